"""Activation checkpointing and CPU offload of saved activations, applied to the SSL model from outside.

Why not MONAI's ``use_checkpoint`` flag: it is all-or-nothing (every block, attention and MLP separately, never
the reconstruction decoder, which at full resolution holds a large share of the activations), and it cannot
offload. Why not ``checkpoint_wrapper``: it inserts ``_checkpoint_wrapped_module.`` into parameter names, which
then have to be cleaned everywhere a state_dict is saved or loaded (MONAI's ``load_from`` would not find them).

Here the chosen modules keep their place in the module tree and their names; only their class is swapped for a
subclass whose ``forward`` runs the same code through ``torch.utils.checkpoint`` (non-reentrant, RNG state
preserved, so dropout/drop-path recompute identically) and/or under saved-tensor hooks that move what autograd
saves to host memory. ``isinstance`` checks (FSDP unit selection, MONAI code) still see the MONAI classes.

Policies (``CheckpointPolicy.policy``):

- ``none``: nothing (MONAI's own ``model.use_checkpoint`` flag still works on its own);
- ``full``: every Swin block (one checkpoint per block), the patch mergings and every stage of the
  reconstruction decoder;
- ``selective``: chosen ``stages``, every ``every_k_blocks``-th block, ``part`` = attention | mlp | block | both,
  decoder on/off; default: the attention of stages 0 and 1 (the highest-resolution ones);
- ``offload``: no recomputation; what the chosen parts save for backward goes to host memory.

``offload_to_cpu`` (DeepSpeed's ``cpu_checkpointing``) with ``full``/``selective`` keeps the checkpoint inputs
in host memory as well. Order of application: checkpointing -> (Strategy.setup) wrap/shard -> optimizer.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from monai.networks.nets.swin_unetr import SwinTransformerBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ssl3d.config import ConfigError
from ssl3d.model.attention import FusedSwinBlock
from ssl3d.model.ssl_model import ReorderedSequential, execution_order

__all__ = [
    "CHECKPOINT_KEYS",
    "DEEPSPEED_KEYS",
    "PARTS",
    "POLICIES",
    "CheckpointPolicy",
    "apply_activation_checkpointing",
    "checkpointed_modules",
    "offload_saved_tensors",
    "remove_activation_checkpointing",
    "simulate_offload",
]

POLICIES = ("none", "full", "selective", "offload")
PARTS = ("block", "attention", "mlp", "both")
SSL3D_KEYS = ("policy", "stages", "every_k_blocks", "part", "decoder", "merging", "mlp_chunks", "offload_to_cpu")
# DeepSpeed's own activation_checkpointing keys: accepted so one ds_config serves every backend.
DEEPSPEED_KEYS = (
    "partition_activations",
    "cpu_checkpointing",
    "contiguous_memory_optimization",
    "number_checkpoints",
    "synchronize_checkpoint_boundary",
    "profile",
)
CHECKPOINT_KEYS = SSL3D_KEYS + DEEPSPEED_KEYS
NUM_STAGES = 4

# Defaults each policy fills in for keys the user did not give.
_PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "full": {"stages": (0, 1, 2, 3), "every_k_blocks": 1, "part": "block", "decoder": True, "merging": True},
    "selective": {"stages": (0, 1), "every_k_blocks": 1, "part": "attention", "decoder": False, "merging": False},
    "offload": {
        "stages": (0, 1, 2, 3),
        "every_k_blocks": 1,
        "part": "block",
        "decoder": True,
        "merging": True,
        "offload_to_cpu": True,
    },
}


@dataclass(frozen=True)
class CheckpointPolicy:
    """What to recompute or offload; parsed from a ds_config ``activation_checkpointing`` section."""

    policy: str = "none"
    stages: tuple[int, ...] = (0, 1, 2, 3)  # encoder stages whose Swin blocks are affected
    every_k_blocks: int = 1  # blocks of the chosen stages numbered 0, 1, ... across stages; every k-th one
    part: str = "block"  # block: one checkpoint per block; attention/mlp: that half only; both: each half
    decoder: bool = True  # the reconstruction decoder's stages ([Conv, Norm, Act, Upsample] each)
    merging: bool = False  # the patch merging at the end of each chosen stage (concat + norm + linear)
    mlp_chunks: int = 1  # the chosen blocks' norm2 + MLP in this many chunks along the first spatial axis
    offload_to_cpu: bool = False  # saved tensors (offload) or checkpoint inputs (full/selective) in host memory
    # DeepSpeed keys without an effect here, kept so the section round-trips and warnings can name them.
    partition_activations: bool = False
    contiguous_memory_optimization: bool = False
    number_checkpoints: int | None = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False
    notes: tuple[str, ...] = field(default=(), compare=False)  # warnings collected while parsing

    # -- construction --------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> CheckpointPolicy:
        """A policy with its defaults, e.g. ``preset("selective", part="mlp")``."""
        return cls.from_dict({"policy": name, **overrides})

    @classmethod
    def from_dict(cls, section: dict[str, Any] | None, prefix: str = "activation_checkpointing") -> CheckpointPolicy:
        """Parse DeepSpeed's section plus ssl3d keys; every problem -> one ConfigError naming the dotted key.

        A section without ``policy`` means ``full`` (DeepSpeed's section is a request to checkpoint), an empty or
        missing section ``none``. ``cpu_checkpointing`` is an alias of ``offload_to_cpu``. Keys starting with
        ``_`` are comments.
        """
        section = {k: v for k, v in (section or {}).items() if not str(k).startswith("_")}
        problems: list[str] = []
        for key in section:
            if key not in CHECKPOINT_KEYS:
                close = difflib.get_close_matches(str(key), CHECKPOINT_KEYS, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                problems.append(f"{prefix}.{key}: unknown key; {hint}valid keys: {', '.join(CHECKPOINT_KEYS)}")
        name = section.get("policy", "full" if section else "none")
        if name not in POLICIES:
            close = difflib.get_close_matches(str(name), POLICIES, n=1)
            hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
            problems.append(f"{prefix}.policy: got {json.dumps(name)}, expected one of {', '.join(POLICIES)}{hint}")
            name = "none"
        values: dict[str, Any] = {"policy": name, **_PRESETS[name]}

        def boolean(key: str) -> None:
            if key in section:
                if not isinstance(section[key], bool):
                    problems.append(f"{prefix}.{key}: got {json.dumps(section[key])}, expected true/false")
                else:
                    values[key] = section[key]

        def positive_int(key: str, note: str = "") -> None:
            if key in section:
                v = section[key]
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    problems.append(f"{prefix}.{key}: got {json.dumps(v)}, expected an integer >= 1{note}")
                else:
                    values[key] = v

        for key in ("decoder", "merging", "offload_to_cpu", "partition_activations", "contiguous_memory_optimization"):
            boolean(key)
        for key in ("synchronize_checkpoint_boundary", "profile"):
            boolean(key)
        if "cpu_checkpointing" in section:
            cpu = section["cpu_checkpointing"]
            if not isinstance(cpu, bool):
                problems.append(f"{prefix}.cpu_checkpointing: got {json.dumps(cpu)}, expected true/false")
            elif "offload_to_cpu" in section and section["offload_to_cpu"] != cpu:
                problems.append(
                    f"{prefix}.cpu_checkpointing: got {json.dumps(cpu)} but offload_to_cpu is "
                    f"{json.dumps(section['offload_to_cpu'])}; they are the same switch, give one of them"
                )
            else:
                values["offload_to_cpu"] = cpu
        if "stages" in section:
            st = section["stages"]
            if not isinstance(st, list | tuple) or not all(isinstance(s, int) and not isinstance(s, bool) for s in st):
                problems.append(f"{prefix}.stages: got {json.dumps(st)}, expected a list of stage indices 0-3")
            elif any(not 0 <= s < NUM_STAGES for s in st):
                problems.append(f"{prefix}.stages: got {json.dumps(list(st))}, expected indices in 0-3 (4 stages)")
            else:
                values["stages"] = tuple(sorted(set(st)))
        positive_int("every_k_blocks")
        if "part" in section:
            part = section["part"]
            if part not in PARTS:
                problems.append(f"{prefix}.part: got {json.dumps(part)}, expected one of {', '.join(PARTS)}")
            else:
                values["part"] = part
        positive_int("mlp_chunks", " (1: off)")
        if "number_checkpoints" in section:
            nc = section["number_checkpoints"]
            if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
                problems.append(f"{prefix}.number_checkpoints: got {json.dumps(nc)}, expected a positive integer")
            else:
                values["number_checkpoints"] = nc
        if problems:
            raise ConfigError(problems)

        notes = []
        for key, why in (
            ("partition_activations", "splits activations over model-parallel ranks; ssl3d has no model parallelism"),
            ("contiguous_memory_optimization", "DeepSpeed's buffer for its own checkpoint function, not used here"),
            ("synchronize_checkpoint_boundary", "a CUDA sync for DeepSpeed's profiling"),
            ("profile", "DeepSpeed's checkpoint timing"),
        ):
            if values.get(key):
                notes.append(f"{prefix}.{key}: true has no effect ({why})")
        if values.get("number_checkpoints") is not None:
            notes.append(f"{prefix}.number_checkpoints: no effect; choose blocks with stages/every_k_blocks")
        if name == "none" and values.get("mlp_chunks", 1) > 1:
            notes.append(f'{prefix}.mlp_chunks: no effect with policy "none"; use "selective" with the stages to chunk')
        if name == "none" and values.get("offload_to_cpu"):
            notes.append(f'{prefix}.offload_to_cpu: no effect with policy "none"; use policy "offload"')
        return cls(**values, notes=tuple(notes))

    # -- queries -------------------------------------------------------------------------------------------
    @property
    def recompute(self) -> bool:
        return self.policy in ("full", "selective")

    @property
    def active(self) -> bool:
        return self.policy != "none"

    @property
    def label(self) -> str:
        """Short name for tables and plots."""
        if self.policy == "none":
            return "none"
        parts = []
        if self.stages:
            stages = ",".join(str(s) for s in self.stages)
            k = f"/{self.every_k_blocks}" if self.every_k_blocks > 1 else ""
            parts.append(f"{self.part}@{stages}{k}")
        if self.merging and self.stages:
            parts.append("merging")
        if self.mlp_chunks > 1 and self.stages:
            parts.append(f"mlp/{self.mlp_chunks}")
        if self.decoder:
            parts.append("decoder")
        suffix = "+offload" if self.offload_to_cpu and self.policy != "offload" else ""
        return f"{self.policy}({' '.join(parts) or 'nothing'}){suffix}"

    def to_dict(self) -> dict[str, Any]:
        """The section back in ds_config vocabulary (ssl3d keys only)."""
        d = asdict(self)
        d["stages"] = list(self.stages)
        return {k: d[k] for k in SSL3D_KEYS}


def as_policy(policy: CheckpointPolicy | dict[str, Any] | str | None) -> CheckpointPolicy:
    """Accept a policy, a section dict, a policy name or None (= none)."""
    if policy is None:
        return CheckpointPolicy()
    if isinstance(policy, CheckpointPolicy):
        return policy
    if isinstance(policy, str):
        return CheckpointPolicy.preset(policy)
    return CheckpointPolicy.from_dict(policy)


# ---------------------------------------------------------------------------------------------------------
# Offloading saved tensors to host memory.

_SIMULATE_HOST: Callable[[], contextlib.AbstractContextManager] | None = None


@contextlib.contextmanager
def simulate_offload(host_allocations: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Make offload copy even CPU tensors, allocating the copies inside ``host_allocations()``.

    For the memory estimator, which traces a GPU step with fake CPU tensors: it needs to see the device->host
    copies (as host memory) and the host->device copies in backward (as device temporaries).
    """
    global _SIMULATE_HOST
    previous, _SIMULATE_HOST = _SIMULATE_HOST, host_allocations
    try:
        yield
    finally:
        _SIMULATE_HOST = previous


def _pack_simulated(t: Tensor) -> Any:
    assert _SIMULATE_HOST is not None
    with _SIMULATE_HOST():
        host = t.detach().clone()
    return host


def _unpack_simulated(host: Tensor) -> Tensor:
    return host.clone()  # the host->device copy in backward


def offload_saved_tensors(device: torch.device) -> contextlib.AbstractContextManager:
    """What autograd saves goes to host memory: torch's ``save_on_cpu(pin_memory=True)`` for a device's tensors;
    nothing to do for tensors already on the CPU; under ``simulate_offload`` (the estimator), counted copies."""
    if _SIMULATE_HOST is not None:
        return torch.autograd.graph.saved_tensors_hooks(_pack_simulated, _unpack_simulated)
    if device.type == "cpu":
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=True)


