"""ADM-style ``.npz`` files (``arr_0``: uint8 N x H x W x 3 images, ``arr_1``: labels) written
and read in pieces, so 50,000 images at 512 px never have to sit in memory at once."""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import numpy as np

from dis_dist.errors import DataError

# What reading a damaged or foreign file as an .npz raises.
NPZ_ERRORS = (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError)


def write_npz(path: str | Path, arrays: dict[str, tuple[tuple[int, ...], np.dtype, Iterable[np.ndarray]]]) -> None:
    """Write each ``name: (shape, dtype, pieces)``, pieces concatenated along axis 0, as
    ``name.npy`` in an uncompressed zip that ``np.load`` reads. Written to a temporary name
    and renamed, so the file is either complete or absent."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, (shape, dtype, pieces) in arrays.items():
            dtype = np.dtype(dtype)
            written = 0
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(f, header)
                for piece in pieces:
                    piece = np.ascontiguousarray(piece, dtype=dtype)
                    if piece.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"{name}: a piece of shape {piece.shape} in an array of shape {shape}")
                    f.write(piece.tobytes())
                    written += piece.shape[0]
            if written != shape[0]:
                raise ValueError(f"{name}: {written} rows written, {shape[0]} declared")
    tmp.replace(path)


def npz_keys(path: str | Path) -> list[str]:
    """The arrays an ``.npz`` holds; DataError naming it when it is not a zip file."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]
    except NPZ_ERRORS as e:
        raise DataError(f"{str(path)!r} is not an .npz (zip) file: {e}") from None


def _read_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


def npz_header(path: str | Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array of an ``.npz``, from its header (nothing else is read)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            shape, _, dtype = _read_header(f)
    except NPZ_ERRORS as e:
        raise DataError(f"{str(path)!r}: {key} is not a readable array ({type(e).__name__}: {e})") from None
    return shape, dtype


def iter_npz(path: str | Path, key: str, batch: int) -> Iterator[np.ndarray]:
    """Rows of one array of an ``.npz``, ``batch`` at a time, read from the file as they go;
    DataError naming the file when it is damaged."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            shape, fortran, dtype = _read_header(f)
            if fortran or dtype.hasobject:
                raise ValueError(f"{key} is stored {'in Fortran order' if fortran else 'as Python objects'}")
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch):
                n = min(batch, shape[0] - start)
                yield np.frombuffer(f.read(n * row), dtype=dtype).reshape((n, *shape[1:]))
    except NPZ_ERRORS as e:
        raise DataError(f"{str(path)!r}: {key} is damaged ({type(e).__name__}: {e})") from None
