"""Built-in synthetic CT, so ``ssl3d pretrain`` runs end to end with no data at all.

The volumes are toy torsos in Hounsfield units, not anatomy: an elliptic body (subcutaneous fat around
textured soft tissue), lungs in the upper half, a liver and two kidneys below them, a spine with vertebrae
and discs, ribs around the lungs, air outside and scanner-like Gaussian noise. They are varied (shape,
size, voxel spacing, one stored in LPS order, one thinner than 64 slices) so that the real pipeline's
reorientation and padding paths run. They are written as real int16 NIfTI with a datalist in the reference's
format, so the demo goes through exactly the code a real dataset goes through.

The generator knows where it put each organ, so every volume comes with a label map on the same grid
(``LABELS``: liver, kidneys, lungs, spine), listed under ``"label"`` as MONAI's Decathlon datalists do: the
fine-tuning and probe commands run on them with no data at all. Pre-training reads only ``"image"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

DATALIST_NAME = "dataset_demo.json"
IMAGE_DIR = "images"
LABEL_DIR = "labels"
FORMAT_VERSION = 2  # 2: label maps beside the images
# Label values of the demo's organs (0 is everything else), in the Decathlon datalist's "labels" form.
LABELS = {"0": "background", "1": "liver", "2": "kidneys", "3": "lungs", "4": "spine"}
LIVER, KIDNEYS, LUNGS, SPINE = 1, 2, 3, 4

# Hounsfield units of each tissue (typical CT values).
HU_AIR, HU_FAT, HU_SOFT, HU_LIVER, HU_KIDNEY = -1000, -100, 40, 60, 50
HU_LUNG, HU_DISC, HU_CANCELLOUS, HU_CORTICAL, HU_RIB = -850, 80, 400, 1000, 700


def write_demo_dataset(
    out_dir: Path | str, n_volumes: int = 6, seed: int = 0, shape: tuple[int, int, int] = (96, 96, 80)
) -> Path:
    """Write (or reuse) ``n_volumes`` synthetic CT volumes and their datalist; returns the datalist path.

    Idempotent: an existing datalist written with the same parameters whose images all exist is reused.
    Files are written under temporary names and renamed, so ranks racing to create the same demo data
    each see complete files (the content is a pure function of the parameters).
    """
    if n_volumes < 2:
        raise ValueError(f"n_volumes: got {n_volumes}, expected at least 2 (one is held out for validation)")
    out = Path(out_dir)
    datalist = out / DATALIST_NAME
    params = {"version": FORMAT_VERSION, "n_volumes": n_volumes, "seed": seed, "shape": list(shape)}
    if _reusable(datalist, params):
        return datalist
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    (out / LABEL_DIR).mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_volumes):
        hu, labels, affine = synthetic_case(np.random.default_rng([seed, i]), _volume_shape(shape, i, seed), i == 2)
        entry = {"image": f"{IMAGE_DIR}/demo_{i:03d}.nii.gz", "label": f"{LABEL_DIR}/demo_{i:03d}.nii.gz"}
        for key, array in (("image", hu), ("label", labels)):
            img = nib.Nifti1Image(array, affine)
            img.header.set_xyzt_units("mm", "sec")
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            _atomic(out / entry[key], lambda p, img=img: nib.save(img, p))
        entries.append(entry)
    n_val = max(1, n_volumes // 6)
    doc = {
        "description": "ssl3d synthetic CT demo (toy torsos in HU with organ labels; for smoke tests)",
        "ssl3d_demo": params,
        "labels": LABELS,
        "training": entries[:-n_val],
        "validation": entries[-n_val:],
    }
    _atomic(datalist, lambda p: Path(p).write_text(json.dumps(doc, indent=2) + "\n"))
    return datalist


def synthetic_ct(
    rng: np.random.Generator, shape: tuple[int, int, int], flip: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One toy torso: (int16 HU array [X, Y, Z], 4x4 affine in RAS mm).

    Array axes follow RAS (x to the patient's right, y anterior, z superior) unless ``flip``, which stores
    the same scan in LPS order (first two axes reversed, negative affine diagonal) as DICOM-derived files are.
    """
    hu, _, affine = synthetic_case(rng, shape, flip)
    return hu, affine


