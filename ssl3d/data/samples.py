"""A few real CT scans for smoke tests, fetched from public PyPI source archives with pip alone.

Four volumes (an abdomen/pelvis CT and a chest CT angiogram from TotalSegmentator 2.18.0's test files, two
chest CTs from pyradiomics 3.0.1's example data) are enough to check that real scanner data (HU ranges,
anisotropic spacing, LPS storage, fewer slices than the ROI) goes through the pipeline. They are smoke-test
samples, NOT a pre-training set: four scans teach an encoder nothing. Nothing is redistributed: the archives
are downloaded at run time (licences: TotalSegmentator Apache-2.0, pyradiomics BSD-3-Clause, as stated by
the packages for their code; neither names a separate data licence).

TotalSegmentator's archive also holds label maps its own test script made for two of its CTs (``--fast --ml``,
its "total" classes): the abdomen CT (same grid) and a 20-slice DICOM series of the upper abdomen (its label map
stored with the y axis the other way round: aligned through the affines). They become a labelled datalist with a
few organs merged from its classes, to try ``ssl3d finetune`` / ``probe`` on real scans (again: a smoke test).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ssl3d.data.readers import read_nrrd

log = logging.getLogger(__name__)

DATALIST_NAME = "dataset_samples.json"
LABELLED_DATALIST_NAME = "dataset_samples_labelled.json"
IMAGE_DIR = "images"
LABEL_DIR = "labels"


@dataclass(frozen=True)
class _Source:
    package: str
    version: str
    files: dict[str, str]  # output name -> member path inside the sdist
    # pyradiomics' setup.py imports numpy, which pip's isolated build environment lacks, and pip prepares
    # an sdist's metadata even for "download": build in this environment (numpy and setuptools are here).
    no_build_isolation: bool = False


SOURCES = (
    _Source(
        "totalsegmentator",
        "2.18.0",
        {
            "totalseg_abdomen_ct.nii.gz": "totalsegmentator-2.18.0/tests/reference_files/example_ct.nii.gz",
            "totalseg_chest_cta.nii.gz": "totalsegmentator-2.18.0/tests/reference_files/aorta_report/example_ct.nii.gz",
        },
    ),
    _Source(
        "pyradiomics",
        "3.0.1",
        {
            "pyradiomics_lung1_ct.nii.gz": "pyradiomics-3.0.1/data/lung1_image.nrrd",
            "pyradiomics_lung2_ct.nii.gz": "pyradiomics-3.0.1/data/lung2_image.nrrd",
        },
        no_build_isolation=True,
    ),
)
VALIDATION = ("pyradiomics_lung2_ct.nii.gz",)

_TS = "totalsegmentator-2.18.0"
_TS_REF = f"{_TS}/tests/reference_files"


@dataclass(frozen=True)
class _LabelledCase:
    image: str  # output name under images/ (and labels/)
    image_member: str  # a NIfTI file, or a folder of DICOM slices, in the archive
    label_member: str  # TotalSegmentator's multi-label map of that image
    split: str  # training | validation


# TotalSegmentator's tests/update_test_files.sh made these label maps from these images.
LABELLED_CASES = (
    _LabelledCase(
        "totalseg_abdomen_ct.nii.gz",
        f"{_TS_REF}/example_ct.nii.gz",
        f"{_TS_REF}/example_seg_fast_force_split.nii.gz",
        "training",
    ),
    _LabelledCase(
        "totalseg_upper_abdomen_dicom_ct.nii.gz",
        f"{_TS_REF}/example_ct_dicom/",
        f"{_TS_REF}/example_seg_dicom.nii.gz",
        "validation",
    ),
)
CLASS_MAP_MEMBER = f"{_TS}/totalsegmentator/map_to_binary.py"
# ssl3d's classes -> the names of TotalSegmentator "total" classes merged into each (indices read from its archive).
ORGANS = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "kidney": ("kidney_right", "kidney_left"),
    "stomach": ("stomach",),
    "aorta": ("aorta",),
}


def fetch_samples(out_dir: Path | str) -> Path:
    """Download and convert the sample CT volumes into ``out_dir``; returns the datalist JSON path.

    Idempotent: volumes already there are not fetched again. Needs pip and access to PyPI, and pynrrd
    (``pip install pynrrd``, the ``samples`` extra) for the two NRRD scans.
    """
    out = Path(out_dir)
    images = out / IMAGE_DIR
    images.mkdir(parents=True, exist_ok=True)
    log.info("fetching real CT smoke-test samples (not a pre-training set) into %s", out)
    for src in SOURCES:
        todo = {name: member for name, member in src.files.items() if not (images / name).is_file()}
        if not todo:
            continue
        with tempfile.TemporaryDirectory(dir=out, prefix=".download-") as tmp:
            archive = _pip_download(src, Path(tmp))
            with tarfile.open(archive, "r:gz") as tar:
                for name, member in todo.items():
                    _extract_one(tar, member, images / name, Path(tmp))
    _fetch_labelled(out)
    names = [name for src in SOURCES for name in src.files]
    doc = {
        "description": "ssl3d real CT smoke-test samples from PyPI sdists (TotalSegmentator 2.18.0, pyradiomics "
        "3.0.1); for smoke tests, not a pre-training set",
        "training": [{"image": f"{IMAGE_DIR}/{n}"} for n in names if n not in VALIDATION],
        "validation": [{"image": f"{IMAGE_DIR}/{n}"} for n in names if n in VALIDATION],
    }
    datalist = _write_json(out / DATALIST_NAME, doc)
    log.info("wrote %d sample volumes and %s", len(names), datalist)
    return datalist


def _write_json(path: Path, doc: dict) -> Path:
    tmp_json = path.with_name(f".{os.getpid()}.{path.name}")
    tmp_json.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp_json, path)
    return path


def _fetch_labelled(out: Path) -> Path:
    """The labelled smoke-test datalist (``LABELLED_DATALIST_NAME``): TotalSegmentator's two labelled CTs, its
    classes merged into ``ORGANS``, each label map on its image's grid."""
    images, labels = out / IMAGE_DIR, out / LABEL_DIR
    labels.mkdir(parents=True, exist_ok=True)
    todo = [c for c in LABELLED_CASES if not (images / c.image).is_file() or not (labels / c.image).is_file()]
    if todo:
        src = next(s for s in SOURCES if s.package == "totalsegmentator")
        with tempfile.TemporaryDirectory(dir=out, prefix=".download-") as tmp:
            archive = _pip_download(src, Path(tmp))
            with tarfile.open(archive, "r:gz") as tar:
                lut = merge_table(read_class_map(tar))
                for case in todo:
                    if not (images / case.image).is_file():
                        _extract_image(tar, case.image_member, images / case.image, Path(tmp))
                    label = Path(tmp) / Path(case.label_member).name
                    _extract_one(tar, case.label_member, label, Path(tmp))
                    write_label_map(label, images / case.image, lut, labels / case.image)
    doc = {
        "description": "ssl3d labelled real-CT smoke test: TotalSegmentator 2.18.0's test CTs and its label maps "
        "(--fast, 'total' classes) merged into a few organs; for trying finetune/probe, not a benchmark",
        "labels": {"0": "background", **{str(i): name for i, name in enumerate(ORGANS, start=1)}},
        **{
            split: [
                {"image": f"{IMAGE_DIR}/{c.image}", "label": f"{LABEL_DIR}/{c.image}"}
                for c in LABELLED_CASES
                if c.split == split
            ]
            for split in ("training", "validation")
        },
    }
    path = _write_json(out / LABELLED_DATALIST_NAME, doc)
    log.info("wrote %d labelled sample volumes and %s", len(LABELLED_CASES), path)
    return path


