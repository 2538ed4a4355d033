"""Preemption and time-based checkpoints at step boundaries, for every training loop (pre-training, fine-tuning).

A preemption signal (SIGTERM from a scheduler, SIGUSR1 from SLURM's ``--signal``) only sets a flag; at the next step
boundary the ranks agree on it with one small all-reduce and leave through the normal checkpoint path, so no rank
stops inside a collective and the checkpoint is the same as any other.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["PreemptionFlag", "StepBoundary"]


class PreemptionFlag:
    """Signals are state: while the loop runs, a preemption signal only sets this flag; the loop reads it at the
    next step boundary, where ranks agree on it, and leaves through the normal checkpoint path. Handlers are
    installed for the loop only (the main thread's previous handlers come back after it)."""

    def __init__(self, names: list[str], rank: int):
        self.signals = [signal.Signals[n] for n in names]
        self.rank = rank
        self.signum: int | None = None  # the signal this rank received
        self.agreed_signum: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        # Nothing else here: the handler may interrupt a print or a write, and re-entering one raises.
        if self.signum is None:
            self.signum = signum

    def agreed(self, signum: int) -> None:
        self.agreed_signum = signum

    def describe(self) -> str:
        got = signal.Signals(self.agreed_signum or self.signum or signal.SIGTERM).name
        return f"preempted by {got} ({'this rank' if self.signum else 'another rank'})"

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StepBoundary:
    """Called after every optimizer step: ranks agree (one small all-reduce) on whether any of them got a preemption
    signal and whether the time-based checkpoint is due (rank 0's clock decides); either writes a checkpoint through
    ``save`` unless this step already has one. Returns True when the run must stop."""

    def __init__(self, strategy: Any, flag: PreemptionFlag, every_minutes: float | None, save: Callable[[], Any]):
        self.strategy, self.flag, self.every_minutes, self.save = strategy, flag, every_minutes, save
        self.last_save = time.monotonic()

    def start(self) -> None:
        self.last_save = time.monotonic()

    def __call__(self, step: int, saved: bool) -> bool:
        now = time.monotonic()
        if saved:
            self.last_save = now
        minutes = self.every_minutes
        due = self.strategy.is_main and minutes is not None and now - self.last_save >= 60 * minutes
        signum, due_any = self.strategy.max_over_ranks([float(self.flag.signum or 0), float(due)])
        if self.flag.signum:
            name = signal.Signals(self.flag.signum).name
            print(f"ssl3d: rank {self.strategy.rank} got {name}: stopping after step {step}", flush=True)
        if (signum or due_any) and not saved:
            self.save()
            self.last_save = time.monotonic()
        if signum:
            self.flag.agreed(int(signum))
        return bool(signum)
