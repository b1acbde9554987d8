"""The framework-free ``EMAHook`` on a hand-written runner, and ``OptimizerStepCounter``.

The runner here is written for these tests: mmcv 1.x's ``EpochBasedRunner`` loop, reduced to
what the hook sees (``.model``, ``.optimizer``, ``.iter``, ``.epoch``, ``.max_iters``, hooks
called in mmcv's order: ``before_run``, then per epoch ``before_train_epoch``, per iteration
``before_train_iter`` / the step / ``after_train_iter``, ``after_train_epoch`` (where mmcv's
``EvalHook`` and ``CheckpointHook`` run, after the EMA hook), and ``after_run``), plus
mmengine's validation and checkpoint calls. No real mmcv 1.x runner installs beside torch 2.13:
mmcv 1.x's runner imports torchvision (``mmcv/runner/checkpoint.py``), and mmcv 1.x (last
release 1.7.2) predates torch 2. The mmengine ``Runner`` is tested for real in
``tests/integrations/test_mmengine.py``.

Every expected average is computed here in float64 from the live weights recorded after each
iteration, with the formulas written out in this file; the hook's float32 average is compared to
it with an absolute and relative tolerance of 1e-6 (float32 rounding). Runs that should be the
same (a resumed run and an uninterrupted one) are compared bitwise.
"""

from __future__ import annotations

import math
import types
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from polyak.hooks import EMAHook, OptimizerStepCounter, find_optimizers

PARAMS = ("lin1.weight", "lin1.bias", "bn.weight", "bn.bias", "lin2.weight", "lin2.bias")
FLOAT_BUFFERS = ("bn.running_mean", "bn.running_var")
TOL = {"rtol": 1e-6, "atol": 1e-6}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.lin2 = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin2(torch.relu(self.bn(self.lin1(x))))


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


_g = torch.Generator().manual_seed(123)
DATA = [(torch.randn(5, 3, generator=_g), torch.randn(5, 1, generator=_g)) for _ in range(16)]