def synthetic_case(
    rng: np.random.Generator, shape: tuple[int, int, int], flip: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``synthetic_ct`` plus its uint8 organ label map (``LABELS``) on the same grid: (hu, labels, affine)."""
    nx, ny, nz = shape
    spacing = np.array([rng.uniform(2.8, 4.0), 0.0, rng.uniform(2.5, 5.0)])
    spacing[1] = spacing[0]
    # Normalised coordinates in [-1, 1] per axis; shapes are drawn as fractions of the field of view.
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    z = np.linspace(-1, 1, nz, dtype=np.float32)[None, None, :]
    u = rng.uniform

    hu = np.full(shape, HU_AIR, dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)  # painted in the same order as the tissues, later ones on top
    bx, by, cy = u(0.72, 0.9), u(0.5, 0.72), u(-0.08, 0.05)  # body semi-axes and AP offset
    body = _ellipse(x, y, 0, cy, bx, by)
    body = np.broadcast_to(body, shape)
    hu[body] = HU_FAT
    fat = u(0.06, 0.14)  # subcutaneous fat thickness (fraction of the body radius)
    inner = np.broadcast_to(_ellipse(x, y, 0, cy, bx * (1 - fat), by * (1 - fat)), shape)
    hu[inner] = HU_SOFT + 15 * _texture(rng, shape, 8)[inner]

    # Lungs: the upper part of the scan; their base moves from scan to scan.
    base = u(-0.2, 0.2)
    lz = (1 - base) / 2
    for side in (-1, 1):
        lung = _ellipsoid(x, y, z, side * bx * 0.42, cy + by * 0.1, base + lz, bx * 0.33, by * 0.62, lz * 1.1)
        lung &= inner
        hu[lung] = HU_LUNG + 60 * _texture(rng, shape, 16)[lung]
        lab[lung] = LUNGS
    # Ribs: bands of an elliptic shell around the lungs.
    shell = _ellipse(x, y, 0, cy, bx * (1 - fat) * 0.97, by * (1 - fat) * 0.97) & ~_ellipse(
        x, y, 0, cy, bx * (1 - fat) * 0.9, by * (1 - fat) * 0.9
    )
    rib_z = (np.cos(z * np.pi * u(5, 8)) > 0.55) & (z > base)
    hu[shell & rib_z] = HU_RIB
    lab[shell & rib_z] = 0
    # Abdomen: liver on the patient's right (+x), kidneys posterior and lateral, below the lungs.
    liver = _ellipsoid(x, y, z, bx * 0.38, cy + by * 0.12, base - 0.2, bx * 0.4, by * 0.55, u(0.25, 0.4)) & inner
    hu[liver] = HU_LIVER + 10 * _texture(rng, shape, 8)[liver]
    lab[liver] = LIVER
    for side in (-1, 1):
        kid = _ellipsoid(x, y, z, side * bx * 0.4, cy - by * 0.45, base - 0.55, bx * 0.12, by * 0.2, 0.22) & inner
        hu[kid] = HU_KIDNEY
        lab[kid] = KIDNEYS
    # Spine: posterior vertebral bodies (cancellous core, cortical rim) separated by discs.
    sr = u(0.09, 0.12)
    sy = cy - by * (1 - fat) + sr * 1.6
    r = np.sqrt(x**2 + (y - sy) ** 2)
    spine = np.broadcast_to(r < sr, shape)
    disc = np.broadcast_to(np.cos(z * np.pi * u(6, 9)) > 0.8, shape)
    hu[spine] = HU_CANCELLOUS
    hu[spine & np.broadcast_to(r > sr * 0.8, shape)] = HU_CORTICAL
    hu[spine & disc] = HU_DISC
    lab[spine] = SPINE

    hu += rng.normal(0, u(10, 20), size=shape).astype(np.float32)
    hu = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -spacing * (np.array(shape) - 1) / 2  # centred on the world origin
    if flip:
        hu = np.ascontiguousarray(hu[::-1, ::-1, :])
        lab = np.ascontiguousarray(lab[::-1, ::-1, :])
        affine[:2, :] *= -1  # the same world points, reached from the opposite corner
    return hu, lab, affine


def _volume_shape(shape: tuple[int, int, int], i: int, seed: int) -> tuple[int, int, int]:
    """Vary the size around ``shape``; volume 1 is thinner than 64 slices to exercise padding."""
    rng = np.random.default_rng([seed, i, 1])
    xy = int(round(shape[0] * rng.uniform(0.85, 1.15)))
    out = [xy, int(round(shape[1] * xy / shape[0])), int(round(shape[2] * rng.uniform(0.85, 1.2)))]
    if i == 1:
        out[2] = min(out[2], 48)
    return out[0], out[1], out[2]


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1


def _ellipsoid(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, cx: float, cy: float, cz: float, ax: float, ay: float, az: float
) -> np.ndarray:
    return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1


def _texture(rng: np.random.Generator, shape: tuple[int, int, int], cell: int) -> np.ndarray:
    """Smooth unit-variance noise with blobs about ``cell`` voxels wide (parenchyma-like texture)."""
    low = [max(2, s // cell + 2) for s in shape]
    noise = torch.from_numpy(rng.standard_normal(low).astype(np.float32))[None, None]
    smooth = F.interpolate(noise, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0].numpy()
    return smooth / max(float(smooth.std()), 1e-6)


def _reusable(datalist: Path, params: dict[str, Any]) -> bool:
    try:
        doc = json.loads(datalist.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(doc, dict) or doc.get("ssl3d_demo") != params:
        return False
    entries = doc.get("training", []) + doc.get("validation", [])
    return bool(entries) and all((datalist.parent / e[k]).is_file() for e in entries for k in ("image", "label"))


def _atomic(path: Path, write: Any) -> None:
    """Write via a temporary name in the same folder, then rename: readers never see a partial file."""
    tmp = path.with_name(f".{os.getpid()}.tmp.{path.name}")
    write(tmp)
    os.replace(tmp, path)
