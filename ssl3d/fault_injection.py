"""Faults on purpose, for the tests that prove a run survives them: a NaN loss at chosen steps, a SIGKILL after a
step or while a checkpoint is being written.

Read once when a run starts (``Faults.from_env``) and handed to the trainer and the checkpoint manager as one
object, so the training step itself never looks at the environment. Variables (unset: no fault):

- ``SSL3D_PLANT_NAN=3,4``: the losses of those optimizer steps (1-based) are NaN;
- ``SSL3D_KILL_AT_STEP=STEP[:RANK]``: SIGKILL after that optimizer step (every rank, or that rank only);
- ``SSL3D_KILL_DURING_SAVE=STEP[:RANK]``: SIGKILL after this rank wrote its part of that step's checkpoint, before
  the folder is marked complete;
- ``SSL3D_SIGTERM_AT_STEP=STEP[:RANK]``: a real SIGTERM to this process after that optimizer step (a scheduler's
  preemption, delivered to the run's own handler).

Under torchrun the kills fire on the first attempt only (``TORCHELASTIC_RESTART_COUNT`` 0), so an elastic restart
runs through.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Faults"]


def _identity(t: Tensor) -> Tensor:
    return t


def _nan(t: Tensor) -> Tensor:
    return t * float("nan")


def _target(raw: str | None) -> tuple[int, int | None] | None:
    if not raw:
        return None
    step, _, rank = raw.partition(":")
    return int(step), (int(rank) if rank else None)


@dataclass(frozen=True)
class Faults:
    nan_steps: frozenset[int] = frozenset()
    kill_at_step: tuple[int, int | None] | None = None  # (step, rank or None for every rank)
    kill_during_save: tuple[int, int | None] | None = None
    sigterm_at_step: tuple[int, int | None] | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Faults:
        first_attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        nan = frozenset(int(v) for v in env.get("SSL3D_PLANT_NAN", "").split(",") if v.strip())
        return cls(
            nan_steps=nan,
            kill_at_step=_target(env.get("SSL3D_KILL_AT_STEP")) if first_attempt else None,
            kill_during_save=_target(env.get("SSL3D_KILL_DURING_SAVE")) if first_attempt else None,
            sigterm_at_step=_target(env.get("SSL3D_SIGTERM_AT_STEP")) if first_attempt else None,
        )

    def loss_hook(self, step: int) -> Callable[[Tensor], Tensor]:
        """For optimizer step ``step`` (1-based): what every loss goes through before backward."""
        return _nan if step in self.nan_steps else _identity

    def after_step(self, step: int, rank: int) -> None:
        _kill_if(self.kill_at_step, step, rank)
        _kill_if(self.sigterm_at_step, step, rank, signal.SIGTERM)

    def after_shard_saved(self, step: int, rank: int) -> None:
        _kill_if(self.kill_during_save, step, rank)


def _kill_if(target: tuple[int, int | None] | None, step: int, rank: int, sig: signal.Signals = signal.SIGKILL) -> None:
    if target is not None and target[0] == step and target[1] in (None, rank):
        os.kill(os.getpid(), sig)
