"""MONAI transform chains for pre-training crops (the reference chain, made safe for small volumes).

The chain is split in two so that datasets can cache the expensive deterministic part (load, reorient,
resample, rescale, pad, crop to the body) and re-draw only the cheap random crops, with a random state
that ``ssl3d.data.datasets`` seeds per item from (seed, epoch, index).
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    RandSpatialCropSamplesd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from ssl3d.config import DataConfig
from ssl3d.data.faults import CheckVolumed, GuardedLoad

KEY = "image"


def build_load_transforms(cfg: DataConfig, label: str | None = None, grow_to_roi: bool = True) -> Compose:
    """Deterministic part: the output is what a cache holds, always at least ``roi`` along every axis.

    One chain for pre-training and fine-tuning: with ``label`` (a labelled datalist's key) the label map follows
    every spatial step (resampled nearest-neighbour) and is never rescaled. ``grow_to_roi``: the body's box grows to
    a multiple of the ROI (the reference's pre-training chain; its fine-tuning chain crops to the body only)."""
    roi = list(cfg.roi)
    keys = [KEY] if label is None else [KEY, label]
    chain: list = [
        LoadImaged(keys=keys, reader="NibabelReader", ensure_channel_first=True, image_only=True),
        CheckVolumed(keys=KEY, min_size=cfg.min_size),  # 2D, constant, tiny: bad before padding hides it
        Orientationd(keys=keys, axcodes="RAS", labels=None),  # labels from the image's space: RAS with nibabel
    ]
    if cfg.spacing is not None:
        mode = "bilinear" if label is None else ("bilinear", "nearest")
        chain.append(Spacingd(keys=keys, pixdim=tuple(cfg.spacing), mode=mode, dtype=np.float32))
    chain += [
        ScaleIntensityRanged(keys=KEY, a_min=cfg.a_min, a_max=cfg.a_max, b_min=cfg.b_min, b_max=cfg.b_max, clip=True),
        SpatialPadd(keys=keys, spatial_size=roi),
        # Crop to the body (anything above a_min HU). The threshold sits a hair above b_min: resampling leaves
        # ~1e-7 ripples in air that the reference's "> 0" counts as body.
        CropForegroundd(
            keys=keys,
            source_key=KEY,
            select_fn=_above(min(cfg.b_min, cfg.b_max) + 1e-3 * abs(cfg.b_max - cfg.b_min)),
            k_divisible=roi if grow_to_roi else 1,
            allow_smaller=True,
            start_coord_key=None,
            end_coord_key=None,
        ),
        # The foreground box may be clipped by the image edge (allow_smaller) or empty (an all-air scan):
        # pad again so a fixed-size random crop always fits. MONAI would silently return smaller crops.
        SpatialPadd(keys=keys, spatial_size=roi),
        # Plain float32 tensors: caches stay small and crops need no metadata from here on.
        EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float32, track_meta=False),
    ]
    return Compose(chain)


def build_guarded_load(cfg: DataConfig, label: str | None = None, grow_to_roi: bool = True) -> GuardedLoad:
    """The deterministic chain, with a file that fails anywhere in it turned into an item marked "bad"
    (the dataset then applies ``data.on_bad_volume``)."""
    return GuardedLoad(build_load_transforms(cfg, label, grow_to_roi))


def build_crop_transforms(cfg: DataConfig) -> Compose:
    """Random part: ``num_samples`` fixed-size crops per volume (a list of dicts, flattened by collation)."""
    return Compose(
        [
            RandSpatialCropSamplesd(
                keys=KEY, roi_size=list(cfg.roi), num_samples=cfg.num_samples, random_center=True, random_size=False
            ),
            EnsureTyped(keys=KEY, data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def build_train_transforms(cfg: DataConfig) -> Compose:
    """The whole reference chain in one Compose, for use outside ssl3d's datasets (e.g. notebooks)."""
    return Compose([*build_load_transforms(cfg).transforms, *build_crop_transforms(cfg).transforms])


def build_val_transforms(cfg: DataConfig) -> Compose:
    """Same chain as training: validation measures the pretext losses on crops of held-out volumes.

    Its crops are made repeatable by the dataset wrapper, which seeds them per item.
    """
    return build_train_transforms(cfg)


class _above:
    """Picklable foreground test (a lambda would break worker processes started with spawn)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x > self.threshold
