"""The two on-disk contracts of the data layer.

``RawData`` (``data/raw/<dataset>/``): what a source said, parsed but not repaired, so that
validation can judge it.  Every loader returns one.
  readings.parquet  long table: timestamp (datetime64[ns]), sensor_id (str), one float column per channel
  sensors.csv       sensor_id, lat, lon (lat/lon empty when unknown); row order = sensor order
  edges.csv         from, to, value  (graph as an edge list; value is a distance or a weight), or
  adjacency.npy     dense [N, N] matrix in sensor order
  source.json       source kind, files and their sha256, null value, channels, units, declared freq
  source/           the source files as read (copies; a link inside data.path is copied as its target)

``ProcessedData`` (``data/processed/<dataset>/``): the regular tensors every model reads.
  values.npy [T, N, C] float32, mask.npy [T, N] bool (valid target readings), timestamps.npy [T]
  datetime64[ns], adjacency.npy [N, N] float32, coords.npy [N, 2] (when known), sensor_ids.json,
  meta.json (frequency, steps per day, null value, channels, units, source, checksum, splits, scaler)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stlink.errors import DataError  # noqa: F401  (re-exported: the one error root is stlink.errors)
from stlink.io import atomic_dir, write_json


@dataclass
class RawData:
    readings: pd.DataFrame                 # long: timestamp, sensor_id, <channels>
    sensors: pd.DataFrame                  # sensor_id, lat, lon
    edges: pd.DataFrame | None = None      # from, to, value
    adjacency: np.ndarray | None = None    # [N, N] in sensors order
    meta: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None         # content hash of data/raw/<dataset>/ (load_raw); None in memory

    @property
    def channels(self) -> list[str]:
        return [c for c in self.readings.columns if c not in ("timestamp", "sensor_id")]

    @property
    def sensor_ids(self) -> list[str]:
        return self.sensors["sensor_id"].astype(str).tolist()


def without_sensors(raw: RawData, drop: list[str] | set[str]) -> RawData:
    """``raw`` without the sensors ``drop``: their readings, their rows in sensors, every edge that
    touches them and their rows and columns of a dense adjacency."""
    drop = {str(s) for s in drop}
    if not drop:
        return raw
    keep = ~raw.sensors["sensor_id"].astype(str).isin(drop).to_numpy()          # (N,)
    edges = raw.edges
    if edges is not None:
        touches = edges["from"].astype(str).isin(drop) | edges["to"].astype(str).isin(drop)
        edges = edges[~touches].reset_index(drop=True)
    adjacency = raw.adjacency
    if adjacency is not None and adjacency.ndim == 2 and adjacency.shape == (len(keep), len(keep)):
        idx = np.flatnonzero(keep)
        adjacency = adjacency[np.ix_(idx, idx)]                                  # (N', N')
    readings = raw.readings[~raw.readings["sensor_id"].astype(str).isin(drop)].reset_index(drop=True)
    return RawData(readings, raw.sensors[keep].reset_index(drop=True), edges, adjacency, dict(raw.meta),
                   raw.fingerprint)


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 over every file of ``folder`` (relative name and content hash), in name order."""
    import hashlib

    from stlink.io import sha256_file

    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder).as_posix()}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def save_raw(raw: RawData, folder: str | Path, extra_files: dict[str, Path] | None = None) -> None:
    """Atomically (re)write ``folder`` with ``raw``; ``extra_files`` are copied under source/."""
    import shutil

    with atomic_dir(folder) as tmp:
        raw.readings.to_parquet(tmp / "readings.parquet", index=False)
        raw.sensors.to_csv(tmp / "sensors.csv", index=False)
        if raw.edges is not None:
            raw.edges.to_csv(tmp / "edges.csv", index=False)
        if raw.adjacency is not None:
            np.save(tmp / "adjacency.npy", np.asarray(raw.adjacency, dtype=np.float32))
        for name, src in (extra_files or {}).items():
            (tmp / "source").mkdir(exist_ok=True)
            shutil.copy2(src, tmp / "source" / name)
        write_json(tmp / "source.json", raw.meta)


def load_raw(folder: str | Path) -> RawData:
    folder = Path(folder)
    if not (folder / "readings.parquet").exists():
        raise DataError(f"{folder}: no readings.parquet; run `stlink ingest` first")
    readings = pd.read_parquet(folder / "readings.parquet")
    sensors = pd.read_csv(folder / "sensors.csv", dtype={"sensor_id": str})
    edges = None
    if (folder / "edges.csv").exists():
        edges = pd.read_csv(folder / "edges.csv", dtype={"from": str, "to": str})
    adjacency = np.load(folder / "adjacency.npy") if (folder / "adjacency.npy").exists() else None
    meta = json.loads((folder / "source.json").read_text())
    return RawData(readings, sensors, edges, adjacency, meta, fingerprint=folder_fingerprint(folder))


@dataclass
class ProcessedData:
    values: np.ndarray        # [T, N, C] float32
    mask: np.ndarray          # [T, N] bool, valid target (channel 0) readings
    timestamps: np.ndarray    # [T] datetime64[ns]
    adjacency: np.ndarray     # [N, N] float32
    sensor_ids: list[str]
    meta: dict[str, Any]
    coords: np.ndarray | None = None  # [N, 2] lat, lon

    @property
    def steps_per_day(self) -> int:
        return int(self.meta["steps_per_day"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.values.shape)  # type: ignore[return-value]


def save_processed(data: ProcessedData, folder: str | Path, check=None) -> None:
    """Atomically write ``data``; ``check(tmp_folder)`` may raise to abort before the swap."""
    with atomic_dir(folder) as tmp:
        np.save(tmp / "values.npy", data.values.astype(np.float32))
        np.save(tmp / "mask.npy", data.mask.astype(bool))
        np.save(tmp / "timestamps.npy", data.timestamps.astype("datetime64[ns]"))
        np.save(tmp / "adjacency.npy", data.adjacency.astype(np.float32))
        if data.coords is not None:
            np.save(tmp / "coords.npy", data.coords.astype(np.float64))
        (tmp / "sensor_ids.json").write_text(json.dumps(list(map(str, data.sensor_ids))))
        write_json(tmp / "meta.json", data.meta)
        if check is not None:
            check(tmp)


def load_processed(folder: str | Path, mmap: bool = False) -> ProcessedData:
    folder = Path(folder)
    if not (folder / "meta.json").exists():
        raise DataError(f"{folder}: no processed dataset here; run `stlink prepare` first")
    mode = "r" if mmap else None
    coords = np.load(folder / "coords.npy") if (folder / "coords.npy").exists() else None
    return ProcessedData(
        values=np.load(folder / "values.npy", mmap_mode=mode),
        mask=np.load(folder / "mask.npy", mmap_mode=mode),
        timestamps=np.load(folder / "timestamps.npy"),
        adjacency=np.load(folder / "adjacency.npy"),
        sensor_ids=json.loads((folder / "sensor_ids.json").read_text()),
        meta=json.loads((folder / "meta.json").read_text()),
        coords=coords,
    )
