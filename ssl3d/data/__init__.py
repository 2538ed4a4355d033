"""Data: datalists in the reference's JSON format, MONAI transforms, seeded resumable loaders, demo and sample CT.

Names are imported on first use (PEP 562), so ``ssl3d.data.prepare`` and the command line's argument parsing do
not pay for MONAI's import.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "load_datalists": "datalist",
    "Datasets": "datasets",
    "EpochBatchSampler": "datasets",
    "TrainLoader": "datasets",
    "build_datasets": "datasets",
    "build_loaders": "datasets",
    "resolve_data_config": "datalist",
    "write_demo_dataset": "demo",
    "fetch_samples": "samples",
    "build_train_transforms": "transforms",
    "build_val_transforms": "transforms",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'ssl3d.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ssl3d.data.{_HOME[name]}"), name)