# ---------------------------------------------------------------------------------------------------------
# The wrappers: class swaps that keep module names.


@dataclass(frozen=True)
class _Plan:
    """How one module runs: recompute in backward and/or keep what autograd saves in host memory."""

    recompute: bool
    offload: bool
    part: str = "block"
    mlp_chunks: int = 1


def _run(plan: _Plan | None, fn: Callable[..., Tensor], *args: Any) -> Tensor:
    if plan is None:
        return fn(*args)
    ctx = offload_saved_tensors(args[0].device) if plan.offload else contextlib.nullcontext()
    with ctx:
        if plan.recompute and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
        return fn(*args)


_MONAI = _Plan(recompute=True, offload=False)  # MONAI's own use_checkpoint behaviour for a part


class CheckpointedSwinBlock(SwinTransformerBlock):
    """A MONAI Swin block whose halves (or whole) run under checkpoint/offload per ``_ssl3d_plan``."""

    _ssl3d_plan: _Plan

    def _parts(self, x: Tensor, mask_matrix: Tensor | None, p1: _Plan | None, p2: _Plan | None) -> Tensor:
        shortcut = x
        x = shortcut + self.drop_path(_run(p1, self.forward_part1, x, mask_matrix))
        if self._ssl3d_plan.mlp_chunks > 1:
            return x + _run(p2, self._chunked_part2, x)
        return x + _run(p2, self.forward_part2, x)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm2(x))

    def _chunked_part2(self, x: Tensor) -> Tensor:
        """``forward_part2`` with norm2 + MLP (token-wise, so exact) run per chunk of the first spatial axis, each
        recomputed in backward: the 4x-wide hidden layer exists for one chunk at a time. Drop-path (one draw per
        sample) stays outside the chunks; MLP dropout, were it on, would draw per chunk."""
        chunks = x.split(-(-x.shape[1] // self._ssl3d_plan.mlp_chunks), dim=1)
        if torch.is_grad_enabled():
            out = [checkpoint(self._mlp, c, use_reentrant=False, preserve_rng_state=True) for c in chunks]
        else:
            out = [self._mlp(c) for c in chunks]
        return self.drop_path(torch.cat(out, dim=1))

    def forward(self, x: Tensor, mask_matrix: Tensor | None) -> Tensor:
        plan = self._ssl3d_plan
        monai = _MONAI if self.use_checkpoint else None
        if plan.part == "block":
            return _run(plan, self._parts, x, mask_matrix, None, None)
        p1 = plan if plan.part in ("attention", "both") else monai
        p2 = plan if plan.part in ("mlp", "both") else monai
        return self._parts(x, mask_matrix, p1, p2)


class CheckpointedFusedSwinBlock(CheckpointedSwinBlock, FusedSwinBlock):
    """``CheckpointedSwinBlock`` over ``FusedSwinBlock``: the checkpointing forward, the fused window shuffling."""


# The Swin block classes checkpointing accepts, each with the class it swaps a block to.
_BLOCK_CLASSES: dict[type, type] = {
    SwinTransformerBlock: CheckpointedSwinBlock,
    FusedSwinBlock: CheckpointedFusedSwinBlock,
}


class CheckpointedSequential(nn.Sequential):
    """A Sequential decoder run as segments ``_ssl3d_segments`` ([start, end) ranges of positions in its execution
    order, see ``execution_order``) under ``_ssl3d_plan``; ``_ssl3d_base`` is the class it had before."""

    _ssl3d_plan: _Plan
    _ssl3d_segments: tuple[tuple[int, int], ...]

    def _range(self, start: int, end: int, x: Tensor) -> Tensor:
        order = execution_order(self)
        for pos in range(start, end):
            x = self[order[pos]](x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        done = 0
        for start, end in self._ssl3d_segments:
            x = self._range(done, start, x)
            x = _run(self._ssl3d_plan, self._segment_fn(start, end), x)
            done = end
        return self._range(done, len(self), x)

    def _segment_fn(self, start: int, end: int) -> Callable[[Tensor], Tensor]:
        def run(x: Tensor) -> Tensor:
            return self._range(start, end, x)

        return run


_WRAPPED_CLASSES: dict[type, type] = {}


def _checkpointed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``cls`` whose forward runs under ``_ssl3d_plan``; one per class, registered in this module
    under ``Checkpointed<Name>`` so pickling and deepcopy find it."""
    if cls in _WRAPPED_CLASSES:
        return _WRAPPED_CLASSES[cls]

    def forward(self: nn.Module, *args: Any) -> Any:
        return _run(self._ssl3d_plan, super(new, self).forward, *args)

    new = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__, "_ssl3d_base": cls})
    _WRAPPED_CLASSES[cls] = new
    globals()[new.__name__] = new
    return new


def decoder_segments(decoder: nn.Sequential) -> tuple[tuple[int, int], ...]:
    """Group a Sequential decoder into stages ([start, end) positions in its execution order): each starts at a
    conv; a 1x1x1 output conv near the end joins the last stage.

    For the "vae" decoder this gives five stages, [Conv, Norm, Act, Upsample] and the last one
    [Conv, Norm, Act, Conv1x1, Upsample], so what feeds the output at full resolution is recomputed, not stored.
    """
    convs = (nn.Conv3d, nn.ConvTranspose3d, nn.Conv2d, nn.ConvTranspose2d)
    modules = [decoder[i] for i in execution_order(decoder)]
    starts = [i for i, m in enumerate(modules) if isinstance(m, convs)]
    if not starts:
        return ((0, len(decoder)),) if len(decoder) else ()
    last = modules[starts[-1]]
    tail = modules[starts[-1] + 1 :]  # only parameter-free modules (the final upsampling) may follow it
    if len(starts) > 1 and all(k == 1 for k in last.kernel_size) and not any(list(m.parameters()) for m in tail):
        starts = starts[:-1]
    if starts[0] != 0:
        starts[0] = 0
    ends = starts[1:] + [len(decoder)]
    return tuple(zip(starts, ends))


def _stages(model: nn.Module) -> list[nn.Module | None]:
    """The encoder's BasicLayer per stage (MONAI keeps each in a one-element ModuleList ``layers<i+1>``)."""
    enc = model.swinViT
    return [getattr(enc, f"layers{i + 1}")[0] if hasattr(enc, f"layers{i + 1}") else None for i in range(NUM_STAGES)]


# SwinUNETR's convolutional path (fine-tuning): encoder1-4 and encoder10 (UnetrBasicBlock), decoder1-5 (UnetrUpBlock).
SEGMENTATION_DECODER = ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10") + tuple(
    f"decoder{i}" for i in range(5, 0, -1)
)


def _check_bare(model: nn.Module) -> None:
    if not hasattr(model, "swinViT"):
        raise TypeError(
            f"apply_activation_checkpointing: expected a bare model with the encoder at swinViT (SSL model, "
            f"SwinUNETR, probe), got {type(model).__name__}; apply it before DDP/FSDP/DeepSpeed/torch.compile wrap it"
        )


def remove_activation_checkpointing(model: nn.Module) -> None:
    """Restore MONAI's classes (undo ``apply_activation_checkpointing``)."""
    for module in model.modules():
        if type(module) in _BLOCK_CLASSES.values():
            module.__class__ = next(base for base, wrapped in _BLOCK_CLASSES.items() if wrapped is type(module))
            module.__dict__.pop("_ssl3d_plan", None)
        elif type(module) is CheckpointedSequential:
            module.__class__ = module.__dict__.pop("_ssl3d_base", nn.Sequential)
            module.__dict__.pop("_ssl3d_plan", None)
            module.__dict__.pop("_ssl3d_segments", None)
        elif type(module) in _WRAPPED_CLASSES.values():
            module.__class__ = type(module)._ssl3d_base
            module.__dict__.pop("_ssl3d_plan", None)


def apply_activation_checkpointing(
    model: nn.Module, policy: CheckpointPolicy | dict[str, Any] | str | None, *, warn: bool = True
) -> None:
    """Apply ``policy`` to the Swin blocks and the decoder (the SSL model's reconstruction decoder, SwinUNETR's
    convolutional blocks) of a bare model, in place.

    Re-applying replaces the previous policy; ``"none"`` removes it. Parameter names do not change.
    """
    policy = as_policy(policy)
    _check_bare(model)
    for name, block in model.named_modules():
        if isinstance(block, SwinTransformerBlock) and type(block) not in (*_BLOCK_CLASSES, *_BLOCK_CLASSES.values()):
            raise TypeError(
                f"apply_activation_checkpointing: {name} is a {type(block).__name__}, changed by a wrapper; "
                "apply checkpointing before FSDP/DeepSpeed/torch.compile"
            )
    remove_activation_checkpointing(model)
    if warn:
        for note in policy.notes:
            warnings.warn(note, stacklevel=2)
    if not policy.active:
        return
    plan = _Plan(recompute=policy.recompute, offload=policy.offload_to_cpu or policy.policy == "offload")
    counter = 0
    for stage, layer in enumerate(_stages(model)):
        if stage not in policy.stages or layer is None:
            continue
        for block in layer.blocks:
            if not isinstance(block, SwinTransformerBlock):
                continue
            if counter % policy.every_k_blocks == 0:
                block.__class__ = _BLOCK_CLASSES[type(block)]
                block._ssl3d_plan = replace(plan, part=policy.part, mlp_chunks=policy.mlp_chunks)
            counter += 1
        down = layer.downsample
        if policy.merging and isinstance(down, nn.Module):
            down.__class__ = _checkpointed_class(type(down))
            down._ssl3d_plan = plan
    if policy.decoder and not hasattr(model, "conv"):
        # SwinUNETR: each block of its convolutional encoder/decoder path recomputes in backward as one unit.
        for name in SEGMENTATION_DECODER:
            block = getattr(model, name, None)
            if isinstance(block, nn.Module):
                block.__class__ = _checkpointed_class(type(block))
                block._ssl3d_plan = plan
    elif policy.decoder:
        decoder = model.conv
        if type(decoder) in (nn.Sequential, ReorderedSequential, CheckpointedSequential):
            if type(decoder) is not CheckpointedSequential:
                decoder._ssl3d_base = type(decoder)
            decoder.__class__ = CheckpointedSequential
            decoder._ssl3d_plan = plan
            decoder._ssl3d_segments = decoder_segments(decoder)
        elif warn:
            warnings.warn(
                f"activation_checkpointing.decoder: the {type(decoder).__name__} decoder is one layer, not a "
                "Sequential of stages; it is left as is (no effect)",
                stacklevel=2,
            )


def checkpointed_modules(model: nn.Module) -> dict[str, str]:
    """Name -> what happens to it (for logs and tests): e.g. ``swinViT.layers1.0.blocks.0: recompute attention``."""
    out = {}
    for name, module in model.named_modules():
        plan = module.__dict__.get("_ssl3d_plan")
        if plan is None:
            continue
        what = " + ".join(w for w, on in (("recompute", plan.recompute), ("offload", plan.offload)) if on)
        if isinstance(module, CheckpointedSequential):
            out[name] = f"{what} stages {list(module._ssl3d_segments)}"
        elif not isinstance(module, SwinTransformerBlock):
            out[name] = what
        else:
            out[name] = f"{what} {plan.part}" + (f" mlp/{plan.mlp_chunks}" if plan.mlp_chunks > 1 else "")
    return out
