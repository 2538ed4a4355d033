"""Turn a folder tree of CT scans (DICOM series, NIfTI, NRRD, MetaImage) into NIfTI volumes and a datalist.

Real collections do not arrive as tidy NIfTI: they are DICOM folders with several series per patient (the
CT next to its localizer, an MR, a dose report), stray text/XML/JPEG files, series with a missing slice, and
LUNA16-style MetaImage files. A training run must not discover a broken series hours in, and decoding DICOM
every epoch is slow. ``prepare_dataset`` does the sorting once, in parallel and resumably:

* every input is either converted to one NIfTI volume in RAS world coordinates (HU values, int16 when they
  fit) or skipped with a one-line reason, and both lists go to ``prepare_report.json``;
* a DICOM series is kept only if it is a CT volume that can be trusted geometrically: one orientation, one
  slice size, at least ``min_slices`` slices, evenly spaced along the slice normal (a missing slice is
  reported as ``gap of X mm at slice k`` rather than silently squeezed out);
* ``dataset.json`` is written in the reference's datalist format with a seeded, patient-level split, so it
  plugs into ``data.datalists`` as it is;
* a rerun converts only what is new or changed (sources are fingerprinted by size and mtime), and a run
  killed midway keeps what it finished (a journal is appended as volumes complete).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ssl3d.data.readers import LPS_TO_RAS, read_dicom_series, read_metaimage, read_metaimage_header, read_nrrd

IMAGE_DIR = "images"
DATALIST_NAME = "dataset.json"
REPORT_NAME = "prepare_report.json"
JOURNAL_NAME = ".prepare_journal.jsonl"  # conversions finished by a run that has not written its report yet
SCAN_CACHE_NAME = ".prepare_scan.json"  # DICOM header summaries, keyed by file size and mtime
FORMAT_VERSION = 1  # bump when the conversion itself changes: every output is redone

DEFAULT_MIN_SLICES = 16  # localizers and key images have 1-3 slices; a 16-slice CT still pads to a 96 ROI
DEFAULT_SPACING_TOLERANCE = 0.05  # slice gaps may differ from the median by this fraction (float rounding, jitter)
SCAN_CHUNK = 64  # DICOM files per header-scan task: large enough to amortise process hand-offs

# Suffixes that are certainly not a scan; anything unrecognised is tried as DICOM (DICOM file names often have
# no suffix or a numeric one, like "CT.1.3.12.2.1107.5.1.4.60064.30000022120808113428000016573").
NON_IMAGE_SUFFIXES = frozenset(
    ".txt .xml .json .jpg .jpeg .png .gif .bmp .tif .tiff .pdf .csv .tsv .md .rst .html .htm .log .py .sh .bat "
    ".zip .tar .gz .tgz .bz2 .xz .7z .ini .cfg .yaml .yml .xls .xlsx .doc .docx .ppt .pptx .bak .db .sqlite "
    ".mat .npy .npz .pkl .pt .pth .h5 .hdf5 .exe .dll .so .stl .obj .vtk .vtp .mp4 .avi .css .js".split()
)
RAW_DATA_SUFFIXES = frozenset({".raw", ".zraw", ".img", ".dat"})
_NIFTI = (".nii.gz", ".nii")
_NRRD = (".nrrd", ".nhdr")
_METAIMAGE = (".mha", ".mhd")


@dataclass
class PrepareReport:
    """What ``prepare_dataset`` did: every converted volume and every skipped input, with where they went."""

    dst: Path
    datalist: Path
    report: Path
    converted: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    training: int = 0
    validation: int = 0

    @property
    def reused(self) -> int:
        """Volumes a previous run had already converted from identical sources."""
        return sum(1 for r in self.converted if r.get("reused"))

    @property
    def newly_converted(self) -> int:
        return len(self.converted) - self.reused

    def summary(self) -> str:
        """One line for the console; the details are in ``report``."""
        return (
            f"{len(self.converted)} volumes ({self.newly_converted} converted now, {self.reused} reused), "
            f"{len(self.skipped)} inputs skipped, {self.training} training / {self.validation} validation; "
            f"datalist {self.datalist}, report {self.report}"
        )


@dataclass
class _Input:
    """One future output volume: a DICOM series or an image file, with everything needed to convert it."""

    key: str  # stable identity across runs: "file:<rel>" or "dicom:<series key>"
    kind: str  # dicom | nifti | nrrd | metaimage
    source: str  # relative path (file) or relative folder (series) shown in the report
    files: list[str]  # every source file (relative), for the fingerprint
    stem: str  # preferred output path, relative to images/, without suffix
    suffix: str  # output suffix
    group: str  # the split unit: the first path component (a patient folder, or the file itself)
    plan: dict[str, Any] = field(default_factory=dict)  # DICOM: sorted files, affine, shape, notes
    info: dict[str, Any] = field(default_factory=dict)  # shown in the report


# ---------------------------------------------------------------------------------------------------------
# Entry point


def prepare_dataset(
    src: Path | str,
    dst: Path | str,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    workers: int | None = None,
    min_slices: int = DEFAULT_MIN_SLICES,
    spacing_tolerance: float = DEFAULT_SPACING_TOLERANCE,
    progress: bool = True,
) -> PrepareReport:
    """Convert every CT volume under ``src`` into ``dst/images`` and write ``dst/dataset.json`` and the report.

    ``workers``: conversion processes (None: all CPUs of this process, up to 8; 0: convert in this process).
    ``val_fraction``: share of patient folders (first-level entries of ``src``) held out for validation,
    seeded by ``seed``; whole patients are held out so that no patient is on both sides of the split.
    Safe to rerun: inputs converted before from identical files (size and mtime) are reused, not redone.
    """
    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"prepare: source folder {src} not found; expected a folder of DICOM/NIfTI/NRRD/MHA")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"prepare: val_fraction {val_fraction} outside [0, 1); e.g. 0.05 holds out 5% of patients")
    if min_slices < 1:
        raise ValueError(f"prepare: min_slices {min_slices}; expected at least 1 (e.g. {DEFAULT_MIN_SLICES})")
    workers = _default_workers() if workers is None else max(0, workers)
    (dst / IMAGE_DIR).mkdir(parents=True, exist_ok=True)

    files = list(_walk(src, exclude=dst))
    skipped: list[dict[str, Any]] = []
    inputs, dicom_candidates = _classify(src, files, skipped)
    summaries = _scan_dicom_headers(src, dst, dicom_candidates, workers, progress)
    inputs += _dicom_series(summaries, skipped, min_slices, spacing_tolerance)
    previous = _previous_records(dst)
    _assign_outputs(inputs, previous)

    converted: list[dict[str, Any]] = []
    todo: list[tuple[_Input, str]] = []
    for inp in inputs:
        fp = _fingerprint(src, inp.files)
        old = previous.get(inp.key)
        if old and old.get("fingerprint") == fp and _output_intact(dst, old):
            converted.append({**old, "reused": True})
        else:
            todo.append((inp, fp))

    journal = dst / JOURNAL_NAME
    with open(journal, "a") as jf:
        for inp, fp, result in _run_conversions(src, dst, todo, workers, progress):
            if "reason" in result:
                skipped.append({"source": inp.source, "kind": inp.kind, "reason": result["reason"], **inp.info})
                continue
            record = {
                "key": inp.key,
                "source": inp.source,
                "kind": inp.kind,
                "output": inp.plan["output"],
                "group": inp.group,
                "fingerprint": fp,
                "files": len(inp.files),
                **inp.info,
                **result,
            }
            jf.write(json.dumps(record) + "\n")
            jf.flush()  # a killed run keeps every volume it finished
            converted.append({**record, "reused": False})

    converted.sort(key=lambda r: r["output"])
    skipped.sort(key=lambda r: (r["source"], r["reason"]))
    training, validation = _split(converted, val_fraction, seed)
    datalist = dst / DATALIST_NAME
    doc = {
        "description": f"CT volumes prepared by ssl3d from {src}",
        "ssl3d_prepare": {"version": FORMAT_VERSION, "seed": seed, "val_fraction": val_fraction},
        "training": [{"image": r["output"]} for r in training],
        "validation": [{"image": r["output"]} for r in validation],
    }
    _atomic_text(datalist, json.dumps(doc, indent=2) + "\n")
    report = dst / REPORT_NAME
    settings = {"min_slices": min_slices, "spacing_tolerance": spacing_tolerance, "seed": seed}
    counts = {"converted": len(converted), "reused": sum(r["reused"] for r in converted), "skipped": len(skipped)}
    body = {
        "version": FORMAT_VERSION,
        "src": str(src),
        "dst": str(dst),
        "settings": {**settings, "val_fraction": val_fraction},
        "counts": counts,
        "converted": [{k: v for k, v in r.items() if k != "reused"} for r in converted],
        "skipped": skipped,
    }
    _atomic_text(report, json.dumps(body, indent=1) + "\n")
    journal.unlink(missing_ok=True)  # everything it held is in the report now
    return PrepareReport(
        dst=dst,
        datalist=datalist,
        report=report,
        converted=converted,
        skipped=skipped,
        training=len(training),
        validation=len(validation),
    )


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


# ---------------------------------------------------------------------------------------------------------
# Walking and classifying files


def _walk(src: Path, exclude: Path) -> Iterator[str]:
    """Relative POSIX paths of the regular files under ``src``, sorted, never entering ``exclude``."""
    for root, dirs, names in os.walk(src):
        here = Path(root)
        dirs[:] = sorted(d for d in dirs if (here / d).resolve() != exclude)
        for name in sorted(names):
            p = here / name
            if p.is_file():
                yield p.relative_to(src).as_posix()


def _suffix_of(rel: str) -> str:
    low = rel.lower()
    for s in (*_NIFTI, *_NRRD, *_METAIMAGE):
        if low.endswith(s):
            return s
    return Path(low).suffix


def _group(rel: str) -> str:
    return rel.split("/", 1)[0]


def _stem(rel: str, suffix: str) -> str:
    return rel[: len(rel) - len(suffix)] if suffix and rel.lower().endswith(suffix) else rel


def _classify(src: Path, files: list[str], skipped: list[dict[str, Any]]) -> tuple[list[_Input], list[str]]:
    """Image files become inputs, obvious non-images are skipped, everything else is a DICOM candidate."""
    inputs: list[_Input] = []
    candidates: list[str] = []
    raw_files: list[str] = []
    claimed: set[str] = set()  # data files named by a .mhd / .nhdr header

    def skip(rel: str, kind: str, reason: str) -> None:
        skipped.append({"source": rel, "kind": kind, "reason": reason})

    for rel in files:
        name = rel.rsplit("/", 1)[-1]
        suffix = _suffix_of(rel)
        if name.startswith("."):
            skip(rel, "other", "hidden file")
        elif name.upper() == "DICOMDIR":
            skip(rel, "other", "DICOMDIR index (its series are found by walking the folders)")
        elif suffix in _NIFTI or suffix in _NRRD or suffix in _METAIMAGE:
            kind = "nifti" if suffix in _NIFTI else "nrrd" if suffix in _NRRD else "metaimage"
            data_files: list[str] = []
            if suffix in (".mhd", ".nhdr"):
                try:
                    data_files = _detached_data_files(src, rel, suffix)
                except (OSError, ValueError, ImportError) as exc:
                    skip(rel, kind, f"unreadable header: {_one_line(exc)}")
                    continue
                claimed.update(data_files)
            out_suffix = ".nii" if suffix == ".nii" else ".nii.gz"
            inputs.append(
                _Input(f"file:{rel}", kind, rel, [rel, *data_files], _stem(rel, suffix), out_suffix, _group(rel))
            )
        elif suffix in RAW_DATA_SUFFIXES:
            raw_files.append(rel)
        elif suffix == ".hdr":
            skip(rel, "other", "Analyze .hdr/.img is not supported; convert it to NIfTI first")
        elif suffix in NON_IMAGE_SUFFIXES:
            skip(rel, "other", f"not an image ({suffix} file)")
        else:
            candidates.append(rel)
    for rel in raw_files:
        if rel not in claimed:
            skip(rel, "other", "raw data file that no .mhd/.nhdr header names")
    return inputs, candidates


def _detached_data_files(src: Path, rel: str, suffix: str) -> list[str]:
    """The data files a detached header (.mhd, .nhdr) points to, relative to ``src``, checked to exist."""
    path = src / rel
    if suffix == ".mhd":
        fields, _ = read_metaimage_header(path)
        names = [] if fields.get("ElementDataFile", "LOCAL").upper() == "LOCAL" else [fields["ElementDataFile"]]
    else:
        import nrrd

        header = nrrd.read_header(str(path))
        value = header.get("data file", header.get("datafile"))
        names = [] if value is None else [value] if isinstance(value, str) else list(value)
    out = []
    for n in names:
        data = (path.parent / n).resolve()
        if not data.is_file():
            raise ValueError(f"data file {n} not found next to the header")
        try:
            out.append(data.relative_to(src).as_posix())
        except ValueError:
            raise ValueError(f"data file {n} lies outside the source folder") from None
    return out


# ---------------------------------------------------------------------------------------------------------
# DICOM: header scan, grouping into series, geometric checks

_DICOM_TAGS = [
    "Modality",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "Rows",
    "Columns",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "NumberOfFrames",
    "ImageType",
    "InstanceNumber",
]


def _scan_one(path: str) -> dict[str, Any] | str:
    """A DICOM file's header summary (JSON-able), or why it is not a usable DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_DICOM_TAGS)
    except InvalidDicomError:
        return "not DICOM (no DICM preamble) and not a known image format"
    except Exception as exc:  # noqa: BLE001 - a corrupt file is a skip with a reason, not a crash
        return f"unreadable DICOM: {_one_line(exc)}"

    def floats(name: str) -> list[float] | None:
        v = ds.get(name)
        try:
            return [float(x) for x in v] if v is not None and len(v) else None
        except (TypeError, ValueError):
            return None

    def text(name: str) -> str:
        v = ds.get(name)
        return "" if v is None else str(v).strip()

    image_type = ds.get("ImageType")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    return {
        "modality": text("Modality").upper(),
        "uid": text("SeriesInstanceUID"),
        "number": text("SeriesNumber"),
        "description": text("SeriesDescription"),
        "rows": int(ds.get("Rows") or 0),
        "cols": int(ds.get("Columns") or 0),
        "ipp": floats("ImagePositionPatient"),
        "iop": floats("ImageOrientationPatient"),
        "spacing": floats("PixelSpacing"),
        "frames": frames,
        "image_type": [str(t).upper() for t in image_type] if image_type else [],
        "instance": text("InstanceNumber"),
    }


