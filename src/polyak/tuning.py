"""Choosing, by measurement, among update plans that compute the same bits.

On the CPU the fastest way to run one averaging update depends on the machine, on the thread
count and on what else is running: a ``cat`` into a scratch buffer followed by one ``lerp_``
beats a multi-tensor kernel over many small tensors on one machine and loses on another; a
kernel split over two threads waits for a core that another process holds. Every candidate
plan writes the same values (elementwise ``lerp_`` and copies, whatever the grouping or the
thread count: ``tests/test_tuning.py`` checks it bit for bit), so the choice can be made by
timing the real updates themselves, with no trial on scratch memory:

* *explore*: each candidate runs ``EXPLORE_ROUNDS`` real updates in turn, timed on the host
  (on the CPU an update is synchronous, so its wall time is its cost);
* *exploit*: the candidate with the least time runs from then on, still timed; the median of
  its first ``SLOWER_WINDOW`` runs is its usual time (between two updates a training step
  evicts the caches, which an exploration run back to back may not have);
* *explore again* after ``RECHECK_EVERY`` updates, or as soon as ``SLOWER_WINDOW`` updates in a
  row took more than ``SLOWER_BY`` times its usual time (another process took a core);
* *and once more* when its usual time is more than ``SLOWER_BY`` times the time another
  candidate took in the exploration (the exploration did not see what the updates see: the
  scheduler moved a thread onto a busy core just after it, say). That second look is not
  repeated before the next exploration for another reason, so a machine where every
  exploration looks faster than the updates that follow cannot make it explore in a loop.

The cost when nothing changes is two ``time.perf_counter`` calls per update.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Candidate", "PlanTuner", "EXPLORE_ROUNDS", "RECHECK_EVERY", "SLOWER_BY", "SLOWER_WINDOW"]

#: Timed updates of each candidate per exploration (the least counts: the first run of a plan
#: may fault in its scratch pages).
EXPLORE_ROUNDS = 2
#: Updates between explorations when nothing looks wrong.
RECHECK_EVERY = 1024
#: An update this many times slower than the chosen plan's usual time counts as slow ...
SLOWER_BY = 1.5
#: ... and this many slow updates in a row start a new exploration.
SLOWER_WINDOW = 8


@dataclass(frozen=True)
class Candidate:
    """One way to run an update: ``run(weight)`` with ``threads`` intra-op threads (``None``:
    torch's current count)."""

    name: str
    run: Callable[[object], None]
    threads: int | None = None


class PlanTuner:
    """Runs each update with one of ``candidates``, chosen by timing real updates (see the
    module docstring). ``chosen`` names the plan in use; ``timings`` holds the least time, in
    seconds, of each candidate in the latest exploration."""

    def __init__(self, candidates: Sequence[Candidate]) -> None:
        if not candidates:
            raise ValueError("a tuner needs at least one candidate")
        self.candidates = list(candidates)
        self.timings: dict[str, float] = {}
        self.explorations = 0
        self._best = 0
        self._best_time = 0.0
        self._queue: list[int] = []
        self._since = 0
        self._slow = 0
        self._usual: list[float] = []
        self._second_look = True
        self._explore()

    @property
    def chosen(self) -> str:
        """The name of the candidate in use (during an exploration: the latest chosen)."""
        return self.candidates[self._best].name

    @property
    def exploring(self) -> bool:
        return bool(self._queue)

    def _explore(self, *, second_look: bool = True) -> None:
        """Start an exploration; ``second_look``: whether its choice may be looked at again
        once its usual time is known (False for that second look itself)."""
        self.explorations += 1
        self._second_look = second_look
        self.timings = {}
        self._queue = [i for _ in range(EXPLORE_ROUNDS) for i in range(len(self.candidates))]
        self._queue.reverse()  # popped from the end: candidate 0 first

    def run(self, weight: object) -> None:
        """One update with the candidate the tuner picks now."""
        exploring = bool(self._queue)
        index = self._queue.pop() if exploring else self._best
        candidate = self.candidates[index]
        elapsed = _timed(candidate, weight)
        if exploring:
            name = candidate.name
            self.timings[name] = min(self.timings.get(name, elapsed), elapsed)
            if not self._queue:
                self._choose()
            return
        self._since += 1
        if len(self._usual) < SLOWER_WINDOW:
            self._usual.append(elapsed)
            if len(self._usual) == SLOWER_WINDOW:
                self._best_time = sorted(self._usual)[SLOWER_WINDOW // 2]
                others = [t for name, t in self.timings.items() if name != self.chosen]
                if self._second_look and others and self._best_time > SLOWER_BY * min(others):
                    self._explore(second_look=False)
                    return
        else:
            self._slow = self._slow + 1 if elapsed > SLOWER_BY * self._best_time else 0
        if self._since >= RECHECK_EVERY or self._slow >= SLOWER_WINDOW:
            self._explore()

    def _choose(self) -> None:
        names = [c.name for c in self.candidates]
        self._best = min(range(len(names)), key=lambda i: self.timings.get(names[i], float("inf")))
        self._best_time = self.timings[names[self._best]]
        self._usual = []
        self._since = 0
        self._slow = 0


def _timed(candidate: Candidate, weight: object) -> float:
    threads = candidate.threads
    before = torch.get_num_threads() if threads is not None else 0
    start = time.perf_counter()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
        try:
            candidate.run(weight)
        finally:
            torch.set_num_threads(before)
    else:
        candidate.run(weight)
    return time.perf_counter() - start
