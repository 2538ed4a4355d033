"""A preprocessing cache: the deterministic transform chain run once per volume, kept on disk memory-mappable.

Why not the caches MONAI already has: ``CacheDataset`` holds float32 volumes in every rank's RAM (a 512x512x300
CT is 300 MB), and ``PersistentDataset`` pickles whole float32 tensors that are read in full for every pair
of 96^3 crops. Here the output of ``build_load_transforms`` (load, RAS, optional resampling, intensity
scaling, foreground crop, padding to the ROI) is written once as a ``.npy`` file, float16 by default (half
the bytes; 2.4e-4 worst-case error on [0, 1] values) or uint8 (a quarter; 2.0e-3 on [0, 1]). Training then
opens it with ``np.load(mmap_mode="r")``: a random crop touches only the pages under it, and the operating
system's page cache is shared by every loader worker and every rank on a node.

The cache is keyed so that it never serves stale data:

* the folder is named by a hash of every setting the chain depends on (ROI, HU window, output range,
  spacing, storage type, MONAI version, cache format): change one and a fresh folder is used;
* each file is named by the source's real path, size and mtime: a rewritten scan gets a new entry.

Several ranks and nodes may build the same cache at once: each writer writes a private temporary file and
hard-links it into place, which fails if the name exists, so the first complete file wins and everyone else
drops their (identical) copy. Readers never see a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import monai
import numpy as np
import torch
from monai.transforms import Compose
from torch.utils.data import Dataset

from ssl3d.config import Config, DataConfig
from ssl3d.data.datalist import load_datalists, resolve_data_config
from ssl3d.data.faults import BAD, BadVolumeError, GuardedLoad
from ssl3d.data.transforms import KEY, build_guarded_load

CACHE_VERSION = 1
Storage = Literal["float16", "uint8"]
STORAGES: tuple[str, ...] = ("float16", "uint8")
# Worst-case absolute error of a cached value relative to the float32 pipeline, per unit of the output range
# (b_max - b_min): float16 rounds to 11 significant bits (half a step below 1.0 is 2^-12), uint8 to 1/255.
QUANTISATION_ERROR = {"float16": 2.0**-12, "uint8": 0.5 / 255}
SETTINGS_NAME = "settings.json"


def prepcache_settings(data: DataConfig, storage: Storage = "float16") -> dict[str, Any]:
    """Everything the cached arrays depend on; its hash names the cache folder."""
    if storage not in STORAGES:
        raise ValueError(f"prepcache storage {storage!r}: expected one of {', '.join(STORAGES)}")
    return {
        "version": CACHE_VERSION,
        "monai": monai.__version__,  # transforms' numerics may change between releases
        "storage": storage,
        "roi": list(data.roi),
        "a_min": data.a_min,
        "a_max": data.a_max,
        "b_min": data.b_min,
        "b_max": data.b_max,
        "spacing": None if data.spacing is None else list(data.spacing),
    }


class PrepCache:
    """One folder of preprocessed volumes for one set of preprocessing settings.

    ``path_for`` stats the source once to name its entry; ``open`` returns the read-only memory map, building
    the entry first if no one has yet; ``build_all`` fills the cache ahead of training, in threads.
    """

    def __init__(self, root: Path | str, data: DataConfig, storage: Storage = "float16"):
        self.settings = prepcache_settings(data, storage)
        digest = hashlib.sha1(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]
        self.folder = Path(root).expanduser() / f"prepcache-{digest}"
        self.storage = storage
        self.data = data
        self._load: GuardedLoad | None = None
        # uint8 spans the output range and 0, the value SpatialPadd pads with.
        self.lo = min(data.b_min, data.b_max, 0.0)
        self.hi = max(data.b_min, data.b_max, 0.0)

    # -- naming

    def path_for(self, image: str) -> Path:
        """The entry of a source file: its real path, size and mtime, so a rewritten scan is not served stale."""
        real = os.path.realpath(image)
        st = os.stat(real)
        digest = hashlib.sha1(f"{real}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:20]
        name = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.mha|\.mhd)$", "", os.path.basename(real))
        return self.folder / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:40]}-{digest}.npy"

    # -- reading

    def open(self, image: str, entry: Path | None = None) -> np.ndarray:
        """The preprocessed volume ``[1, X, Y, Z]`` as a read-only memory map (float16 or uint8)."""
        entry = entry or self.path_for(image)
        for _ in range(2):
            try:
                return np.load(entry, mmap_mode="r")
            except FileNotFoundError:
                self.build(image, entry)
            except ValueError:  # a damaged file (a disk error; writers never leave partial ones): redo it
                entry.unlink(missing_ok=True)
                self.build(image, entry)
        return np.load(entry, mmap_mode="r")

    def crop_transforms(self, crops: Compose) -> Compose:
        """The random crop chain for cached volumes: uint8 crops are scaled back after cropping.

        Appended at the end, a deterministic transform draws no random numbers, so the crops themselves are
        exactly those of the uncached pipeline for the same seed.
        """
        if self.storage != "uint8":
            return crops
        return Compose([*crops.transforms, _Dequantize(self.lo, (self.hi - self.lo) / 255.0)])

    # -- writing

    def build(self, image: str, entry: Path | None = None) -> bool:
        """Preprocess one volume into the cache; True if this call's file is the one that landed."""
        entry = entry or self.path_for(image)
        if entry.exists():
            return False
        if self._load is None:
            self._load = build_guarded_load(self.data)
        loaded = self._load({KEY: image})
        if loaded.get(BAD):
            raise BadVolumeError(loaded[BAD])
        volume = loaded[KEY]  # float32 [1, X, Y, Z]
        array = volume.numpy() if isinstance(volume, torch.Tensor) else np.asarray(volume)
        self._write_settings()
        return _publish(entry, self._encode(array))

    def _encode(self, array: np.ndarray) -> np.ndarray:
        if self.storage == "float16":
            return array.astype(np.float16)
        scaled = (array - self.lo) * (255.0 / (self.hi - self.lo))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)

    def build_all(self, images: Sequence[str], workers: int = 1, progress: bool = False) -> dict[str, int]:
        """Fill the cache for ``images`` (threads: decompression and MONAI's array code release the GIL).

        Returns counts: ``written`` (by this call), ``present`` (already there), ``lost`` (another builder
        finished the same entry first; its file was kept).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        entries = [self.path_for(i) for i in images]
        todo = [(i, e) for i, e in zip(images, entries) if not e.exists()]
        counts = {"written": 0, "present": len(images) - len(todo), "lost": 0}
        if not todo:
            return counts
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"prepcache {self.folder.name}", unit="vol", dynamic_ncols=True)

        def one(item: tuple[str, Path]) -> bool:
            try:
                won = self.build(*item)
            except BadVolumeError:  # left out of the cache; the dataset applies data.on_bad_volume when used
                counts["bad"] = counts.get("bad", 0) + 1
                won = True
            if bar is not None:
                bar.update(1)
            return won

        if workers <= 1 or len(todo) == 1:
            results = [one(t) for t in todo]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = list(pool.map(one, todo))
        if bar is not None:
            bar.close()
        counts["written"] = sum(results)
        counts["lost"] = len(results) - counts["written"]
        return counts

    def _write_settings(self) -> None:
        path = self.folder / SETTINGS_NAME
        if path.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**self.settings, "note": "ssl3d preprocessing cache; safe to delete"}, indent=2) + "\n"
        tmp = path.with_name(f".{SETTINGS_NAME}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(text)
        _link_or_replace(tmp, path)


def _publish(entry: Path, array: np.ndarray) -> bool:
    """Atomically create ``entry`` unless it exists: first complete writer wins, the rest drop their copy."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())  # the name must never point at data still in flight
    return _link_or_replace(tmp, entry)


