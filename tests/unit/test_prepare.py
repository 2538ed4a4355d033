"""``ssl3d data prepare``: DICOM series, NIfTI, NRRD and MetaImage into RAS NIfTI, skips with reasons, resume.

Synthetic DICOM values are a linear function of the LPS world position of each voxel (exact in binary
floating point), so one check covers both the HU values and the geometry: read a converted volume, map every
voxel through its affine, and the value there must be the function of that world point.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage, Orientation

import ssl3d.data.prepare as prep
from ssl3d.cli import add_prepare_arguments, run_prepare
from ssl3d.data.prepare import prepare_dataset, read_metaimage
from ssl3d.data.readers import read_nrrd

pydicom = pytest.importorskip("pydicom")
nrrd = pytest.importorskip("nrrd")

from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # rows run anterior->posterior, columns head->feet


def hu_at(lps: np.ndarray) -> np.ndarray:
    """The synthetic scan's HU at LPS points [..., 3]: even integers (coordinates are multiples of 0.5 mm)."""
    return 4 * lps[..., 0] - 8 * lps[..., 1] + 12 * lps[..., 2]


def write_series(
    folder: Path,
    *,
    n: int,
    iop: list[float],
    origin: tuple[float, float, float],
    step: float,
    pixel_spacing: tuple[float, float] = (0.5, 1.0),  # (between rows, between columns), as DICOM orders it
    size: tuple[int, int] = (12, 10),  # rows, columns
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = -1024.0,
    drop: int | None = None,
    number: int = 1,
    description: str = "CT",
    seed: int = 0,
    shift: float = 0.0,
) -> str:
    """One series as single-frame DICOM files with random names, in random order; returns its UID."""
    uid = generate_uid()
    study = generate_uid()
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    rows, cols = size
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in rng.permutation(n):
        if k == drop:
            continue
        ipp = np.asarray(origin) + k * step * normal
        lps = ipp + c[..., None] * pixel_spacing[1] * row + r[..., None] * pixel_spacing[0] * col
        stored = np.round((hu_at(lps) + shift - intercept) / slope).astype(np.int16)  # [rows, cols]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / "x"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, uid
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription, ds.InstanceNumber = modality, number, description, k + 1
        ds.ImagePositionPatient = [f"{v:g}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:g}" for v in iop]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{step:g}"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        ds.PixelData = stored.astype("<i2").tobytes()
        ds.save_as(folder / f"IM{rng.integers(1 << 30):09d}", enforce_file_format=True)
    return uid


def check_world_values(path: Path, shift: float = 0.0) -> np.ndarray:
    """Every voxel holds hu_at(its world position) + shift; returns the data."""
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in data.shape], indexing="ij"), -1).reshape(-1, 3)
    ras = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
    lps = ras * [-1, -1, 1]
    np.testing.assert_array_equal(data.reshape(-1), hu_at(lps) + shift)
    return data


