"""Volume readers for what ``ssl3d data prepare`` converts: DICOM series, NRRD and MetaImage, each to an array and
a RAS affine (NIfTI's world; DICOM, NRRD-LPS and MetaImage worlds are LPS)."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LPS_TO_RAS", "nrrd_affine", "read_dicom_series", "read_metaimage", "read_metaimage_header", "read_nrrd"]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _integral(values: np.ndarray) -> bool:
    return values.dtype.kind in "iub" or bool(np.all(np.mod(values, 1) == 0))


def read_dicom_series(paths: list[Path], plan: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Stack the sorted slices into HU ([columns, rows, slices]); int16 while every slice fits it."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    cols, rows, n = plan["shape"]
    vol: np.ndarray = np.empty((rows, cols, n), dtype=np.int16)  # [row, column, slice], transposed at the end
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        px = ds.pixel_array
        if px.shape != (rows, cols):
            raise ValueError(f"{p.name}: pixel array {px.shape}, expected {(rows, cols)}")
        hu = apply_modality_lut(px, ds)  # pydicom's Modality LUT: Rescale Slope/Intercept (or a LUT sequence)
        if vol.dtype == np.int16 and _integral(hu) and hu.min() >= -32768 and hu.max() <= 32767:
            vol[:, :, k] = hu
            continue
        if vol.dtype != np.float32:
            vol = vol.astype(np.float32)  # a fractional rescale or a huge value: float for the whole volume
        vol[:, :, k] = hu
    return vol.transpose(1, 0, 2), np.asarray(plan["affine"], dtype=np.float64)


_SPACE_TO_RAS = {  # sign of each world axis going from the NRRD space to RAS
    "left-posterior-superior": (-1, -1, 1),
    "lps": (-1, -1, 1),
    "right-anterior-superior": (1, 1, 1),
    "ras": (1, 1, 1),
    "left-anterior-superior": (-1, 1, 1),
    "las": (-1, 1, 1),
}


def nrrd_affine(header: dict[str, Any]) -> np.ndarray:
    """The 4x4 voxel-to-RAS affine of a 3D NRRD header (rows of "space directions" are the axis vectors)."""
    space = str(header.get("space", "")).lower()
    if space not in _SPACE_TO_RAS:
        raise ValueError(f"NRRD space {space!r} not supported; expected one of {', '.join(sorted(_SPACE_TO_RAS))}")
    dirs = np.asarray(header["space directions"], dtype=np.float64)
    if dirs.shape != (3, 3) or not np.isfinite(dirs).all():
        raise ValueError(f"NRRD space directions {dirs.tolist()}: expected a 3x3 matrix (a 3D scalar image)")
    affine = np.eye(4)
    affine[:3, :3] = dirs.T  # column i: the world step of one voxel along array axis i
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    affine[:3] *= np.asarray(_SPACE_TO_RAS[space], dtype=np.float64)[:, None]  # LPS -> RAS negates x and y
    return affine


def read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A 3D NRRD volume and its RAS affine (pynrrd reads the data, ``nrrd_affine`` the space).

    Not MONAI's ``NrrdReader``: it gives the same array and affine for LPS and RAS files, but reads a
    ``left-anterior-superior`` file as RAS (x not negated, checked with the MONAI version in constraints.txt), a
    silent left-right flip."""
    try:
        import nrrd
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("reading NRRD needs pynrrd: pip install pynrrd (or ssl3d[samples])") from exc
    data, header = nrrd.read(str(path), index_order="F")
    if data.ndim != 3:
        raise ValueError(f"{data.ndim}D NRRD; expected a 3D scalar image")
    return data, nrrd_affine(header)


# ---------------------------------------------------------------------------------------------------------
# MetaImage (.mha / .mhd), read with numpy: MONAI's ITKReader needs itk, which is a heavy dependency

_MET_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}
_MAX_HEADER = 1 << 16


