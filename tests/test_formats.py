"""Reading checkpoints (polyak.files, polyak.cli.formats): safe loading, and the averages other libraries save.

Every foreign format is produced by the library itself where it is installed (torch
``AveragedModel``, torch_ema, diffusers ``EMAModel``, ema-pytorch, mmengine's ``EMAHook`` in a
tiny real ``Runner``, Lightning's ``EMAWeightAveraging`` in a tiny ``Trainer.fit``), converted
with ``polyak convert``, and the converted weights compared with the library's own EMA weights
(exactly: conversion copies tensors). timm and mmcv 1.x are not installed: their layouts are
built by hand from their saving code (said at each test). The malicious-pickle tests show that
nothing in a file runs while the tensors beside it are still read.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import polyak
from polyak import checkpoint as ck
from polyak import files
from polyak.cli import formats, main
from polyak.schedules import MMCVWarmup, NumUpdatesWarmup, StartAt, Warmup, schedule_from_dict


class Net(nn.Module):
    """Linear + BatchNorm + Linear: parameters, float buffers and an int64 buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 8)
        self.bn = nn.BatchNorm1d(8)
        self.lin2 = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(torch.relu(self.bn(self.lin1(x))))


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


@torch.no_grad()
def train(model: nn.Module, i: int) -> None:
    """A stand-in for an optimizer step: move every parameter, and run a train-mode forward
    so the BatchNorm statistics and ``num_batches_tracked`` change."""
    g = torch.Generator().manual_seed(100 + i)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g), alpha=0.1)
    model.train()
    model(torch.randn(6, 4, generator=g))