def _scan_chunk(paths: list[str]) -> list[dict[str, Any] | str]:
    return [_scan_one(p) for p in paths]


def _scan_dicom_headers(
    src: Path, dst: Path, rels: list[str], workers: int, progress: bool
) -> dict[str, dict[str, Any] | str]:
    """Header summaries of the DICOM candidates, reusing those of unchanged files from the last run."""
    cache_path = dst / SCAN_CACHE_NAME
    try:
        cache = json.loads(cache_path.read_text())
        if cache.get("version") != FORMAT_VERSION:
            cache = {}
    except (OSError, ValueError):
        cache = {}
    old = cache.get("files", {})
    stats = {rel: _stat(src / rel) for rel in rels}
    out: dict[str, dict[str, Any] | str] = {}
    todo = []
    for rel in rels:
        hit = old.get(rel)
        if hit and hit[0] == stats[rel]:
            out[rel] = hit[1]
        else:
            todo.append(rel)
    if todo:
        try:
            import pydicom  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            example = todo[0]
            raise ImportError(f"reading DICOM (e.g. {example}) needs pydicom: pip install pydicom") from exc
    chunks = [todo[i : i + SCAN_CHUNK] for i in range(0, len(todo), SCAN_CHUNK)]
    bar = _bar(len(todo), "scanning DICOM headers", progress)
    results = _map(_scan_chunk, [[str(src / r) for r in c] for c in chunks], workers)
    for chunk, res in results:
        for rel, summary in zip(chunks[chunk], res):
            out[rel] = summary
        bar.update(len(res))
    bar.close()
    files = {rel: [stats[rel], out[rel]] for rel in rels}
    if todo or set(files) != set(old):
        _atomic_text(cache_path, json.dumps({"version": FORMAT_VERSION, "files": files}))
    return out


