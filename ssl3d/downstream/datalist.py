"""Labelled datalists (MONAI / Decathlon convention) for fine-tuning and probing, checked before anything starts.

``{"labels": {"0": "background", "1": "liver"}, "training": [{"image": ..., "label": ...}], "validation": [...]}``
as BTCV's ``dataset_0.json`` and the Decathlon's ``dataset.json``. Every problem a run would otherwise meet hours
in (an entry without a label, a label map on another grid than its image, a label value the network has no
output for) is found here, reported one line each naming the file and the value.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssl3d.config import Config, ConfigError, read_json
from ssl3d.data.datalist import _hold_out

MAX_REPORTED = 5
SUBSET_STREAM = 0x1ABE1


@dataclass
class LabelledData:
    training: list[dict[str, str]]  # the --labelled subset, in its seeded order
    validation: list[dict[str, str]]
    num_classes: int  # output channels, background included
    class_names: list[str]  # index -> name
    available: int  # training cases before the subset was taken


def _entries(items: Any, path: Path, key: str, root: Path) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise ConfigError(f'datalist file {path}: "{key}" is {type(items).__name__}; expected a list of entries')
    out = []
    for j, item in enumerate(items):
        if not isinstance(item, dict) or "label" not in item:
            found = ", ".join(json.dumps(k) for k in item) if isinstance(item, dict) else json.dumps(item)[:60]
            raise ConfigError(
                f'datalist file {path}: "{key}"[{j}] has no "label" (found: {found}); fine-tuning needs '
                '{"image": "img.nii.gz", "label": "seg.nii.gz"} entries (a pre-training list has images only)'
            )
        entry = {}
        for k in ("image", "label"):
            value = item.get(k)
            if not isinstance(value, str) or not value:
                raise ConfigError(f'datalist file {path}: "{key}"[{j}] {k} is {json.dumps(value)}; expected one path')
            p = Path(value).expanduser()
            entry[k] = os.path.abspath(p if p.is_absolute() else root / p)
        out.append(entry)
    return out


def _subset_size(labelled: float, available: int, where: str) -> int:
    if labelled == 0:
        return available
    n = int(labelled) if labelled >= 1 else max(1, round(labelled * available))
    if n > available:
        raise ConfigError(f"finetune.labelled: got {int(labelled)}, but {where} has {available} training cases")
    return n


def load_labelled(cfg: Config, check_files: bool = True) -> LabelledData:
    """The run's labelled training subset, validation list and classes; ConfigError listing every problem."""
    f = cfg.finetune
    training: list[dict[str, str]] = []
    validation: list[dict[str, str]] = []
    names: dict[int, str] = {}
    for dl in cfg.data.datalists:
        path = Path(dl.json)
        doc = read_json(path, what="datalist")
        root = Path(os.path.abspath(Path(dl.root).expanduser() if dl.root else path.parent))
        if "training" not in doc:
            raise ConfigError(
                f'datalist file {path}: no "training" key; expected {{"training": [{{"image", "label"}}]}}'
            )
        train_i = _entries(doc["training"], path, "training", root)
        val_i = _entries(doc["validation"], path, "validation", root) if "validation" in doc else None
        if val_i is None:
            train_i, val_i = _hold_out(train_i, seed=cfg.train.seed, where=f"datalist file {path}")
        training += train_i
        validation += val_i
        labels = doc.get("labels")
        if isinstance(labels, dict):
            for k, v in labels.items():
                if str(k).isdigit():
                    names.setdefault(int(k), str(v))
    where = ", ".join(Path(dl.json).name for dl in cfg.data.datalists)
    if not training:
        raise ConfigError(f"datalist file(s) {where}: no training cases")
    num_classes = f.num_classes or (max(names) + 1 if names else 0)
    if num_classes < 2:
        raise ConfigError(
            f'finetune.num_classes: 0 and datalist file(s) {where} have no "labels" map; '
            "set finetune.num_classes (classes including background)"
        )
    available = len(training)
    order = np.random.default_rng([cfg.train.seed % 2**32, SUBSET_STREAM]).permutation(available)
    subset = [training[i] for i in order[: _subset_size(f.labelled, available, where)]]
    data = LabelledData(
        subset, validation, num_classes, [names.get(i, f"class_{i}") for i in range(num_classes)], available
    )
    if check_files:
        check_pairs(subset + validation, num_classes)
    return data


def check_pairs(entries: list[dict[str, str]], num_classes: int) -> None:
    """Every image and label exists, they share a grid, and labels hold only values 0..num_classes-1."""
    import nibabel as nib

    problems: list[str] = []
    unique = {(e["image"], e["label"]): e for e in entries}  # a case listed twice is reported once
    for e in unique.values():
        if len(problems) >= MAX_REPORTED:
            break
        missing = [e[k] for k in ("image", "label") if not os.path.isfile(e[k])]
        if missing:
            problems += [f"{m}: not found" for m in missing]
            continue
        try:
            img, lab = nib.load(e["image"]), nib.load(e["label"])
        except Exception as exc:  # noqa: BLE001 - nibabel raises several types for unreadable files
            problems.append(f"{e['image']} / {e['label']}: unreadable ({str(exc).splitlines()[0]})")
            continue
        if img.shape[:3] != lab.shape[:3]:
            problems.append(
                f"label file {e['label']}: shape {list(lab.shape)} differs from its image's {list(img.shape)} "
                f"({e['image']}); expected label maps on the image's grid"
            )
            continue
        values = np.unique(np.asarray(lab.dataobj))
        top = float(values.max()) if values.size else 0.0
        if top >= num_classes or float(values.min()) < 0 or not np.all(np.equal(np.mod(values, 1), 0)):
            bad = values[(values >= num_classes) | (values < 0) | (np.mod(values, 1) != 0)]
            problems.append(
                f"label file {e['label']}: value {bad[0]:g} outside the classes 0..{num_classes - 1} "
                f"(finetune.num_classes {num_classes}); set finetune.num_classes or fix the labels map"
            )
    if problems:
        raise ConfigError(problems)
