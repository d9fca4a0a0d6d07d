"""Writers of tiny source files in each supported format, and a local HTTP file server.

Used by tests/test_sources.py and tests/test_download.py; everything goes under pytest's tmp_path.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import pickle
import socket
import struct
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd


# --- a real HTTP server on 127.0.0.1 -----------------------------------------------------------

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; ``/truncated/<n>`` promises ``n`` bytes and sends 10 before hanging up."""

    def log_message(self, *args: Any) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/truncated/"):
            self.send_response(200)
            self.send_header("Content-Length", self.path.rsplit("/", 1)[1])
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- series ------------------------------------------------------------------------------------

def cube(t: int, n: int, c: int, seed: int = 0) -> np.ndarray:
    """(T, N, C) positive float readings; value = 100*t + 10*n + c + noise, so positions are checkable."""
    rng = np.random.default_rng(seed)
    ti, ni, ci = np.meshgrid(np.arange(t), np.arange(n), np.arange(c), indexing="ij")
    return 100.0 * ti + 10.0 * ni + ci + rng.uniform(0, 0.5, (t, n, c))


# --- PEMS --------------------------------------------------------------------------------------

def write_pems(folder: Path, values: np.ndarray, edges: list[tuple[int, int, float]] | None = None,
               name: str = "PEMS99", value_header: str = "cost") -> tuple[Path, Path | None]:
    """``<name>.npz`` (key data) and ``<name>.csv`` (from,to,cost) as ASTGCN ships them."""
    folder.mkdir(parents=True, exist_ok=True)
    npz = folder / f"{name}.npz"
    np.savez_compressed(npz, data=values)
    csv = None
    if edges is not None:
        csv = folder / f"{name}.csv"
        pd.DataFrame(edges, columns=["from", "to", value_header]).to_csv(csv, index=False)
    return npz, csv


# --- METR-LA (DCRNN) ---------------------------------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote: ``str`` as BINSTRING, numpy under ``numpy.core``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_py2_text(self, obj: str) -> None:
        self.save_py2_str(obj.encode("latin1"))

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_text  # Python 2 wrote dtype codes such as 'f4' as byte strings too

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", "")
        name = name or obj.__qualname__
        if module.startswith("numpy._core"):
            module = module.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
        self.memoize(obj)


def write_py2_pickle(path: Path, obj: Any) -> Path:
    """Pickle ``obj`` (protocol 2) the way a Python 2 DCRNN script did; use bytes for py2 ``str``."""
    with open(path, "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump(obj)
    return path


def write_adj_pkl(path: Path, sensor_ids: list[str], adj: np.ndarray) -> Path:
    """DCRNN ``adj_mx.pkl``: (sensor_ids, sensor_id_to_ind, adj_mx float32) with py2 byte-string ids."""
    ids = [s.encode() for s in sensor_ids]
    return write_py2_pickle(path, (ids, {s: i for i, s in enumerate(ids)}, adj.astype(np.float32)))


def write_metrla_h5(path: Path, values: np.ndarray, sensor_ids: list[str], start: str = "2012-03-01",
                    freq: str = "5min") -> Path:
    """pandas HDF with a (T, N) DataFrame: DatetimeIndex x sensor-id columns (key ``df``)."""
    index = pd.date_range(start, periods=values.shape[0], freq=freq)
    pd.DataFrame(values, index=index, columns=sensor_ids).to_hdf(path, key="df")
    return path


def write_locations(path: Path, sensor_ids: list[str], lat: list[float], lon: list[float]) -> Path:
    """``graph_sensor_locations.csv``: index,sensor_id,latitude,longitude."""
    pd.DataFrame({"index": range(len(sensor_ids)), "sensor_id": sensor_ids, "latitude": lat,
                  "longitude": lon}).to_csv(path, index=False)
    return path


# --- T-GCN -------------------------------------------------------------------------------------

def write_tgcn(folder: Path, values: np.ndarray, sensor_ids: list[str], adj: np.ndarray | None,
               adj_header: list[str] | None = None, name: str = "los") -> tuple[Path, Path | None]:
    """``<name>_speed.csv`` (header = ids, no timestamps) and ``<name>_adj.csv`` (no header)."""
    folder.mkdir(parents=True, exist_ok=True)
    speed = folder / f"{name}_speed.csv"
    pd.DataFrame(values, columns=sensor_ids).to_csv(speed, index=False)
    adj_path = None
    if adj is not None:
        adj_path = folder / f"{name}_adj.csv"
        pd.DataFrame(adj, columns=adj_header).to_csv(adj_path, index=False, header=adj_header is not None)
    return speed, adj_path


# --- bring your own ----------------------------------------------------------------------------

def byo_long(timestamps: pd.DatetimeIndex, sensor_ids: list[str], seed: int = 0) -> pd.DataFrame:
    """Long readings: timestamp, sensor_id, value, flow (time-major)."""
    rng = np.random.default_rng(seed)
    rows = pd.MultiIndex.from_product([timestamps, sensor_ids], names=["timestamp", "sensor_id"])
    df = rows.to_frame(index=False)
    df["value"] = rng.uniform(20, 70, len(df))
    df["flow"] = rng.uniform(100, 900, len(df))
    return df


def write_byo(folder: Path, readings: pd.DataFrame, sensors: pd.DataFrame | None = None,
              edges: pd.DataFrame | None = None, fmt: str = "csv") -> Path:
    """``readings.<fmt>`` (+ ``sensors.csv``, ``edges.csv``) into ``folder``; returns the readings path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"readings.{fmt}"
    if fmt == "parquet":
        readings.to_parquet(path, index=False)
    else:
        readings.to_csv(path, index=False)
    if sensors is not None:
        sensors.to_csv(folder / "sensors.csv", index=False)
    if edges is not None:
        edges.to_csv(folder / "edges.csv", index=False)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut ``path`` to the first ``keep`` fraction of its bytes (a broken download)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