def _dicom_series(
    summaries: dict[str, dict[str, Any] | str],
    skipped: list[dict[str, Any]],
    min_slices: int,
    spacing_tolerance: float,
) -> list[_Input]:
    """Group DICOM files into series and keep the CT volumes whose geometry is consistent."""
    series: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for rel, s in summaries.items():
        if isinstance(s, str):
            skipped.append({"source": rel, "kind": "other", "reason": s})
            continue
        folder = rel.rsplit("/", 1)[0] if "/" in rel else "."
        # Anonymisers sometimes blank the UID (TotalSegmentator's example series has none): fall back to the
        # folder and the series number, the most a human would use to tell series apart.
        key = s["uid"] or f"{folder}#{s['number']}#{s['description']}"
        series[key].append((rel, s))
    inputs = []
    for key, members in sorted(series.items()):
        members.sort()
        rels = [r for r, _ in members]
        first = members[0][1]
        folder = rels[0].rsplit("/", 1)[0] if "/" in rels[0] else "."
        info = {"series_uid": first["uid"], "series_number": first["number"], "description": first["description"]}
        if not first["uid"]:
            info["note"] = "no SeriesInstanceUID: grouped by folder, series number and description"
        plan = _check_series(members, min_slices, spacing_tolerance)
        if isinstance(plan, str):
            skipped.append({"source": folder, "kind": "dicom", "reason": plan, "files": len(rels), **info})
            continue
        label = _slug(f"s{first['number'] or 'x'}_{first['description']}")
        stem = f"{folder}/{label}" if folder != "." else label
        stem += "_" + hashlib.sha1(key.encode()).hexdigest()[:8]
        inputs.append(_Input(f"dicom:{key}", "dicom", folder, rels, stem, ".nii.gz", _group(rels[0]), plan, info))
    return inputs


