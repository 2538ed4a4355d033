"""Crops per second from the training loader: decoding NIfTI every time ("plain") against the preprocessing cache.

Both go through ``ssl3d.data.build_loaders`` exactly as training does (seeded crops, global shuffle, loader
workers); each item is one volume giving ``--crops`` random crops of ``--roi``. The cache is built once per
source before its timings (the build time is reported separately: it is paid once per dataset and settings).
Timings are in a warm page cache (the files were just written or read); a cold disk would slow both, the
NIfTI decode by its full compressed volume and the cache by about the crop's share of a volume.

    python bench/data.py                                   # 8 synthetic 256x256x160 CT volumes
    python bench/data.py --samples /tmp/ssl3d_samples      # plus the real CT samples (ssl3d data samples DIR)
    python bench/data.py --workers 0 2 --batches 8 --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def time_loader(datalist: Path, kind: str, workers: int, args: argparse.Namespace, cache_dir: Path) -> dict:
    """Crops per second over ``args.batches`` training batches of one volume each (the loader is built untimed)."""
    from ssl3d.config import load_config
    from ssl3d.data import build_loaders

    cfg = load_config(
        overrides={
            "data.datalists": [{"json": str(datalist)}],
            "data.roi": [args.roi] * 3,
            "data.num_samples": args.crops,
            "data.dataset": kind,
            "data.num_workers": workers,
            "data.cache_dir": str(cache_dir),
            "train.batch_size": 1,
            "train.logdir": str(cache_dir.parent / "run"),
            "train.progress": False,
        }
    )
    object.__setattr__(cfg.data, "prepcache_storage", args.storage)  # until DataConfig has the key
    t0 = time.perf_counter()
    train, _ = build_loaders(cfg)
    setup = time.perf_counter() - t0
    # Timed from the first request: worker start-up (a fork, milliseconds) is included, but no batch that
    # workers prefetched before the clock started is counted as free.
    t0 = time.perf_counter()
    batches = iter(_forever(train))
    for _ in range(args.batches):
        batch = next(batches)
    elapsed = time.perf_counter() - t0
    assert batch["image"].shape == (args.crops, 1, args.roi, args.roi, args.roi)
    effective = train.loader.num_workers
    del batches, train
    return {
        "kind": kind,
        "workers": workers,
        "effective_workers": effective,
        "crops_per_s": args.batches * args.crops / elapsed,
        "setup_s": setup,
    }


def _forever(loader):  # noqa: ANN001, ANN202 - a TrainLoader; moves to the next epoch by itself
    while True:
        yield from loader


def bench_source(name: str, datalist: Path, args: argparse.Namespace, work: Path) -> list[dict]:
    cache_dir = work / f"cache-{name}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    rows = []
    for kind in ("plain", "prepcache"):
        for i, w in enumerate(args.workers):
            r = time_loader(datalist, kind, w, args, cache_dir)
            r["source"] = name
            rows.append(r)
            built = kind == "prepcache" and i == 0  # the first prepcache loader built the cache
            extra = f" (cache built in {r['setup_s']:.1f} s)" if built else ""
            print(f"  {name:8s} {kind:9s} workers={w} -> {r['crops_per_s']:7.1f} crops/s{extra}", flush=True)
    return rows


def describe(datalist: Path) -> str:
    import nibabel as nib

    doc = json.loads(datalist.read_text())
    shapes = [nib.load(datalist.parent / e["image"]).shape for e in doc["training"]]
    mb = sum((datalist.parent / e["image"]).stat().st_size for e in doc["training"]) / 2**20
    sizes = ", ".join("x".join(map(str, s)) for s in shapes)
    return f"{len(shapes)} training volumes, shapes {sizes}, {mb:.0f} MB .nii.gz"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volumes", type=int, default=8, help="synthetic volumes (one more is written for validation)")
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 160])
    p.add_argument("--roi", type=int, default=96)
    p.add_argument("--crops", type=int, default=2, help="crops per volume (data.num_samples)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--batches", type=int, default=24, help="timed batches (one volume each) per configuration")
    p.add_argument("--storage", choices=["float16", "uint8"], default="float16")
    p.add_argument("--samples", type=Path, default=None, help="a folder from `ssl3d data samples DIR`, if fetched")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "ssl3d_bench_data")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args()

    import torch

    from ssl3d.data.demo import write_demo_dataset

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    demo = write_demo_dataset(args.work / "demo", n_volumes=args.volumes + 1, shape=tuple(args.shape))
    print(f"demo data ready in {time.perf_counter() - t0:.0f} s: {describe(demo)}")
    sources = {"demo": demo}
    if args.samples is not None:
        samples = args.samples / "dataset_samples.json"
        if samples.is_file():
            sources["samples"] = samples
            print(f"real samples: {describe(samples)}")
        else:
            print(f"no {samples}: run `ssl3d data samples {args.samples}` to include the real CT samples")
    rows = []
    for name, datalist in sources.items():
        rows += bench_source(name, datalist, args, args.work)

    print(f"\nROI {args.roi}^3, {args.crops} crops per volume, cache {args.storage}, {cpus} CPUs, torch threads 2")
    print("| source | workers | plain (decode NIfTI) crops/s | prepcache crops/s | speed-up |")
    print("|---|---|---|---|---|")
    for name in sources:
        for w in args.workers:
            a = next(r for r in rows if r["source"] == name and r["kind"] == "plain" and r["workers"] == w)
            b = next(r for r in rows if r["source"] == name and r["kind"] == "prepcache" and r["workers"] == w)
            eff = f" ({a['effective_workers']} used)" if a["effective_workers"] != w else ""
            speed = b["crops_per_s"] / a["crops_per_s"]
            print(f"| {name} | {w}{eff} | {a['crops_per_s']:.1f} | {b['crops_per_s']:.1f} | {speed:.1f}x |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
