"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer states sharded over ranks.

One FSDP unit per Swin block (or per stage) plus the root, so only one unit's full parameters exist at a time.
Parameters become DTensors; the optimizer is built on them after sharding. Checkpoints go through
``torch.distributed.checkpoint`` with plain parameter names, so they can be loaded at another world size.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl3d.strategies.base import (
    OptimizerFactory,
    Strategy,
    clean_name,
    require_layout,
    to_cpu_fp32,
)
from ssl3d.strategies.ds_config import FSDPOptions


def shard_units(model: nn.Module, shard: str) -> list[nn.Module]:
    """The modules that become FSDP units: Swin blocks (``block``) or whole stages (``stage``).

    A block wrapped for activation checkpointing is sharded as its wrapper, so the recomputation in backward
    happens inside the unit whose parameters are gathered.
    """
    from monai.networks.nets.swin_unetr import BasicLayer, SwinTransformerBlock

    target = SwinTransformerBlock if shard == "block" else BasicLayer
    units: list[nn.Module] = []
    wrapped: set[int] = set()
    for module in model.modules():
        inner = getattr(module, "_checkpoint_wrapped_module", None)
        if isinstance(inner, target):
            units.append(module)
            wrapped.add(id(inner))
    units += [m for m in model.modules() if isinstance(m, target) and id(m) not in wrapped]
    if not units:
        raise RuntimeError(f'fsdp.shard "{shard}": the model has no {target.__name__} modules to shard')
    return units


class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, *args: Any, options: FSDPOptions | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.options = options or (self.ds_config.fsdp if self.ds_config else FSDPOptions())

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        # Order: activation checkpointing (applied by the caller) -> shard blocks, then the root -> optimizer.
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        mp = MixedPrecisionPolicy()  # fp32: no casts
        if self.dtype != torch.float32:
            # Compute in bf16, but reduce gradients in fp32 so the average over ranks loses nothing.
            mp = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        offload = CPUOffloadPolicy(pin_memory=self.device.type == "cuda") if self.options.cpu_offload else None
        kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload or OffloadPolicy()}
        if not self.options.cpu_offload:
            model = model.to(self.device)
        units = shard_units(model, self.options.shard)
        # The reconstruction decoder is a unit of its own: left in the root, its 8 M parameters (42% of the
        # reference model) would stay gathered from forward through backward (bench/model_states.py).
        if isinstance(getattr(model, "conv", None), nn.Module) and any(
            p.requires_grad for p in model.conv.parameters()
        ):
            units.append(model.conv)
        for unit in units:
            fully_shard(unit, reshard_after_forward=self.options.reshard_after_forward, **kwargs)
        # The root keeps its (small) parameters gathered after forward: backward needs them at once.
        fully_shard(model, reshard_after_forward=False, **kwargs)
        self.model = model
        self.optimizer = make_optimizer(model.parameters())
        # fp16 (what "auto" means on GPUs without native bf16) needs loss scaling; torch's sharded scaler checks
        # the gradient shards of every rank for overflow. Disabled (a pass-through) in bf16 and fp32.
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        opts = self.ds_config.fp16 if self.ds_config else {}
        self.scaler = ShardedGradScaler(
            device=self.device.type,
            init_scale=2.0 ** opts.get("initial_scale_power", 16),
            growth_interval=opts.get("loss_scale_window", 1000),
            enabled=self.dtype == torch.float16,
        )
        return self.model, self.optimizer

    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else None

    def autocast(self) -> contextlib.AbstractContextManager:
        # MixedPrecisionPolicy casts parameters and inputs to the compute dtype itself.
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Keep unsharded gradients locally on all but the last micro-batch; reduce-scatter on the last."""
        self.model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.grad_accum).backward()

    def clip_and_step(self, max_grad_norm: float | None) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        assert self.optimizer is not None
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):
            # Sum of the shards' squares over ranks, then the root. With CPU offload the shards are CPU tensors:
            # the group needs a CPU backend beside NCCL (distributed.group_backend gives it one).
            norm = norm.full_tensor()
        finite = bool(torch.isfinite(norm))
        if finite and max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the update itself on inf/nan
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    # -- state ---------------------------------------------------------------------------------------------
    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        path = Path(directory) / "dcp"
        # On a machine with a GPU, DCP's default writer stages tensors through CUDA streams (its overlapping loader)
        # even for a CPU run: copying no bytes ahead keeps a CPU run off the GPU.
        writer = dcp.FileSystemWriter(path, per_thread_copy_ahead=0) if self.device.type == "cpu" else None
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=path, storage_writer=writer)
        self.save_extra(directory, {**extra, "grad_scaler": self.scaler.state_dict()})

    def load(self, directory: Path) -> dict[str, Any]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = require_layout(directory, "dcp", self.name)
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=path)  # reshards to this run's world size
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        extra = self.load_extra(directory)
        if extra.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(extra["grad_scaler"])
        return extra

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)  # collective; rank 0 gets the tensors
        return {clean_name(k): to_cpu_fp32(v) for k, v in state.items()}

    def load_model_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Full plain-named weights present on every rank -> this rank's shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, {clean_name(k): v for k, v in state.items()}, options=options)


def read_dcp_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model in a DCP checkpoint folder as full fp32 tensors, offline: no process group, any world size.

    For exporting a sharded run's weights (``model_swinvit.pt``) or starting a one-process run from them.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        full = Path(tmp) / "full.pt"
        dcp_to_torch_save(Path(path), full)
        state = torch.load(full, map_location="cpu", weights_only=True)
    return {clean_name(k): to_cpu_fp32(v) for k, v in state["model"].items()}
