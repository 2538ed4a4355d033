"""The built-in demo CT: real NIfTI files with the designed Hounsfield ranges and geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ssl3d.data.demo import (
    HU_AIR,
    HU_CORTICAL,
    HU_KIDNEY,
    HU_LIVER,
    HU_LUNG,
    KIDNEYS,
    LABELS,
    LIVER,
    LUNGS,
    SPINE,
    write_demo_dataset,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo"), n_volumes=6, seed=0)


def _volumes(datalist: Path) -> list[Path]:
    doc = json.loads(datalist.read_text())
    return [datalist.parent / e["image"] for e in doc["training"] + doc["validation"]]


def _frac(hu: np.ndarray, lo: float, hi: float) -> float:
    return float(((hu >= lo) & (hu < hi)).mean())


def test_datalist_in_the_reference_format(demo: Path) -> None:
    datalist = demo
    doc = json.loads(datalist.read_text())
    assert len(doc["training"]) == 5 and len(doc["validation"]) == 1
    for e in doc["training"] + doc["validation"]:
        assert set(e) == {"image", "label"} and not Path(e["image"]).is_absolute() and e["image"].endswith(".nii.gz")
        assert (datalist.parent / e["image"]).is_file()


def test_volumes_read_back_with_designed_hu_and_geometry(demo: Path) -> None:
    shapes, spacings, codes = set(), set(), set()
    for path in _volumes(demo):
        img = nib.load(path)
        assert img.get_data_dtype() == np.int16
        raw = np.asarray(img.dataobj)
        zooms = img.header.get_zooms()
        np.testing.assert_allclose(np.abs(np.diag(img.affine)[:3]), zooms, rtol=1e-5)  # affine carries spacing
        assert img.header.get_qform(coded=True)[1] == 1 and img.header.get_sform(coded=True)[1] == 1
        shapes.add(raw.shape)
        spacings.add(tuple(round(float(z), 3) for z in zooms))
        codes.add(nib.aff2axcodes(img.affine))

        hu = nib.as_closest_canonical(img).get_fdata()  # RAS: x right, y anterior, z superior
        assert -1024 <= hu.min() and hu.max() <= 3071
        corner = hu[:5, :5, :]  # outside the body
        assert abs(corner.mean() - HU_AIR) < 10 and 5 < corner.std() < 25  # air + 10-20 HU noise
        assert _frac(hu, -900, -780) > 0.02  # lungs around -850
        assert _frac(hu, -160, -40) > 0.01  # fat around -100
        assert _frac(hu, 0, 120) > 0.15  # soft tissue and organs, 40-60
        assert _frac(hu, 300, 3072) > 0.001 and hu.max() > HU_CORTICAL - 100  # bone up to ~1000
        lungs = np.argwhere((hu > HU_LUNG - 80) & (hu < HU_LUNG + 80))
        bone = np.argwhere(hu > 300)
        assert lungs[:, 2].mean() > hu.shape[2] * 0.5  # lungs in the upper (superior) half
        assert bone[:, 1].mean() < hu.shape[1] * 0.5  # spine is posterior
    assert len(shapes) == 6 and len(spacings) == 6  # varied
    assert min(s[2] for s in shapes) < 64  # one thinner than 64 slices
    assert ("L", "P", "S") in codes and ("R", "A", "S") in codes  # one stored the DICOM way


def test_idempotent_and_regenerates_what_is_missing(tmp_path: Path) -> None:
    first = write_demo_dataset(tmp_path, n_volumes=3)
    files = _volumes(first)
    stamps = [p.stat().st_mtime_ns for p in files]
    assert write_demo_dataset(tmp_path, n_volumes=3) == first
    assert [p.stat().st_mtime_ns for p in files] == stamps  # reused, not rewritten
    content = np.asarray(nib.load(files[1]).dataobj)
    files[1].unlink()
    write_demo_dataset(tmp_path, n_volumes=3)
    np.testing.assert_array_equal(np.asarray(nib.load(files[1]).dataobj), content)  # same content again
    other = write_demo_dataset(tmp_path, n_volumes=3, seed=1)  # other parameters: rewritten
    assert not np.array_equal(np.asarray(nib.load(_volumes(other)[1]).dataobj), content)
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left behind


def test_needs_a_validation_volume(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        write_demo_dataset(tmp_path, n_volumes=1)


def test_label_maps_mark_the_organs_where_their_tissue_is(demo: Path) -> None:
    """Each label sits on its organ's Hounsfield range, on the image's grid and orientation (the LPS one too)."""
    doc = json.loads(demo.read_text())
    assert doc["labels"] == LABELS
    for e in doc["training"] + doc["validation"]:
        img, lab = nib.load(demo.parent / e["image"]), nib.load(demo.parent / e["label"])
        assert lab.shape == img.shape and np.array_equal(lab.affine, img.affine)
        hu = np.asarray(img.dataobj).astype(np.float32)
        seg = np.asarray(lab.dataobj)
        assert set(np.unique(seg).tolist()) == {0, LIVER, KIDNEYS, LUNGS, SPINE}
        # Medians in each organ: noise of 10-20 HU around the designed values.
        assert abs(np.median(hu[seg == LUNGS]) - HU_LUNG) < 60
        assert abs(np.median(hu[seg == LIVER]) - HU_LIVER) < 30
        assert abs(np.median(hu[seg == KIDNEYS]) - HU_KIDNEY) < 30
        assert np.median(hu[seg == SPINE]) > 300  # cancellous and cortical bone
        assert np.median(hu[seg == 0]) < -50 or (seg == 0).mean() > 0.5  # mostly air, fat and muscle
