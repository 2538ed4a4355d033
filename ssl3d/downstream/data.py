"""Transforms and loaders for labelled volumes: the pre-training's preprocessing, label-aware crops.

The deterministic part repeats what the encoder saw (RAS, optional resampling, the intensity window, crop to the
body) for image and label together (labels resampled nearest-neighbour). Training crops come from MONAI's
``RandCropByPosNegLabeld`` through the same seeded machinery as pre-training (``ssl3d.data.datasets``): crops are a
pure function of (seed, epoch, volume), the order is a seeded global shuffle split across ranks, and a resume
continues the data order. Validation yields whole volumes for ``sliding_window_inference``; every rank reads all of
them, since sharded backends need the same forwards on every rank.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import CacheDataset, list_data_collate
from monai.data import Dataset as MonaiDataset
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from torch.utils.data import DataLoader

from ssl3d.config import Config, DataConfig
from ssl3d.data.datasets import TRAIN_STREAM, CropDataset, EpochBatchSampler, TrainLoader, _GlobalShuffle, num_workers
from ssl3d.data.transforms import _above
from ssl3d.downstream.datalist import LabelledData

KEYS = ["image", "label"]


def build_labelled_load(d: DataConfig) -> Compose:
    chain: list = [
        LoadImaged(keys=KEYS, reader="NibabelReader", ensure_channel_first=True, image_only=True),
        Orientationd(keys=KEYS, axcodes="RAS", labels=None),
    ]
    if d.spacing is not None:
        chain.append(Spacingd(keys=KEYS, pixdim=tuple(d.spacing), mode=("bilinear", "nearest"), dtype=np.float32))
    chain += [
        ScaleIntensityRanged(keys="image", a_min=d.a_min, a_max=d.a_max, b_min=d.b_min, b_max=d.b_max, clip=True),
        CropForegroundd(
            keys=KEYS,
            source_key="image",
            select_fn=_above(min(d.b_min, d.b_max) + 1e-3 * abs(d.b_max - d.b_min)),
            allow_smaller=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        SpatialPadd(keys=KEYS, spatial_size=list(d.roi)),
        EnsureTyped(keys=KEYS, data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    return Compose(chain)


def build_labelled_crops(d: DataConfig, pos_fraction: float) -> Compose:
    return Compose(
        [
            RandCropByPosNegLabeld(
                keys=KEYS,
                label_key="label",
                spatial_size=list(d.roi),
                pos=pos_fraction,
                neg=1.0 - pos_fraction,
                num_samples=d.num_samples,
                allow_smaller=False,
            ),
            EnsureTyped(keys=KEYS, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def build_labelled_loaders(
    cfg: Config, data: LabelledData, rank: int, world_size: int, epoch: int = 0, start_batch: int = 0
) -> tuple[TrainLoader, DataLoader]:
    d = cfg.data
    load = build_labelled_load(d)
    workers = num_workers(d)
    # Labelled sets are small: cache the preprocessed volumes (each rank all of them; the order splits them).
    base = CacheDataset(data.training, transform=load, cache_rate=1.0, num_workers=max(1, workers), progress=False)
    n = len(data.training)
    plan = _GlobalShuffle(n, rank, world_size, cfg.train.seed)
    crops = build_labelled_crops(d, cfg.finetune.pos_fraction)
    train_ds = CropDataset(base, crops, plan, list(range(n)), TRAIN_STREAM, cfg.train.seed)
    sampler = EpochBatchSampler(train_ds, cfg.train.batch_size, drop_last=True, epoch=epoch, start_batch=start_batch)
    train = DataLoader(
        train_ds,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=list_data_collate,
        persistent_workers=workers > 0,
    )
    val = DataLoader(MonaiDataset(data.validation, transform=load), batch_size=1, num_workers=min(workers, 1))
    return TrainLoader(train, sampler), val
