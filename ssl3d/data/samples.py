"""A few real CT scans for smoke tests, fetched from public PyPI source archives with pip alone.

Four volumes (an abdomen/pelvis CT and a chest CT angiogram from TotalSegmentator 2.18.0's test files, two
chest CTs from pyradiomics 3.0.1's example data) are enough to check that real scanner data (HU ranges,
anisotropic spacing, LPS storage, fewer slices than the ROI) goes through the pipeline. They are smoke-test
samples, NOT a pre-training set: four scans teach an encoder nothing. Nothing is redistributed: the archives
are downloaded at run time (licences: TotalSegmentator Apache-2.0, pyradiomics BSD-3-Clause, as stated by
the packages for their code; neither names a separate data licence).
"""

from __future__ import annotations

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
IMAGE_DIR = "images"


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
    names = [name for src in SOURCES for name in src.files]
    doc = {
        "description": "ssl3d real CT smoke-test samples from PyPI sdists (TotalSegmentator 2.18.0, pyradiomics "
        "3.0.1); for smoke tests, not a pre-training set",
        "training": [{"image": f"{IMAGE_DIR}/{n}"} for n in names if n not in VALIDATION],
        "validation": [{"image": f"{IMAGE_DIR}/{n}"} for n in names if n in VALIDATION],
    }
    datalist = out / DATALIST_NAME
    tmp_json = datalist.with_name(f".{os.getpid()}.{DATALIST_NAME}")
    tmp_json.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp_json, datalist)
    log.info("wrote %d sample volumes and %s", len(names), datalist)
    return datalist


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