def read_class_map(tar: tarfile.TarFile) -> dict[int, str]:
    """TotalSegmentator's "total" classes (index -> name), read from its ``map_to_binary.py`` without running it."""
    f = tar.extractfile(CLASS_MAP_MEMBER)
    if f is None:
        raise RuntimeError(f"{CLASS_MAP_MEMBER}: not in {tar.name}")
    for node in ast.parse(f.read().decode()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            return {int(k): str(v) for k, v in ast.literal_eval(node.value)["total"].items()}
    raise RuntimeError(f"{CLASS_MAP_MEMBER}: no class_map found")


def merge_table(class_map: dict[int, str]) -> np.ndarray:
    """A lookup table from TotalSegmentator's label values to ssl3d's ``ORGANS`` (everything else background)."""
    index = {name: i for i, name in class_map.items()}
    lut = np.zeros(max(index.values()) + 1, dtype=np.uint8)
    for organ_id, (organ, parts) in enumerate(ORGANS.items(), start=1):
        missing = [p for p in parts if p not in index]
        if missing:
            raise RuntimeError(f"TotalSegmentator class map has no {', '.join(missing)} (for {organ})")
        lut[[index[p] for p in parts]] = organ_id
    return lut


def write_label_map(label: Path | str, image: Path | str, lut: np.ndarray, dst: Path | str) -> None:
    """``label`` with its values merged through ``lut``, brought onto ``image``'s voxel grid and saved as ``dst``.

    Only exact grid matches are accepted: the same voxel size and extent, the axes at most permuted or flipped
    (as TotalSegmentator's DICOM label map is against the DICOM series read in LPS order); anything else would
    need interpolation and is refused."""
    img, lab = nib.load(str(image)), nib.load(str(label))
    ornt = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(lab.affine), nib.orientations.io_orientation(img.affine)
    )
    moved = lab.as_reoriented(ornt)
    if moved.shape[:3] != img.shape[:3] or not np.allclose(moved.affine, img.affine, atol=1e-3):
        raise RuntimeError(
            f"{label}: not on the grid of {image} (shape {moved.shape} vs {img.shape}, affine "
            f"{np.round(moved.affine, 3).tolist()} vs {np.round(img.affine, 3).tolist()})"
        )
    values = np.asarray(moved.dataobj).astype(np.int64)
    if values.min() < 0 or values.max() >= len(lut):
        raise RuntimeError(f"{label}: label values {values.min()}..{values.max()} outside 0..{len(lut) - 1}")
    out = nib.Nifti1Image(lut[values], img.affine)
    out.header.set_qform(img.affine, code=1)
    out.header.set_sform(img.affine, code=1)
    partial = Path(dst).with_name(f".{os.getpid()}.{Path(dst).name}")
    nib.save(out, str(partial))
    os.replace(partial, dst)


