"""Peak memory of one training step, predicted without the target device.

One real training step (forward on both views, SSL losses, backward, AdamW step; or, for fine-tuning and the probe,
SwinUNETR / the frozen-encoder probe on labelled crops with Dice+CE) is traced under
``FakeTensorMode`` with fake CPU tensors: no data, no compute, only shapes, so even the full-size model at 256^3
traces in about a second. A ``TorchDispatchMode`` counts the bytes of every live storage after each operator and
sorts them into parameters, gradients, optimizer states, activations (created in forward), temporaries (created in
backward or the optimizer step), inputs and host memory (offloaded activations). The timeline of one unsharded
rank is then turned into a per-rank figure for a strategy by sharding arithmetic, and for GPUs by a simple model
of the CUDA caching allocator (512-byte rounding per tensor, fragmentation headroom, 2 MiB segments) plus stated
allowances for what is not a tensor: cuBLAS and cuDNN workspaces, NCCL's buffers (more than one rank) and the CUDA
context (``CUBLAS_WORKSPACE``, ``CUDNN_WORKSPACE``, ``NCCL_BUFFERS``, ``CUDA_CONTEXT``, each with its source).

Why a trace and not a formula: activations depend on MONAI's exact op sequence (window padding, shift masks,
the five layer-normed stage outputs, the decoder at full resolution), on which tensors autograd keeps, on the
checkpoint policy and on fused attention. The trace sees all of that; a formula would drift with every change.

Mixed precision for a GPU follows CUDA autocast's rules although the trace runs CPU autocast on fake CPU tensors:
``ssl3d.memory.cuda_autocast`` gives the AutocastCPU dispatch key CUDA's op lists while the step is traced (e.g.
LayerNorm saves an fp32 copy of its input, softmax and trilinear upsampling run in fp32).

Known approximations: (1) DeepSpeed's bf16 mode (a bf16 model, not autocast) is approximated by the autocast trace
with bf16 parameter/gradient bytes. (2) Workspaces and NCCL buffers are fixed allowances, not traced; cuDNN's is
elastic in reality (PyTorch skips an engine whose workspace it cannot allocate). (3) Kernels are the CPU's where
they differ in what they keep (e.g. the CPU flash-attention kernel for CUDA's memory-efficient one: both keep the
output and the log-sum-exp). (4) Sharding overheads follow the backends' defaults, see ``_rank_bytes``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ssl3d.config import ConfigError, ModelConfig, OptimConfig, roi_problems
from ssl3d.memory.activation_checkpointing import (
    CheckpointPolicy,
    apply_activation_checkpointing,
    as_policy,
    simulate_offload,
)
from ssl3d.memory.cuda_autocast import cuda_autocast_rules
from ssl3d.memory.process import ALLOCATOR_NOTE, process_baseline_bytes
from ssl3d.model.meta import meta_model, model_from_key, model_key
from ssl3d.optim import build_optimizer
from ssl3d.step import DTYPES, LocalBackend, StepSettings, no_phase, run_step

__all__ = [
    "CATEGORIES",
    "CUBLAS_WORKSPACE",
    "CUDA_CONTEXT",
    "CUDNN_WORKSPACE",
    "NCCL_BUFFERS",
    "STRATEGIES",
    "MemoryEstimate",
    "StepTrace",
    "StorageTracker",
    "estimate_memory",
    "format_estimate",
    "make_step_inputs",
    "normalize_roi",
    "step_settings",
    "trace_step",
    "training_step",
]

GIB = 2**30
MIB = 2**20
STRATEGIES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3")
CATEGORIES = (
    "parameters",
    "buffers",
    "gradients",
    "optimizer_states",
    "activations",
    "temporaries",
    "inputs",
    "workspace",  # transient memory inside one kernel that PyTorch does not see as tensors (modelled)
    "host",  # always last: not device memory
)
_CAT = {name: i for i, name in enumerate(CATEGORIES)}
PHASES = ("setup", "forward", "backward", "optimizer")
_PHASE = {name: i for i, name in enumerate(PHASES)}
CUDA_BLOCK = 512  # the caching allocator rounds every request up to 512 bytes
CUDA_SEGMENT = 2 * MIB
# What a GPU process holds beyond its tensors. Stated allowances, each with its source; none is traced.
# pytorch#86509: a torch process's CUDA context measured 274 MiB with lazy module loading (torch's default since
# 1.13) and 636 MiB without; the rest is the kernels a training step loads (cuDNN, cuBLAS, torch's own).
CUDA_CONTEXT = GIB // 2
DEFAULT_CUDA_CONTEXT = CUDA_CONTEXT  # the older name
# torch's cuBLAS workspace per handle and stream (":4096:8" = 32 MiB on Hopper, 8 MiB + 128 KiB before) plus
# cuBLASLt's (32 MiB on Hopper, pytorch#120925); one stream runs forward and backward; via the caching allocator.
CUBLAS_WORKSPACE = 64 * MIB
# cuDNN convolution workspace at the peak, via the caching allocator. An allowance, not a bound: PyTorch tries
# cuDNN's engines in heuristic order and skips one whose workspace it cannot allocate (pytorch#49207), so the
# workspace takes what is free rather than failing; 256 MiB is the room a fit keeps for it.
CUDNN_WORKSPACE = 256 * MIB
# NCCL's buffers per rank when there is more than one (allocated by NCCL, outside the caching allocator).
# nccl-tests keeps 1 GB per GPU aside for NCCL and CUDA on HGX/DGX nodes (NVIDIA/nccl-tests#198); one communicator
# after an all-reduce held about 1.6 GB, context included (NVIDIA/nccl#864). NVLS on H100 can take more.
NCCL_BUFFERS = GIB
# A first CPU training step leaves resident memory that is no tensor: oneDNN's JIT kernels and primitive cache,
# per-thread scratch, allocator arenas (measured over the tensor peak for the tiny model: docs/memory.md).
DEFAULT_CPU_RUNTIME = 96 * MIB
DEFAULT_FRAGMENTATION = 0.10
DEEPSPEED_PERSISTENCE = 100_000  # elements; stage3_param_persistence_threshold default
# oneDNN (CPU) convolutions reorder their input (and output) into blocked layouts outside PyTorch's view: measured
# 1.4-3x the input's bytes for the decoder's convolutions, forward and backward alike.
CPU_CONV_WORKSPACE = 2.0


# ---------------------------------------------------------------------------------------------------------
# Counting live storages.


class StorageTracker(TorchDispatchMode):
    """Live bytes per category after every operator; works on real and on fake tensors.

    New storages take the category of the current phase (forward: activations; backward and optimizer step:
    temporaries; inside ``host()``: host). Parameters, optimizer states and inputs are registered with
    ``register``; gradients are re-labelled when autograd accumulates them (``watch_gradients``). Views share
    their base's storage and are counted once.
    """

    def __init__(
        self,
        round_bytes: int = 1,
        workspace: Callable[[Any, tuple], int] | None = None,
        pinned_host: bool = False,
    ) -> None:
        super().__init__()
        self.round_bytes = max(1, int(round_bytes))
        # CUDA offload copies into pinned memory from torch's caching host allocator, which rounds every block up
        # to a power of two (PowerOf2Ceil) and keeps it: the host column counts those block sizes (GPU_AUDIT S3).
        self.pinned_host = pinned_host
        self.workspace = workspace  # (op, args) -> transient bytes the op uses beyond its outputs
        self.current = [0] * len(CATEGORIES)
        self._info: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> [bytes, category]
        self._refs: set[weakref.ref] = set()
        self.phase = "setup"
        self._host = 0
        self.events: list[tuple[int, ...]] = []
        self._hooks: list[Any] = []

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def _bytes(self, st: torch.UntypedStorage, category: int = -1) -> int:
        n = st.nbytes()
        if self.pinned_host and category == _CAT["host"]:
            return 1 << max(0, n - 1).bit_length()
        r = self.round_bytes
        return -(-n // r) * r if r > 1 else n

    def _release(self, entry: list[int], ref: weakref.ref) -> None:
        self._refs.discard(ref)
        self.current[entry[1]] -= entry[0]

    def register(self, t: Tensor, category: str, relabel: bool = True) -> None:
        """Count ``t``'s storage under ``category`` (re-label it if it is already counted and ``relabel``)."""
        if not isinstance(t, Tensor) or t.device.type == "meta":
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or otherwise storage-less tensors
            return
        cat = _CAT[category]
        entry = self._info.get(st)
        if entry is None:
            entry = [self._bytes(st, cat), cat]
            self._info[st] = entry
            self._refs.add(weakref.ref(st, functools.partial(self._release, entry)))
            self.current[cat] += entry[0]
        elif relabel and entry[1] != cat:
            self.current[entry[1]] -= entry[0]
            entry[1] = cat
            self.current[cat] += entry[0]

    def mark(self) -> None:
        self.events.append((_PHASE[self.phase], *self.current))

    def set_phase(self, phase: str) -> None:
        self.mark()
        self.phase = phase

    @contextlib.contextmanager
    def host(self) -> Iterator[None]:
        """Storages created inside are host memory (offloaded activations)."""
        self._host += 1
        try:
            yield
        finally:
            self._host -= 1

    def register_step_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, inputs: dict[str, Tensor]
    ) -> list[nn.Parameter]:
        """Count what lives through a whole step (parameters, frozen ones too, buffers, optimizer states, inputs)
        and label the gradients as autograd creates them; returns the trained parameters."""
        params = [p for p in model.parameters() if p.requires_grad]
        for p in model.parameters():
            self.register(p, "parameters")
        for b in model.buffers():
            self.register(b, "buffers")
        for state in optimizer.state.values():
            for v in state.values():
                self.register(v, "optimizer_states")
        for v in inputs.values():
            self.register(v, "inputs")
        self.watch_gradients(params)
        return params

    def watch_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Label each ``.grad`` as a gradient the moment autograd accumulates it."""

        def hook(p: Tensor) -> None:
            if p.grad is not None:
                self.register(p.grad, "gradients")
                self.mark()

        self._hooks += [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if self._host:
            cat = "host"
        else:
            cat = "activations" if self.phase in ("forward", "setup") else "temporaries"
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.register(t, cat, relabel=False)
        extra = self.workspace(func, args) if self.workspace is not None else 0
        self.current[_CAT["workspace"]] += extra
        self.mark()
        self.current[_CAT["workspace"]] -= extra
        return out


def cpu_conv_workspace(factor: float = CPU_CONV_WORKSPACE) -> Callable[[Any, tuple], int]:
    """Workspace model for CPU convolutions: ``factor`` x the bytes of the convolution's input."""
    ops = {torch.ops.aten.convolution.default: 0, torch.ops.aten.convolution_backward.default: 1}

    def workspace(func: Any, args: tuple) -> int:
        i = ops.get(func)
        if i is None or len(args) <= i or not isinstance(args[i], Tensor):
            return 0
        return int(factor * args[i].numel() * args[i].element_size())

    return workspace