def _check_series(members: list[tuple[str, dict[str, Any]]], min_slices: int, tol: float) -> dict[str, Any] | str:
    """The plan to stack a series into a volume (sorted files, RAS affine), or why it cannot be trusted."""
    modalities = sorted({s["modality"] or "unknown" for _, s in members})
    if modalities != ["CT"]:
        return f"modality {'/'.join(modalities)}, not CT"
    if any(s["frames"] > 1 for _, s in members):
        return "multi-frame (enhanced) DICOM is not supported; convert it with dcm2niix first"
    slices = [(r, s) for r, s in members if "LOCALIZER" not in s["image_type"]]
    if not slices:
        return "localizer (scout) images, not a volume"
    notes = []
    if len(slices) < len(members):
        notes.append(f"{len(members) - len(slices)} localizer images left out")
    if any(s["ipp"] is None or s["iop"] is None or s["spacing"] is None or not s["rows"] for _, s in slices):
        return "slices without ImagePositionPatient/ImageOrientationPatient/PixelSpacing/Rows (not a volume)"
    if any(len(s["ipp"]) != 3 or len(s["iop"]) != 6 or len(s["spacing"]) != 2 for _, s in slices):
        return "malformed ImagePositionPatient/ImageOrientationPatient/PixelSpacing"
    n = len(slices)
    if n < min_slices:
        return f"{n} slices, fewer than min_slices={min_slices}"
    sizes = sorted({(s["rows"], s["cols"]) for _, s in slices})
    if len(sizes) > 1:
        return f"slices of different sizes ({', '.join(f'{r}x{c}' for r, c in sizes)})"
    iop = np.array([s["iop"] for _, s in slices])
    if np.abs(iop - iop[0]).max() > 1e-3:
        return "several slice orientations (ImageOrientationPatient differs between slices)"
    pix = np.array([s["spacing"] for _, s in slices])
    if np.abs(pix - pix[0]).max() > 1e-3 * max(1.0, float(pix[0].max())):
        return "PixelSpacing differs between slices"
    row, col = iop[0, :3], iop[0, 3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        return f"ImageOrientationPatient {iop[0].tolist()} is not two orthonormal directions"
    normal = np.cross(row, col)
    pos = np.array([s["ipp"] for _, s in slices])
    depth = pos @ normal
    order = np.argsort(depth, kind="stable")
    depth, pos = depth[order], pos[order]
    gaps = np.diff(depth)
    step = float(np.median(gaps))
    dup = int((gaps < 1e-3 * max(step, 1.0)).sum())
    if dup:
        return f"{dup} slices share a position with another (several acquisitions or phases in one series?)"
    off = np.abs(gaps - step) > tol * step
    if off.any():
        k = int(np.argmax(off))
        if gaps[k] > step:
            missing = round(gaps[k] / step) - 1
            hint = f"; {missing} missing slice{'s' if missing != 1 else ''}?" if missing >= 1 else ""
            return f"gap of {gaps[k]:.2f} mm at slice {k + 1} (slices are {step:.2f} mm apart elsewhere{hint})"
        return f"uneven slice spacing: {gaps.min():.2f} to {gaps.max():.2f} mm (median {step:.2f} mm)"
    # The step between slices may lean off the normal (gantry tilt): use it as the third axis, and check that
    # the slice origins lie on one line.
    stepvec = (pos[-1] - pos[0]) / (n - 1)
    line = pos[0] + np.arange(n)[:, None] * stepvec
    if np.abs(pos - line).max() > tol * step + 1e-3:
        return "slice positions do not lie on a line"
    if np.linalg.norm(np.cross(stepvec / np.linalg.norm(stepvec), normal)) > 1e-3:
        notes.append("slices stacked off their normal (gantry tilt): the affine is sheared")
    affine = np.eye(4)
    affine[:3, 0] = row * pix[0][1]  # array axis 0 runs along a row: the column index, PixelSpacing[1] apart
    affine[:3, 1] = col * pix[0][0]  # array axis 1 runs down a column: the row index, PixelSpacing[0] apart
    affine[:3, 2] = stepvec
    affine[:3, 3] = pos[0]
    affine = LPS_TO_RAS @ affine
    rows, cols = sizes[0]
    return {
        "files": [slices[i][0] for i in order],
        "affine": affine.tolist(),
        "shape": [cols, rows, n],
        "notes": notes,
    }


# ---------------------------------------------------------------------------------------------------------
# Conversion (runs in worker processes)


def _convert_task(task: dict[str, Any]) -> dict[str, Any]:
    """Convert one input; returns the output's facts, or ``{"reason": ...}`` when it must be skipped."""
    src, out = Path(task["src"]), Path(task["out"])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        kind = task["kind"]
        if kind == "dicom":
            data, affine = read_dicom_series([src / f for f in task["plan"]["files"]], task["plan"])
            facts = _write_volume(data, affine, out)
        elif kind == "nifti":
            facts = _copy_nifti(src / task["files"][0], out)
        elif kind == "nrrd":
            data, affine = read_nrrd(src / task["files"][0])
            facts = _write_volume(data, affine, out)
        elif kind == "metaimage":
            data, affine = read_metaimage(src / task["files"][0])
            facts = _write_volume(data, affine, out)
        else:  # pragma: no cover - the classifier produces only the kinds above
            raise ValueError(f"unknown input kind {kind}")
    except Exception as exc:  # noqa: BLE001 - one bad input must not stop a 10 000-volume conversion
        return {"reason": f"conversion failed: {_one_line(exc)}"}
    facts["bytes"] = out.stat().st_size
    if task["kind"] == "dicom" and task["plan"].get("notes"):
        facts["notes"] = task["plan"]["notes"]
    return facts


def _narrow(data: np.ndarray) -> np.ndarray:
    """int16 when every value is an integer that fits (half the bytes of float32 and what CT scanners store)."""
    if data.dtype == np.int16 or data.size == 0:
        return data
    if data.dtype.kind in "iub":
        lo, hi = int(data.min()), int(data.max())
        return data.astype(np.int16) if -32768 <= lo and hi <= 32767 else data
    if data.dtype.kind == "f":
        if np.isfinite(data).all() and -32768 <= data.min() and data.max() <= 32767 and (data == np.round(data)).all():
            return data.astype(np.int16)
        return data.astype(np.float32)
    raise ValueError(f"voxel type {data.dtype} is not a scalar image")


def _write_volume(data: np.ndarray, affine: np.ndarray, out: Path) -> dict[str, Any]:
    if data.ndim != 3:
        raise ValueError(f"{data.ndim}D image; expected a 3D volume")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("degenerate voxel-to-world transform")
    data = _narrow(np.asarray(data))
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    _atomic(out, lambda p: nib.save(img, p))
    return _facts(img.shape, affine, data.dtype)


def _copy_nifti(path: Path, out: Path) -> dict[str, Any]:
    """NIfTI needs no conversion: check it is one 3D volume, then hard-link (or copy) it in."""
    img = nib.load(path)
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise ValueError(f"{len(img.shape)}D NIfTI {img.shape}; expected one 3D volume")
    affine = img.affine
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("degenerate voxel-to-world transform")

    def place(tmp: str) -> None:
        try:
            os.link(path, tmp)  # no copy for terabytes of NIfTI when source and destination share a file system
        except OSError:
            shutil.copyfile(path, tmp)

    _atomic(out, place)
    return _facts(shape, affine, img.get_data_dtype())


def _facts(shape: Iterable[int], affine: np.ndarray, dtype: Any) -> dict[str, Any]:
    return {
        "shape": [int(s) for s in shape],
        "spacing": [round(float(v), 4) for v in np.linalg.norm(affine[:3, :3], axis=0)],
        "axcodes": "".join(nib.aff2axcodes(affine)),
        "dtype": np.dtype(dtype).name,
    }


def _run_conversions(
    src: Path, dst: Path, todo: list[tuple[_Input, str]], workers: int, progress: bool
) -> Iterator[tuple[_Input, str, dict[str, Any]]]:
    tasks = [
        {
            "src": str(src),
            "out": str(dst / inp.plan["output"]),
            "kind": inp.kind,
            "files": inp.files,
            "plan": inp.plan,
        }
        for inp, _ in todo
    ]
    bar = _bar(len(tasks), "converting", progress)
    for i, result in _map(_convert_task, tasks, workers):
        bar.update(1)
        yield todo[i][0], todo[i][1], result
    bar.close()


def _map(fn: Callable[[Any], Any], items: list[Any], workers: int) -> Iterator[tuple[int, Any]]:
    """(index, fn(item)) in completion order; in this process when ``workers`` is 0 or there is one item."""
    if workers <= 0 or len(items) <= 1:
        for i, item in enumerate(items):
            yield i, fn(item)
        return
    # fork: the workers run numpy/pydicom/nibabel only, and a fork saves each of them the seconds it takes to
    # import torch and MONAI again (spawn and forkserver re-import the ssl3d.data package).
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool: Executor = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=ctx)
    with pool:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


