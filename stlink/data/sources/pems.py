"""PEMS0x (ASTGCN/STSGCN): ``PEMS0x.npz`` (key ``data``, [T, N, C] or [T, N]) + edge list ``from,to,cost``.

The npz carries no timestamps: they come from ``data.start_time`` + ``data.freq``.  Read with
``allow_pickle=False``: an object array (a pickle inside the npz) is refused, never loaded.
"""
from __future__ import annotations

import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stlink.data.formats import RawData
from stlink.data.sources.common import (channel_names, long_from_cube, read_edges, reason, require_file,
                                        sensors_frame, source_meta, timestamps_from)
from stlink.errors import DataError

if TYPE_CHECKING:
    from stlink.config import DataConfig


def load(cfg: "DataConfig", f: dict[str, Path | None]) -> RawData:
    return load_pems(f["data"], f["edges"], cfg.start_time, cfg.freq, cfg.channels, cfg.null_value,
                     sensor_ids=f["sensor_ids"], units=cfg.units)


def load_pems(npz: Path, edges_csv: Path | None, start_time: str | None, freq: str | None,
              channels: list[str], null_value: float, sensor_ids: Path | list[str] | None = None,
              units: list[str] | None = None) -> RawData:
    """PEMS0x ``npz`` (key ``data``, [T, N, C] or [T, N]); timestamps from ``start_time`` + ``freq``.

    Sensors are ``0..N-1`` unless ``sensor_ids`` (a list, or a text file with one id per line)
    names them in node order (PEMS03 ships ``PEMS03.txt`` of station ids).
    """
    npz = require_file(Path(npz))
    values = read_npz(npz)
    if values.ndim == 2:
        values = values[:, :, None]                                # (T, N, 1)
    if values.ndim != 3 or not np.issubdtype(values.dtype, np.number):
        raise DataError(f"{npz}: 'data' must be numeric [T, N, C] or [T, N], got {values.dtype} {values.shape}")
    t, n, c = values.shape
    if isinstance(sensor_ids, (str, Path)):
        ids_path = require_file(Path(sensor_ids))
        ids = [s.strip() for s in ids_path.read_text().replace(",", "\n").splitlines() if s.strip()]
    else:
        ids_path = None
        ids = [str(s) for s in sensor_ids] if sensor_ids is not None else [str(i) for i in range(n)]
    if len(ids) != n:
        raise DataError(f"{ids_path or 'sensor_ids'}: {len(ids)} sensor ids for {n} sensors in {npz}")
    names = channel_names(channels, c)
    timestamps = timestamps_from(start_time, freq, t, npz)
    edges, kind = read_edges(Path(edges_csv)) if edges_csv is not None else (None, None)
    return RawData(
        readings=long_from_cube(values, timestamps, ids, names),
        sensors=sensors_frame(ids),
        edges=edges,
        meta=source_meta("pems", [npz, edges_csv and Path(edges_csv), ids_path], null_value, names, units,
                         freq, kind),
    )


def read_npz(path: Path) -> np.ndarray:
    """Array ``data`` of an npz (a plain .npy array is accepted too); pickled object arrays are refused."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded
        with loaded:
            keys = list(loaded.files)
            values = np.asarray(loaded["data"]) if "data" in keys else None
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
            raise DataError(f"{path}: holds a pickled object array; refused (data files are data, "
                            "not code: save it as a numeric array)") from None
        raise DataError(f"{path}: not a readable npz: {reason(exc)}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DataError(f"{path}: not a readable npz: {reason(exc)}") from None
    if values is None:
        raise DataError(f"{path}: no array 'data' (found {keys})")
    return values