# ---------------------------------------------------------------------------------------------------------
# One training step, shared by the estimator (fake tensors) and the profiler (real tensors).


def normalize_roi(roi: int | Sequence[int]) -> tuple[int, int, int]:
    """An int means a cube; the rules are ``data.roi``'s (``ssl3d.config.roi_problems``)."""
    r = (int(roi),) * 3 if isinstance(roi, int | np.integer) else tuple(int(v) for v in roi)
    if len(r) != 3:
        raise ConfigError(f"roi: got {list(r)}, expected one size or three sizes")
    problems = roi_problems(r, "roi")
    if problems:
        raise ConfigError(problems)
    return r  # type: ignore[return-value]


def make_step_inputs(step: StepSettings, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """What the trainer holds during a step (the task says what: e.g. pre-training's crops, both views, their
    corrupted copies and rotation labels; fine-tuning's labelled crops)."""
    return step.task.step_inputs(step, device)


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: dict[str, Tensor],
    step: StepSettings,
    *,
    autocast_dtype: torch.dtype | None = None,
    phase: Callable[[str], None] = no_phase,
    objective: Any = None,
) -> Tensor:
    """The trainer's step (``ssl3d.step.run_step`` with the task's objective) on ready-made inputs
    (``make_step_inputs``), on one process with plain autograd: forward, losses, backward, optimizer step.
    ``objective``: one built beforehand (the trace registers the state it keeps across steps); default: a fresh
    ``step.task.objective(step)``."""
    device_type = next(iter(inputs.values())).device.type
    backend = LocalBackend(optimizer, autocast_dtype, device_type)
    objective = step.task.objective(step) if objective is None else objective
    losses, _ = run_step(model, objective, [step.task.batch_from_inputs(inputs)], backend, phase=phase)
    return losses[0]["total"]