def read_metaimage_header(path: Path | str) -> tuple[dict[str, str], int]:
    """``key = value`` fields up to ElementDataFile (always the last), and the byte offset where data starts."""
    fields: dict[str, str] = {}
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw = f.readline(_MAX_HEADER)
            if not raw:
                raise ValueError("no ElementDataFile field: not a MetaImage header")
            offset += len(raw)
            if offset > _MAX_HEADER:
                raise ValueError(f"no ElementDataFile field in the first {_MAX_HEADER} bytes: not a MetaImage header")
            line = raw.decode("latin-1").strip()
            if not line:
                continue
            if "=" not in line:
                raise ValueError(f"line {line[:40]!r} is not 'key = value': not a MetaImage header")
            key, value = (s.strip() for s in line.split("=", 1))
            fields[key] = value
            if key == "ElementDataFile":
                return fields, offset


def read_metaimage(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """A 3D MetaImage as (array [x, y, z], voxel-to-RAS affine); raw or zlib-compressed, local or detached.

    MetaImage's world is ITK's LPS; ``TransformMatrix`` lists the direction of each array axis in turn (ITK's
    MetaImageIO reads consecutive triples as axis directions). ``AnatomicalOrientation`` is informational
    and ignored, as ITK does.
    """
    path = Path(path)
    fields, offset = read_metaimage_header(path)

    def get(*names: str, default: str | None = None) -> str | None:
        for n in names:
            if n in fields:
                return fields[n]
        return default

    def numbers(text: str | None, n: int, what: str) -> list[float]:
        try:
            vals = [float(v) for v in (text or "").split()]
        except ValueError:
            vals = []
        if len(vals) != n:
            raise ValueError(f"{what} = {text!r}: expected {n} numbers")
        return vals

    ndims = int(get("NDims", default="0") or 0)
    dims = [int(v) for v in numbers(get("DimSize"), ndims, "DimSize")] if ndims else []
    if ndims == 4 and dims[3] == 1:
        ndims, dims = 3, dims[:3]
    if ndims != 3:
        raise ValueError(f"NDims = {get('NDims')}: expected a 3D image")
    if int(get("ElementNumberOfChannels", default="1") or 1) != 1:
        raise ValueError("ElementNumberOfChannels > 1: expected a scalar image")
    etype = get("ElementType", default="")
    if etype not in _MET_TYPES:
        raise ValueError(f"ElementType = {etype}: expected one of {', '.join(_MET_TYPES)}")
    msb = (get("BinaryDataByteOrderMSB", "ElementByteOrderMSB", default="False") or "").lower() == "true"
    dtype = np.dtype(_MET_TYPES[etype]).newbyteorder(">" if msb else "<")
    spacing = numbers(get("ElementSpacing", "ElementSize", default="1 1 1"), 3, "ElementSpacing")
    origin = numbers(get("Offset", "Position", "Origin", default="0 0 0"), 3, "Offset")
    matrix = numbers(
        get("TransformMatrix", "Rotation", "Orientation", default="1 0 0 0 1 0 0 0 1"), 9, "TransformMatrix"
    )
    compressed = (get("CompressedData", default="False") or "").lower() == "true"
    name = get("ElementDataFile", default="LOCAL") or "LOCAL"
    if name.upper() == "LIST" or "%" in name or " " in name:
        raise ValueError(f"ElementDataFile = {name}: one volume split over several files is not supported")
    local = name.upper() == "LOCAL"
    data_path = path if local else path.parent / name
    count = int(np.prod(dims))
    if compressed:
        raw = data_path.read_bytes()[offset if local else 0 :]
        raw = zlib.decompress(raw, zlib.MAX_WBITS | 32)  # zlib or gzip stream
        flat = np.frombuffer(raw, dtype=dtype, count=count)
    else:
        start = offset if local else int(get("HeaderSize", default="0") or 0)
        if start < 0:  # HeaderSize = -1: the data are the last bytes of the file
            start = data_path.stat().st_size - count * dtype.itemsize
        flat = np.fromfile(data_path, dtype=dtype, count=count, offset=start)
    if flat.size != count:
        raise ValueError(f"{flat.size} voxels in the data, expected {count} ({'x'.join(map(str, dims))})")
    data = flat.reshape(dims[::-1]).transpose(2, 1, 0).astype(dtype.newbyteorder("="), copy=False)
    directions = np.asarray(matrix).reshape(3, 3)  # row i: the direction of array axis i
    affine = np.eye(4)
    affine[:3, :3] = directions.T * np.asarray(spacing)[None, :]
    affine[:3, 3] = origin
    return data, LPS_TO_RAS @ affine