def _link_or_replace(tmp: Path, path: Path) -> bool:
    try:
        os.link(tmp, path)  # atomic, and fails if the name exists: no writer ever replaces another's file
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: rename is atomic too (the bytes are identical)
        os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


class _Dequantize:
    """uint8 crops back to [lo, lo + 255 * scale] (a class, not a lambda: loader workers may be spawned)."""

    def __init__(self, lo: float, scale: float):
        self.lo, self.scale = lo, scale

    def __call__(self, d: dict[str, Any]) -> dict[str, Any]:
        out = dict(d)
        out[KEY] = d[KEY] * self.scale + self.lo
        return out


class PrepCacheDataset(Dataset):
    """Items ``{"image": tensor [1, X, Y, Z]}`` backed by the cache's memory maps (no voxel is read here).

    The random crops that ``CropDataset`` applies slice that tensor, so only the cropped region is read.
    Missing entries are built on first access (by whichever loader worker gets there first).
    """

    def __init__(self, items: Sequence[dict[str, str]], cache: PrepCache):
        self.items = list(items)
        self.cache = cache
        self.entries = [cache.path_for(item[KEY]) for item in self.items]  # one stat per volume, not per access

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        array = self.cache.open(self.items[index][KEY], self.entries[index])
        with warnings.catch_warnings():
            # torch warns that the map is read-only; nothing writes to it (crops copy what they take).
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return {KEY: torch.from_numpy(array)}


# ---------------------------------------------------------------------------------------------------------
# Building ahead of training (``ssl3d data cache``)


def prepcache_root(cfg: Config) -> Path:
    """Where the cache lives: ``data.cache_dir``, else ``<logdir>/cache`` (share it between runs by setting it)."""
    return Path(cfg.data.cache_dir or os.path.join(cfg.train.logdir, "cache"))


def build_prepcache(
    cfg: Config,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 1,
    storage: Storage = "float16",
    progress: bool = True,
) -> dict[str, Any]:
    """Fill the cache for a run's datalists (every ``world_size``-th volume from ``rank``: shard it by node).

    Returns the folder and the counts; safe to run concurrently with training or with other builders.
    """
    d = resolve_data_config(cfg)
    training, validation = load_datalists(d, seed=cfg.train.seed)
    images = sorted({e[KEY] for e in training + validation})[rank::world_size]
    cache = PrepCache(prepcache_root(cfg), d, storage)
    counts = cache.build_all(images, workers=workers, progress=progress)
    return {"folder": str(cache.folder), "volumes": len(images), **counts}
