"""Averages under torch.distributed (gloo on 127.0.0.1, CPU): DDP and FSDP2.

Each case runs as separate processes, one per rank, started from this very file (see the
bottom): ``python test_distributed.py CASE RANK WORLD PORT OUTDIR``. A rank writes what it
saw to ``OUTDIR/CASE-RANK.pt`` and the test asserts in the parent, against float64 references
computed here from the live weights the ranks recorded. Processes get ``OMP_NUM_THREADS=1``, a
fresh free port, a deadline, and are killed (their whole process group) if they overrun.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

DEADLINE_S = 120
STEPS = 4
MOMENTUM = 0.3


# -- the harness ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(case: str, world: int, outdir: Path, **params: Any) -> list[dict[str, Any]]:
    """Run ``case`` on ``world`` ranks and return what each rank wrote. A port taken between
    choosing it and binding it (another process on this machine) is retried with a new one."""
    for attempt in range(3):
        failure = _run_world_once(case, world, outdir, params)
        if failure is None:
            return [torch.load(outdir / f"{case}-{r}.pt", weights_only=False) for r in range(world)]
        taken = any(m in failure.lower() for m in ("address already in use", "eaddrinuse"))
        if not taken or attempt == 2:
            pytest.fail(failure)
    raise AssertionError("unreachable")


def _run_world_once(case: str, world: int, outdir: Path, params: dict[str, Any]) -> str | None:
    torch.save(params, outdir / f"{case}-params.pt")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = []
    logs = []
    for rank in range(world):
        log = open(outdir / f"{case}-{rank}.log", "w")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, case, str(rank), str(world), str(port), str(outdir)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    timed_out = False
    try:
        for p in procs:
            p.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    if timed_out:
        return f"{case}: ranks did not finish within {DEADLINE_S} s"
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        text = (outdir / f"{case}-{failed[0]}.log").read_text()[-4000:]
        return f"{case}: rank {failed[0]} exited with {procs[failed[0]].returncode}:\n{text}"
    return None


# -- models and references --------------------------------------------------------------------


def make_net() -> nn.Module:
    """Uneven dims (7 and 3 rows do not divide by 2 or 4) and a BatchNorm."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def batch(rank: int, step: int) -> Tensor:
    return torch.randn(6, 5, generator=torch.Generator().manual_seed(1000 * step + rank))


def ema_reference(snapshots: list[dict[str, Tensor]], momentum: float) -> dict[str, Tensor]:
    """float64 EMA of the parameters: the first snapshot copied, then lerp by ``momentum``."""
    avg = {k: v.double().clone() for k, v in snapshots[0].items()}
    for snap in snapshots[1:]:
        for k in avg:
            avg[k] = (1 - momentum) * avg[k] + momentum * snap[k].double()
    return avg


def assert_close_to(ref: dict[str, Tensor], got: dict[str, Tensor], atol: float = 1e-6) -> None:
    for k, v in ref.items():
        assert k in got, k
        torch.testing.assert_close(got[k].double(), v, atol=atol, rtol=0, msg=k)


# -- the tests --------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_ddp_identical_average_on_every_rank(tmp_path: Path) -> None:
    ranks = run_world("ddp", 2, tmp_path, steps=STEPS)
    r0, r1 = ranks
    # built from DDP(model) or from model: the same, without the `module.` prefix
    assert r0["keys_from_ddp"] == r0["keys_from_plain"]
    assert not any(k.startswith("module.module.") for k in r0["keys_from_ddp"])
    # every rank: the same parameters of the average, bitwise
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    # the live BatchNorm statistics differ between ranks (different data) ...
    assert not torch.equal(r0["buffers_before_sync"]["1.running_mean"], r1["buffers_before_sync"]["1.running_mean"])
    # ... and all_reduce_buffers makes the average's identical: the mean of the two
    for k in ("1.running_mean", "1.running_var"):
        mean = (r0["buffers_before_sync"][k].double() + r1["buffers_before_sync"][k].double()) / 2
        torch.testing.assert_close(r0["buffers"][k].double(), mean, atol=1e-6, rtol=0)
        assert torch.equal(r0["buffers"][k], r1["buffers"][k])
    # against a float64 reference over the live parameters the ranks recorded
    assert_close_to(ema_reference(r0["snapshots"], MOMENTUM), r0["params"])
    # the evaluation with the average swapped in used the averaged weights
    torch.testing.assert_close(r0["eval_out"], r0["eval_expected"], atol=1e-5, rtol=0)
    # written once
    assert sorted(p.name for p in tmp_path.glob("ddp-ema*.pt")) == ["ddp-ema.pt"]