# ---------------------------------------------------------------------------------------------------------
# Outputs, resume, split


def _assign_outputs(inputs: list[_Input], previous: dict[str, dict[str, Any]]) -> None:
    """Give each input a unique output path (``images/...``), keeping the one a previous run used.

    Inputs seen before are placed first, so a new input can never take (and overwrite) an existing output.
    """
    taken: set[str] = set()
    ordered = sorted(inputs, key=lambda i: (previous.get(i.key, {}).get("output") is None, i.key))
    for inp in ordered:
        old = previous.get(inp.key, {}).get("output")
        name = old if old and old not in taken else f"{IMAGE_DIR}/{inp.stem}{inp.suffix}"
        if name in taken:  # e.g. ct.nii.gz and ct.nrrd side by side
            name = f"{IMAGE_DIR}/{inp.stem}_{hashlib.sha1(inp.key.encode()).hexdigest()[:8]}{inp.suffix}"
        taken.add(name)
        inp.plan["output"] = name


def _previous_records(dst: Path) -> dict[str, dict[str, Any]]:
    """Converted volumes recorded by earlier runs: the last report, then the journal of an unfinished run."""
    records: dict[str, dict[str, Any]] = {}
    try:
        report = json.loads((dst / REPORT_NAME).read_text())
        if report.get("version") == FORMAT_VERSION:
            records.update({r["key"]: r for r in report.get("converted", []) if "key" in r})
    except (OSError, ValueError):
        pass
    try:
        with open(dst / JOURNAL_NAME) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:  # the line a killed run was writing
                    continue
                records[r["key"]] = r
    except OSError:
        pass
    return records


