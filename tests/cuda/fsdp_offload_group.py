"""One rank of tests/cuda/test_cuda_semantics.py's F2 check, started by torchrun under the ``nccl-group`` simulation.

It joins the process group exactly as ssl3d does for an FSDP2 CPU-offload run on a GPU (``strategy_from_ds_config``
with a CUDA device), then all-reduces a CPU tensor, as FSDP2's offloaded gradient norm does in every step. Prints
``CPU all-reduce: <value>`` or ``CPU all-reduce failed: <error>``.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ssl3d.config import Config  # noqa: E402
from ssl3d.strategies import strategy_from_ds_config  # noqa: E402
from ssl3d.strategies.ds_config import resolve_ds_config  # noqa: E402

cfg = Config()
cfg.train.precision = "bf16"
preset = {"strategy": "fsdp", "fsdp": {"cpu_offload": True}}
ds = resolve_ds_config(preset, cfg, world_size=2, device_type="cuda", auto_precision="bf16")
strategy_from_ds_config(ds, torch.device("cuda", 0))
t = torch.ones(1) * (dist.get_rank() + 1)
try:
    dist.all_reduce(t)
    print(f"CPU all-reduce: {t.item():g}", flush=True)
except Exception as exc:  # noqa: BLE001 - reported to the test
    print(f"CPU all-reduce failed: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
dist.destroy_process_group()
