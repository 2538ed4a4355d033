"""What proving a checkpoint costs at the reference size (feature size 48, depths 2-2-2-2, AdamW): the time to
write a step folder, the part of it spent on the COMPLETE marker's sizes and SHA-256 checksums (read back and
fsynced in one pass), and the time to verify it before a resume, beside the time ``torch.load`` takes to read
the same state anyway. One process, one run, side by side; the folder is written to the system's temp folder
(or ``--dir``).

    python bench/checkpoint_verify.py
    python bench/checkpoint_verify.py --dir /scratch --repeat 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl3d import checkpoint  # noqa: E402
from ssl3d.config import ModelConfig, OptimConfig  # noqa: E402
from ssl3d.memory.profile import peak_rss_bytes  # noqa: E402
from ssl3d.model import build_model  # noqa: E402
from ssl3d.optim import build_optimizer  # noqa: E402
from ssl3d.strategies.single import SingleStrategy  # noqa: E402


def median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: the system's temp folder)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(ModelConfig(), 512)  # the reference size
    strategy = SingleStrategy(torch.device("cpu"), torch.float32)
    strategy.setup(model, lambda params: build_optimizer(OptimConfig(), params))
    for p in model.parameters():  # one AdamW step, so the optimizer's moments exist as in a real checkpoint
        p.grad = torch.randn_like(p) * 1e-3
    strategy.step(None)
    extra = {"step": 1, "config": "{}"}
    with tempfile.TemporaryDirectory(dir=a.dir) as root:
        manager = checkpoint.CheckpointManager(Path(root), strategy, keep=1)
        folder = manager.save(1, extra)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        res = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "checkpoint_bytes": size,
            "save_s": median_time(lambda: manager.save(1, extra), a.repeat),
            "manifest_s": median_time(lambda: checkpoint._manifest(folder), a.repeat),
            "verify_sizes_s": median_time(lambda: checkpoint.checkpoint_problem(folder, checksums=False), a.repeat),
            "verify_checksums_s": median_time(lambda: checkpoint.checkpoint_problem(folder), a.repeat),
            "torch_load_s": median_time(
                lambda: torch.load(folder / "state.pt", map_location="cpu", weights_only=True), a.repeat
            ),
        }
    res["sha256_MiB_per_s"] = size / 2**20 / res["verify_checksums_s"]
    res["peak_rss_gib"] = peak_rss_bytes() / 2**30
    print(f"checkpoint at the reference size: {res['parameters'] / 1e6:.1f} M parameters, {size / 2**20:.0f} MiB")
    print(f"{'write the step folder (all of it)':44s} {res['save_s']:7.3f} s")
    print(f"{'  of which sizes + SHA-256 + fsync (marker)':44s} {res['manifest_s']:7.3f} s")
    print(f"{'verify before resume: sizes only':44s} {res['verify_sizes_s']:7.4f} s")
    print(f"{'verify before resume: sizes + SHA-256':44s} {res['verify_checksums_s']:7.3f} s")
    print(f"{'torch.load of state.pt (for comparison)':44s} {res['torch_load_s']:7.3f} s")
    print(f"SHA-256 throughput {res['sha256_MiB_per_s']:.0f} MiB/s; peak RSS {res['peak_rss_gib']:.2f} GiB")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
