"""One training step, shared by the trainer, the memory estimator's trace and the profiler.

A step is: for each micro-batch, the objective's forward and losses and the backward through a backend; then the
backend's optimizer step. What is learnt (``ssl3d.ssl.task.SSLTask`` for pre-training, Dice + cross-entropy for
fine-tuning and the probe; each task of ``ssl3d.tasks`` supplies its own) is the objective's business; where
gradients go (reduced, sharded, scaled) is the backend's: the run's ``Strategy`` in training, plain autograd
(``LocalBackend``) in the estimator and the profiler. So the estimator traces the very code the trainer runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ssl3d.config import ModelConfig

__all__ = ["DTYPES", "LocalBackend", "StepBackend", "StepSettings", "Task", "identity", "no_phase", "run_step"]


# The run's precision names (train.precision, the presets' bf16/fp16 sections) as compute dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class StepSettings:
    """What one step computes on one rank, independent of how ranks share the work.

    The estimator, the profiler, the planner and the command line pass this one value around instead of the same
    ten arguments; the trainer's step follows the same settings from the run config."""

    model: ModelConfig
    roi: tuple[int, int, int]
    batch_size: int = 1  # volumes per micro-batch
    num_samples: int = 2  # crops per volume (two views each)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    policy: Any = None  # activation checkpointing: a CheckpointPolicy, its preset section or a name
    fused_attention: bool = True
    two_passes: bool = False  # the reference's one forward per view (benchmarks)
    contrastive_dim: int = 512
    grad_cache_chunk: int = 0  # views per forward/backward with contrastive gradient caching; 0: off
    num_classes: int = 14  # the task's outputs, background included, where the task has classes
    # ssl.negative_queue: embeddings of earlier views kept (fp32, per rank) as extra contrastive negatives; 0: off
    negative_queue: int = 0
    # What is learnt: a ``ssl3d.tasks.Task`` (``ssl3d.tasks.get_task(name)``). It builds the model, the step's
    # objective and inputs; the memory tools ask it, never a task's name.
    task: Any = field(kw_only=True)


def identity(t: Tensor) -> Tensor:
    return t


def no_phase(name: str) -> None:
    """Phase marks (forward, backward, optimizer, setup) are for the estimator's storage tracker."""


class StepBackend(Protocol):
    """Where a step's gradients go: a ``Strategy`` in training, ``LocalBackend`` for the estimator and profiler."""

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: Tensor) -> None: ...

    def gather_embeddings(self, t: Tensor) -> Tensor: ...

    def step(self, max_grad_norm: float | None) -> Any: ...


class Task(Protocol):
    """What a step learns: forward, losses and backward of one micro-batch (``losses["total"]`` is minimised)."""

    loss_keys: tuple[str, ...]

    def forward_backward(
        self,
        model: nn.Module,
        batch: Any,
        backend: StepBackend,
        *,
        sync: bool,
        loss_hook: Callable[[Tensor], Tensor] = identity,
        phase: Callable[[str], None] = no_phase,
    ) -> dict[str, Tensor]: ...


class LocalBackend:
    """One process, plain autograd, an optimizer stepped as it is: what the estimator traces and the profiler runs."""

    def __init__(self, optimizer: torch.optim.Optimizer, dtype: torch.dtype | None = None, device_type: str = "cpu"):
        self.optimizer = optimizer
        self.dtype = dtype if dtype != torch.float32 else None
        self.device_type = device_type

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def gather_embeddings(self, t: Tensor) -> Tensor:
        return t

    def step(self, max_grad_norm: float | None = None) -> None:
        if max_grad_norm is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def run_step(
    model: nn.Module,
    task: Task,
    micro_batches: Sequence[Any],
    backend: StepBackend,
    *,
    max_grad_norm: float | None = None,
    loss_hook: Callable[[Tensor], Tensor] = identity,
    phase: Callable[[str], None] = no_phase,
) -> tuple[list[dict[str, Tensor]], Any]:
    """One optimizer step over ``micro_batches``; returns each micro-batch's detached losses and what the backend's
    ``step`` returned. Only the last micro-batch reduces gradients across ranks (``sync``).

    ``loss_hook`` sees every loss before backward (tests plant non-finite losses through it); ``phase`` marks
    the step's phases for the estimator."""
    losses = []
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        losses.append(task.forward_backward(model, batch, backend, sync=last, loss_hook=loss_hook, phase=phase))
    phase("optimizer")
    result = backend.step(max_grad_norm)
    phase("setup")
    return losses, result