def clone(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


def assert_same(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    assert list(got) == list(want) or set(got) == set(want), (sorted(got), sorted(want))
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def convert(src: Path, out: Path, *extra: str) -> dict:
    code = main(["convert", str(src), "-o", str(out), "-q", *extra])
    assert code == 0
    state = torch.load(out, weights_only=True)  # the output needs no unsafe load
    assert ck.has_averages(state)
    return state


def record(state: dict) -> dict:
    meta = state["polyak"]
    return meta["averages"][meta["primary"]]


# -- safe loading ----------------------------------------------------------------------------------


class Payload:
    """Pickles as a call of ``func(*args)``: what a malicious checkpoint does."""

    def __init__(self, func: Callable, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _evil_checkpoint(path: Path, marker: Path, *, legacy: bool = False) -> dict[str, Tensor]:
    weights = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(7)}
    payload = {
        "state_dict": weights,
        "system": Payload(os.system, f"touch {marker}"),
        "eval": Payload(eval, f"open({str(marker)!r}, 'w').write('x')"),
        "nested": [Payload(getattr, Payload(__import__, "os"), "system")],
    }
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return weights


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_pickle_runs_nothing_and_tensors_are_read(tmp_path: Path, legacy: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    weights = _evil_checkpoint(path, marker, legacy=legacy)
    with pytest.raises(pickle.UnpicklingError):  # what torch's weights_only loader says
        torch.load(path, weights_only=True)
    loaded = files.load(path)
    assert not marker.exists()
    assert loaded.loader == "restricted"
    assert {"builtins.eval", "builtins.getattr"} <= set(loaded.replaced)
    assert any(k.endswith(".system") for k in loaded.replaced)  # posix.system
    assert isinstance(loaded.obj["system"], files.Opaque)
    assert_same(loaded.obj["state_dict"], weights)
    # and through the command line: inspect and average read it, nothing runs
    assert main(["inspect", str(path), "-q"]) == 0
    copy = tmp_path / "copy.pt"
    shutil.copy(path, copy)
    assert main(["average", str(path), str(copy), "-o", str(tmp_path / "a.safetensors"), "-q"]) == 0
    assert_same(files.load(tmp_path / "a.safetensors").obj, weights)
    assert main(["export", str(path), "-o", str(tmp_path / "e.pt"), "-q"]) == 1  # a plain state dict
    assert not marker.exists()


def test_unsafe_really_unpickles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The payload of the test above is live: --unsafe (with its warning) runs it."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _evil_checkpoint(path, marker)
    assert main(["inspect", str(path), "--unsafe", "--json"]) == 0
    assert marker.exists()
    assert "--unsafe" in capsys.readouterr().err


def test_plain_checkpoint_loads_with_nothing_replaced(tmp_path: Path) -> None:
    """Every .pt file goes through polyak's restricted unpickler (torch's weights_only list,
    guarded: issue 11); a plain state dict has nothing to replace."""
    path = tmp_path / "plain.pt"
    torch.save(make_net().state_dict(), path)
    loaded = files.load(path)
    assert loaded.loader == "restricted" and not loaded.replaced
    assert files.is_state_dict(loaded.obj)


def test_sniff_is_by_content_not_suffix(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "weights.bin"))
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.safetensors")
    assert files.sniff(tmp_path / "weights.bin") == "safetensors"
    assert files.sniff(tmp_path / "weights.safetensors") == "zip"
    assert torch.equal(files.load(tmp_path / "weights.safetensors").obj["w"], torch.ones(2))


def test_damaged_files_are_one_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save(make_net().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(files.FormatError, match="corrupt"):
        files.load(path)
    (tmp_path / "noise.pt").write_bytes(os.urandom(256))
    with pytest.raises(files.FormatError):
        files.load(tmp_path / "noise.pt")
    with pytest.raises(files.FormatError, match="no such file"):
        files.load(tmp_path / "missing.pt")


# -- polyak's own format -------------------------------------------------------------------------


def test_pack_state_output_resumes_into_a_polyak_average(tmp_path: Path) -> None:
    model = make_net()
    ema = polyak.ExponentialMovingAverage(model, momentum=0.2)
    for i in range(4):
        train(model, i)
        ema.update_parameters(model)
    rec = ck.record(ema, weights=False)
    state = ck.pack_state({}, ema.averaged_state_dict(), {"ema": rec}, live=model.state_dict())
    state = torch.load(_save(state, tmp_path / "s.pt"), weights_only=True)
    again = polyak.ExponentialMovingAverage(make_net(1), momentum=0.2)
    live, missing = ck.unpack(state, {"ema": again})
    assert not missing and again.steps == 4
    assert_same(clone(again.module.state_dict()), clone(ema.module.state_dict()))
    assert_same(live, clone(model.state_dict()))
    assert record(state)["dtype"] == "float32"


def test_hugging_face_averaging_state_takes_the_primary_from_model_safetensors(tmp_path: Path) -> None:
    """polyak's Trainer integration leaves the primary average out of polyak_averages.pt when
    the checkpoint directory's model.safetensors holds it: export reads it from there."""
    from safetensors.torch import save_file

    model = make_net()
    ema = polyak.ExponentialMovingAverage(model, momentum=0.3)
    for i in range(3):
        train(model, i)
        ema.update_parameters(model)
    state = ck.pack({}, {"ema": ema}, weights_key="model.safetensors", live=model.state_dict())
    weights = state.pop("model.safetensors")
    save_file({k: v.clone() for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    torch.save(state, tmp_path / "polyak_averages.pt")
    out = tmp_path / "ema.pt"
    assert main(["export", str(tmp_path / "polyak_averages.pt"), "-o", str(out), "-q"]) == 0
    assert_same(torch.load(out, weights_only=True)["state_dict"], clone(ema.module.state_dict()))


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_detection_failure_lists_the_formats_tried(tmp_path: Path) -> None:
    path = _save(make_net().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(files.FormatError) as e:
        formats.detect(files.load(path))
    assert "plain state dict" in str(e.value)
    for name in formats.FORMATS:
        assert name in str(e.value)


# -- foreign formats, made by the libraries ----------------------------------------------------------


def test_torch_averaged_model(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = make_net()
    swa = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for i in range(5):
        train(model, i)
        swa.update_parameters(model)
    want = clone(swa.module.state_dict())
    # nested beside the model: the live weights are found too
    src = _save({"model": model.state_dict(), "swa": swa.state_dict()}, tmp_path / "run.pt")
    state = convert(src, tmp_path / "out.pt")
    assert_same(state["state_dict"], want)
    assert_same(state["live_state_dict"], clone(model.state_dict()))
    rec = record(state)
    assert rec["class"] == "AveragedModel" and rec["counters"] == {"n_averaged": 5} and rec["steps"] == 5
    # alone, with the decay it does not save given on the command line
    src = _save(swa.state_dict(), tmp_path / "swa.pt")
    state = convert(src, tmp_path / "out2.pt", "--decay", "0.9")
    assert_same(state["state_dict"], want)
    assert "live_state_dict" not in state
    assert schedule_from_dict(record(state)["schedule"]).decay(3) == pytest.approx(0.9)


def _torch_ema_run(tmp_path: Path) -> tuple[Net, object]:
    from torch_ema import ExponentialMovingAverage

    model = make_net()
    ema = ExponentialMovingAverage(model.parameters(), decay=0.9)
    for i in range(6):
        train(model, i)
        ema.update(model.parameters())
    return model, ema


def test_torch_ema_by_position_and_resume(tmp_path: Path) -> None:
    model, ema = _torch_ema_run(tmp_path)
    with ema.average_parameters(model.parameters()):  # torch_ema's own averaged model
        want = clone(model.state_dict())
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    # the names are needed, and the error says so
    assert main(["convert", str(tmp_path / "ema.pt"), "-o", str(tmp_path / "x.pt"), "-q"]) == 1
    assert not (tmp_path / "x.pt").exists()
    state = convert(tmp_path / "ema.pt", tmp_path / "out.pt", "--names-from", str(tmp_path / "model.pt"))
    assert_same(state["state_dict"], want)
    rec = record(state)
    assert schedule_from_dict(rec["schedule"]) == NumUpdatesWarmup(0.9)
    assert rec["steps"] == ema.num_updates + 1 == 7  # polyak counts the initial copy
    # resume in polyak and continue side by side with torch_ema: same numbers
    avg = polyak.AveragedModel(make_net(3), schedule=NumUpdatesWarmup(0.9))
    live, _ = ck.unpack(state, {"ema": avg})
    assert_same(live, clone(model.state_dict()))
    for i in range(6, 9):
        train(model, i)
        ema.update(model.parameters())
        avg.update_parameters(model)
    for name, shadow in zip([n for n, _ in model.named_parameters()], ema.shadow_params, strict=True):
        torch.testing.assert_close(avg.module.state_dict()[name], shadow, rtol=1e-6, atol=1e-7)
    # nested beside the model: names found without --names-from
    torch.save({"model": model.state_dict(), "ema": ema.state_dict()}, tmp_path / "both.pt")
    with ema.average_parameters(model.parameters()):
        want = clone(model.state_dict())
    state = convert(tmp_path / "both.pt", tmp_path / "out2.pt")
    assert_same(state["state_dict"], want)


@pytest.mark.parametrize("warmup", [True, False], ids=["ema_warmup", "num_updates"])
def test_diffusers_ema_model_and_resume(tmp_path: Path, warmup: bool) -> None:
    from diffusers.training_utils import EMAModel

    model = make_net()
    ema = EMAModel(model.parameters(), decay=0.95, use_ema_warmup=warmup, power=0.75, update_after_step=2)
    for i in range(7):
        train(model, i)
        ema.step(model.parameters())
    live = clone(model.state_dict())
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    want = clone(model.state_dict())
    ema.restore(model.parameters())
    torch.save({"ema": ema.state_dict(), "unet": model.state_dict()}, tmp_path / "ckpt.pt")
    state = convert(tmp_path / "ckpt.pt", tmp_path / "out.pt")
    assert_same(state["state_dict"], want)
    assert_same(state["live_state_dict"], live)
    rec = record(state)
    sched = schedule_from_dict(rec["schedule"])
    assert isinstance(sched, Warmup if warmup else StartAt)
    assert rec["steps"] == ema.optimization_step + 1
    # polyak continues with diffusers' numbers
    avg = polyak.AveragedModel(make_net(3), schedule=sched)
    ck.unpack(state, {"ema": avg})
    for i in range(7, 10):
        train(model, i)
        ema.step(model.parameters())
        avg.update_parameters(model)
    for name, shadow in zip([n for n, _ in model.named_parameters()], ema.shadow_params, strict=True):
        torch.testing.assert_close(avg.module.state_dict()[name], shadow, rtol=1e-6, atol=1e-7)


def test_ema_pytorch(tmp_path: Path) -> None:
    from ema_pytorch import EMA

    model = make_net()
    ema = EMA(model, beta=0.9, update_after_step=0, update_every=1)
    for i in range(5):
        train(model, i)
        ema.update()
    torch.save(ema.state_dict(), tmp_path / "ema.pt")
    state = convert(tmp_path / "ema.pt", tmp_path / "out.pt")
    assert_same(state["state_dict"], clone(ema.ema_model.state_dict()))
    assert_same(state["live_state_dict"], clone(model.state_dict()))
    assert record(state)["steps"] == int(ema.step)


def test_mmengine_ema_hook_in_a_real_runner(tmp_path: Path) -> None:
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Model(BaseModel):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = Net()

        def forward(self, x: Tensor, y: Tensor | None = None, mode: str = "tensor") -> object:
            out = self.net(x)
            return {"loss": ((out - y) ** 2).mean()} if mode == "loss" else out

    class Data(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 24

        def __getitem__(self, i: int) -> dict[str, Tensor]:
            g = torch.Generator().manual_seed(i)
            return {"x": torch.randn(4, generator=g), "y": torch.randn(3, generator=g)}

    hook = {"type": "EMAHook", "momentum": 0.1}
    runner = Runner(
        model=Model(),
        work_dir=str(tmp_path / "work"),
        train_dataloader={
            "dataset": Data(),
            "sampler": {"type": "DefaultSampler", "shuffle": False},
            "batch_size": 4,
            "collate_fn": {"type": "default_collate"},
        },
        optim_wrapper={"optimizer": {"type": "SGD", "lr": 0.1}},
        train_cfg={"by_epoch": False, "max_iters": 6, "val_interval": 100},
        custom_hooks=[hook],
        default_hooks={"checkpoint": {"type": "CheckpointHook", "interval": 6, "by_epoch": False}},
        cfg={"custom_hooks": [hook]},  # what a config file gives: saved as meta.cfg
        log_level="ERROR",
        visualizer={"type": "Visualizer", "vis_backends": []},
    )
    runner.train()
    ema_hook = next(h for h in runner.hooks if type(h).__name__ == "EMAHook")
    path = tmp_path / "work" / "iter_6.pth"
    loaded = files.load(path)
    # message_hub holds mmengine's classes: the restricted unpickler reads them as placeholders,
    # unless polyak.integrations.mmengine has allow-listed them in this process (process-wide
    # state that other tests change)
    assert loaded.loader in ("restricted", "weights_only")
    state = convert(path, tmp_path / "out.pt")
    assert_same(state["state_dict"], clone(ema_hook.ema_model.module.state_dict()))
    assert_same(state["live_state_dict"], clone(runner.model.state_dict()))
    rec = record(state)
    assert rec["class"] == "ExponentialMovingAverage"
    assert rec["schedule"] == {"type": "ConstantMomentum", "args": {"momentum": 0.1}}
    assert rec["steps"] == int(ema_hook.ema_model.steps) == 6
    # polyak's ExponentialMovingAverage resumes from it
    avg = polyak.ExponentialMovingAverage(Model(), momentum=0.1, compensate_interval=False)
    ck.unpack(state, {"ema": avg})
    assert avg.steps == 6
    assert_same(clone(avg.module.state_dict()), clone(ema_hook.ema_model.module.state_dict()))


def test_lightning_ema_weight_averaging_in_a_real_trainer(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = Net()

        def training_step(self, batch: list[Tensor], i: int) -> Tensor:
            x, y = batch
            return ((self.net(x) - y) ** 2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(24, 4, generator=g), torch.randn(24, 3, generator=g))
    callback = EMAWeightAveraging(decay=0.9)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=6, save_top_k=-1, filename="last")
    trainer = pl.Trainer(
        max_steps=6,
        callbacks=[callback, saver],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=4))
    path = tmp_path / "last.ckpt"
    saved = torch.load(path, weights_only=True)
    state = convert(path, tmp_path / "out.pt")
    assert_same(state["state_dict"], clone(callback._average_model.module.state_dict()))
    assert_same(state["live_state_dict"], saved["current_model_state"])
    rec = record(state)
    assert rec["class"] == "AveragedModel"
    assert rec["counters"] == {"n_averaged": int(callback._average_model.n_averaged)} and rec["steps"] == 6


# -- foreign formats built by hand (the library is not installed) ---------------------------------


def test_timm_state_dict_ema_by_hand(tmp_path: Path) -> None:
    """timm is not installed: the layout is that of timm's ``CheckpointSaver`` (``state_dict``
    = the live model, ``state_dict_ema`` = ``get_state_dict(model_ema)``, unwrapped; old
    ``ModelEma`` under DDP left a ``module.`` prefix, accepted too)."""
    model, ema_model = make_net(0), make_net(1)
    train(model, 0)
    ema = {"module." + k: v for k, v in clone(ema_model.state_dict()).items()}
    src = _save(
        {"epoch": 3, "arch": "net", "state_dict": model.state_dict(), "state_dict_ema": ema}, tmp_path / "t.pth"
    )
    state = convert(src, tmp_path / "out.pt")
    assert_same(state["state_dict"], clone(ema_model.state_dict()))
    assert_same(state["live_state_dict"], clone(model.state_dict()))
    assert record(state)["schedule"] is None and "steps" not in record(state)


def test_mmcv_ema_buffers_by_hand(tmp_path: Path) -> None:
    """mmcv 1.x is not installed: this runs the update of mmcv's ``EMAHook``
    (mmcv/runner/hooks/ema.py): a buffer ``ema_<name with . as _>`` registered on the model for
    every parameter, ``buf.mul_(1 - m).add_(m * param)`` after each iteration, saved inside the
    model's ``state_dict`` with ``meta.iter`` and the config text in ``meta.config``."""
    model = make_net()
    names = {}
    for name, p in model.named_parameters():
        names[name] = "ema_" + name.replace(".", "_")
        model.register_buffer(names[name], p.data.clone())
    momentum = 0.1
    for i in range(5):
        train(model, i)
        m = min(momentum, (1 + i) / (100 + i))
        bufs = dict(model.named_buffers())
        for name, p in model.named_parameters():
            bufs[names[name]].mul_(1 - m).add_(p.data, alpha=m)
    sd = model.state_dict()
    config = "custom_hooks = [dict(type='EMAHook', momentum=0.1, interval=1, warm_up=100, priority=49)]\n"
    src = _save({"meta": {"iter": 5, "epoch": 1, "config": config}, "state_dict": sd}, tmp_path / "mmcv.pth")
    state = convert(src, tmp_path / "out.pt")
    want = {k: v for k, v in clone(sd).items() if not k.startswith("ema_")}
    for name in names:
        want[name] = sd[names[name]]
    assert_same(state["state_dict"], want)
    assert not any(k.startswith("ema_") for k in state["live_state_dict"])
    rec = record(state)
    assert schedule_from_dict(rec["schedule"]) == MMCVWarmup(0.1, warm_up=100) and rec["steps"] == 5


# -- naming tensors by position ---------------------------------------------------------------------


def test_match_by_position_checks_shapes_and_counts() -> None:
    named = clone(make_net().state_dict())
    shadows = [t.clone() for k, t in named.items() if "running" not in k and "num_batches" not in k]
    out = formats.match_by_position(shadows, named)
    assert list(out) == ["lin1.weight", "lin1.bias", "bn.weight", "bn.bias", "lin2.weight", "lin2.bias"]
    swapped = [shadows[1], shadows[0], *shadows[2:]]
    with pytest.raises(files.FormatError, match=r"shadow\[0\] has shape \(8,\) but parameter 0 .*'lin1.weight'"):
        formats.match_by_position(swapped, named)
    with pytest.raises(files.FormatError, match="holds 5 tensors but the names have 6 parameters"):
        formats.match_by_position(shadows[:5], named)
    # an extra floating buffer must be named
    named_extra = {**named, "scale": torch.ones(3)}
    with pytest.raises(files.FormatError, match="--buffer-names"):
        formats.match_by_position(shadows, named_extra)
    assert len(formats.match_by_position(shadows, named_extra, buffer_names=["sca*"])) == 6


def test_match_by_position_tied_weights() -> None:
    emb = nn.Embedding(5, 4)
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight  # tied: parameters() yields it once, state_dict() twice
    model = nn.ModuleDict({"emb": emb, "head": head})
    buf = io_roundtrip(model.state_dict())
    shadows = [p.detach() * 2 for p in model.parameters()]
    out = formats.match_by_position(shadows, buf)
    assert set(out) == {"emb.weight", "head.weight"}
    assert torch.equal(out["head.weight"], shadows[0])


def io_roundtrip(obj: object) -> dict[str, Tensor]:
    import io

    b = io.BytesIO()
    torch.save(obj, b)
    b.seek(0)
    return torch.load(b, weights_only=True)
