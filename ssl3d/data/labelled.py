"""Loaders for labelled volumes (fine-tuning and probing): pre-training's preprocessing, label-aware crops.

The deterministic part is pre-training's chain (``ssl3d.data.transforms.build_guarded_load``) with the label map
following every spatial step, and with the same bad-volume handling (``data.on_bad_volume``). Training crops come
from MONAI's ``RandCropByPosNegLabeld`` through the same seeded machinery as pre-training (``ssl3d.data.datasets``):
crops are a pure function of (seed, epoch, volume), the order is a seeded global shuffle split across ranks, and a
resume continues the data order. Validation yields whole volumes for ``sliding_window_inference``, split across
ranks like pre-training's (volumes repeated to even out the ranks come marked ``valid: False``).
"""

from __future__ import annotations

from typing import Any

import torch
from monai.data import CacheDataset, list_data_collate
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose, EnsureTyped, RandCropByPosNegLabeld
from torch.utils.data import DataLoader

from ssl3d.config import Config, DataConfig
from ssl3d.data.datasets import (
    TRAIN_STREAM,
    CropDataset,
    EpochBatchSampler,
    TrainLoader,
    _GlobalShuffle,
    even_partition,
    num_workers,
)
from ssl3d.data.transforms import build_guarded_load

LABEL = "label"
KEYS = ["image", LABEL]


def build_labelled_crops(d: DataConfig, pos_fraction: float) -> Compose:
    return Compose(
        [
            RandCropByPosNegLabeld(
                keys=KEYS,
                label_key=LABEL,
                spatial_size=list(d.roi),
                pos=pos_fraction,
                neg=1.0 - pos_fraction,
                num_samples=d.num_samples,
                allow_smaller=False,
            ),
            EnsureTyped(keys=KEYS, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def one_volume(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Validation batches of one whole volume, left as the chain produced it (a bad volume has no tensor)."""
    return batch[0]


def build_labelled_loaders(
    cfg: Config,
    training: list[dict[str, str]],
    validation: list[dict[str, str]],
    rank: int,
    world_size: int,
    epoch: int = 0,
) -> tuple[TrainLoader, DataLoader]:
    d = cfg.data
    # The reference's fine-tuning chain crops to the body without growing the box to ROI multiples.
    load = build_guarded_load(d, label=LABEL, grow_to_roi=False)
    workers = num_workers(d)
    # Labelled sets are small: cache the preprocessed volumes (each rank all of them; the order splits them).
    base = CacheDataset(training, transform=load, cache_rate=1.0, num_workers=max(1, workers), progress=False)
    n = len(training)
    plan = _GlobalShuffle(n, rank, world_size, cfg.train.seed)
    crops = build_labelled_crops(d, cfg.finetune.pos_fraction)
    train_ds = CropDataset(base, crops, plan, list(range(n)), TRAIN_STREAM, cfg.train.seed, on_bad=d.on_bad_volume)
    sampler = EpochBatchSampler(train_ds, cfg.train.batch_size, drop_last=True, epoch=epoch)
    train = DataLoader(
        train_ds,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=list_data_collate,
        persistent_workers=workers > 0,
    )
    split = even_partition(list(range(len(validation))), rank, world_size)
    share = [{**validation[g], "valid": copy == 0} for g, copy in split]
    val = DataLoader(
        MonaiDataset(share, transform=load), batch_size=1, num_workers=min(workers, 1), collate_fn=one_volume
    )
    return TrainLoader(train, sampler), val
