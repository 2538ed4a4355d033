"""Data: datalists in the reference's JSON format, MONAI transforms, seeded resumable loaders, demo and sample CT."""

from ssl3d.data.datalist import load_datalists
from ssl3d.data.datasets import (
    Datasets,
    EpochBatchSampler,
    TrainLoader,
    build_datasets,
    build_loaders,
    resolve_data_config,
)
from ssl3d.data.demo import write_demo_dataset
from ssl3d.data.samples import fetch_samples
from ssl3d.data.transforms import build_train_transforms, build_val_transforms

__all__ = [
    "Datasets",
    "EpochBatchSampler",
    "TrainLoader",
    "build_datasets",
    "build_loaders",
    "build_train_transforms",
    "build_val_transforms",
    "fetch_samples",
    "load_datalists",
    "resolve_data_config",
    "write_demo_dataset",
]