# ---------------------------------------------------------------------------------------------------------
# Building the model without memory.


def _unit_sizes(model: nn.Module) -> dict[str, int]:
    """Parameter counts that sharding needs: total, trainable, per Swin block (FSDP/ZeRO-3 units), the rest (FSDP
    root). SwinUNETR (fine-tuning) has no ``conv``: FSDP shards its Swin blocks and leaves the convolutional
    encoder/decoder path in the root, as ``ssl3d.strategies.fsdp`` wraps it."""
    from monai.networks.nets.swin_unetr import SwinTransformerBlock

    total = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, SwinTransformerBlock)]
    small = sum(p.numel() for p in model.parameters() if p.numel() < DEEPSPEED_PERSISTENCE)
    modules = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    decoder = sum(p.numel() for p in model.conv.parameters()) if hasattr(model, "conv") else 0
    return {
        "total": total,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),  # the probe's encoder is frozen
        # FSDP2 units: every Swin block and the decoder (ssl3d.strategies.fsdp); the root holds the rest.
        "largest_block": max([*blocks, decoder], default=0),
        "root": total - sum(blocks) - decoder,
        "persistent": small,
        "largest_module": max(modules, default=0),
    }


# ---------------------------------------------------------------------------------------------------------
# The trace.


@dataclass
class StepTrace:
    """Timeline of one unsharded rank: ``events[i] = (phase, bytes per category...)`` after operator i."""

    events: np.ndarray  # [E, 1 + len(CATEGORIES)] int64
    units: dict[str, int]  # parameter counts (see _unit_sizes)
    param_bytes: int
    seconds: float

    def column(self, category: str) -> np.ndarray:
        return self.events[:, 1 + _CAT[category]]

    @property
    def phase(self) -> np.ndarray:
        return self.events[:, 0]


