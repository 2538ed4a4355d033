"""``model_swinvit.json``: what a downstream model must repeat to use ``model_swinvit.pt`` (nnssl keeps the same).

The weight file stays exactly what MONAI's ``SwinUNETR.load_from`` reads; the JSON beside it records the encoder's
shape (feature size, depths, heads, window, patch, input channels, merging order), the preprocessing the encoder
saw (orientation, spacing, intensity window and output range), the ROI, the steps trained, the data lists, the
versions, and each tensor's shape and SHA-256. The fingerprints catch what a shape check cannot: a tensor permuted
within its own shape (a square projection transposed, axes of a patch kernel swapped) or two same-shaped tensors
swapped under each other's names, the silent failures after which fine-tuning starts from garbage without an error.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ssl3d.config import Config, ConfigError

FORMAT = "ssl3d.model_swinvit/1"
PREPROCESSING_KEYS = ("a_min", "a_max", "b_min", "b_max", "spacing")
ARCH_KEYS = ("feature_size", "depths", "num_heads", "window_size", "patch_size", "in_channels", "legacy_patch_merging")


def metadata_path(weights: Path) -> Path:
    """``model_swinvit.pt`` -> ``model_swinvit.json`` (same folder, same stem)."""
    return Path(weights).with_suffix(".json")


def tensor_fingerprint(t: torch.Tensor) -> str:
    """SHA-256 of the fp32 bytes in memory order: any permutation, even within one shape, changes it."""
    return hashlib.sha256(t.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def build_metadata(cfg: Config, state_dict: dict[str, torch.Tensor], steps: int | None) -> dict[str, Any]:
    """The JSON document for an export whose ``{"state_dict": ...}`` is ``state_dict``."""
    import monai

    import ssl3d

    m, d = cfg.model, cfg.data
    datalists = []
    for dl in d.datalists:
        try:
            doc = json.loads(Path(dl.json).read_text())
            sizes = {k: len(doc.get(k, [])) for k in ("training", "validation")}
        except (OSError, ValueError):
            sizes = {}
        datalists.append({"name": Path(dl.json).name, **sizes})
    return {
        "format": FORMAT,
        "model": {
            "feature_size": m.feature_size,
            "depths": list(m.depths),
            "num_heads": list(m.num_heads),
            "window_size": m.window_size,
            "patch_size": m.patch_size,
            "in_channels": m.in_channels,
            "legacy_patch_merging": m.legacy_patch_merging,
        },
        "preprocessing": {
            "orientation": "RAS",
            "spacing": list(d.spacing) if d.spacing is not None else None,
            "a_min": d.a_min,
            "a_max": d.a_max,
            "b_min": d.b_min,
            "b_max": d.b_max,
            "clip": True,
        },
        "roi": list(d.roi),
        "steps": steps,
        "datalists": datalists,
        "versions": {"ssl3d": ssl3d.__version__, "monai": monai.__version__, "torch": torch.__version__.split("+")[0]},
        "tensors": {k: {"shape": list(v.shape), "sha256": tensor_fingerprint(v)} for k, v in state_dict.items()},
    }


def write_metadata(weights: Path, doc: dict[str, Any]) -> Path:
    path = metadata_path(weights)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_metadata(weights: Path) -> dict[str, Any] | None:
    """The JSON beside ``weights``, or None when there is none (released weights, older ssl3d exports)."""
    path = metadata_path(weights)
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc}); delete it to load {Path(weights).name} without it") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {doc.get('format') if isinstance(doc, dict) else None!r}, expected {FORMAT}")
    return doc


def verify_tensors(weights: Path, doc: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse an export whose tensors are not the ones its metadata describes (renamed, reshaped or permuted)."""
    listed = doc.get("tensors", {})
    problems = []
    for name, info in listed.items():
        if name not in state_dict:
            problems.append(f"{name} is listed in {metadata_path(weights).name} but missing from the file")
        elif list(state_dict[name].shape) != info["shape"]:
            problems.append(f"{name} has shape {list(state_dict[name].shape)}, the metadata says {info['shape']}")
        elif tensor_fingerprint(state_dict[name]) != info["sha256"]:
            problems.append(f"{name} differs from its fingerprint (permuted, swapped or edited after export)")
    extra = sorted(set(state_dict) - set(listed))
    if listed and extra:
        problems.append(f"{extra[0]} is in the file but not in its metadata ({len(extra)} such tensors)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{weights}: {problems[0]}{more}; re-export it with ssl3d export")
