"""Backends for the training loop, chosen from a ds_config JSON (DeepSpeed's vocabulary).

Heavy or optional libraries (DeepSpeed, fairscale) are imported only when their backend is set up.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ssl3d.config import Config, TrainConfig
from ssl3d.step import DTYPES
from ssl3d.strategies.base import (
    Strategy,
    clean_name,
    configure_cuda,
    emulated_bf16_warning,
    native_bf16,
    resolve_device,
    resolve_precision,
    to_cpu_fp32,
)
from ssl3d.strategies.ddp import DDPStrategy
from ssl3d.strategies.deepspeed import DeepSpeedStrategy, read_zero_weights, select_accelerator
from ssl3d.strategies.distributed import dist_env, group_backend, init_distributed
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


def strategy_from_ds_config(ds: DSConfig, device: torch.device, train: TrainConfig | None = None) -> Strategy:
    """The backend a resolved preset names, on ``device``; joins the process group when the backend needs one.

    ``train`` (the run config's train section) carries the collective timeout and the GPU speed switches."""
    train = train or TrainConfig()
    configure_cuda(device, train.cudnn_benchmark, train.allow_tf32)
    if ds.strategy != "single":
        offload = ds.strategy == "fsdp" and ds.fsdp.cpu_offload
        init_distributed(group_backend(device, cpu_collectives=offload), train.collective_timeout_minutes)
    return STRATEGIES[ds.strategy](device, DTYPES[ds.precision], grad_accum=ds.grad_accum, ds_config=ds)


def build_strategy(cfg: Config) -> Strategy:
    """The backend the run's ds_config asks for; one process on one device when there is none.

    The preset is checked against the run config and the launcher's world size before any process group exists,
    so a wrong preset fails in a second, on every rank, with every problem listed.
    """
    ds, device = resolve_strategy_config(cfg)
    return strategy_from_ds_config(ds, device, cfg.train)


def resolve_strategy_config(cfg: Config) -> tuple[DSConfig, torch.device]:
    """The run's preset resolved against the run config, the launcher's world size and this rank's device.

    What "auto" chose where it is not the obvious choice, and bf16 asked for on a GPU that only emulates it, are
    said in one line each (rank 0)."""
    env = dist_env()
    device = resolve_device(cfg.train.device, env.local_rank)
    select_accelerator(device)  # before the preset's check imports DeepSpeed's config models
    auto_precision = DTYPE_NAMES[resolve_precision("auto", device)]
    ds = load_ds_config(
        cfg.ds_config, cfg, world_size=env.world_size, device_type=device.type, auto_precision=auto_precision
    )
    if env.rank == 0:
        for note in ds.notes:
            print(f"ssl3d: {note}")
        if ds.precision == "bf16" and not native_bf16(device):
            print(f"ssl3d: warning: {emulated_bf16_warning(device)}", file=sys.stderr)
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