def _output_intact(dst: Path, record: dict[str, Any]) -> bool:
    try:
        return (dst / record["output"]).stat().st_size == record.get("bytes")
    except (OSError, KeyError):
        return False


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _fingerprint(src: Path, rels: list[str]) -> str:
    """Size and mtime of every source file: cheap on millions of files and changed by any rewrite."""
    h = hashlib.sha1(f"v{FORMAT_VERSION}".encode())
    for rel in sorted(rels):
        size, mtime = _stat(src / rel)
        h.update(f"\n{rel}\t{size}\t{mtime}".encode())
    return h.hexdigest()


def _split(
    converted: list[dict[str, Any]], val_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Seeded split by patient group; with a single group everything trains (the loader then holds out)."""
    groups = sorted({r["group"] for r in converted})
    k = max(1, round(val_fraction * len(groups))) if val_fraction > 0 and len(groups) >= 2 else 0
    held = {groups[i] for i in np.random.default_rng([seed, 0x5EED]).permutation(len(groups))[:k]}
    return [r for r in converted if r["group"] not in held], [r for r in converted if r["group"] in held]


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("._")[:60] or "series"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temporary name in the same folder (keeping the suffix nibabel dispatches on), then rename."""
    tmp = path.with_name(f".{os.getpid()}.tmp.{path.name}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_text(path: Path, text: str) -> None:
    _atomic(path, lambda p: Path(p).write_text(text))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, desc: str, progress: bool) -> Any:
    if not progress or total == 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="file" if desc.startswith("scan") else "vol", dynamic_ncols=True)