def write_mha(path: Path, data: np.ndarray, spacing, origin, matrix, compressed: bool, detached: bool = False) -> None:
    payload = np.ascontiguousarray(data.transpose(2, 1, 0)).astype("<i2").tobytes()  # x fastest
    if compressed:
        payload = zlib.compress(payload)
    fields = [
        "ObjectType = Image",
        "NDims = 3",
        "BinaryData = True",
        "BinaryDataByteOrderMSB = False",
        f"CompressedData = {compressed}",
        f"TransformMatrix = {' '.join(map(str, matrix))}",
        f"Offset = {' '.join(map(str, origin))}",
        "AnatomicalOrientation = RAI",
        f"ElementSpacing = {' '.join(map(str, spacing))}",
        f"DimSize = {' '.join(map(str, data.shape))}",
        "ElementType = MET_SHORT",
    ]
    if detached:
        raw = path.with_suffix(".zraw" if compressed else ".raw")
        raw.write_bytes(payload)
        path.write_text("\n".join([*fields, f"ElementDataFile = {raw.name}"]) + "\n")
    else:
        path.write_bytes(("\n".join([*fields, "ElementDataFile = LOCAL"]) + "\n").encode() + payload)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five patients: mixed DICOM series with strays, a gap, a short series, NIfTI, NRRD, MetaImage."""
    src = tmp_path_factory.mktemp("src")
    p1 = src / "patient01" / "study"
    write_series(p1, n=20, iop=AXIAL, origin=(-3.0, -6.5, -40.0), step=2.5, number=2, description="Body 2.5", seed=1)
    write_series(p1, n=18, iop=SAGITTAL, origin=(10.0, -5.0, 30.0), step=1.5, slope=2.0, intercept=-1000, number=3)
    write_series(p1, n=12, iop=AXIAL, origin=(0.0, 0.0, 0.0), step=3.0, modality="MR", number=4, seed=2)
    (p1 / "notes.txt").write_text("scanner notes")
    (p1 / "report.xml").write_text("<report/>")
    (p1 / "preview.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (p1 / "README").write_text("no extension, not DICOM")
    p2 = src / "patient02"
    write_series(p2 / "gap", n=20, iop=AXIAL, origin=(0.0, 0.0, 0.0), step=2.5, drop=7, seed=3)
    write_series(p2 / "short", n=4, iop=AXIAL, origin=(0.0, 0.0, 0.0), step=2.5, seed=4)
    write_series(p2 / "half", n=10, iop=AXIAL, origin=(0.5, 1.0, -2.0), step=2.0, slope=0.25, seed=5, shift=0.25)
    rng = np.random.default_rng(0)
    nifti = rng.integers(-1000, 2000, size=(9, 8, 7)).astype(np.int16)
    (src / "patient03").mkdir()
    nib.save(nib.Nifti1Image(nifti, np.diag([0.8, 0.8, 2.0, 1.0])), src / "patient03" / "scan.nii.gz")
    (src / "patient04").mkdir()
    nrrd_data = rng.integers(-1024, 3000, size=(7, 6, 5)).astype(np.int32)  # int32 that fits int16: narrowed
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.5, 0.5, 3.0]), "kinds": ["domain"] * 3}
    nrrd.write(str(src / "patient04" / "lung.nrrd"), nrrd_data, {**header, "space origin": np.array([1.0, 2.0, 3.0])})
    p5 = src / "patient05"
    p5.mkdir()
    mha = rng.integers(-1024, 3000, size=(6, 5, 4)).astype(np.int16)
    perm = [0, 1, 0, 0, 0, 1, 1, 0, 0]  # axis 0 -> P, axis 1 -> S, axis 2 -> L (LPS world)
    write_mha(p5 / "raw.mha", mha, (0.7, 0.9, 2.5), (-10.0, 20.0, -30.0), perm, compressed=False)
    write_mha(p5 / "zlib.mha", mha, (0.7, 0.9, 2.5), (-10.0, 20.0, -30.0), perm, compressed=True)
    write_mha(p5 / "luna.mhd", mha, (0.7, 0.9, 2.5), (-10.0, 20.0, -30.0), [1, 0, 0, 0, 1, 0, 0, 0, 1], True, True)
    (src / "patient06").mkdir()
    (src / "patient06" / "orphan.raw").write_bytes(b"\0" * 16)
    return src


@pytest.fixture(scope="module")
def prepared(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> prep.PrepareReport:
    return prepare_dataset(
        tree, tmp_path_factory.mktemp("dst"), val_fraction=0.2, workers=0, min_slices=8, progress=False
    )


def _by_source(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["source"], []).append(r)
    return out


def test_every_input_is_converted_or_skipped_with_its_reason(prepared: prep.PrepareReport) -> None:
    conv = _by_source(prepared.converted)
    assert sorted(conv) == [
        "patient01/study",
        "patient02/half",
        "patient03/scan.nii.gz",
        "patient04/lung.nrrd",
        "patient05/luna.mhd",
        "patient05/raw.mha",
        "patient05/zlib.mha",
    ]
    assert len(conv["patient01/study"]) == 2  # two CT series in one folder, told apart by SeriesInstanceUID
    reasons = {(s["source"], s["reason"]) for s in prepared.skipped}
    assert ("patient01/study", "modality MR, not CT") in reasons
    assert (
        "patient02/gap",
        "gap of 5.00 mm at slice 7 (slices are 2.50 mm apart elsewhere; 1 missing slice?)",
    ) in reasons
    assert ("patient02/short", "4 slices, fewer than min_slices=8") in reasons
    assert ("patient01/study/notes.txt", "not an image (.txt file)") in reasons
    assert ("patient01/study/report.xml", "not an image (.xml file)") in reasons
    assert ("patient01/study/preview.jpg", "not an image (.jpg file)") in reasons
    assert ("patient01/study/README", "not DICOM (no DICM preamble) and not a known image format") in reasons
    assert ("patient06/orphan.raw", "raw data file that no .mhd/.nhdr header names") in reasons
    assert len(prepared.skipped) == 8  # luna.raw belongs to luna.mhd: not a stray
    report = json.loads(prepared.report.read_text())
    assert report["counts"] == {"converted": 8, "reused": 0, "skipped": 8}
    gap = next(s for s in report["skipped"] if s["source"] == "patient02/gap")
    assert gap["files"] == 19 and gap["series_uid"]


def test_dicom_values_in_hu_and_geometry_in_ras(prepared: prep.PrepareReport) -> None:
    series = sorted(prepared.converted, key=lambda r: r["output"])
    dicom = [r for r in series if r["kind"] == "dicom"]
    assert len(dicom) == 3
    for r in dicom:
        half = r["source"] == "patient02/half"  # slope 0.25: quarter HU values, kept as float32
        data = check_world_values(prepared.dst / r["output"], shift=0.25 if half else 0.0)
        assert data.dtype == (np.float32 if half else np.int16)
    axial = next(r for r in dicom if r["description"] == "Body 2.5")
    img = nib.load(prepared.dst / axial["output"])
    # 12 rows x 10 columns, 0.5 mm between rows and 1.0 mm between columns: array axes are (column, row, slice).
    assert img.shape == (10, 12, 20) and axial["spacing"] == [1.0, 0.5, 2.5]
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")  # DICOM order, RAS world
    # What the training pipeline sees: RAS after MONAI's Orientation, first voxel at the right-posterior-inferior.
    ras = Orientation(axcodes="RAS", labels=None)(
        LoadImage(image_only=True, ensure_channel_first=True)(img.get_filename())
    )
    np.testing.assert_allclose(ras.affine[:3, 3].numpy(), [-(-3.0 + 9 * 1.0), -(-6.5 + 11 * 0.5), -40.0])
    sag = next(r for r in dicom if r["series_number"] == "3")
    assert nib.aff2axcodes(nib.load(prepared.dst / sag["output"]).affine) == ("P", "I", "R")


def test_dicom_matches_monai_pydicom_reader(tmp_path: Path) -> None:
    write_series(tmp_path / "one", n=9, iop=AXIAL, origin=(-3.0, -6.5, -40.0), step=2.5, slope=2.0, seed=7)
    report = prepare_dataset(tmp_path / "one", tmp_path / "out", workers=0, min_slices=8, progress=False)
    ours = _ras(LoadImage(image_only=True, ensure_channel_first=True)(str(report.dst / report.converted[0]["output"])))
    ref = _ras(LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)(str(tmp_path / "one")))
    assert torch.equal(ours.as_tensor().float(), ref.as_tensor().float())
    np.testing.assert_allclose(ours.affine.numpy(), ref.affine.numpy(), atol=1e-5)


def _ras(img: torch.Tensor) -> torch.Tensor:
    return Orientation(axcodes="RAS", labels=None)(img)


def test_nifti_nrrd_metaimage_keep_their_world_geometry(prepared: prep.PrepareReport, tree: Path) -> None:
    out = {r["source"]: prepared.dst / r["output"] for r in prepared.converted}
    src_nifti = nib.load(tree / "patient03" / "scan.nii.gz")
    got = nib.load(out["patient03/scan.nii.gz"])
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(src_nifti.dataobj))
    lung = nib.load(out["patient04/lung.nrrd"])
    assert lung.get_data_dtype() == np.int16  # int32 values that fit int16
    np.testing.assert_allclose(lung.affine[:3, 3], [-1.0, -2.0, 3.0])  # LPS origin (1, 2, 3) in RAS
    # MetaImage: axis 0 -> posterior, 1 -> superior, 2 -> patient's left (LPS): in RAS that is (P, S, L).
    mha = nib.load(out["patient05/raw.mha"])
    assert nib.aff2axcodes(mha.affine) == ("P", "S", "L")
    np.testing.assert_allclose(mha.affine[:3, 3], [10.0, -20.0, -30.0])
    np.testing.assert_allclose(np.linalg.norm(mha.affine[:3, :3], axis=0), [0.7, 0.9, 2.5])
    for name in ("patient05/zlib.mha", "patient05/luna.mhd"):
        np.testing.assert_array_equal(np.asarray(nib.load(out[name]).dataobj), np.asarray(mha.dataobj))


def test_metaimage_reader_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "a.mha").write_text(
        "ObjectType = Image\nNDims = 2\nDimSize = 3 3\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    with pytest.raises(ValueError, match="expected a 3D image"):
        read_metaimage(tmp_path / "a.mha")
    (tmp_path / "b.mha").write_text("NDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = LOCAL\n")
    with pytest.raises(ValueError, match="0 voxels in the data, expected 8"):
        read_metaimage(tmp_path / "b.mha")
    (tmp_path / "c.mha").write_text("just some text\n")
    with pytest.raises(ValueError, match="not a MetaImage header"):
        read_metaimage(tmp_path / "c.mha")


def test_datalist_is_a_seeded_patient_level_split(prepared: prep.PrepareReport, tmp_path: Path) -> None:
    doc = json.loads(prepared.datalist.read_text())
    assert len(doc["training"]) + len(doc["validation"]) == 8
    assert all(not Path(e["image"]).is_absolute() and (prepared.dst / e["image"]).is_file() for e in doc["training"])
    group = {r["output"]: r["group"] for r in prepared.converted}
    val_groups = {group[e["image"]] for e in doc["validation"]}
    train_groups = {group[e["image"]] for e in doc["training"]}
    assert len(val_groups) == 1 and not val_groups & train_groups  # 20% of 5 patients, whole patients held out
    splits = {tuple(sorted({r["group"] for r in prep._split(prepared.converted, 0.2, s)[1]})) for s in range(8)}
    assert len(splits) > 1  # the seed decides which patient
    assert prep._split(prepared.converted, 0.2, 3) == prep._split(prepared.converted, 0.2, 3)
    # The datalist loads as it is.
    from ssl3d.config import DataConfig, DatalistConfig
    from ssl3d.data.datalist import load_datalists

    train, val = load_datalists(DataConfig(datalists=[DatalistConfig(json=str(prepared.datalist))]))
    assert len(train) == len(doc["training"]) and len(val) == len(doc["validation"])


def test_rerun_converts_nothing_and_a_changed_source_only_itself(tree: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    first = prepare_dataset(tree, dst, workers=0, min_slices=8, progress=False)
    mtimes = {r["output"]: (dst / r["output"]).stat().st_mtime_ns for r in first.converted}
    again = prepare_dataset(tree, dst, workers=0, min_slices=8, progress=False)
    assert again.newly_converted == 0 and again.reused == 8
    assert {r["output"]: (dst / r["output"]).stat().st_mtime_ns for r in again.converted} == mtimes
    assert json.loads(again.datalist.read_text()) == json.loads(first.datalist.read_text())
    nrrd_file = tree / "patient04" / "lung.nrrd"
    st = nrrd_file.stat()
    os.utime(nrrd_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    try:
        third = prepare_dataset(tree, dst, workers=0, min_slices=8, progress=False)
    finally:
        os.utime(nrrd_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [r["source"] for r in third.converted if not r["reused"]] == ["patient04/lung.nrrd"]


def test_same_named_inputs_get_distinct_outputs_and_keep_them(tmp_path: Path) -> None:
    src = tmp_path / "src" / "p"
    src.mkdir(parents=True)
    data = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2)
    nrrd.write(str(src / "ct.nrrd"), data, {"space": "left-posterior-superior", "space directions": np.eye(3)})
    first = prepare_dataset(tmp_path / "src", tmp_path / "dst", workers=0, progress=False)
    assert [r["output"] for r in first.converted] == ["images/p/ct.nii.gz"]
    # A new ct.nii.gz sorts first but must not take (and overwrite) the NRRD's existing output.
    nib.save(nib.Nifti1Image(data + 1, np.eye(4)), src / "ct.nii.gz")
    second = prepare_dataset(tmp_path / "src", tmp_path / "dst", workers=0, progress=False)
    outputs = {r["source"]: (r["output"], r["reused"]) for r in second.converted}
    assert outputs["p/ct.nrrd"] == ("images/p/ct.nii.gz", True)
    assert outputs["p/ct.nii.gz"][0].startswith("images/p/ct_") and not outputs["p/ct.nii.gz"][1]
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "dst/images/p/ct.nii.gz").dataobj), data)


def test_a_killed_run_keeps_what_it_finished(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = prep._convert_task

    def dies_on_the_fourth(task: dict) -> dict:
        calls.append(task)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(prep, "_convert_task", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(tree, tmp_path, workers=0, min_slices=8, progress=False)
    monkeypatch.setattr(prep, "_convert_task", real)
    assert not (tmp_path / prep.REPORT_NAME).exists()
    resumed = prepare_dataset(tree, tmp_path, workers=0, min_slices=8, progress=False)
    assert resumed.reused == 3 and resumed.newly_converted == 5
    assert not (tmp_path / prep.JOURNAL_NAME).exists()


def test_parallel_workers_give_the_same_outputs(tree: Path, prepared: prep.PrepareReport, tmp_path: Path) -> None:
    par = prepare_dataset(tree, tmp_path, val_fraction=0.2, workers=2, min_slices=8, progress=False)
    assert [r["output"] for r in par.converted] == [r["output"] for r in prepared.converted]
    for r in par.converted:
        a, b = nib.load(tmp_path / r["output"]), nib.load(prepared.dst / r["output"])
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)
    assert json.loads(par.datalist.read_text()) == json.loads(prepared.datalist.read_text())


# ---------------------------------------------------------------------------------------------------------
# Real DICOM: TotalSegmentator 2.18.0's example series (JPEG 2000, blank SeriesInstanceUID)


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.skipif(os.environ.get("SSL3D_OFFLINE") == "1", reason="SSL3D_OFFLINE=1: no PyPI")
def test_totalsegmentator_dicom_series_matches_monai(tmp_path: Path) -> None:
    """Downloads the 27 MB TotalSegmentator 2.18.0 sdist from PyPI (a few seconds); SSL3D_OFFLINE=1 skips it."""
    from ssl3d.data.samples import SOURCES, _pip_download, extract_folder

    pytest.importorskip("PIL")  # decodes its JPEG 2000 pixel data
    archive = _pip_download(next(s for s in SOURCES if s.package == "totalsegmentator"), tmp_path)
    member_dir = "totalsegmentator-2.18.0/tests/reference_files/example_ct_dicom/"
    with tarfile.open(archive, "r:gz") as tar:
        series = extract_folder(tar, member_dir, tmp_path / "src" / "patient" / "ct")
    report = prepare_dataset(tmp_path / "src", tmp_path / "dst", workers=0, progress=False)
    assert len(report.converted) == 1 and not report.skipped
    rec = report.converted[0]
    assert rec["shape"] == [512, 512, 20] and rec["spacing"] == [0.9766, 0.9766, 2.0] and rec["dtype"] == "int16"
    assert "no SeriesInstanceUID" in rec["note"]
    ours = _ras(LoadImage(image_only=True, ensure_channel_first=True)(str(report.dst / rec["output"])))
    ref = _ras(LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)(str(series)))
    assert torch.equal(ours.as_tensor().float(), ref.as_tensor().float())
    np.testing.assert_allclose(ours.affine.numpy(), ref.affine.numpy(), atol=1e-4)
    assert float(ref.min()) == -1024.0


def test_command_line_flags(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    args = parser.parse_args([str(tree), str(tmp_path), "--workers", "0", "--min-slices", "8", "--no-progress"])
    assert run_prepare(args) == 0
    out = capsys.readouterr().out
    assert "8 volumes (8 converted now, 0 reused), 8 inputs skipped" in out
    assert "skipped      1 x gap of N mm at slice N" in out
    with pytest.raises(FileNotFoundError, match="source folder .* not found"):
        prepare_dataset(tmp_path / "nope", tmp_path / "out")


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior", "left-anterior-superior"])
def test_nrrd_reader_agrees_with_monai_where_monai_is_right(tmp_path: Path, space: str) -> None:
    """ssl3d's NRRD reader gives MONAI's NrrdReader's array and affine for LPS and RAS files; for LAS it negates x
    where MONAI keeps it (the world x axis of LAS points left, so RAS needs -x): why ssl3d keeps its own reader."""
    from monai.data import NrrdReader

    data = np.random.default_rng(0).integers(-1000, 1000, (6, 7, 8)).astype(np.int16)
    directions = np.array([[0.7, 0.1, 0.0], [0.0, 0.9, 0.05], [0.0, 0.0, 2.5]])
    path = tmp_path / "x.nrrd"
    header = {"space": space, "space directions": directions, "space origin": np.array([1.0, 2.0, 3.0])}
    nrrd.write(str(path), data, header, index_order="F")
    ours, affine = read_nrrd(path)
    reader = NrrdReader()
    theirs, meta = reader.get_data(reader.read(str(path)))
    assert np.array_equal(ours, np.asarray(theirs))
    monai_affine = np.asarray(meta["affine"], dtype=np.float64)
    if space == "left-anterior-superior":
        assert np.allclose(affine, np.diag([-1.0, 1.0, 1.0, 1.0]) @ monai_affine)
        assert affine[0, 3] == -1.0  # origin x=1 in LAS is x=-1 in RAS
    else:
        assert np.allclose(affine, monai_affine, atol=1e-12)