def as64(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A copy of ``state``, floating tensors widened to float64 (exactly)."""
    return {k: (v.detach().double() if v.is_floating_point() else v.detach()).clone() for k, v in state.items()}


def snapshot64(model: nn.Module) -> dict[str, Tensor]:
    return as64(model.state_dict())


def compensated(momentum: Callable[[int], float], s: int, k: int) -> float:
    """1 - prod_{j=s-k+1}^{s} (1 - m(j)): the momentum of an update standing for k steps."""
    return 1.0 - math.prod(1.0 - momentum(j) for j in range(s - k + 1, s + 1))


def reference_average(
    states: list[dict[str, Tensor]],
    momentum: Callable[[int], float],
    *,
    interval: int = 1,
    averaged: tuple[str, ...] = PARAMS,
) -> dict[str, Tensor]:
    """polyak's rule in float64: the call with steps s == 0 copies; a call with s % interval == 0
    averages the ``averaged`` tensors with ``momentum(s)``; every call copies the others."""
    avg: dict[str, Tensor] = {}
    for s, state in enumerate(states):
        for k, v in state.items():
            if s == 0 or k not in averaged:
                avg[k] = v.clone()
            elif s % interval == 0:
                m = momentum(s)
                avg[k] = (1.0 - m) * avg[k] + m * v
    return avg


def assert_state_close(actual: dict[str, Tensor], expected: dict[str, Tensor], keys=None) -> None:
    for k in keys or expected:
        a, e = actual[k], expected[k]
        if e.is_floating_point():
            torch.testing.assert_close(a.detach().double(), e, **TOL, msg=lambda m, k=k: f"{k}: {m}")
        else:
            assert torch.equal(a, e), k


def assert_state_equal(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for k in expected:
        assert torch.equal(actual[k].detach().to(expected[k].dtype), expected[k]), k


# --------------------------------------------------------------------------------------------
# the hand-written runner


class MiniRunner:
    """mmcv 1.x's ``EpochBasedRunner`` loop with mmengine's validation and checkpoint calls."""

    def __init__(
        self,
        model: nn.Module,
        hooks: list,
        *,
        max_epochs: int = 1,
        iters_per_epoch: int = 6,
        optimizer: torch.optim.Optimizer | None = None,
        step: Callable[[MiniRunner], None] | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.hooks = list(hooks)
        self.max_epochs = max_epochs
        self.iters_per_epoch = iters_per_epoch
        self.max_iters = max_epochs * iters_per_epoch
        self.epoch = 0
        self.iter = 0
        self.step = step or sgd_step

    def call(self, name: str, **kwargs) -> None:
        for hook in self.hooks:
            fn = getattr(hook, name, None)
            if fn is not None:
                fn(self, **kwargs)

    def run(self, resume: str | None = None) -> None:
        self.call("before_run")
        if resume is not None:
            self.resume(resume)
        while self.epoch < self.max_epochs:
            self.call("before_train_epoch")
            for i in range(self.iter - self.epoch * self.iters_per_epoch, self.iters_per_epoch):
                self.call("before_train_iter", batch_idx=i)
                self.step(self)
                self.call("after_train_iter", batch_idx=i)
                self.iter += 1
            self.call("after_train_epoch")
            self.epoch += 1
        self.call("after_run")

    def validate(self, evaluate: Callable[[nn.Module], dict]) -> dict:
        self.call("before_val_epoch")
        metrics = evaluate(self.model)
        self.call("after_val_epoch", metrics=metrics)
        return metrics

    def save_checkpoint(self, path) -> dict:
        # The weights alias the model's tensors, as mmengine's on the CPU (weights_to_cpu).
        checkpoint = {
            "meta": {"epoch": self.epoch, "iter": self.iter + 1},
            "state_dict": dict(self.model.state_dict()),
        }
        if self.optimizer is not None:
            checkpoint["optimizer"] = self.optimizer.state_dict()
        self.call("before_save_checkpoint", checkpoint=checkpoint)
        torch.save(checkpoint, path)
        return checkpoint

    def resume(self, path) -> None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        self.call("after_load_checkpoint", checkpoint=checkpoint)
        self.model.load_state_dict(checkpoint["state_dict"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.iter = checkpoint["meta"]["iter"]
        self.epoch = self.iter // self.iters_per_epoch


def sgd_step(runner: MiniRunner) -> None:
    x, y = DATA[runner.iter % len(DATA)]
    runner.model.train()
    loss = ((runner.model(x) - y) ** 2).mean()
    runner.optimizer.zero_grad()
    loss.backward()
    runner.optimizer.step()


def make_runner(hooks: list, seed: int = 0, **kwargs) -> MiniRunner:
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return MiniRunner(model, hooks, optimizer=opt, **kwargs)


class Recorder:
    """Records the live state after every iteration, and the state each iteration starts from."""

    def __init__(self) -> None:
        self.after: dict[int, dict[str, Tensor]] = {}
        self.before: dict[int, dict[str, Tensor]] = {}

    def before_train_iter(self, runner, batch_idx=0):
        self.before[runner.iter] = snapshot64(runner.model)

    def after_train_iter(self, runner, batch_idx=0, data_batch=None, outputs=None):
        self.after[runner.iter] = snapshot64(runner.model)

    def states(self, iters) -> list[dict[str, Tensor]]:
        return [self.after[i] for i in iters]


class At:
    """Calls ``action(runner)`` in ``after_train_iter`` (after the EMA hook) at the given
    iterations, or in ``after_train_epoch`` when ``epoch_end``: mmengine's validation and
    checkpoint points, mmcv's ``EvalHook`` / ``CheckpointHook``."""

    def __init__(self, action, iters=None, *, epoch_end: bool = False) -> None:
        self.action, self.iters, self.epoch_end = action, iters, epoch_end

    def after_train_iter(self, runner, batch_idx=0, data_batch=None, outputs=None):
        if not self.epoch_end and (self.iters is None or runner.iter in self.iters):
            self.action(runner)

    def after_train_epoch(self, runner):
        if self.epoch_end:
            self.action(runner)


def constant(m: float) -> Callable[[int], float]:
    return lambda s: m


# --------------------------------------------------------------------------------------------
# mmcv's arguments


def test_mmcv_warm_up_and_interval_against_float64_reference():
    """``EMAHook(momentum, interval, warm_up)``: m(t) = min(momentum, (1+t)/(w+t)) (mmcv's
    formula, t the optimizer step), compensated over the interval: 1 - prod(1 - m(j))."""
    momentum, interval, warm_up = 0.3, 2, 5
    hook = EMAHook(momentum=momentum, interval=interval, warm_up=warm_up, update_buffers=True)
    rec = Recorder()
    runner = make_runner([hook, rec], iters_per_epoch=9)
    seen = []
    runner.hooks.append(At(lambda r: seen.append((hook.ema_model.steps, hook.momentum))))
    runner.run()

    def mmcv(t: int) -> float:
        return min(momentum, (1 + t) / (warm_up + t))

    expected = reference_average(
        rec.states(range(9)),
        lambda s: compensated(mmcv, s, interval),
        interval=interval,
        averaged=PARAMS + FLOAT_BUFFERS,
    )
    assert_state_close(hook.ema_model.module.state_dict(), expected)
    # the momentum of each averaging update, as written above
    for steps, m in seen:
        s = steps - 1  # the update just made had steps == s
        if s == 0:
            assert m == 1.0
        elif s % interval == 0:
            assert math.isclose(m, compensated(mmcv, s, interval), rel_tol=1e-12), s
    # the warm-up binds at the start: (1+t)/(5+t) < 0.3 for t < 1.29
    assert mmcv(0) == pytest.approx(0.2) and mmcv(2) == momentum


def test_mmcv_momentum_to_the_interval_fault_is_not_reproduced():
    """mmcv stored ``momentum ** interval`` (1e-8 for 0.01 at interval 4): its average never
    moves. polyak uses 1 - (1 - 0.01)^4 per update, the same horizon in steps as interval 1."""
    momentum, interval, n = 0.01, 4, 13
    hook = EMAHook(momentum=momentum, interval=interval)
    rec = Recorder()
    make_runner([hook, rec], iters_per_epoch=n).run()
    states = rec.states(range(n))

    ours = reference_average(states, lambda s: 1.0 - (1.0 - momentum) ** interval, interval=interval)
    assert_state_close(hook.ema_model.module.state_dict(), ours)
    assert hook.momentum == pytest.approx(1.0 - 0.99**4, rel=1e-12)

    # mmcv 1.x, literally: the buffer starts as the initial weights (before_run), and at every
    # iteration t with t % interval == 0 moves with min(momentum ** interval, (1+t)/(w+t)).
    initial = snapshot64(make_model(0))
    mmcv = {k: initial[k].clone() for k in PARAMS}
    for t, state in enumerate(states):
        if t % interval == 0:
            m = min(momentum**interval, (1 + t) / (100 + t))
            for k in PARAMS:
                mmcv[k] = (1 - m) * mmcv[k] + m * state[k]
    # (lin1.bias gets no gradient through the BatchNorm: leave out what training did not move)
    moved = [k for k in PARAMS if (states[-1][k] - initial[k]).abs().max() > 0.05]
    assert len(moved) >= 4
    for k in moved:
        # mmcv's average is still the initial model (to 1e-6); polyak's has moved away from it
        assert (mmcv[k] - initial[k]).abs().max() < 1e-6
        assert (hook.ema_model.module.state_dict()[k].double() - initial[k]).abs().max() > 1e-2


def test_mmcv_warm_up_with_update_buffers_builds():
    hook = EMAHook(momentum=0.1, warm_up=10, update_buffers=True)
    runner = make_runner([hook], iters_per_epoch=2)
    runner.run()
    assert hook.ema_model.use_buffers and hook.ema_model.update_buffers


# --------------------------------------------------------------------------------------------
# swapping


def test_swap_epoch_like_mmcv_with_checkpoint_at_epoch_end(tmp_path):
    """swap="epoch": the average is in the model after each training epoch (for mmcv's
    EvalHook and CheckpointHook), the live weights are back before the next; a checkpoint written
    then still holds the live weights under ``ema_state_dict``."""
    hook = EMAHook(momentum=0.3, swap="epoch")
    rec = Recorder()
    at_epoch_end: list[dict[str, Tensor]] = []
    checkpoints = []

    def eval_and_save(runner):
        at_epoch_end.append(snapshot64(runner.model))
        path = tmp_path / f"epoch_{runner.epoch + 1}.pth"
        runner.save_checkpoint(path)
        checkpoints.append(torch.load(path, weights_only=True))
        assert_state_equal(snapshot64(runner.model), at_epoch_end[-1])  # swapped in again after saving

    runner = make_runner([hook, rec, At(eval_and_save, epoch_end=True)], max_epochs=2, iters_per_epoch=3)
    runner.run()

    for epoch in range(2):
        last = 3 * epoch + 2
        expected = reference_average(rec.states(range(last + 1)), constant(0.3))
        # the model during the epoch-end hooks holds the average (parameters; buffers are live)
        assert_state_close(at_epoch_end[epoch], expected)
        assert_state_equal(
            {k: at_epoch_end[epoch][k] for k in FLOAT_BUFFERS}, {k: rec.after[last][k] for k in FLOAT_BUFFERS}
        )
        ck = checkpoints[epoch]
        assert_state_close(ck["state_dict"], expected)
        live = {k[len("module.") :]: v for k, v in ck["ema_state_dict"].items() if k.startswith("module.")}
        assert_state_equal(live, rec.after[last])
        assert int(ck["ema_state_dict"]["steps"]) == last + 1
    # the second epoch starts from the live weights, and the run ends with them
    assert_state_equal(rec.before[3], rec.after[2])
    assert_state_equal(snapshot64(runner.model), rec.after[5])


@pytest.mark.parametrize("swap", ["val", None])
def test_swap_val(swap):
    hook = EMAHook(momentum=0.3, swap=swap)
    rec = Recorder()
    seen: list[tuple[int, dict[str, Tensor], dict[str, Tensor]]] = []

    def validate(runner):
        evaluated = runner.validate(lambda model: {"state": snapshot64(model)})["state"]
        seen.append((runner.iter, evaluated, snapshot64(runner.model)))

    make_runner([hook, rec, At(validate, iters={1, 4})], iters_per_epoch=6).run()
    assert [i for i, _, _ in seen] == [1, 4]
    for i, evaluated, after in seen:
        if swap == "val":
            assert_state_close(evaluated, reference_average(rec.states(range(i + 1)), constant(0.3)))
        else:
            assert_state_equal(evaluated, rec.after[i])
        assert_state_equal(after, rec.after[i])  # the live weights are back, bitwise
        assert_state_equal(rec.before[i + 1], rec.after[i])


def test_test_epoch_swaps_too_and_a_second_run_keeps_the_average():
    hook = EMAHook(momentum=0.3)
    rec = Recorder()
    runner = make_runner([hook, rec], iters_per_epoch=4)
    runner.run()
    average = hook.ema_model
    expected = reference_average(rec.states(range(4)), constant(0.3))
    # runner.test() after runner.train(): before_run again, then the test epoch
    runner.call("before_run")
    assert hook.ema_model is average
    runner.call("before_test_epoch")
    assert_state_close(snapshot64(runner.model), expected)
    runner.call("after_test_epoch", metrics={})
    runner.call("after_run")
    assert_state_equal(snapshot64(runner.model), rec.after[3])


def test_validation_never_swaps_an_average_not_yet_updated():
    hook = EMAHook(momentum=0.3)
    runner = make_runner([hook])
    runner.call("before_run")
    before = snapshot64(runner.model)
    with torch.no_grad():
        runner.model.lin1.weight.add_(1.0)  # the model moved since the average was built
    moved = snapshot64(runner.model)
    assert not torch.equal(before["lin1.weight"], moved["lin1.weight"])
    with pytest.warns(UserWarning, match="has not been updated"):
        evaluated = runner.validate(lambda model: {"state": snapshot64(model)})["state"]
    assert_state_equal(evaluated, moved)
    assert_state_equal(snapshot64(runner.model), moved)


# --------------------------------------------------------------------------------------------
# begin_iter / begin_epoch


def test_begin_iter_copies_then_averages():
    hook = EMAHook(momentum=0.3, begin_iter=3)
    rec = Recorder()
    during: list[tuple[int, int, dict[str, Tensor], dict[str, Tensor], list]] = []

    def check(runner):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            evaluated = runner.validate(lambda model: {"state": snapshot64(model)})["state"]
        average = snapshot64(hook.ema_model.module)
        during.append((runner.iter, hook.ema_model.steps, average, evaluated, caught))

    make_runner([hook, rec, At(check)], iters_per_epoch=6).run()
    for i, steps, average, evaluated, caught in during:
        if i < 2:  # runner.iter + 1 < begin_iter: a copy that does not count; no swap
            assert steps == 0
            assert_state_equal(average, rec.after[i])
            assert_state_equal(evaluated, rec.after[i])
            assert any("has not been updated" in str(w.message) for w in caught)
        else:
            assert steps == i - 1
            expected = reference_average(rec.states(range(2, i + 1)), constant(0.3))
            assert_state_close(evaluated, expected)
            assert not caught
    assert_state_close(hook.ema_model.module.state_dict(), reference_average(rec.states(range(2, 6)), constant(0.3)))


def test_begin_epoch_copies_then_averages():
    hook = EMAHook(momentum=0.3, begin_epoch=2)
    rec = Recorder()
    steps_after = {}
    make_runner(
        [hook, rec, At(lambda r: steps_after.__setitem__(r.iter, hook.ema_model.steps))],
        max_epochs=3,
        iters_per_epoch=2,
    ).run()
    assert steps_after == {0: 0, 1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    assert_state_close(hook.ema_model.module.state_dict(), reference_average(rec.states(range(2, 6)), constant(0.3)))


def test_begin_checks():
    with pytest.raises(ValueError, match="not both"):
        EMAHook(begin_iter=2, begin_epoch=1)
    with pytest.raises(ValueError, match="begin_iter"):
        EMAHook(begin_iter=-1)
    hook = EMAHook(begin_iter=6)
    runner = make_runner([hook], iters_per_epoch=6)
    hook.before_run(runner)
    with pytest.raises(ValueError, match="not below max_iters"):
        hook.before_train(runner)


# --------------------------------------------------------------------------------------------
# CosineEMA


def test_cosine_ema_gets_max_steps_from_the_runner():
    start, end, n = 0.5, 0.05, 8
    hook = EMAHook(ema_type="CosineEMA", momentum=start, end_momentum=end)
    rec = Recorder()
    make_runner([hook, rec], iters_per_epoch=n).run()
    assert hook.ema_model.max_steps == n

    def cosine(t: int) -> float:
        return end - (end - start) * (math.cos(math.pi * min(t, n) / n) + 1) / 2

    assert_state_close(hook.ema_model.module.state_dict(), reference_average(rec.states(range(n)), cosine))
    assert hook.momentum == pytest.approx(cosine(n - 1), rel=1e-12)


def test_cosine_ema_keeps_an_explicit_max_steps():
    hook = EMAHook(ema_type="CosineEMA", momentum=0.5, max_steps=20)
    make_runner([hook], iters_per_epoch=3).run()
    assert hook.ema_model.max_steps == 20


# --------------------------------------------------------------------------------------------
# one update per real optimizer step


def test_grad_scaler_skipped_steps_do_not_update():
    skipped = {1, 4}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def amp_step(runner):
        x, y = DATA[runner.iter % len(DATA)]
        runner.model.train()
        loss = ((runner.model(x) - y) ** 2).mean()
        if runner.iter in skipped:
            loss = loss * float("inf")  # inf gradients: the scaler skips optimizer.step()
        runner.optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(runner.optimizer)
        scaler.update()

    hook = EMAHook(momentum=0.3)
    rec = Recorder()
    runner = make_runner([hook, rec], iters_per_epoch=7, step=amp_step)
    runner.run()
    # the test's own check that those steps were skipped: the parameters did not move
    for i in skipped:
        for k in PARAMS:
            assert torch.equal(rec.after[i][k], rec.after[i - 1][k]), (i, k)
        assert not torch.equal(rec.after[i]["bn.running_mean"], rec.after[i - 1]["bn.running_mean"])
    stepped = [i for i in range(7) if i not in skipped]
    assert hook.ema_model.steps == len(stepped)
    assert_state_close(hook.ema_model.module.state_dict(), reference_average(rec.states(stepped), constant(0.3)))


def test_gradient_accumulation_updates_once_per_optimizer_step():
    def accumulate(runner):
        x, y = DATA[runner.iter % len(DATA)]
        runner.model.train()
        (((runner.model(x) - y) ** 2).mean() / 2).backward()
        if runner.iter % 2 == 1:
            runner.optimizer.step()
            runner.optimizer.zero_grad()

    hook = EMAHook(momentum=0.3)
    rec = Recorder()
    runner = make_runner([hook, rec], iters_per_epoch=7, step=accumulate)
    runner.optimizer.zero_grad()
    runner.run()
    stepped = [1, 3, 5]
    assert hook.ema_model.steps == 3
    expected = reference_average(rec.states(stepped), constant(0.3))
    # the last iteration (6) did not step: the average's buffers are those of iteration 5
    assert not torch.equal(rec.after[6]["bn.running_mean"], rec.after[5]["bn.running_mean"])
    assert_state_close(hook.ema_model.module.state_dict(), expected)


def test_without_an_optimizer_every_iteration_updates():
    hook = EMAHook(momentum=0.3)
    rec = Recorder()
    model = make_model()

    def perturb(runner):
        with torch.no_grad():
            for p in runner.model.parameters():
                p.add_(0.1 * (runner.iter + 1))

    MiniRunner(model, [hook, rec], iters_per_epoch=4, step=perturb).run()
    assert hook.ema_model.steps == 4
    assert_state_close(hook.ema_model.module.state_dict(), reference_average(rec.states(range(4)), constant(0.3)))


def test_optimizer_step_counter():
    model = nn.Linear(2, 1)
    a = torch.optim.SGD(model.parameters(), lr=0.1)
    b = torch.optim.SGD(model.parameters(), lr=0.1)
    counter = OptimizerStepCounter([a])
    counter.watch([a, b])  # a is counted once
    assert not counter.advanced()
    a.step()
    b.step()
    assert counter.count == 2 and counter.advanced() and not counter.advanced()
    counter.close()
    a.step()
    assert counter.count == 2 and not counter.watching


def test_find_optimizers():
    model = nn.Linear(2, 1)
    a = torch.optim.SGD(model.parameters(), lr=0.1)
    b = torch.optim.Adam(model.parameters())
    wrapper = types.SimpleNamespace(optimizer=a)  # mmengine OptimWrapper, accelerate
    wrappers = types.SimpleNamespace(optim_wrappers={"g": wrapper, "d": types.SimpleNamespace(optimizer=b)})
    assert find_optimizers(a) == [a]
    assert find_optimizers(wrapper) == [a]
    assert find_optimizers(wrappers) == [a, b]
    assert find_optimizers([a, {"x": b}]) == [a, b]
    assert find_optimizers(None) == [] and find_optimizers({"type": "SGD", "lr": 0.1}) == []


def test_accelerated_optimizer_counts_the_inner_steps():
    """accelerate's AcceleratedOptimizer subclasses Optimizer without its step hooks and calls the
    inner step only at the end of an accumulation cycle: the inner optimizer is counted."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    try:
        accelerator = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
        model = make_model()
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        found = find_optimizers(optimizer)
        assert found == [optimizer.optimizer]
        counter = OptimizerStepCounter(found)
        advanced, moved = [], []
        for i in range(5):
            before = model.lin2.weight.detach().clone()
            with accelerator.accumulate(model):
                x, y = DATA[i]
                accelerator.backward(((model(x) - y) ** 2).mean())
                optimizer.step()
                optimizer.zero_grad()
            advanced.append(counter.advanced())
            moved.append(not torch.equal(before, model.lin2.weight))
        assert advanced == moved == [False, True, False, True, False]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# --------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    path = tmp_path / "iter_3.pth"
    hook_a, rec_a = EMAHook(momentum=0.3, update_buffers=True), Recorder()
    runner_a = make_runner([hook_a, rec_a, At(lambda r: r.save_checkpoint(path), iters={2})], iters_per_epoch=6)
    runner_a.run()

    ck = torch.load(path, weights_only=True)
    averaged = PARAMS + FLOAT_BUFFERS
    expected3 = reference_average(rec_a.states(range(3)), constant(0.3), averaged=averaged)
    assert_state_close(ck["state_dict"], expected3)
    live = {k[len("module.") :]: v for k, v in ck["ema_state_dict"].items() if k.startswith("module.")}
    assert_state_equal(live, rec_a.after[2])
    assert int(ck["ema_state_dict"]["steps"]) == 3
    assert ck["polyak"]["averages"]["ema"]["steps"] == 3

    # a fresh runner (another initialisation) resumed from it
    hook_b, rec_b = EMAHook(momentum=0.3, update_buffers=True), Recorder()
    runner_b = make_runner([hook_b, rec_b], seed=1, iters_per_epoch=6)
    runner_b.run(resume=str(path))
    assert sorted(rec_b.after) == [3, 4, 5]
    assert_state_equal(snapshot64(runner_b.model), snapshot64(runner_a.model))
    assert_state_equal(snapshot64(hook_b.ema_model.module), snapshot64(hook_a.ema_model.module))
    assert hook_b.ema_model.steps == hook_a.ema_model.steps == 6
    states = rec_a.states(range(3)) + rec_b.states(range(3, 6))
    assert_state_close(
        hook_b.ema_model.module.state_dict(), reference_average(states, constant(0.3), averaged=averaged)
    )

    # mmcv's resume_from: the hook asks the runner to resume in before_run
    hook_c = EMAHook(momentum=0.3, update_buffers=True, resume_from=str(path))
    runner_c = make_runner([hook_c], seed=2, iters_per_epoch=6)
    runner_c.run()
    assert_state_equal(snapshot64(runner_c.model), snapshot64(runner_a.model))
    assert_state_equal(snapshot64(hook_c.ema_model.module), snapshot64(hook_a.ema_model.module))


def test_resume_from_on_a_runner_without_resume(tmp_path):
    path = tmp_path / "iter_3.pth"
    hook_a, rec_a = EMAHook(momentum=0.3), Recorder()
    make_runner([hook_a, rec_a, At(lambda r: r.save_checkpoint(path), iters={2})], iters_per_epoch=3).run()
    bare = types.SimpleNamespace(model=make_model(5), iter=0, epoch=0, max_iters=6)
    hook = EMAHook(momentum=0.3, resume_from=str(path))
    hook.before_run(bare)
    assert_state_equal(snapshot64(bare.model), rec_a.after[2])
    assert_state_close(hook.ema_model.module.state_dict(), reference_average(rec_a.states(range(3)), constant(0.3)))
    assert hook.ema_model.steps == 3


def test_checkpoints_in_mmengine_ema_hook_layout_load():
    """mmengine's own EMAHook writes ``state_dict`` = the average and ``ema_state_dict`` = the
    live weights under ``module.`` keys with ``steps`` (no polyak block)."""
    source = make_model(0)
    average = {k: v + 1.0 if v.is_floating_point() else v + 10 for k, v in make_model(1).state_dict().items()}
    live = source.state_dict()
    checkpoint = {
        "state_dict": dict(average),
        "ema_state_dict": {"steps": torch.tensor(5), **{"module." + k: v for k, v in live.items()}},
    }
    runner = types.SimpleNamespace(model=make_model(2), iter=0, epoch=0, max_iters=10, _resume=True)
    hook = EMAHook(momentum=0.3)
    hook.before_run(runner)
    hook.after_load_checkpoint(runner, checkpoint)
    assert hook.ema_model.steps == 5
    assert_state_equal(snapshot64(hook.ema_model.module), as64(average))
    assert_state_equal(as64(checkpoint["state_dict"]), snapshot64(source))  # the live weights, for the runner

    # load_from without resume: the average starts from the checkpoint's (deployable) weights
    runner = types.SimpleNamespace(model=make_model(2), iter=0, epoch=0, max_iters=10, _resume=False)
    hook = EMAHook(momentum=0.3)
    hook.before_run(runner)
    plain = {"state_dict": dict(average)}
    hook.after_load_checkpoint(runner, plain)
    assert hook.ema_model.steps == 1
    assert_state_equal(snapshot64(hook.ema_model.module), as64(average))


MISUSE = """
import types
from polyak.hooks import EMAHook
hook = EMAHook()
runner = types.SimpleNamespace(iter=0, epoch=0, model=None)
for call in (hook.after_train_iter, hook.before_val_epoch, lambda r: hook.before_save_checkpoint(r, {}),
             lambda r: hook.after_load_checkpoint(r, {})):
    try:
        call(runner)
    except RuntimeError as e:
        print("RuntimeError:", e)
"""


@pytest.mark.parametrize("optimize", [False, True], ids=["python", "python -O"])
def test_a_hook_used_before_before_run_says_so_also_under_python_O(optimize: bool) -> None:
    """Misuse raised ``assert`` errors, which ``python -O`` strips (then an AttributeError on
    None): now a RuntimeError naming ``before_run``, with or without ``-O``."""
    import subprocess
    import sys

    flags = ["-O"] if optimize else []
    out = subprocess.run([sys.executable, *flags, "-c", MISUSE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and all("before_run(runner) was not called" in line for line in lines), lines
