"""The preprocessing cache: same crops as the uncached pipeline (within quantisation), keyed, concurrent-safe.

Tolerances: the cache stores the chain's [b_min, b_max] = [0, 1] output as float16 (worst case 2^-12 = 2.4e-4
absolute, round to nearest) or uint8 (0.5 / 255 = 2.0e-3); the crops are the same voxels, so that bound is
the whole difference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cpu_runs import cpu_env

from ssl3d.config import Config, DataConfig, load_config
from ssl3d.data.datasets import build_datasets, build_loaders
from ssl3d.data.demo import write_demo_dataset
from ssl3d.data.prepcache import QUANTISATION_ERROR, PrepCache, PrepCacheDataset, prepcache_root
from ssl3d.data.transforms import build_load_transforms

ROI = (64, 64, 64)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_volumes=6)


def _images(datalist: Path) -> list[str]:
    doc = json.loads(datalist.read_text())
    return [str(datalist.parent / e["image"]) for e in doc["training"] + doc["validation"]]


def _cfg(datalist: Path, tmp_path: Path, **overrides: object) -> Config:
    base = {
        "data.datalists": [{"json": str(datalist)}],
        "data.roi": list(ROI),
        "data.num_workers": 0,
        "data.num_samples": 2,
        "data.cache_dir": str(tmp_path / "cache"),
        "train.batch_size": 1,
        "train.logdir": str(tmp_path / "run"),
        "train.progress": False,
    }
    return load_config(overrides={**base, **overrides})


def _crops(cfg: Config, storage: str | None = None) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
    if storage is not None:
        object.__setattr__(cfg.data, "prepcache_storage", storage)  # until DataConfig has the key
    train, val = build_loaders(cfg)
    plan = train.dataset.plan(0)
    return {gid: b["image"] for (_, gid, _), b in zip(plan, train, strict=True)}, [b["image"] for b in val]


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["float16", "uint8"])
def test_cached_crops_match_the_uncached_pipeline(demo: Path, tmp_path: Path, storage: str) -> None:
    plain, plain_val = _crops(_cfg(demo, tmp_path))
    cached, cached_val = _crops(_cfg(demo, tmp_path, **{"data.dataset": "prepcache", "data.num_workers": 2}), storage)
    tol = QUANTISATION_ERROR[storage] * 1.0001  # output range [0, 1]
    assert cached.keys() == plain.keys()
    worst = 0.0
    for gid, x in plain.items():
        assert cached[gid].shape == x.shape == (2, 1, *ROI) and cached[gid].dtype == torch.float32
        worst = max(worst, float((cached[gid] - x).abs().max()))
    for a, b in zip(cached_val, plain_val, strict=True):
        worst = max(worst, float((a - b).abs().max()))
    assert 0.0 < worst <= tol, (storage, worst)  # quantised, and by no more than the stated bound
    files = list((tmp_path / "cache").glob("prepcache-*/*.npy"))
    assert len(files) == 6 and not list((tmp_path / "cache").glob("prepcache-*/.*.tmp"))
    assert {np.load(f, mmap_mode="r").dtype for f in files} == {np.dtype(storage)}


def test_entries_are_memory_maps_built_on_first_access(demo: Path, tmp_path: Path) -> None:
    cfg = _cfg(demo, tmp_path, **{"data.dataset": "prepcache"})
    ds = build_datasets(cfg, rank=0, world_size=2)  # builds rank 0's share only: 3 of 6 volumes
    cache = ds.train.base.cache
    assert isinstance(ds.train.base, PrepCacheDataset)
    assert len(list(cache.folder.glob("*.npy"))) == 3
    for i in range(len(ds.train.base)):
        item = ds.train.base[i]["image"]
        assert item.dtype == torch.float16 and item.shape[0] == 1
    assert len(list(cache.folder.glob("*.npy"))) == 5  # the 5 training volumes, the others built on access
    array = cache.open(_images(demo)[0])
    assert isinstance(array, np.memmap) and not array.flags.writeable
    settings = json.loads((cache.folder / "settings.json").read_text())
    assert settings["roi"] == list(ROI) and settings["storage"] == "float16"


def test_settings_or_source_change_is_never_served_stale(demo: Path, tmp_path: Path) -> None:
    image = _images(demo)[0]
    narrow = DataConfig(roi=ROI, a_min=-1000.0, a_max=500.0)
    wide, other = PrepCache(tmp_path, DataConfig(roi=ROI)), PrepCache(tmp_path, narrow)
    assert wide.folder != other.folder
    a, b = np.asarray(wide.open(image)), np.asarray(other.open(image))
    expected = build_load_transforms(narrow)({"image": image})["image"].numpy()
    np.testing.assert_allclose(b.astype(np.float32), expected, atol=QUANTISATION_ERROR["float16"] * 1.0001, rtol=0)
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert PrepCache(tmp_path, DataConfig(roi=ROI), storage="uint8").folder != wide.folder
    # A rewritten scan (new mtime) gets a new entry; the old one is left for whoever still reads it.
    before = wide.path_for(image)
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        after = wide.path_for(image)
        assert after != before and not after.exists()
        wide.open(image)
        assert after.exists() and before.exists()
    finally:
        os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_damaged_entry_is_rebuilt(demo: Path, tmp_path: Path) -> None:
    image = _images(demo)[1]
    cache = PrepCache(tmp_path, DataConfig(roi=ROI))
    good = np.asarray(cache.open(image)).copy()
    cache.path_for(image).write_bytes(b"\x93NUMPY garbage")
    np.testing.assert_array_equal(np.asarray(cache.open(image)), good)
    with pytest.raises(ValueError, match="prepcache storage 'int4'"):
        PrepCache(tmp_path, DataConfig(), storage="int4")  # type: ignore[arg-type]


_BUILDER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from ssl3d.config import DataConfig
    from ssl3d.data.prepcache import PrepCache

    root, go, images = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    cache = PrepCache(root, DataConfig(roi=(64, 64, 64)))
    while not go.exists():  # start together: both processes race for every entry
        time.sleep(0.01)
    print(json.dumps(cache.build_all(images, workers=1)))
    """
)


