"""Datalists in MONAI's "decathlon" JSON format, the format of the reference's five collection lists.

A datalist file is a JSON object with a ``"training"`` list and usually a ``"validation"`` list; each entry is
``{"image": "relative/path.nii.gz", ...}`` (other keys are ignored) or a plain path string. Relative paths
are resolved against the datalist's own root (by default the folder holding the JSON file), so several
collections stored in different places can be combined in one run.

MONAI's ``load_decathlon_datalist`` is not used: it rejects plain-string entries and its errors name neither
the file nor the entry, which is what a user needs to fix a list of thousands of lines.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ssl3d.config import Config, ConfigError, DataConfig, DatalistConfig, read_json

MAX_REPORTED_MISSING = 5
HOLDOUT_FRACTION = 0.05
log = logging.getLogger(__name__)


def load_datalists(
    cfg: DataConfig, seed: int = 0, check_files: bool = True
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """All datalists of a run merged into (training, validation) lists of ``{"image": absolute_path}``.

    A datalist without a ``"validation"`` list gives up a small seeded hold-out of its training list (with a
    warning), so validation losses always exist. ``check_files`` reports missing images up front rather
    than in a loader worker hours into a run.
    """
    if not cfg.datalists:
        raise ConfigError(
            'data.datalists: empty; expected at least one {"json": "dataset.json"} (ssl3d\'s datasets '
            "fall back to the built-in demo data themselves)"
        )
    training: list[dict[str, str]] = []
    validation: list[dict[str, str]] = []
    missing: list[str] = []
    for dl in cfg.datalists:
        train_i, val_i = read_datalist(dl, missing=missing if check_files else None)
        if val_i is None:
            train_i, val_i = _hold_out(train_i, seed=seed, where=f"datalist file {dl.json}")
        training += train_i
        validation += val_i
    if not training:
        files = ", ".join(dl.json for dl in cfg.datalists)
        raise ConfigError(f'datalist file(s) {files}: no training volumes; expected a non-empty "training" list')
    if not validation:
        training, validation = _hold_out(training, seed=seed, where="all datalists (their validation lists are empty)")
    if missing:
        extra = len(missing) - MAX_REPORTED_MISSING
        more = [f"... and {extra} more missing images"] if extra > 0 else []
        raise ConfigError(missing[:MAX_REPORTED_MISSING] + more)
    return training, validation


def read_datalist(
    dl: DatalistConfig, missing: list[str] | None = None
) -> tuple[list[dict[str, str]], list[dict[str, str]] | None]:
    """One datalist file -> (training, validation or None when the file has no validation list).

    With ``missing`` given, one line per image file that does not exist is appended to it.
    """
    path = Path(dl.json)
    data = read_json(path, what="datalist")
    if dl.root:
        root = Path(dl.root).expanduser()
    else:
        root = path.parent
    root = Path(os.path.abspath(root))
    if "training" not in data:
        found = ", ".join(json.dumps(k) for k in data) or "none"
        raise ConfigError(
            f'datalist file {path}: no "training" key (keys found: {found}); '
            'expected {"training": [{"image": "relative/path.nii.gz"}, ...], "validation": [...]}'
        )
    training = _entries(data["training"], path, "training", root, missing)
    validation = _entries(data["validation"], path, "validation", root, missing) if "validation" in data else None
    return training, validation


def _entries(items: Any, path: Path, key: str, root: Path, missing: list[str] | None) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise ConfigError(
            f'datalist file {path}: "{key}" is {type(items).__name__}; expected a list of {{"image": "path"}} entries'
        )
    out = []
    for j, item in enumerate(items):
        if isinstance(item, dict):
            if "image" not in item:
                found = ", ".join(json.dumps(k) for k in item) or "none"
                raise ConfigError(
                    f'datalist file {path}: "{key}"[{j}] has no "image" key (keys found: {found}); '
                    'expected {"image": "relative/path.nii.gz"} or a plain path string'
                )
            image = item["image"]
        else:
            image = item
        if not isinstance(image, str) or not image:
            got = json.dumps(image, default=str)[:80]
            raise ConfigError(
                f'datalist file {path}: "{key}"[{j}] image is {got}; expected one path string '
                "(multi-channel or multi-file images are not supported)"
            )
        p = Path(image).expanduser()
        full = os.path.abspath(p if p.is_absolute() else root / p)
        if missing is not None and not os.path.isfile(full):
            missing.append(
                f'datalist file {path}: "{key}"[{j}] image {full} not found; '
                f'expected a file under the datalist root {root} (set its "root" if the images live elsewhere)'
            )
        out.append({"image": full})
    return out


def _hold_out(
    entries: list[dict[str, str]], seed: int, where: str
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Seeded split: ~5% (at least one volume) becomes validation; a single volume serves as both."""
    n = len(entries)
    if n == 0:
        return entries, []
    if n == 1:
        warnings.warn(f"{where}: no validation list and one training volume; validating on that volume", stacklevel=3)
        return entries, list(entries)
    k = max(1, round(HOLDOUT_FRACTION * n))
    held = set(np.random.default_rng([seed, 0x5EED]).permutation(n)[:k].tolist())
    warnings.warn(
        f"{where}: no validation list; holding out {k} of {n} training volumes (seeded) for validation",
        stacklevel=3,
    )
    return [e for i, e in enumerate(entries) if i not in held], [e for i, e in enumerate(entries) if i in held]


def resolve_data_config(cfg: Config) -> DataConfig:
    """The run's data config; with no datalists, the built-in demo data (written on first use)."""
    d = cfg.data
    if d.datalists:
        return d
    from ssl3d.data.demo import write_demo_dataset  # torch and nibabel: only when the demo data is needed

    demo_dir = Path(d.demo_dir or Path(cfg.train.logdir).parent / "demo_data")  # as ssl3d.trainer writes it
    path = write_demo_dataset(demo_dir, n_volumes=d.demo_volumes, seed=cfg.train.seed)
    log.info("data.datalists is empty: using %d synthetic demo volumes from %s", d.demo_volumes, path)
    return d.model_copy(update={"datalists": [DatalistConfig(json=str(path))]})
