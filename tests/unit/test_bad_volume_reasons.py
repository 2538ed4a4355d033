"""An unreadable volume's reason comes from the file (empty, a directory, not an image format), not from whichever
of MONAI's readers failed last (pydicom's InvalidDicomError for an empty .nii.gz, an IndexError for a folder)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from ssl3d.cli import main


def test_data_check_explains_each_unreadable_file(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    good = nib.Nifti1Image(rng.normal(0, 300, size=(40, 40, 40)).astype(np.int16), np.eye(4))
    nib.save(good, tmp_path / "good.nii.gz")
    raw = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])  # a real NIfTI, truncated: the reader's error
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    (tmp_path / "x.nii.gz").mkdir()
    (tmp_path / "text.nii.gz").write_text("<html>404 Not Found</html>")
    (tmp_path / "zipped_text.nii.gz").write_bytes(gzip.compress(b"<html>404 Not Found</html>"))
    names = ["good", "cut", "empty", "x", "text", "zipped_text", "missing"]
    datalist = {"training": [{"image": f"{n}.nii.gz"} for n in names], "validation": []}
    (tmp_path / "list.json").write_text(json.dumps(datalist))

    assert main(["data", "check", str(tmp_path / "list.json")]) == 1
    lines = {
        line.split(": ", 2)[1]: line.split(": ", 2)[2]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("bad: ")
    }
    reasons = {Path(k).name.removesuffix(".nii.gz"): v for k, v in lines.items()}
    assert sorted(reasons) == ["cut", "empty", "missing", "text", "x", "zipped_text"], reasons
    assert reasons["empty"] == "empty file (0 bytes)"
    assert reasons["x"] == "is a directory, not a volume file"
    assert reasons["missing"] == "file not found"
    assert reasons["text"].startswith("not a NIfTI/DICOM/NRRD/MetaImage file (first bytes 3c 68 74 6d 6c 3e")
    assert "'<html>404 Not Fo'" in reasons["text"] and "26 bytes on disk" in reasons["text"]
    assert reasons["zipped_text"].startswith("not a NIfTI/DICOM/NRRD/MetaImage file (gzip holding 3c 68 74 6d 6c")
    # A file that is a volume but damaged keeps the reader's own explanation (here: the gzip stream ends early).
    assert "Compressed file ended" in reasons["cut"] or "EOF" in reasons["cut"], reasons["cut"]
    assert not any("InvalidDicomError" in r or "IndexError" in r for r in reasons.values()), reasons