@pytest.mark.slow
def test_two_concurrent_builders_make_one_valid_cache(demo: Path, tmp_path: Path) -> None:
    images = _images(demo)[:4]
    go = tmp_path / "go"
    env = cpu_env()
    args = [sys.executable, "-c", _BUILDER, str(tmp_path / "cache"), str(go), json.dumps(images)]
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    go.touch()
    counts = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        counts.append(json.loads(out.strip().splitlines()[-1]))
    # Every entry was written by exactly one builder; the other found it there or lost the race.
    assert sum(c["written"] for c in counts) == 4
    assert all(c["written"] + c["present"] + c["lost"] == 4 for c in counts)
    cache = PrepCache(tmp_path / "cache", DataConfig(roi=(64, 64, 64)))
    assert sorted(p.name for p in cache.folder.iterdir()) == sorted(
        [*(cache.path_for(i).name for i in images), "settings.json"]
    )
    load = build_load_transforms(DataConfig(roi=(64, 64, 64)))
    for image in images:
        expected = load({"image": image})["image"].numpy().astype(np.float16)
        np.testing.assert_array_equal(np.load(cache.path_for(image)), expected)


def test_cache_root_defaults_under_the_run(tmp_path: Path) -> None:
    cfg = load_config(overrides={"train.logdir": str(tmp_path / "run")})
    assert prepcache_root(cfg) == tmp_path / "run" / "cache"


def test_data_cache_command_fills_the_cache_training_reads(demo: Path, tmp_path: Path, capsys) -> None:
    """``ssl3d data cache``: each rank (here 2 of them, as separate commands) builds its share of the volumes; a
    later run finds every entry present; the training dataset with the same config reads those files (writing
    nothing) and gives the cached arrays."""
    from ssl3d.cli import main

    args = ["data", "cache", f"--datalist={demo}", "--workers=1", "--set=data.dataset=prepcache"]
    args += [f"--set=data.cache_dir={tmp_path / 'cache'}", f"--set=data.roi={json.dumps(list(ROI))}"]
    args += [f"--set=train.logdir={tmp_path / 'run'}"]

    def cache(*extra: str) -> dict[str, str]:
        assert main([*args, *extra]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert line.startswith("ssl3d: "), line
        return dict(part.split(": ", 1) for part in line.removeprefix("ssl3d: ").split(", "))

    first = cache("--rank=0", "--world-size=2")
    assert (first["volumes"], first["written"], first["present"]) == ("3", "3", "0")
    folder = Path(first["folder"])
    assert len(list(folder.glob("*.npy"))) == 3
    second = cache("--rank=1", "--world-size=2")
    assert (second["volumes"], second["written"], second["present"]) == ("3", "3", "0")
    assert second["folder"] == first["folder"]
    entries = {p: p.stat().st_mtime_ns for p in folder.glob("*.npy")}
    assert len(entries) == 6
    again = cache()
    assert (again["volumes"], again["written"], again["present"]) == ("6", "0", "6")

    cfg = _cfg(demo, tmp_path, **{"data.dataset": "prepcache"})
    ds = build_datasets(cfg)
    assert isinstance(ds.train.base, PrepCacheDataset) and ds.train.base.cache.folder == folder
    item = ds.train.base[0]["image"]
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.npy")} == entries  # read, not rebuilt
    cached = [np.asarray(ds.train.base.cache.open(image)) for image in _images(demo)]
    assert any(c.shape == tuple(item.shape) and np.array_equal(c, item.numpy()) for c in cached)
