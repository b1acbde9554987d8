"""Draw docs/figures/posthoc-profiles.png: what post-hoc EMA reconstructs.

Left: the weight each past step receives in the power-function average at step 1000
(:func:`polyak.posthoc.power_function_response`) for the two tracked profiles,
sigma_rel 0.05 and 0.10, and for sigma_rel 0.07, which was not tracked; dashed, the 0.07 profile
as the least-squares combination of the 20 snapshots (0.05 and 0.10 every 100 steps) that
:func:`polyak.posthoc.synthesize` would use. Right: the coefficients of those snapshots.

Run: ``python docs/figures/make_posthoc_figure.py`` (matplotlib; a few seconds on a CPU).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from polyak.posthoc import power_function_response, solve_coefficients
from polyak.schedules import sigma_rel_to_gamma

AT_STEP = 1000
EVERY = 100
TRACKED = (0.05, 0.10)
TARGET = 0.07
OUT = Path(__file__).with_name("posthoc-profiles.png")


def main() -> None:
    steps = torch.arange(AT_STEP)
    # the snapshots: each tracked profile every EVERY steps, as PostHocEMA writes them
    snaps = [(t, s) for t in range(EVERY, AT_STEP + 1, EVERY) for s in TRACKED]
    gammas = [sigma_rel_to_gamma(s) for _, s in snaps]
    coef, report = solve_coefficients([t for t, _ in snaps], gammas, AT_STEP, sigma_rel_to_gamma(TARGET))
    recon = torch.zeros(AT_STEP, dtype=torch.float64)
    for (t, _), g, c in zip(snaps, gammas, coef.tolist(), strict=True):
        recon[:t] += c * power_function_response(g, t)

    fig, (left, right) = plt.subplots(1, 2, figsize=(8.0, 3.0), gridspec_kw={"width_ratios": [1.6, 1]})
    for s, color in zip(TRACKED, ("tab:blue", "tab:orange"), strict=True):
        w = power_function_response(sigma_rel_to_gamma(s), AT_STEP)
        left.plot(steps, w, color=color, lw=1.2, label=f"tracked σ_rel={s:.2f}")
    target = power_function_response(sigma_rel_to_gamma(TARGET), AT_STEP)
    left.plot(steps, target, color="black", lw=1.2, label=f"wanted σ_rel={TARGET:.2f}")
    label = f"synthesized (error {report['relative_error']:.1e})"
    left.plot(steps, recon, color="tab:red", lw=1.2, ls="--", label=label)
    left.set_xlim(400, AT_STEP)
    left.set_xlabel("training step τ")
    left.set_ylabel(f"weight of step τ at step {AT_STEP}")
    left.legend(fontsize=7, frameon=False, loc="upper left")

    for s, color, offset in zip(TRACKED, ("tab:blue", "tab:orange"), (-8, 8), strict=True):
        idx = [i for i, (_, si) in enumerate(snaps) if si == s]
        right.bar([snaps[i][0] + offset for i in idx], coef[idx].numpy(), width=16, color=color, label=f"σ_rel={s:.2f}")
    right.axhline(0, color="gray", lw=0.5)
    right.set_xlim(550, AT_STEP + 50)  # the earlier coefficients are below 1e-4
    right.set_xlabel("snapshot step")
    right.set_ylabel("coefficient")
    right.set_title(f"coefficients (sum {float(coef.sum()):.3f})", fontsize=8)
    right.legend(fontsize=7, frameon=False)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KiB); profile error {report['relative_error']:.2e}")


if __name__ == "__main__":
    main()
