"""One process on one device (GPU or CPU): the reference's single-GPU mode, and the base for DDP."""

from __future__ import annotations

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


class SingleStrategy(Strategy):
    name = "single"

    def setup(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        # Order: activation checkpointing (applied by the caller before setup) -> wrap -> optimizer.
        self.module = model.to(self.device)
        self.model = self.wrap(self.module)
        self.optimizer = make_optimizer(self.model.parameters())
        # fp16 needs loss scaling; bf16 and fp32 do not. The preset's fp16 section (DeepSpeed vocabulary) sets it.
        opts = self.ds_config.fp16 if self.ds_config else {}
        self.scaler = torch.amp.GradScaler(
            self.device.type,
            init_scale=2.0 ** opts.get("initial_scale_power", 16),
            growth_interval=opts.get("loss_scale_window", 1000),
            enabled=self.dtype == torch.float16,
        )
        return self.model, self.optimizer

    def loss_scale(self) -> float | None:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else None

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.grad_accum).backward()

    def clip_and_step(self, max_grad_norm: float | None) -> torch.Tensor:
        assert self.optimizer is not None
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = bool(torch.isfinite(norm))
        if finite and max_grad_norm is not None:
            # clip_grads_with_norm_ takes the parameters (it scales their .grad), not the gradients.
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
        if self.is_main:
            state = {
                "model": self.full_state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "world_size": self.world_size,
            }
            torch.save(state, directory / "state.pt")
        self.save_extra(directory, extra)

    def load(self, directory: Path) -> dict[str, Any]:
        state = torch.load(require_layout(directory, "state.pt", self.name), map_location="cpu", weights_only=True)
        self.load_model_weights(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        return self.load_extra(directory)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {clean_name(k): to_cpu_fp32(v) for k, v in self.module.state_dict().items()}

    def load_model_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(match_names(self.module.state_dict(), state))


def match_names(own: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain-named weights -> this module's own state-dict names (which may carry wrapper prefixes)."""
    by_clean = {clean_name(k): k for k in own}
    return {by_clean.get(clean_name(k), clean_name(k)): v for k, v in state.items()}