@pytest.mark.timeout(300)
def test_ddp_resume_in_fresh_processes_matches_uninterrupted(tmp_path: Path) -> None:
    whole = run_world("ddp_resume", 2, tmp_path, phase="whole")
    run_world("ddp_resume", 2, tmp_path, phase="first")
    resumed = run_world("ddp_resume", 2, tmp_path, phase="second")
    for r in range(2):
        for k, v in whole[r]["state"].items():
            assert torch.equal(v, resumed[r]["state"][k]), (r, k)


@pytest.mark.timeout(300)
def test_fsdp2_sharded_average(tmp_path: Path) -> None:
    ranks = run_world("fsdp", 2, tmp_path)
    r0, r1 = ranks
    # never a deep copy: DTensors with the model's placements, 1/world of the bytes each
    assert r0["types"] == {"DTensor"}
    for r in ranks:
        assert r["local_bytes"] <= 0.6 * r["full_bytes"], r  # uneven dims: 4 + 3 rows, 2 + 1
    assert r0["local_bytes"] + r1["local_bytes"] == r0["full_bytes"]
    assert "forward" in r0["forward_error"] and "swapped" in r0["forward_error"]
    # the exported full average equals a float64 EMA of the gathered live weights
    ref = ema_reference(r0["snapshots"], MOMENTUM)
    assert_close_to(ref, r0["export"])
    assert r1["export"] is None
    # the safetensors export is the same and loads into the plain model
    from safetensors.torch import load_file

    st = load_file(tmp_path / "fsdp-ema.safetensors")
    assert sorted(st) == sorted(r0["export"])
    for k, v in st.items():
        assert torch.equal(v, r0["export"][k]), k
    plain = make_net()
    plain.load_state_dict(st)
    # evaluation with the average swapped into the sharded model = the plain model with the
    # averaged parameters and the rank's live BatchNorm statistics (update_buffers is False)
    plain.load_state_dict(r0["live_buffers"], strict=False)
    plain.eval()
    torch.testing.assert_close(r0["eval_out"], plain(torch.ones(2, 5)), atol=1e-5, rtol=0)
    # the live weights were restored after the swap
    assert r0["restored"] and r1["restored"]
    # copy_to on the sharded model
    for k, v in r0["after_copy_to"].items():
        torch.testing.assert_close(v.double(), ref[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.timeout(300)
def test_fsdp2_checkpoint_resumes_and_reshards(tmp_path: Path) -> None:
    whole = run_world("fsdp_ckpt", 2, tmp_path, phase="whole")
    run_world("fsdp_ckpt", 2, tmp_path, phase="first")
    resumed = run_world("fsdp_ckpt", 2, tmp_path, phase="second")
    # same world size: continuing from the checkpoint is bitwise the uninterrupted run
    for k, v in whole[0]["export"].items():
        assert torch.equal(v, resumed[0]["export"][k]), k
    # saved with 2 ranks, loaded with 1 (unsharded and FSDP2) and with 4: the same average
    saved = run_world("fsdp_ckpt", 2, tmp_path, phase="export_saved")[0]["export"]
    one = run_world("fsdp_load", 1, tmp_path, sharded=False)[0]["export"]
    one_sharded = run_world("fsdp_load", 1, tmp_path, sharded=True)[0]["export"]
    four = run_world("fsdp_load", 4, tmp_path, sharded=True)[0]["export"]
    for other in (one, one_sharded, four):
        assert sorted(other) == sorted(saved)
        for k, v in saved.items():
            assert torch.equal(v, other[k]), k


@pytest.mark.timeout(300)
def test_fsdp2_partly_replicated_model(tmp_path: Path) -> None:
    """Only the first layer is sharded; the rest stays plain tensors that every rank holds whole
    (and, with nothing syncing their gradients here, trains on its own): each rank averages its
    own, and the export carries rank 0's."""
    r0, r1 = run_world("fsdp_partial", 2, tmp_path)
    assert r0["types"] == {"DTensor", "Parameter"}
    assert_close_to(ema_reference(r0["snapshots"], MOMENTUM), r0["export"])
    ref1 = ema_reference(r1["snapshots"], MOMENTUM)
    for k in ("3.weight", "3.bias"):
        torch.testing.assert_close(r1["replicated"][k].double(), ref1[k], atol=1e-6, rtol=0)


@pytest.mark.timeout(300)
def test_a_failing_writer_reaches_every_rank(tmp_path: Path) -> None:
    """export_full: the writing rank fails in the middle of the stream (its safetensors writer
    raises after two tensors) or at the end (torch.save raises): every rank raises instead of
    waiting in the next gather, no output file is left, and an existing one is kept."""
    old = tmp_path / "kept.safetensors"
    old.write_bytes(b"old contents")
    r0, r1 = run_world("fsdp_export_fails", 2, tmp_path)
    for mode in ("stream", "end"):
        # ENOSPC: the writer says the disk is full (polyak.files.atomic_write)
        assert r0[mode][0] == "FormatError" and "the disk is full" in r0[mode][1], r0[mode]
        assert r1[mode][0] == "RuntimeError" and "rank 0" in r1[mode][1], r1[mode]
    assert not (tmp_path / "new.pt").exists()
    assert old.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file


# -- the ranks ----------------------------------------------------------------------------------


def _init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _params(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _shard(model: nn.Module, world: int, partial: bool = False) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model[0], mesh=mesh)
    if not partial:
        fully_shard(model, mesh=mesh)
    return model


def _full(model: nn.Module) -> dict[str, Tensor]:
    from polyak.tensors import is_dtensor

    return {k: (v.full_tensor() if is_dtensor(v) else v).detach().clone() for k, v in model.named_parameters()}


def case_ddp(rank: int, world: int, outdir: Path, steps: int) -> dict[str, Any]:
    import polyak
    from polyak.distributed import all_reduce_buffers

    model = make_net()
    ddp = nn.parallel.DistributedDataParallel(model)
    ema = polyak.ExponentialMovingAverage(ddp, momentum=MOMENTUM)
    plain_built = polyak.ExponentialMovingAverage(model, momentum=MOMENTUM)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    snapshots = []
    for step in range(steps):
        ddp(batch(rank, step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(ddp)
        snapshots.append(_params(model))
    before = {k: v.clone() for k, v in ema.module.named_buffers()}
    all_reduce_buffers(ema)
    if rank == 0:
        torch.save(ema.state_dict(), outdir / "ddp-ema.pt")
    x = torch.ones(2, 5)
    with ema.swapped(ddp):
        ddp.eval()
        out = ddp(x).detach()
        ddp.train()
    # the average's parameters with the buffers the forward used: the live ones (update_buffers
    # is False), which DDP broadcast from rank 0 at the start of the forward
    expected_model = make_net()
    expected_model.load_state_dict({**dict(ema.module.named_parameters()), **dict(model.named_buffers())})
    expected_model.eval()
    return {
        "keys_from_ddp": list(ema.state_dict()),
        "keys_from_plain": list(plain_built.state_dict()),
        "params": _params(ema.module),
        "buffers_before_sync": before,
        "buffers": {k: v.clone() for k, v in ema.module.named_buffers()},
        "snapshots": snapshots,
        "eval_out": out,
        "eval_expected": expected_model(x).detach(),
    }


def case_ddp_resume(rank: int, world: int, outdir: Path, phase: str) -> dict[str, Any]:
    import polyak

    model = make_net()
    ddp = nn.parallel.DistributedDataParallel(model)
    ema = polyak.ExponentialMovingAverage(ddp, momentum=MOMENTUM, interval=2)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    first, last = {"whole": (0, 6), "first": (0, 3), "second": (3, 6)}[phase]
    if phase == "second":
        state = torch.load(outdir / "ddp-resume.pt", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
    for step in range(first, last):
        ddp(batch(rank, step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(ddp)
    if phase == "first" and rank == 0:
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict()}, outdir / "ddp-resume.pt"
        )
    import torch.distributed as dist

    dist.barrier()
    return {"state": {k: v.clone() for k, v in ema.state_dict().items()}}


def _train_fsdp(model: nn.Module, ema: Any, rank: int, steps: range, snapshots: list | None = None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in steps:
        model(batch(rank, step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(model)
        if snapshots is not None:
            snapshots.append(_full(model))


def case_fsdp(rank: int, world: int, outdir: Path) -> dict[str, Any]:
    import polyak
    from polyak.distributed import export_full
    from polyak.tensors import is_dtensor, local

    model = _shard(make_net(), world)
    ema = polyak.ExponentialMovingAverage(model, momentum=MOMENTUM)
    snapshots: list[dict[str, Tensor]] = []
    _train_fsdp(model, ema, rank, range(STEPS), snapshots)
    params = list(ema.module.parameters())
    full_bytes = sum(p.numel() * p.element_size() for p in params)
    local_bytes = sum(local(p).numel() * local(p).element_size() for p in params)
    try:
        ema(torch.ones(2, 5))
        forward_error = ""
    except RuntimeError as e:
        forward_error = str(e)
    live_before = _full(model)
    with ema.swapped(model):
        model.eval()
        out = model(torch.ones(2, 5)).detach()
        model.train()
    live_after = _full(model)
    live_buffers = {k: v.clone() for k, v in model.named_buffers()}
    export = export_full(ema)
    export_full(ema, outdir / "fsdp-ema.safetensors")
    ema.copy_to(model)
    return {
        "types": {type(p).__name__ for p in params},
        "full_bytes": full_bytes,
        "local_bytes": local_bytes,
        "forward_error": forward_error,
        "snapshots": snapshots,
        "export": export,
        "eval_out": out,
        "live_buffers": live_buffers,
        "restored": all(torch.equal(live_before[k], live_after[k]) for k in live_before),
        "after_copy_to": _full(model),
        "sharded": all(is_dtensor(p) for p in model.parameters()),
    }


def case_fsdp_ckpt(rank: int, world: int, outdir: Path, phase: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    import polyak
    from polyak import distributed as pd

    model = _shard(make_net(), world)
    ema = polyak.ExponentialMovingAverage(model, momentum=MOMENTUM, interval=2)
    if phase == "export_saved":
        pd.load(ema, outdir / "fsdp-ckpt-ema")
        return {"export": pd.export_full(ema)}
    first, last = {"whole": (0, 6), "first": (0, 3), "second": (3, 6)}[phase]
    if phase == "second":
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=outdir / "fsdp-ckpt-model")
        model.load_state_dict(state["model"])
        pd.load(ema, outdir / "fsdp-ckpt-ema")
    # Every rank sees the same batches here, so that the live BatchNorm statistics (plain
    # tensors, which DCP writes from one rank) are the same on every rank, as DCP assumes.
    _train_fsdp(model, ema, 0, range(first, last))
    if phase == "first":
        dcp.save({"model": model.state_dict()}, checkpoint_id=outdir / "fsdp-ckpt-model")
        pd.save(ema, outdir / "fsdp-ckpt-ema")
    return {"export": pd.export_full(ema)}


def case_fsdp_load(rank: int, world: int, outdir: Path, sharded: bool) -> dict[str, Any]:
    import polyak
    from polyak import distributed as pd

    model = _shard(make_net(), world) if sharded else make_net()
    ema = polyak.ExponentialMovingAverage(model, momentum=MOMENTUM, interval=2)
    pd.load(ema, outdir / "fsdp-ckpt-ema")
    return {"export": pd.export_full(ema)}


def case_fsdp_partial(rank: int, world: int, outdir: Path) -> dict[str, Any]:
    import polyak
    from polyak.distributed import export_full

    model = _shard(make_net(), world, partial=True)
    ema = polyak.ExponentialMovingAverage(model, momentum=MOMENTUM)
    snapshots: list[dict[str, Tensor]] = []
    _train_fsdp(model, ema, rank, range(STEPS), snapshots)
    return {
        "types": {type(p).__name__ for p in ema.module.parameters()},
        "snapshots": snapshots,
        "export": export_full(ema),
        "replicated": {k: v.detach().clone() for k, v in ema.module.named_parameters() if k.startswith("3.")},
    }


def case_fsdp_export_fails(rank: int, world: int, outdir: Path) -> dict[str, Any]:
    import polyak
    import polyak.distributed as pd

    model = _shard(make_net(), world)
    ema = polyak.ExponentialMovingAverage(model, momentum=MOMENTUM)
    _train_fsdp(model, ema, rank, range(2))
    real = pd.write_safetensors

    def fails_after_two(path: Any, layout: Any, tensors: Any, metadata: Any = None) -> None:
        def two() -> Any:
            for i, item in enumerate(tensors):
                if i == 2:
                    raise OSError(28, "No space left on device (injected)")
                yield item

        real(path, layout, two(), metadata)

    def save_fails(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device (injected)")

    out: dict[str, Any] = {}
    for mode, target, patch in (
        ("stream", outdir / "kept.safetensors", ("write_safetensors", fails_after_two)),
        ("end", outdir / "new.pt", ("torch_save", save_fails)),
    ):
        if rank == 0 and patch[0] == "write_safetensors":
            pd.write_safetensors = patch[1]
        saved = torch.save
        if rank == 0 and patch[0] == "torch_save":
            torch.save = patch[1]
        try:
            pd.export_full(ema, target)
            out[mode] = ("none", "")
        except Exception as e:
            out[mode] = (type(e).__name__, e.strerror if isinstance(e, OSError) else str(e))
        finally:
            pd.write_safetensors = real
            torch.save = saved
    return out


def main() -> None:
    case, rank, world, port, outdir = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        Path(sys.argv[5]),
    )
    params = torch.load(outdir / f"{case}-params.pt", weights_only=False)
    _init(rank, world, port)
    import torch.distributed as dist

    try:
        result = globals()[f"case_{case}"](rank, world, outdir, **params)
        torch.save(result, outdir / f"{case}-{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
