"""T-GCN (LOS-LOOP, SZ-taxi): wide ``*_speed.csv`` (header = sensor ids, no timestamps) + dense ``*_adj.csv``."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stlink.data.formats import RawData
from stlink.data.sources.common import (TIME_COLUMNS, channel_names, long_from_cube, raw_header, read_csv,
                                        read_dense_matrix, reorder, sensors_frame, source_meta, timestamps_from,
                                        to_float, to_timestamps)
from stlink.errors import DataError

if TYPE_CHECKING:
    from stlink.config import DataConfig


def load(cfg: "DataConfig", f: dict[str, Path | None]) -> RawData:
    return load_tgcn(f["speed"], f["adj"], cfg.start_time, cfg.freq, cfg.channels, cfg.null_value, units=cfg.units)


def load_tgcn(speed_csv: Path, adj_csv: Path | None, start_time: str | None, freq: str | None,
              channels: list[str], null_value: float, units: list[str] | None = None) -> RawData:
    """T-GCN wide CSV (header = sensor ids, one row per step) + dense adjacency CSV.

    A first column named timestamp/time/date/datetime gives the timestamps; otherwise they
    are built from ``start_time`` + ``freq``.
    """
    speed_csv = Path(speed_csv)
    df = read_csv(speed_csv)
    header = raw_header(speed_csv)
    df.columns = header if len(header) == df.shape[1] else df.columns
    if len(df) == 0:
        raise DataError(f"{speed_csv}: header only, no rows")
    if str(df.columns[0]).lower() in TIME_COLUMNS:
        timestamps = to_timestamps(df.iloc[:, 0], speed_csv, str(df.columns[0]))
        df = df.iloc[:, 1:]
    else:
        timestamps = timestamps_from(start_time, freq, len(df), speed_csv)
    ids = [str(c) for c in df.columns]
    if not ids:
        raise DataError(f"{speed_csv}: no sensor columns")
    values = np.column_stack([to_float(df.iloc[:, j], speed_csv, ids[j]) for j in range(len(ids))])  # (T, N)
    names = channel_names(channels, 1)
    adjacency = None
    if adj_csv is not None:
        mat, adj_ids = read_dense_matrix(Path(adj_csv))
        if adj_ids is not None:
            adjacency = reorder(mat, adj_ids, ids, Path(adj_csv))
        elif mat.shape[0] != len(ids):
            raise DataError(f"{adj_csv}: adjacency is {mat.shape[0]} x {mat.shape[1]} but {speed_csv} "
                            f"has {len(ids)} sensors")
        else:
            adjacency = mat
    return RawData(
        readings=long_from_cube(values[:, :, None], timestamps, ids, names),
        sensors=sensors_frame(ids),
        adjacency=adjacency,
        meta=source_meta("tgcn", [speed_csv, adj_csv and Path(adj_csv)], null_value, names, units, freq,
                         "weight" if adjacency is not None else None),
    )