class _RealIndexTensors(TorchFunctionMode):
    """``torch.arange`` of plain numbers made for real inside the fake trace: MONAI's losses build their reduction
    axes that way and read them back with ``.tolist()`` (DiceLoss), which a fake tensor cannot answer."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is torch.arange and all(isinstance(a, int | float) for a in (*args, *kwargs.values())):
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=256)
def _trace_cached(key: str, step: StepSettings, cuda: bool) -> StepTrace:
    """``step`` without its model (``key`` names it): hashable, so traces are cached per configuration."""
    import time

    from torch._subclasses.fake_tensor import FakeTensorMode

    from ssl3d.model.attention import apply_fused_attention

    t0 = time.perf_counter()
    model = copy.deepcopy(meta_model(key, step.contrastive_dim, step.task, step.num_classes))
    units = _unit_sizes(model)
    if step.fused_attention:
        apply_fused_attention(model)
    apply_activation_checkpointing(model, step.policy, warn=False)
    model.train()
    tracker = StorageTracker(
        round_bytes=CUDA_BLOCK if cuda else 1, workspace=None if cuda else cpu_conv_workspace(), pinned_host=cuda
    )
    # A GPU step's autocast follows CUDA's op lists, not the CPU's the fake trace would otherwise get.
    rules = cuda_autocast_rules() if cuda and step.precision != "fp32" else contextlib.nullcontext()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model.to_empty(device="cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        # foreach (multi-tensor) AdamW is the CUDA default and the larger one in temporaries.
        optimizer = build_optimizer(OptimConfig(), params, foreach=cuda)
        step = dataclasses.replace(step, model=model_from_key(key))  # the cached step came without its model
        inputs = make_step_inputs(step, "cpu")
        objective = step.task.objective(step)
        with simulate_offload(tracker.host) if cuda else contextlib.nullcontext():
            # Steady state: the optimizer's states exist before the measured step (one step on zero gradients
            # creates them at a fraction of the cost of a traced training step).
            for p in params:
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tracker.register_step_state(model, optimizer, inputs)
            # What the objective keeps across steps (pre-training's queue of negatives, full: the steady state) is
            # per-rank state, never sharded: counted with the buffers.
            for t in getattr(objective, "state_tensors", list)():
                tracker.register(t, "buffers")
            with tracker, _RealIndexTensors(), rules:
                tracker.mark()
                training_step(
                    model,
                    optimizer,
                    inputs,
                    step,
                    autocast_dtype=DTYPES[step.precision],
                    phase=tracker.set_phase,
                    objective=objective,
                )
                tracker.mark()
            tracker.remove_hooks()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # frozen ones too
    events = np.asarray(tracker.events, dtype=np.int64)
    return StepTrace(events=events, units=units, param_bytes=param_bytes, seconds=time.perf_counter() - t0)


def step_settings(
    model: ModelConfig | StepSettings,
    roi: int | Sequence[int] | None = None,
    batch_size: int = 1,
    num_samples: int = 2,
    precision: str = "fp32",
    policy: CheckpointPolicy | dict[str, Any] | str | None = None,
    fused_attention: bool = True,
    two_passes: bool = False,
    contrastive_dim: int = 512,
    grad_cache_chunk: int = 0,
    num_classes: int = 14,
    negative_queue: int = 0,
    *,
    task: Any = None,
) -> StepSettings:
    """Checked ``StepSettings`` (ROI and policy normalised); ``model`` may already be settings (then the rest is
    ignored); ``task``: a ``ssl3d.tasks.Task``. Raises ``ConfigError`` naming what is wrong."""
    if not isinstance(model, StepSettings):
        if roi is None:
            raise ConfigError("roi: missing; give the crop size, e.g. 96")
        if task is None:
            raise ConfigError("task: missing; give the task whose step is estimated (ssl3d.tasks.get_task)")
        model = StepSettings(
            model, roi, batch_size, num_samples, precision, policy, fused_attention, two_passes, contrastive_dim,
            grad_cache_chunk, num_classes, negative_queue, task=task,
        )  # fmt: skip
    s = model
    problem = s.task.check_settings(s)
    if problem:
        raise ConfigError(problem)
    if s.precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f'precision: got "{s.precision}", expected fp32, bf16 or fp16')
    if s.batch_size < 1 or s.num_samples < 1:
        raise ConfigError(f"batch_size/num_samples: got {s.batch_size}/{s.num_samples}, expected at least 1 each")
    if s.negative_queue < 0:
        raise ConfigError(f"negative_queue: got {s.negative_queue}, expected 0 (off) or the queued negatives (>= 1)")
    return dataclasses.replace(
        s,
        roi=normalize_roi(s.roi),
        policy=as_policy(s.policy),
        batch_size=int(s.batch_size),
        num_samples=int(s.num_samples),
        fused_attention=bool(s.fused_attention),
        two_passes=bool(s.two_passes),
        grad_cache_chunk=int(s.grad_cache_chunk),
        num_classes=int(s.num_classes),
        negative_queue=int(s.negative_queue),
    )


def trace_step(model: ModelConfig | StepSettings, *step: Any, device: str = "cuda", **step_kw: Any) -> StepTrace:
    """Trace one unsharded training step for ``device`` (cached per configuration); the step is ``model`` as
    ``StepSettings``, or ``step_settings``' arguments."""
    if device not in ("cuda", "cpu"):
        raise ConfigError(f'device: got "{device}", expected "cuda" or "cpu" (the target the estimate is for)')
    s = step_settings(model, *step, **step_kw)
    return _trace_cached(model_key(s.model), dataclasses.replace(s, model=None), device == "cuda")


