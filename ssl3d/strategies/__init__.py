"""Backends for the training loop, chosen from a ds_config JSON (DeepSpeed's vocabulary).

Heavy or optional libraries (DeepSpeed, fairscale) are imported only when their backend is set up.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ssl3d.config import Config
from ssl3d.step import DTYPES
from ssl3d.strategies.base import Strategy, clean_name, resolve_device, resolve_precision, to_cpu_fp32
from ssl3d.strategies.ddp import DDPStrategy
from ssl3d.strategies.deepspeed import DeepSpeedStrategy, read_zero_weights
from ssl3d.strategies.distributed import backend_for, dist_env, init_distributed
from ssl3d.strategies.ds_config import DSConfig, load_ds_config
from ssl3d.strategies.fairscale import FairscaleStrategy
from ssl3d.strategies.fsdp import FSDPStrategy, read_dcp_weights
from ssl3d.strategies.single import SingleStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "single": SingleStrategy,
    "ddp": DDPStrategy,
    "fsdp": FSDPStrategy,
    "deepspeed": DeepSpeedStrategy,
    "fairscale": FairscaleStrategy,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def strategy_from_ds_config(ds: DSConfig, device: torch.device) -> Strategy:
    """The backend a resolved preset names, on ``device``; joins the process group when the backend needs one."""
    if ds.strategy != "single":
        init_distributed(backend_for(device))
    return STRATEGIES[ds.strategy](device, DTYPES[ds.precision], grad_accum=ds.grad_accum, ds_config=ds)


def build_strategy(cfg: Config) -> Strategy:
    """The backend the run's ds_config asks for; one process on one device when there is none.

    The preset is checked against the run config and the launcher's world size before any process group exists,
    so a wrong preset fails in a second, on every rank, with every problem listed.
    """
    return strategy_from_ds_config(*resolve_strategy_config(cfg))


def resolve_strategy_config(cfg: Config) -> tuple[DSConfig, torch.device]:
    """The run's preset resolved against the run config, the launcher's world size and this rank's device."""
    env = dist_env()
    device = resolve_device(cfg.train.device, env.local_rank)
    auto_precision = DTYPE_NAMES[resolve_precision("auto", device)]
    ds = load_ds_config(
        cfg.ds_config, cfg, world_size=env.world_size, device_type=device.type, auto_precision=auto_precision
    )
    return ds, device


def read_checkpoint_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Full fp32 model weights with plain names from ANY backend's checkpoint folder, offline.

    ``state.pt`` (single, ddp, fairscale), ``dcp/`` (fsdp, any world size) or ``deepspeed/`` (ZeRO 0-3): for export
    (``model_swinvit.pt``) and for starting another backend or world size from a run's weights (fresh optimizer).
    """
    directory = Path(directory)
    if (directory / "state.pt").is_file():
        state = torch.load(directory / "state.pt", map_location="cpu", weights_only=True)["model"]
        return {clean_name(k): to_cpu_fp32(v) for k, v in state.items()}
    if (directory / "dcp").is_dir():
        return read_dcp_weights(directory / "dcp")
    if (directory / "deepspeed").is_dir():
        return read_zero_weights(directory)
    raise FileNotFoundError(f"{directory}: no checkpoint ssl3d knows (expected state.pt, dcp/ or deepspeed/)")


__all__ = [
    "DDPStrategy",
    "DeepSpeedStrategy",
    "FSDPStrategy",
    "FairscaleStrategy",
    "STRATEGIES",
    "SingleStrategy",
    "Strategy",
    "build_strategy",
    "clean_name",
    "init_distributed",
    "read_checkpoint_weights",
    "resolve_strategy_config",
    "resolve_device",
    "resolve_precision",
    "strategy_from_ds_config",
]
