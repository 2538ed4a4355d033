"""The Strategy interface: how one training loop runs on one process, several, or sharded.

The trainer talks only to this interface and never asks which backend it has. Each backend lives in its
own small module. Things are applied in one fixed order: activation checkpointing (by the caller) ->
``setup``: wrap/shard -> optimizer on the wrapped parameters.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ssl3d.config import ConfigError
from ssl3d.rss import peak_rss_bytes
from ssl3d.step import DTYPES
from ssl3d.strategies.distributed import is_distributed
from ssl3d.strategies.precision import LossScaleWatch, StepResult  # VmHWM: ru_maxrss can carry a parent's peak

if TYPE_CHECKING:
    from ssl3d.strategies.ds_config import DSConfig

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

# DDP and DeepSpeed, torch.compile (a user may compile a model ssl3d then saves), activation checkpointing.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_checkpoint_wrapped_module.")
_WRAPPER_PARTS = frozenset(p.rstrip(".") for p in WRAPPER_PREFIXES)


def clean_name(name: str) -> str:
    """Drop wrapper prefixes that DDP, torch.compile and checkpoint wrappers insert into parameter names.

    Whole dotted components only: a plain ``replace("module.", "")`` would also cut the ``module.`` out of
    ``_checkpoint_wrapped_module.`` and leave ``_checkpoint_wrapped_norm1.weight``.
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def to_cpu_fp32(t: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy; floating-point tensors in fp32, integer buffers (e.g. position indices) as they are."""
    t = t.detach().cpu()
    return t.float().clone() if t.is_floating_point() else t.clone()


def resolve_device(kind: str, local_rank: int = 0) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError('train.device: got "cuda" but no CUDA device is available; use "auto" or "cpu"')
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: the CPU (ssl3d's CPU runs use it only when asked) and GPUs of
    compute capability 8.0 and newer. torch's ``is_bf16_supported()`` also says yes on a V100 or T4, where bf16 is
    emulated: no cuDNN bf16 convolutions, and attention falls back to the math kernel with fp32 scores."""
    if device.type != "cuda":
        return True
    return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on GPUs with native bf16 (Ampere and newer), fp16 with loss scaling on older GPUs (V100, T4:
    the reference's own AMP default), fp32 on the CPU (CPU autocast is slower than fp32 here). A backend without an
    fp16 loss scaler turns "auto" into fp32 (``ds_config.NO_FP16``)."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return DTYPES[precision]


def emulated_bf16_warning(device: torch.device) -> str:
    """One line on what bf16 costs on a GPU that only emulates it."""
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    return (
        f"bf16 on {name} (compute capability {major}.{minor}) is emulated: convolutions leave cuDNN for a slow "
        "fallback and attention takes the math kernel with fp32 score tensors (several GiB more at ROI 96); "
        'train.precision "fp16" (or "auto") is the fast choice on this GPU'
    )


def configure_cuda(device: torch.device, cudnn_benchmark: bool = True, allow_tf32: bool = True) -> None:
    """The GPU speed switches a user expects (``train.cudnn_benchmark``, ``train.allow_tf32``); nothing on the CPU.

    Crops have one fixed size, so cuDNN's autotuner pays for itself after the first step (the reference set it
    too); TF32 runs fp32 matmuls and convolutions on Ampere's tensor cores (10-bit mantissa products, fp32 sums)."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


# What each backend writes into a checkpoint folder; one layout per family, so errors can say what a folder holds.
CHECKPOINT_LAYOUTS = {
    "state.pt": "one full file (single, ddp, fairscale)",
    "dcp": "a sharded torch.distributed.checkpoint (fsdp)",
    "deepspeed": "a DeepSpeed engine checkpoint (deepspeed)",
}


def require_layout(directory: Path, entry: str, strategy: str) -> Path:
    """``directory/entry``, or an error that says which backend wrote the folder and how to convert it."""
    path = Path(directory) / entry
    if path.exists():
        return path
    found = [desc for name, desc in CHECKPOINT_LAYOUTS.items() if (Path(directory) / name).exists()]
    held = f"it holds {found[0]}" if found else "it holds no checkpoint ssl3d knows"
    raise RuntimeError(
        f"{directory}: strategy {strategy} cannot resume from this folder ({held}); resume with the strategy "
        "that wrote it, or start from its weights with a fresh optimizer (ssl3d.strategies.read_checkpoint_weights "
        "reads every layout)"
    )


def read_extra(directory: Path, rank: int = 0) -> dict[str, Any]:
    """Rank ``rank``'s loop state in a checkpoint folder (rank 0's when that rank wrote none)."""
    path = Path(directory) / f"extra_rank{rank}.pt"
    if not path.exists():
        path = Path(directory) / "extra_rank0.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


class Strategy(ABC):
    """One backend. Subclasses keep their engine/wrapper state; the trainer holds only the returned model."""

    name: str = "base"

    def __init__(
        self,
        device: torch.device,
        dtype: torch.dtype,
        grad_accum: int = 1,
        ds_config: DSConfig | None = None,
    ):
        self.device = device
        self.dtype = dtype  # compute dtype for autocast
        self.grad_accum = grad_accum
        self.ds_config = ds_config  # the resolved preset (None: built directly, e.g. in tests)
        self.gather_contrastive = bool(ds_config and ds_config.gather_contrastive)
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- building ------------------------------------------------------------------------------------------
    @abstractmethod
    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Move/wrap/shard the model and build its optimizer."""

    # -- one optimizer step --------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Context for one micro-batch; ``sync`` is False on all but the last micro-batch of a step."""
        yield

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Backward of an unscaled micro-batch loss; the strategy divides by the accumulation steps.

        Where gradients are reduced across ranks is ``accumulate(sync)``'s business, not this call's."""

    @functools.cached_property
    def loss_scale_watch(self) -> LossScaleWatch:
        """The fp16 policy; below ``fp16.min_loss_scale`` (DeepSpeed's default 1) the run stops."""
        return LossScaleWatch(float(self.ds_config.fp16.get("min_loss_scale", 1.0)) if self.ds_config else 1.0)

    def step(self, max_grad_norm: float | None) -> StepResult:
        """Clip (when asked), step, zero the gradients; says what happened (``StepResult``).

        A non-finite gradient norm skips the update (no weight or optimizer-state change); with fp16 the loss
        scaler's verdict (overflow, or a scale too low to go on) is part of the answer."""
        before = self.loss_scale()
        try:
            norm = float(self.clip_and_step(max_grad_norm))
        except Exception as exc:
            if not self.is_loss_scale_stop(exc):
                raise
            return StepResult(grad_norm=math.nan, overflow=True, stop=self.loss_scale_watch.underflow(before))
        return self.loss_scale_watch.result(norm, before, self.loss_scale())

    @abstractmethod
    def clip_and_step(self, max_grad_norm: float | None) -> torch.Tensor:
        """The backend's own step: clip, step (skipped on a non-finite norm), zero the gradients; returns the global
        gradient norm before clipping."""

    def is_loss_scale_stop(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the backend's own fp16 stop (the scale cannot go lower); the run then stops cleanly."""
        return False

    def loss_scale(self) -> float | None:
        """The current fp16 loss scale; None when the run does not scale its loss (fp32, bf16)."""
        return None

    def set_lr(self, lr: float) -> None:
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- state ---------------------------------------------------------------------------------------------
    def load_extra(self, directory: Path) -> dict[str, Any]:
        """This rank's loop state; another rank's when the world size changed (its RNG streams then differ)."""
        return read_extra(directory, self.rank)

    def save_extra(self, directory: Path, extra: dict[str, Any]) -> None:
        """This rank's loop state (the trainer's ``extra``), beside whatever the backend writes itself."""
        torch.save(extra, Path(directory) / f"extra_rank{self.rank}.pt")

    @abstractmethod
    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        """Write model + optimizer (+ scaler) state into ``directory`` (collective: every rank calls it)."""

    @abstractmethod
    def load(self, directory: Path) -> dict[str, Any]:
        """Restore what ``save`` wrote; returns ``extra``."""

    def resume_problem(self, directory: Path, saved_world_size: int) -> str | None:
        """Why ``load`` cannot restore this backend's ``directory``, written at ``saved_world_size``, with its
        optimizer at this run's world size; None when it can (the default: the layout does not depend on it)."""
        return None

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model in fp32 on the CPU with plain names (collective; meaningful on rank 0)."""

    def load_model_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load plain-named full weights into the (possibly wrapped) model, e.g. from a consolidated file."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for the device's queued work (a step's wall time then is its compute time)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- collectives (no-ops on one process) ---------------------------------------------------------------
    def barrier(self) -> None:
        if is_distributed():
            torch.distributed.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if is_distributed():
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any: how ranks agree on a failed checkpoint write."""
        return self.max_over_ranks([1.0 if flag else 0.0])[0] > 0

    def max_over_ranks(self, values: list[float]) -> list[float]:
        """Each value's maximum over all ranks, on every rank (one small all-reduce): how ranks agree at a step
        boundary on a preemption signal that reached only one of them, or on a checkpoint that is due."""
        if not is_distributed():
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.tolist()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (e.g. the checkpoint it verified)."""
        if not is_distributed():
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Per-rank counters summed over ranks, on every rank (a copy on one process)."""
        if not is_distributed():
            return dict(counts)
        gathered: list[dict[str, int]] = [{} for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(gathered, counts)
        merged: dict[str, int] = {}
        for part in gathered:
            for key, n in part.items():
                merged[key] = merged.get(key, 0) + n
        return merged

    def gather_embeddings(self, t: torch.Tensor) -> torch.Tensor:
        """All ranks' rows of ``t`` ([N, E] -> [world x N, E]) with gradients, when ``gather_contrastive`` is on.

        A contrastive loss on the gathered batch sees every rank's negatives, so it matches one process with the
        global batch. Every rank computes the same global loss; the gather's backward sums the gradients of the
        local rows over ranks and the data-parallel average divides by the world size, which gives exactly the
        global loss's gradient. Off (or on one process): returns ``t`` unchanged.
        """
        if not self.gather_contrastive or not is_distributed():
            return t
        if torch.distributed.get_world_size() == 1:
            return t
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t.contiguous()), dim=0)

    def memory_report(self) -> dict[str, float]:
        """Peak memory figures in GiB for the logs."""
        out: dict[str, float] = {}
        if self.device.type == "cuda":
            out["cuda_allocated_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            out["cuda_reserved_peak_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        out["host_rss_peak_gib"] = peak_rss_bytes() / 2**30
        return out

    def teardown(self) -> None:
        if is_distributed():
            torch.distributed.destroy_process_group()