# ---------------------------------------------------------------------------------------------------------
# Per-rank arithmetic.

DEEPSPEED_DEFAULT_BUCKET = 500_000_000  # elements


def auto_bucket_size(parameters: int) -> int:
    """The presets' ``"auto"`` bucket size for a model of ``parameters`` elements (the rule of
    ``ssl3d.strategies.ds_config.auto_bucket_size``, restated so the estimator stays below the strategy layer;
    a unit test holds the two equal): that many, rounded up to a multiple of 4096, at most DeepSpeed's default."""
    return min(DEEPSPEED_DEFAULT_BUCKET, -(-parameters // 4096) * 4096)


@dataclass
class MemoryEstimate:
    """Peak memory per rank of one training step, in bytes, with its breakdown at the peak."""

    breakdown: dict[str, int]  # parameters, gradients, optimizer_states, activations, temporaries, ..., total
    peak_phase: str
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.breakdown["total"]

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in self.breakdown.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "peak_phase": self.peak_phase,
            "bytes": dict(self.breakdown),
            "gib": self.gib(),
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)


def _rank_bytes(
    trace: StepTrace,
    strategy: str,
    world_size: int,
    precision: str,
    offload_optimizer: bool,
    offload_params: bool,
    reduce_bucket_size: int | None,
    overlap_comm: bool | None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Per-event device bytes of one rank under ``strategy``; returns columns and notes on what was assumed.

    - ddp: full parameters, gradients and optimizer states; the gradients are DDP's buckets, kept between steps;
    - zero1, zero2: gradients and optimizer states / N (the pinned DeepSpeed partitions gradients at stage 1 too), plus
      the contiguous gradient bucket of ``reduce_bucket_size`` elements (two with ``overlap_comm``) in backward
      and step; every DeepSpeed stage keeps an fp32 master copy of its partition, in fp32 runs too;
    - zero3: everything / N, parameters under 1e5 elements kept whole, two gathered modules (current + prefetch),
      one reduce bucket for the whole run;
    - fsdp (FSDP2, one unit per Swin block): everything / N, plus the root's parameters gathered through forward
      and backward (it is not resharded after forward) and two gathered blocks, and one block's unsharded grads;
    - offload_optimizer: optimizer states and the step's temporaries live on the host;
      offload_params (zero3/fsdp): the sharded parameters (and for FSDP the gradients) live on the host.
    DeepSpeed's bf16 (zero*) keeps bf16 parameters/gradients and fp32 master weights in the optimizer.
    """
    n = max(1, int(world_size))
    if reduce_bucket_size is None:  # what ssl3d's presets resolve "auto" to: the model's parameter count
        reduce_bucket_size = auto_bucket_size(trace.units["total"])
    col = {c: trace.column(c).astype(np.float64) for c in CATEGORIES}
    phase = trace.phase
    in_step = phase == _PHASE["optimizer"]
    in_bw = phase == _PHASE["backward"]
    fwd_bwd = (phase == _PHASE["forward"]) | in_bw
    units = trace.units
    pb = trace.param_bytes / max(units["total"], 1)  # bytes per parameter in the trace (4: fp32 parameters)
    low = precision in ("bf16", "fp16")
    notes: list[str] = []
    params, grads, opt = col["parameters"], col["gradients"], col["optimizer_states"]
    extra = np.zeros_like(params)
    deepspeed = strategy.startswith("zero")
    if deepspeed:
        # An fp32 master copy of the partition lives with the optimizer states, in fp32 runs too (measured:
        # bench/model_states.py); bf16/fp16 runs keep low-precision parameters and gradients.
        if low:
            params = params / 2
            grads = grads / 2
        opt = opt + units.get("trainable", units["total"]) * 4 * (opt > 0)
        notes.append("DeepSpeed: fp32 master weights counted as optimizer states" + (", bf16 model" if low else ""))
    if strategy in ("single", "ddp"):
        if n > 1 and strategy == "single":
            notes.append("single: world_size ignored (one process)")
        if strategy == "ddp":
            # gradient_as_bucket_view=True: the gradients ARE DDP's buckets, allocated for the whole run.
            # Same shapes (and allocator rounding) as the trained parameters (the probe's frozen encoder has none).
            grads = np.maximum(grads, params * (units.get("trainable", units["total"]) / max(units["total"], 1)))
    elif strategy in ("zero1", "zero2"):
        # The pinned DeepSpeed's stage 1 also reduces gradients into this rank's partition (measured: as stage 2).
        opt = opt / n
        grads = grads / n
        elem = 2 if low else 4
        buckets = 2 if overlap_comm else 1
        bucket = reduce_bucket_size * elem * buckets
        extra = extra + bucket * (in_bw | in_step)
        notes.append(f"DeepSpeed gradient bucket: {buckets} x {reduce_bucket_size:.3g} elements in backward and step")
    elif strategy == "zero3":
        persistent = units["persistent"] * pb * (0.5 if low else 1.0)
        params = params / n + persistent * (1 - 1 / n)
        grads = grads / n
        opt = opt / n
        live = 2 * units["largest_module"] * pb * (0.5 if low else 1.0)
        elem = 2 if low else 4
        # One reduce bucket, allocated for the whole run (measured: bench/model_states.py).
        extra = extra + live * fwd_bwd + reduce_bucket_size * elem
        notes.append("ZeRO-3: two gathered modules (current + prefetch), params < 1e5 elements kept whole, 1 bucket")
    elif strategy == "fsdp":
        gathered = 0.5 if low else 1.0  # MixedPrecisionPolicy(param_dtype=bf16) gathers bf16 parameters
        params = params / n
        grads = grads / n
        opt = opt / n
        root = units["root"] * pb * gathered
        block = units["largest_block"] * pb * gathered
        extra = extra + (root + 2 * block) * fwd_bwd + (units["root"] + units["largest_block"]) * pb * in_bw
        notes.append("FSDP2: root gathered in forward+backward, two blocks gathered, one block + root unsharded grads")
    else:
        raise ConfigError(f'strategy: got "{strategy}", expected one of {", ".join(STRATEGIES)}')
    temps = col["temporaries"]
    if offload_optimizer:
        opt = opt * 0
        temps = np.where(in_step, 0.0, temps)
        notes.append("optimizer offload: optimizer states and the step on the host")
    if offload_params:
        if strategy not in ("zero3", "fsdp"):
            raise ConfigError(
                f"offload_params: needs strategy zero3 or fsdp (got {strategy}); or offload the optimizer"
            )
        params = params * 0
        if strategy == "fsdp":
            grads = grads * 0
        notes.append("parameter offload: sharded parameters on the host, gathered units on the device")
    out = {
        "parameters": params,
        "buffers": col["buffers"],
        "gradients": grads,
        "optimizer_states": opt,
        "activations": col["activations"],
        "temporaries": temps,
        "inputs": col["inputs"],
        "workspace": col["workspace"],
        "sharding_buffers": extra,
        "host": col["host"],
    }
    return out, notes


def estimate_memory(
    model: ModelConfig | StepSettings,
    *step_args: Any,
    strategy: str = "single",
    world_size: int = 1,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    device: str = "cuda",
    fragmentation: float = DEFAULT_FRAGMENTATION,
    runtime_bytes: int | None = None,
    reduce_bucket_size: int | None = None,
    overlap_comm: bool | None = None,
    process_baseline: int | None = None,
    workspace_bytes: int | None = None,
    nccl_bytes: int | None = None,
    **step_kw: Any,
) -> MemoryEstimate:
    """Predicted peak memory per rank of one step (forward, backward, AdamW step), without the device.

    The step is ``model`` as ``StepSettings`` (what callers inside ssl3d pass), or ``step_settings``' arguments
    (model, roi, batch size, crops, precision, policy, ...): ``batch_size`` volumes x ``num_samples`` crops per
    rank, two views each. The keywords here say how ranks share it and what device it is for.
    ``device="cuda"``: tensors as CUDA autocast makes them, rounded as the caching allocator does, + the cuBLAS and
    cuDNN workspaces (``workspace_bytes``, default ``CUBLAS_WORKSPACE + CUDNN_WORKSPACE``), + ``fragmentation``
    headroom rounded to 2 MiB segments, + the CUDA context (``runtime_bytes``, default ``CUDA_CONTEXT``), + NCCL's
    buffers for more than one rank (``nccl_bytes``, default ``NCCL_BUFFERS``). ``"cpu"``: tensor bytes + a oneDNN
    convolution workspace model + ``runtime_bytes`` (default 96 MiB), comparable with the peak RSS growth
    ``profile_memory`` measures; plus ``process_baseline`` (default: measured once per environment, see
    ``ssl3d.memory.process``) it is ``process_peak``, the whole process's peak RSS that ``top`` shows.
    ``two_passes`` reproduces the reference (one forward per view); ``grad_cache_chunk`` the trainer's
    contrastive gradient caching (``ssl.grad_cache_chunk`` views per forward/backward); ``negative_queue`` the queue
    of negatives (``ssl.negative_queue``): its ``negative_queue x contrastive_dim`` fp32 buffer under buffers, and
    the loss's extra ``[views, negative_queue]`` logits where the trace meets them.
    """
    step = step_settings(model, *step_args, **step_kw)
    trace = trace_step(step, device=device)
    precision = step.precision
    cols, notes = _rank_bytes(
        trace,
        strategy,
        world_size,
        precision,
        offload_optimizer,
        offload_params,
        reduce_bucket_size,
        overlap_comm,
    )
    cuda = device == "cuda"
    if cuda:  # allocated through the caching allocator: they count in max_memory_allocated
        workspace = CUBLAS_WORKSPACE + CUDNN_WORKSPACE if workspace_bytes is None else int(workspace_bytes)
        cols["workspace"] = cols["workspace"] + workspace
    sharded = strategy != "single" and world_size > 1
    nccl = (NCCL_BUFFERS if nccl_bytes is None else int(nccl_bytes)) if cuda and sharded else 0
    device_total = sum(v for k, v in cols.items() if k != "host")
    i = int(np.argmax(device_total))
    breakdown = {k: int(round(float(v[i]))) for k, v in cols.items() if k != "host"}
    allocated = int(round(float(device_total[i])))
    breakdown["allocated_peak"] = allocated
    breakdown["activations_max"] = int(trace.column("activations").max())
    breakdown["host_offload_max"] = int(cols["host"].max())
    if cuda:
        runtime = CUDA_CONTEXT if runtime_bytes is None else int(runtime_bytes)
        reserved = math.ceil(allocated * (1 + fragmentation) / CUDA_SEGMENT) * CUDA_SEGMENT
        allowances = f"cuBLAS + cuDNN workspaces {workspace / MIB:.0f} MiB, CUDA context {runtime / MIB:.0f} MiB"
        if nccl:
            allowances += f", NCCL buffers {nccl / MIB:.0f} MiB"
        notes.append(f"CUDA allowances (stated, not traced): {allowances}")
        if breakdown["host_offload_max"]:
            notes.append("host: pinned blocks rounded up to powers of two, as torch's host allocator keeps them")
    else:
        runtime = DEFAULT_CPU_RUNTIME if runtime_bytes is None else int(runtime_bytes)
        reserved = allocated
    breakdown["allocator_overhead"] = reserved - allocated
    breakdown["reserved"] = reserved
    breakdown["runtime"] = runtime
    if cuda:
        breakdown["nccl"] = nccl
    breakdown["total"] = reserved + runtime + nccl
    if device == "cpu":
        baseline = process_baseline_bytes() if process_baseline is None else int(process_baseline)
        breakdown["process_baseline"] = baseline
        breakdown["process_peak"] = breakdown["total"] + baseline
        notes.append(ALLOCATOR_NOTE)
    config = {
        "model": step.model.model_dump(),
        "roi": list(step.roi),
        "batch_size": step.batch_size,
        "num_samples": step.num_samples,
        "precision": step.precision,
        "policy": step.policy.label,
        "fused_attention": step.fused_attention,
        "strategy": strategy,
        "world_size": world_size,
        "offload_optimizer": offload_optimizer,
        "offload_params": offload_params,
        "device": device,
        "two_passes": step.two_passes,
        "grad_cache_chunk": step.grad_cache_chunk,
        "negative_queue": step.negative_queue,
        "task": step.task.name,
        "task_label": step.task.describe(step.num_classes),
        "num_classes": step.num_classes if step.task.needs_classes else None,
        "parameters_count": trace.units["total"],
        "trainable_count": trace.units["trainable"],
        "trace_seconds": round(trace.seconds, 2),
    }
    return MemoryEstimate(breakdown=breakdown, peak_phase=PHASES[int(trace.phase[i])], config=config, notes=notes)


_ROWS = (
    ("parameters", "parameters"),
    ("buffers", "buffers"),
    ("gradients", "gradients"),
    ("optimizer_states", "optimizer states"),
    ("activations", "activations (saved for backward)"),
    ("temporaries", "temporaries"),
    ("inputs", "inputs (crops, views)"),
    ("workspace", "kernel workspaces (modelled)"),
    ("sharding_buffers", "sharding/communication buffers"),
    ("allocated_peak", "= allocated at peak"),
    ("allocator_overhead", "allocator rounding/fragmentation"),
    ("runtime", "CUDA context / CPU runtime"),
    ("nccl", "NCCL buffers (outside the allocator)"),
    ("total", "= total per rank"),
    ("process_baseline", "libraries before the step (measured)"),
    ("process_peak", "= whole-process peak (RSS)"),
    ("activations_max", "(max activations during forward)"),
    ("host_offload_max", "(host memory for offload)"),
)


def format_estimate(est: MemoryEstimate) -> str:
    """A two-column table in GiB for the terminal."""
    c = est.config
    roi = "x".join(str(r) for r in c["roi"])
    task = c["task_label"].rstrip(", ") + "  " if c.get("task_label") else ""
    head = (
        f"{task}{c['strategy']} x{c['world_size']}  roi {roi}  batch {c['batch_size']}x{c['num_samples']}  "
        f"{c['precision']}  checkpointing {c['policy']}  fused attention {'on' if c['fused_attention'] else 'off'}  "
        f"({c['device']}, peak in {est.peak_phase})"
    )
    lines = [head, "-" * len(head)]
    for key, label in _ROWS:
        if key in est.breakdown and not (key == "nccl" and not est.breakdown[key]):
            lines.append(f"{label:<36} {est.breakdown[key] / GIB:10.3f} GiB")
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)
