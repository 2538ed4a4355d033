"""Broken volumes: found when loaded, named once, and either skipped (replaced by another volume) or fatal.

Collections gathered from several archives always hold a few bad files (missing, truncated, 2D, constant,
a handful of voxels). The policy ``data.on_bad_volume`` decides: ``skip`` (default) replaces the sample and
reports it; ``fail`` stops at once naming the file. ``ssl3d data check`` finds them all up front.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import torch
from monai.transforms import Compose, MapTransform

from ssl3d.errors import BadVolumeError

KEY = "image"
BAD = "bad"  # set in a loaded item that could not be used: "<path>: <reason>"


def root_cause(exc: BaseException) -> str:
    """The innermost message of an exception chain (MONAI's Compose wraps the real error in RuntimeErrors)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".strip()


def _looks_like_volume(head: bytes) -> bool:
    """NIfTI-1/2 (header size 348/540 at byte 0, magic at 344 or 4), DICOM ("DICM" at 128), NRRD, MetaImage."""
    sizes = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    nifti = bool(sizes & {348, 540}) or head[344:347] in (b"n+1", b"ni1") or head[4:7] in (b"n+2", b"ni2")
    metaimage = any(k in head[:512] for k in (b"ObjectType", b"NDims", b"ElementType"))
    return nifti or head[128:132] == b"DICM" or head.startswith(b"NRRD") or metaimage


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a file cannot be a volume, from the file itself (not from whichever reader failed last), or None when
    it looks like one: then the reader's own error is the reason (e.g. a truncated gzip stream)."""
    p = Path(path)
    if not p.exists():
        return "file not found"
    if p.is_dir():
        return "is a directory, not a volume file"
    size = p.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    with open(p, "rb") as fh:
        head = fh.read(1024)
    what = "first bytes"
    if head[:2] == b"\x1f\x8b":  # gzip: judge what it holds
        try:
            with gzip.open(p, "rb") as gz:
                inner = gz.read(1024)
        except (OSError, EOFError):
            return None  # a damaged stream: the reader's error says so
        if not inner:
            return "empty gzip stream (decompresses to 0 bytes)"
        head, what = inner, "gzip holding"
    if _looks_like_volume(head):
        return None
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in head[:16])
    return f"not a NIfTI/DICOM/NRRD/MetaImage file ({what} {head[:16].hex(' ')} {text!r}, {size} bytes on disk)"


def volume_problem(image: Any, min_size: int) -> str | None:
    """Why a loaded [C, X, Y, Z] volume is unusable, or None."""
    shape = tuple(image.shape)
    if len(shape) != 4 or shape[0] != 1:
        return f"not a 3D volume with one channel: shape {list(shape)[1:] if len(shape) else shape}"
    if min(shape[1:]) < min_size:
        return f"too small: shape {list(shape[1:])}, an axis under {min_size} voxels (data.min_size)"
    t = torch.as_tensor(image)
    if not bool(torch.isfinite(t).all()):
        return "holds NaN or infinite values"
    if float(t.max()) == float(t.min()):
        return f"constant: every voxel is {float(t.min()):g}"
    return None


class CheckVolumed(MapTransform):
    """Raises BadVolumeError for a volume that must not reach the padding and cropping steps."""

    def __init__(self, keys: str = KEY, min_size: int = 16):
        super().__init__(keys)
        self.min_size = min_size

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        for key in self.key_iterator(data):
            problem = volume_problem(data[key], self.min_size)
            if problem:
                raise BadVolumeError(problem)
        return data


class GuardedLoad:
    """Wraps the deterministic chain so a bad file becomes a marked item instead of an exception.

    Caching datasets build their caches in bulk; one unreadable file must not end that, so the decision
    (skip or fail) is taken where the item is used.
    """

    def __init__(self, chain: Compose):
        self.chain = chain

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.chain(item)
        except Exception as exc:  # noqa: BLE001 - any reader error means the same: this file is unusable
            # MONAI tries every reader it has and reports the last one's complaint (pydicom's for an empty .nii.gz):
            # the file itself says more, unless it looks like a volume and the reader's error is the real story.
            path = item.get(KEY)
            reason = (file_problem(path) if isinstance(path, str | os.PathLike) else None) or root_cause(exc)
            return {KEY: None, BAD: f"{path}: {reason}"}


def check_datalist_entries(items: list[dict[str, str]], load: GuardedLoad) -> list[str]:
    """Load every entry through the guarded chain; one line per bad entry."""
    bad = []
    for item in items:
        out = load(dict(item))
        if out.get(BAD):
            bad.append(out[BAD])
    return bad


__all__ = [
    "BAD",
    "BadVolumeError",
    "CheckVolumed",
    "GuardedLoad",
    "check_datalist_entries",
    "file_problem",
    "volume_problem",
]
