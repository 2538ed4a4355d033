"""What a training task supplies to the one training loop (``ssl3d.trainer.Trainer``) and to the memory tools.

The loop owns everything every task needs the same way: set-up through the Strategy, batches (worker restarts,
bad-volume accounting), the step outcome, out-of-memory help, preemption, verified checkpoints and resume, logging
and finishing. A task owns what differs: its model, its data, its step objective (forward, losses, backward), its
validation and which metric is best, its own saved state and the files a run leaves.

Two facets: the *step facet* (``build_model``, ``objective``, ``step_inputs``, a few properties) needs nothing
but a model config and ``StepSettings``, so the estimator, planner and profiler ask it through the task object
they are given (they never import a task module); the *run facet* (``prepare`` to ``finish``) is the loop's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ssl3d.config import Config, ModelConfig


class Task(ABC):
    """One training objective. Instances with the same ``name`` behave alike for the step facet (equal, one hash),
    so a run's configured task and the registry's bare one share the estimator's caches."""

    name: str  # pretrain | finetune | probe (the registry's key, ``finetune.task``)
    title: str  # the progress bar's label
    loss_keys: tuple[str, ...] = ("total",)
    views_per_crop: int = 1  # forward passes' batch per crop (pre-training: two views)
    supports_grad_cache: bool = False  # ssl.grad_cache_chunk applies (the contrastive loss's)
    needs_classes: bool = False  # num_classes (background included) shapes the model
    num_classes: int = 0  # a run's classes, where the task has them (its labelled data's)
    frozen_encoder: bool = False  # the encoder runs under no_grad: nothing to checkpoint, no optimizer state
    best_metric: str = "total"  # the validation value that picks checkpoints/best
    higher_is_better: bool = False

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("ssl3d-task", self.name))

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # -- step facet: the model and one step, from settings alone ------------------------------------------------
    @abstractmethod
    def build_model(self, model: ModelConfig, contrastive_dim: int = 512, num_classes: int = 0) -> nn.Module:
        """The task's network, freshly initialised (on the meta device when built under a meta device mode)."""

    @abstractmethod
    def objective(self, settings: Any, generator: torch.Generator | None = None) -> Any:
        """The ``ssl3d.step.Task`` one micro-batch runs (forward, losses, backward) for ``StepSettings``."""

    @abstractmethod
    def step_inputs(self, settings: Any, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        """Zero tensors for what the loop holds during a step (the estimator registers them; the profiler fills
        them with random values)."""

    @abstractmethod
    def batch_from_inputs(self, inputs: dict[str, Tensor]) -> Any:
        """The micro-batch ``objective`` takes, made of ``step_inputs``' tensors."""

    def randomise_inputs(self, inputs: dict[str, Tensor], settings: Any, generator: torch.Generator) -> None:
        """Fill ``step_inputs`` with plausible values (the profiler's step)."""
        for v in inputs.values():
            if v.is_floating_point():
                v.copy_(torch.rand(v.shape, generator=generator, device="cpu"))

    def check_settings(self, settings: Any) -> str | None:
        """What is wrong with ``settings`` for this task (a ``ConfigError`` message), or None."""
        return None

    def describe(self, num_classes: int | None) -> str:
        """Prefix naming the task in memory reports ("" for pre-training, the default)."""
        return f"{self.name} ({num_classes} classes), "

    # -- run facet: what the training loop asks --------------------------------------------------------------
    def prepare(self, cfg: Config, strategy: Any) -> None:
        """Anything to do on every rank before the model exists (e.g. writing the demo data)."""
        return None  # nothing by default

    @abstractmethod
    def run_model(self, cfg: Config, is_main: bool) -> nn.Module:
        """The run's network before the memory tools and the strategy: built and initialised as configured."""

    @abstractmethod
    def run_objective(self, cfg: Config, device: torch.device, rank: int) -> Any:
        """The ``ssl3d.step.Task`` the run's steps use (its random streams are the task's saved state)."""

    @abstractmethod
    def loaders(self, cfg: Config, rank: int, world_size: int, epoch: int) -> tuple[Any, Any]:
        """This rank's training loader (a ``TrainLoader``) and validation loader."""

    @abstractmethod
    def train_batch(self, batch: dict[str, Any], device: torch.device) -> Any:
        """One loaded training batch as the objective's micro-batch, on ``device``."""

    @abstractmethod
    def validate(self, trainer: Any) -> dict[str, float]:
        """Validation metrics (``best_metric`` among them) over this rank's share of the validation list; the
        trainer gives ``model``, ``strategy``, ``cfg``, ``device``, ``log``, ``state`` and ``note_bad_volumes``."""

    def validation_scalars(self, metrics: dict[str, float]) -> dict[str, float]:
        return {f"Validation/{k}": v for k, v in metrics.items()}

    def state_dict(self) -> dict[str, Any]:
        """The task's own part of a checkpoint (random streams, queues)."""
        return {}

    def load_state_dict(self, extra: dict[str, Any], *, same_layout: bool, step: int, is_main: bool) -> None:
        """Restore ``state_dict``'s part from a checkpoint's extra state; ``same_layout``: written at this world
        size on this device type (else per-rank streams are re-seeded)."""
        return None  # nothing by default

    def on_best(self, trainer: Any) -> None:
        """Called on every rank when validation improved ``best_metric`` (collectives allowed)."""
        return None  # nothing by default

    @abstractmethod
    def finish(self, trainer: Any, weights: dict[str, Tensor], validation: dict[str, float]) -> dict[str, Any]:
        """Write the run's files from the consolidated ``weights`` (main rank) and return the summary fields."""


def mean_losses(per_micro: Iterable[dict[str, Tensor]], keys: tuple[str, ...]) -> dict[str, float]:
    """The mean over micro-batches of each loss, as Python floats."""
    per_micro = list(per_micro)
    sums = dict.fromkeys(keys, 0.0)
    for losses in per_micro:
        for k in keys:
            sums[k] += float(losses[k]) / len(per_micro)
    return sums