def extract_folder(tar: tarfile.TarFile, member: str, dest: Path) -> Path:
    """The files directly or indirectly under the archive folder ``member`` (ending in "/"), flat into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for m in tar.getmembers():
        if m.isfile() and m.name.startswith(member):
            f = tar.extractfile(m)
            if f is None:
                raise RuntimeError(f"{m.name}: not a regular file in {tar.name}")
            (dest / Path(m.name).name).write_bytes(f.read())
    return dest


def _extract_image(tar: tarfile.TarFile, member: str, dst: Path, tmp: Path) -> None:
    """A NIfTI member as it is; a folder of DICOM slices converted by ``ssl3d data prepare``'s reader."""
    if not member.endswith("/"):
        _extract_one(tar, member, dst, tmp)
        return
    from ssl3d.data.prepare import prepare_dataset

    extract_folder(tar, member, tmp / "dicom" / "case" / "ct")
    report = prepare_dataset(tmp / "dicom", tmp / "dicom_out", workers=0, progress=False)
    if len(report.converted) != 1:
        raise RuntimeError(f"{member}: expected one DICOM series, converted {len(report.converted)}")
    os.replace(report.dst / report.converted[0]["output"], dst)


def _pip_download(src: _Source, dest: Path) -> Path:
    spec = f"{src.package}=={src.version}"
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dest), spec]
    attempts = [[*base, "--no-build-isolation"], base] if src.no_build_isolation else [base]
    errors = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(dest.glob(f"{src.package}-{src.version}.tar.gz"))
        if proc.returncode == 0 and archives:
            return archives[0]
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        errors.append(f"`{' '.join(cmd[1:])}` failed: {tail[0]}")
    raise RuntimeError(f"could not download {spec} from PyPI: " + "; ".join(errors))


def _extract_one(tar: tarfile.TarFile, member: str, dst: Path, tmp: Path) -> None:
    """Copy one file out of the archive (no full extraction); NRRD becomes RAS NIfTI on the way."""
    f = tar.extractfile(member)
    if f is None:
        raise RuntimeError(f"{member}: not a regular file in {tar.name}")
    partial = dst.with_name(f".{os.getpid()}.{dst.name}")
    if member.endswith(".nrrd"):
        raw = tmp / Path(member).name
        with open(raw, "wb") as g:
            shutil.copyfileobj(f, g)
        nrrd_to_nifti(raw, partial)
    else:
        with open(partial, "wb") as g:
            shutil.copyfileobj(f, g)
    os.replace(partial, dst)


# ---------------------------------------------------------------------------------------------------------
# NRRD -> NIfTI


def nrrd_to_nifti(src: Path | str, dst: Path | str) -> None:
    """Convert a 3D NRRD (via pynrrd) to NIfTI with the same world geometry, in RAS."""
    try:
        data, affine = read_nrrd(Path(src))
    except ValueError as exc:
        raise ValueError(f"{src}: {exc}") from None
    if not np.issubdtype(data.dtype, np.integer):
        data = data.astype(np.float32)
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    nib.save(img, str(dst))
