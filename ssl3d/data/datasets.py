"""Datasets and loaders whose crops are a pure function of (seed, epoch, volume), on any number of workers.

Three things the reference left to chance are fixed here:

* Crops: every item re-seeds the random crop transforms from (seed, epoch, volume index), so the crops do
  not depend on ``num_workers``, on which worker loads an item, or on whether the run was resumed.
* Order: a seeded, DistributedSampler-like batch sampler (even partition across ranks, reshuffled per
  epoch) that can start at a batch offset, so a resumed run continues the data order where it stopped
  without loading the skipped volumes.
* Caches: ``cache`` and ``smart_cache`` give each rank a fixed, seeded partition of the volumes and cache
  only that partition (the reference cached everything on every rank); the SmartCacheDataset is actually
  started and advanced once per epoch (the reference never started it, so it never replaced anything).

Batches are dicts with ``"image"``: float32 ``[batch_size * num_samples, 1, *roi]``; validation batches also
carry ``"valid"``: bool ``[batch_size * num_samples]``, False for crops of volumes repeated only to give every
rank the same number of batches (FSDP and ZeRO-3 need every rank to run the same number of forwards).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import monai
import numpy as np
import torch
from monai.data import CacheDataset, PersistentDataset, SmartCacheDataset, list_data_collate
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl3d.config import Config, DataConfig
from ssl3d.data.datalist import load_datalists, resolve_data_config
from ssl3d.data.faults import BAD, BadVolumeError
from ssl3d.data.prepcache import PrepCache, PrepCacheDataset, prepcache_root
from ssl3d.data.transforms import build_crop_transforms, build_guarded_load

log = logging.getLogger(__name__)

TRAIN_STREAM, VAL_STREAM = 0, 1
PARTITION_STREAM = 2
VAL_EPOCH = 0  # validation crops are drawn once: the same crops at every evaluation

# (dataset index, global volume id, copy number): copy > 0 marks a volume repeated to even out the ranks.
PlanItem = tuple[int, int, int]


class EpochPlan(Protocol):
    """Which items one rank visits in an epoch, in which order; the same length every epoch."""

    num_items: int

    def __call__(self, epoch: int) -> list[PlanItem]: ...


def item_seed(seed: int, stream: int, epoch: int, volume: int, copy: int = 0) -> int:
    """The random state of one item's crops: a hash of everything that identifies the item, nothing else."""
    entropy = [seed % 2**32, stream, epoch, volume, copy]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def even_partition(order: list[int] | np.ndarray, rank: int, world_size: int) -> list[tuple[int, int]]:
    """DistributedSampler's split: pad ``order`` by wrapping to a multiple of world_size, take every
    world_size-th item from ``rank``; returns (volume id, copy number) pairs, equally many on every rank."""
    n = len(order)
    if n == 0:
        return []
    total = math.ceil(n / world_size) * world_size
    return [(int(order[i % n]), i // n) for i in range(rank, total, world_size)]


# ---------------------------------------------------------------------------------------------------------
# Epoch plans: which items this rank visits in an epoch, in which order.


class _GlobalShuffle:
    """Plain / persistent: the whole list is reshuffled every epoch and split across ranks (mixes best)."""

    def __init__(self, n: int, rank: int, world_size: int, seed: int):
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.num_items = math.ceil(n / world_size) if n else 0

    def __call__(self, epoch: int) -> list[PlanItem]:
        order = np.random.default_rng([self.seed % 2**32, TRAIN_STREAM, epoch]).permutation(self.n)
        return [(gid, gid, copy) for gid, copy in even_partition(order, self.rank, self.world_size)]


class _LocalShuffle:
    """Cache kinds: this rank's fixed partition (dataset index i holds ``local[i]``), reshuffled per epoch."""

    def __init__(self, local: list[tuple[int, int]], rank: int, seed: int, shuffle: bool = True):
        self.local, self.rank, self.seed, self.shuffle = local, rank, seed, shuffle
        self.num_items = len(local)

    def __call__(self, epoch: int) -> list[PlanItem]:
        idx = np.arange(len(self.local))
        if self.shuffle:
            idx = np.random.default_rng([self.seed % 2**32, TRAIN_STREAM, epoch, self.rank]).permutation(idx)
        return [(int(i), *self.local[i]) for i in idx]


class _SmartWindow:
    """Smart cache: in epoch e cache slot j holds ``local[(e * replace_num + j) % len(local)]``."""

    def __init__(self, local: list[tuple[int, int]], cache_num: int, replace_num: int, rank: int, seed: int):
        self.local, self.cache_num, self.replace_num, self.rank, self.seed = local, cache_num, replace_num, rank, seed
        self.num_items = cache_num

    def rotated(self, epoch: int) -> list[int]:
        """Indices into ``local`` in the order that makes SmartCacheDataset's first window epoch ``epoch``'s."""
        start = epoch * self.replace_num % len(self.local)
        return [(start + k) % len(self.local) for k in range(len(self.local))]

    def __call__(self, epoch: int) -> list[PlanItem]:
        slots = np.random.default_rng([self.seed % 2**32, TRAIN_STREAM, epoch, self.rank]).permutation(self.cache_num)
        start = epoch * self.replace_num
        return [(int(j), *self.local[(start + int(j)) % len(self.local)]) for j in slots]


# ---------------------------------------------------------------------------------------------------------
# Datasets


class CropDataset(Dataset):
    """Seeded random crops of a (possibly caching) MONAI dataset of preprocessed volumes.

    Indexed by ``(dataset index, crop seed, valid)`` keys that the batch sampler produces; returns a list of
    ``num_samples`` crop dicts, which ``list_data_collate`` flattens into the batch.
    """

    def __init__(
        self,
        base: Any,  # a MONAI Dataset / CacheDataset / SmartCacheDataset / PersistentDataset
        crops: Compose,
        plan: EpochPlan,
        volume_ids: list[int],
        stream: int,
        seed: int,
        with_valid: bool = False,
        on_bad: str = "skip",
    ):
        self.base, self.crops, self.plan, self.stream, self.seed = base, crops, plan, stream, seed
        self.volume_ids = volume_ids  # global ids of the volumes this rank's base dataset holds
        self.with_valid = with_valid
        self.on_bad = on_bad  # data.on_bad_volume
        self.num_items = plan.num_items  # items per epoch on this rank
        self.known_bad: dict[int, str] = {}  # per worker: bad volumes are not read again

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, index: int) -> tuple[dict[str, Any] | None, str]:
        """The item at ``index``, or None and why it is unusable."""
        if index in self.known_bad:
            return None, self.known_bad[index]
        try:
            item = self.base[index]
        except BadVolumeError as exc:
            item = {BAD: str(exc)}
        if item.get(BAD):
            self.known_bad[index] = item[BAD]
            return None, item[BAD]
        return item, ""

    def __getitem__(self, key: tuple[int, int, bool]) -> list[dict[str, Any]]:
        index, seed, valid = key
        item, bad = self._load(index)
        if item is None:
            if self.on_bad == "fail":
                raise BadVolumeError(f'{bad} (data.on_bad_volume is "fail"; "skip" replaces such volumes)')
            # Replace it by the next usable volume; the same one every time, so runs stay reproducible.
            for step in range(1, len(self.base)):
                item, _ = self._load((index + step) % len(self.base))
                if item is not None:
                    break
            if item is None:
                raise BadVolumeError(f"every volume of this rank is unusable, e.g. {bad}")
            valid = False  # a validation mean must not count the stand-in
        self.crops.set_random_state(seed=seed)
        out = self.crops(item)
        for d in out:
            d[BAD] = bad
            if self.with_valid:
                d["valid"] = valid
        return out


class SmartCache:
    """A SmartCacheDataset kept in step with ssl3d's epochs (MONAI leaves start/update/shutdown to the caller)."""

    def __init__(self, dataset: SmartCacheDataset, window: _SmartWindow, items: list[dict], epoch: int):
        self.dataset, self.window, self.items, self.epoch = dataset, window, items, epoch

    def start(self) -> None:
        """Begin loading the next window's volumes in a background thread."""
        self.dataset.start()

    def sync(self, epoch: int) -> None:
        """Make the cache hold ``epoch``'s window; call before iterating that epoch."""
        if epoch == self.epoch:
            return
        if epoch == self.epoch + 1:
            self.dataset.update_cache()  # waits for the background replacement, then swaps it in
        else:  # a jump (an odd resume, tests): load that epoch's window directly
            self.dataset.shutdown()
            self.dataset.set_data([self.items[self.window.local[k][0]] for k in self.window.rotated(epoch)])
            self.dataset._start_pos = 0  # shutdown() resets these only when the thread was running
            self.dataset._compute_data_idx()
            self.dataset.start()
        self.epoch = epoch

    def shutdown(self) -> None:
        self.dataset.shutdown()


@dataclass
class Datasets:
    train: CropDataset
    val: CropDataset
    data: DataConfig  # the data config actually used (datalists filled in with the demo data if empty)
    smart: SmartCache | None = None  # set for data.dataset == "smart_cache"


def build_datasets(cfg: Config, rank: int = 0, world_size: int = 1, start_epoch: int = 0) -> Datasets:
    """This rank's training and validation datasets; ``start_epoch`` positions a smart cache for a resume."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    d = resolve_data_config(cfg)
    seed = cfg.train.seed
    # Missing files stop the run up front only under "fail"; under "skip" they are replaced like broken ones.
    training, validation = load_datalists(d, seed=seed, check_files=d.on_bad_volume == "fail")
    load, crops = build_guarded_load(d), build_crop_transforms(d)
    workers = _cache_threads(d)
    progress = cfg.train.progress and rank == 0
    kind = d.dataset
    prepcache = _prepcache(cfg, d, training + validation, rank, world_size, workers, progress)
    if prepcache is not None:
        crops = prepcache.crop_transforms(crops)

    # Training
    n = len(training)
    smart_cache = None
    if kind in ("plain", "persistent", "prepcache"):  # every rank can read every volume: shuffle globally
        plan: EpochPlan = _GlobalShuffle(n, rank, world_size, seed)
        ids = list(range(n))
        base = _plain_or_persistent(kind, training, load, cfg, d, prepcache)
    else:
        order = np.random.default_rng([seed % 2**32, PARTITION_STREAM]).permutation(n)
        local = even_partition(order, rank, world_size)
        cache_num = 2 * cfg.train.batch_size * d.num_samples
        replace_num = min(cache_num, len(local) - cache_num)
        if kind == "smart_cache" and replace_num > 0:
            window = _SmartWindow(local, cache_num, replace_num, rank, seed)
            plan = window
            ids = [local[k][0] for k in window.rotated(start_epoch)]
            smart = SmartCacheDataset(
                [training[g] for g in ids],
                transform=load,
                replace_rate=1.0,
                cache_num=cache_num,
                num_init_workers=workers,
                num_replace_workers=workers,
                progress=progress,
                shuffle=False,  # ssl3d shuffles itself, so the window of any epoch can be rebuilt on resume
                copy_cache=False,
            )
            base = smart
            smart_cache = SmartCache(smart, window, training, start_epoch)
        else:
            if kind == "smart_cache":
                log.info(
                    "smart_cache: %d volumes per rank fit in cache_num=%d; caching them all", len(local), cache_num
                )
            rate = d.cache_rate if kind == "cache" else 1.0
            plan = _LocalShuffle(local, rank, seed)
            ids = [g for g, _ in local]
            base = CacheDataset(
                [training[g] for g in ids],
                transform=load,
                cache_rate=rate,
                num_workers=workers,
                progress=progress,
                copy_cache=False,
            )
    train = CropDataset(base, crops, plan, ids, TRAIN_STREAM, seed, on_bad=d.on_bad_volume)

    # Validation: in order, split across ranks, every rank caching only its share.
    local_val = even_partition(list(range(len(validation))), rank, world_size)
    val_items = [validation[g] for g, _ in local_val]
    if kind == "plain":
        val_base: Dataset = MonaiDataset(val_items, transform=load)
    elif kind in ("persistent", "prepcache"):
        val_base = _plain_or_persistent(kind, val_items, load, cfg, d, prepcache)
    else:
        val_base = CacheDataset(
            val_items, transform=load, cache_rate=d.cache_rate, num_workers=workers, progress=progress, copy_cache=False
        )
    val = CropDataset(
        val_base,
        crops,
        _LocalShuffle(local_val, rank, seed, shuffle=False),
        [g for g, _ in local_val],
        VAL_STREAM,
        seed,
        with_valid=True,
        on_bad=d.on_bad_volume,
    )
    return Datasets(train=train, val=val, data=d, smart=smart_cache)


def _plain_or_persistent(
    kind: str, items: list[dict], load: Compose, cfg: Config, d: DataConfig, prepcache: PrepCache | None = None
) -> Dataset:
    if kind == "plain":
        return MonaiDataset(items, transform=load)
    if prepcache is not None:
        return PrepCacheDataset(items, prepcache)
    # Keys hash only the item dict, so the folder must change whenever the preprocessing does.
    folder = Path(d.cache_dir or os.path.join(cfg.train.logdir, "cache")) / _preprocessing_hash(d)
    folder.mkdir(parents=True, exist_ok=True)
    return PersistentDataset(items, transform=load, cache_dir=folder)


def _prepcache(
    cfg: Config, d: DataConfig, items: list[dict], rank: int, world_size: int, workers: int, progress: bool
) -> PrepCache | None:
    """The preprocessing cache of ``data.dataset == "prepcache"``, with this rank's share built up front.

    Each rank builds every world_size-th volume (in threads); an entry another rank has not finished yet is
    built by whichever loader worker first needs it, and the first complete file wins.
    """
    if d.dataset != "prepcache":
        return None
    cache = PrepCache(prepcache_root(cfg), d, storage=d.prepcache_storage)
    cache.build_all([e["image"] for e in items[rank::world_size]], workers=workers, progress=progress)
    return cache


def _preprocessing_hash(d: DataConfig) -> str:
    spec: dict[str, Any] = {k: getattr(d, k) for k in ("roi", "a_min", "a_max", "b_min", "b_max", "spacing")}
    spec["monai"] = monai.__version__  # transforms' numerics may change between releases
    return "prep-" + hashlib.sha1(json.dumps(spec, sort_keys=True, default=list).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------
# Sampling and loading


class EpochBatchSampler(Sampler[list[tuple[int, int, bool]]]):
    """Batches of ``(dataset index, crop seed, valid)`` keys for one epoch, optionally from a batch offset.

    The epoch's order comes from the dataset's plan (seeded by epoch), so skipping ``start_batch`` batches
    costs nothing: no skipped volume is loaded.
    """

    def __init__(self, dataset: CropDataset, batch_size: int, drop_last: bool, epoch: int = 0, start_batch: int = 0):
        self.dataset, self.batch_size = dataset, batch_size
        n = dataset.num_items
        drop = drop_last and n >= batch_size
        self.batches_per_epoch = n // batch_size if drop else math.ceil(n / batch_size)
        self.set_epoch(epoch, start_batch)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_per_epoch}] batches per epoch")
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        ds, bs = self.dataset, self.batch_size
        plan = ds.plan(self.epoch)
        for b in range(self.start_batch, self.batches_per_epoch):
            yield [
                (index, item_seed(ds.seed, ds.stream, self.epoch, gid, copy), copy == 0)
                for index, gid, copy in plan[b * bs : (b + 1) * bs]
            ]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


class TrainLoader:
    """The training DataLoader plus its position (epoch, batch offset) and the smart cache's life cycle.

    Iterating yields the rest of the current epoch; after a complete pass it moves to the next epoch by
    itself, so ``for epoch ...: for batch in loader`` works with or without explicit ``set_epoch`` calls.
    """

    def __init__(self, loader: DataLoader, sampler: EpochBatchSampler, smart: SmartCache | None = None):
        self.loader, self.sampler, self.smart = loader, sampler, smart
        self.dataset: CropDataset = sampler.dataset
        self.batches_per_epoch = sampler.batches_per_epoch
        if smart is not None:
            smart.start()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def start_batch(self) -> int:
        return self.sampler.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Position the loader: the next iteration yields batches ``start_batch..`` of ``epoch``."""
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.sampler.epoch
        if self.smart is not None:
            self.smart.sync(epoch)
        yield from self.loader
        self.sampler.set_epoch(epoch + 1, 0)

    def restart_workers(self) -> None:
        """Drop the worker pool after a worker died; the next iteration starts fresh workers."""
        self.loader._iterator = None  # DataLoader keeps persistent workers here; a dead pool cannot be reused

    def close(self) -> None:
        """Stop the smart cache's replacement thread (loader workers end with the loader)."""
        if self.smart is not None:
            self.smart.shutdown()


def build_loaders(
    cfg: Config, rank: int = 0, world_size: int = 1, start_epoch: int = 0, start_batch: int = 0
) -> tuple[TrainLoader, DataLoader]:
    """This rank's training loader (positioned at ``start_epoch``/``start_batch``) and validation loader."""
    ds = build_datasets(cfg, rank, world_size, start_epoch=start_epoch)
    bs = cfg.train.batch_size
    workers = num_workers(ds.data)
    common: dict[str, Any] = {
        "num_workers": workers,
        "collate_fn": list_data_collate,
        "pin_memory": torch.cuda.is_available() and cfg.train.device != "cpu",
    }
    train_sampler = EpochBatchSampler(ds.train, bs, drop_last=True, epoch=start_epoch, start_batch=start_batch)
    # Smart cache swaps its content between epochs in this process: workers must be re-forked to see it.
    persistent = workers > 0 and ds.smart is None
    train = DataLoader(ds.train, batch_sampler=train_sampler, persistent_workers=persistent, **common)
    val_sampler = EpochBatchSampler(ds.val, bs, drop_last=False, epoch=VAL_EPOCH)
    val = DataLoader(ds.val, batch_sampler=val_sampler, persistent_workers=workers > 0, **common)
    return TrainLoader(train, train_sampler, ds.smart), val


def num_workers(d: DataConfig) -> int:
    """Loader workers per process: the configured number, clamped to this process's share of the CPUs."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE: the ranks sharing this node's CPUs.
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    return max(0, min(d.num_workers, cpus // max(local_procs, 1)))


def _cache_threads(d: DataConfig) -> int:
    return max(1, num_workers(d))
