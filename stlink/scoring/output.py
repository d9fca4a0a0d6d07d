"""The forecast table: rows, its own validation, the output location check, the unnamed-then-linked file.

Columns (``docs/conventions.md`` plus the per-sensor verdict):
``sensor_id, issued_at, target_time, horizon_step, value, model_version, status, reason``.
``status`` is ``ok`` (``value`` in original units) or ``no_forecast`` (``value`` null; ``reason`` says why,
see ``stlink.scoring.status``).  Exactly one row per sensor x horizon step x issue time.  When the
model card carries an interval calibration, ``lower_<k>`` / ``upper_<k>`` follow (``stlink.monitoring.intervals``).
"""
from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import pandas as pd

from stlink.errors import ConfigError, DataError, ResourceError
from stlink.io import atomic_path
from stlink.scoring.status import NO_FORECAST, OK, STATUSES

FORMATS = ("parquet", "csv")
OUTPUT_COLUMNS = ("sensor_id", "issued_at", "target_time", "horizon_step", "value", "model_version", "status",
                  "reason")


class OutputValidationError(DataError):
    """The forecast table failed its own checks (it is not written)."""


def check_output_location(output: str | Path, fmt: str) -> Path:
    """Before any scoring: ``output`` must name a file (not a folder) in a folder this process can write.

    ``ConfigError`` for a folder or a wrong format, ``ResourceError`` for a read-only or blocked location."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: one of {', '.join(FORMATS)}")
    output = Path(output)
    if output.is_dir() or str(output).endswith(os.sep):
        raise ConfigError(f"--output {output}: is a folder; name the file, e.g. {output / ('forecast.' + fmt)}")
    parent = output.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ResourceError(errno.ENOTDIR, f"--output {output}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ResourceError(errno.EACCES, f"--output {output}: the folder {parent} is not writable")
    if output.exists() and not os.access(output, os.W_OK) and not os.access(output.parent, os.W_OK):
        raise ResourceError(errno.EACCES, f"--output {output}: cannot be replaced")
    return output


def forecast_rows(y: np.ndarray, issue_times: np.ndarray, sensor_ids: list[str], freq: pd.Timedelta,
                  model_version: str, reasons: np.ndarray | None = None):
    """Forecasts (B, H, N) -> the long output table (pyarrow), issue-major, then sensor, then step.

    ``reasons`` (B, N): '' where the window was usable, else why not (the row's value is null)."""
    import pyarrow as pa

    b, h, n = y.shape
    value = y.transpose(0, 2, 1).reshape(-1).astype(np.float32)                  # (B*N*H,)
    issued = np.repeat(np.asarray(issue_times, "datetime64[ns]"), n * h)         # (B*N*H,)
    step = np.tile(np.arange(1, h + 1, dtype=np.int32), b * n)                   # (B*N*H,)
    reason = (np.full(b * n * h, "", dtype=object) if reasons is None
              else np.repeat(np.asarray(reasons, dtype=object).reshape(-1), h))  # (B*N*H,)
    bad = reason != ""
    status = np.where(bad, NO_FORECAST, OK).astype(object)
    return pa.table({
        "sensor_id": pa.array(np.tile(np.repeat(np.asarray(sensor_ids, dtype=object), h), b), pa.string()),
        "issued_at": pa.array(issued, pa.timestamp("ns")),
        "target_time": pa.array(issued + step.astype(np.int64) * freq.to_timedelta64(), pa.timestamp("ns")),
        "horizon_step": pa.array(step, pa.int32()),
        "value": pa.array(value, pa.float32(), mask=bad),
        "model_version": pa.array(np.full(len(value), model_version, dtype=object), pa.string()),
        "status": pa.array(status, pa.string()),
        "reason": pa.array(reason, pa.string()),
    })


def validate_output(df: pd.DataFrame, *, sensor_ids: list[str], horizon: int, issue_times: np.ndarray,
                    freq: pd.Timedelta, bounds: list[float] | None, model_version: str, where: str) -> dict[str, int]:
    """``ok`` rows: no NaN, within bounds; ``no_forecast`` rows: a reason; exactly one row per sensor x step x
    issue time, right target times.  Returns ``{"ok": rows, "no_forecast": rows}``."""
    def fail(msg: str) -> None:
        raise OutputValidationError(f"{where}: output validation failed: {msg}; nothing written")

    extra = [c for c in df.columns[len(OUTPUT_COLUMNS):] if not c.startswith(("lower_", "upper_"))]
    if tuple(df.columns[:len(OUTPUT_COLUMNS)]) != OUTPUT_COLUMNS or extra:
        fail(f"columns {list(df.columns)}, expected {list(OUTPUT_COLUMNS)} (then lower_<k>/upper_<k> intervals)")
    unknown = ~df["status"].isin(STATUSES)
    if unknown.any():
        fail(f"status {df.loc[unknown, 'status'].iloc[0]!r}: one of {', '.join(STATUSES)}")
    ok = (df["status"] == OK).to_numpy()
    reason = df["reason"].fillna("").astype(str)
    no_reason = ~ok & (reason == "").to_numpy()
    if no_reason.any():
        fail(f"{int(no_reason.sum())} {NO_FORECAST} row(s) without a reason")
    nan = (df[[c for c in OUTPUT_COLUMNS if c not in ("value", "reason")]].isna().any(axis=1).to_numpy() | (ok & df["value"].isna().to_numpy()))
    if nan.any():
        row = df[nan].iloc[0]
        fail(f"{int(nan.sum())} row(s) with NaN, e.g. sensor {row['sensor_id']!r} issued {row['issued_at']} "
             f"step {row['horizon_step']}")
    if bounds is not None:
        v = df["value"].to_numpy()
        out = ok & ((v < bounds[0]) | (v > bounds[1]))
        if out.any():
            row = df[out].iloc[0]
            fail(f"{int(out.sum())} forecast(s) outside the physical bounds {bounds}, e.g. sensor "
                 f"{row['sensor_id']!r} at {row['target_time']}: {row['value']}")
    expected = len(sensor_ids) * horizon * len(issue_times)
    keys = df[["sensor_id", "issued_at", "horizon_step"]]
    if keys.duplicated().any():
        fail(f"{int(keys.duplicated().sum())} duplicate (sensor_id, issued_at, horizon_step) row(s)")
    if len(df) != expected or not pd.Index(df["sensor_id"].unique()).isin(sensor_ids).all() or \
            not pd.Index(df["horizon_step"].unique()).isin(range(1, horizon + 1)).all() or \
            not pd.DatetimeIndex(df["issued_at"].unique()).isin(pd.DatetimeIndex(issue_times)).all():
        fail(f"{len(df)} rows, expected one per sensor x step x issue time = {len(sensor_ids)} x {horizon} x "
             f"{len(issue_times)} = {expected}")
    target = pd.DatetimeIndex(df["issued_at"]) + df["horizon_step"].to_numpy() * freq
    if (pd.DatetimeIndex(df["target_time"]) != target).any():
        fail("target_time != issued_at + horizon_step x frequency")
    if (df["model_version"] != model_version).any():
        fail(f"model_version differs from {model_version!r}")
    return {OK: int(ok.sum()), NO_FORECAST: int((~ok).sum())}


class RowWriter:
    """Appends pyarrow tables to an open binary file as Parquet or CSV, and reads the file back."""

    def __init__(self, fh: BinaryIO, fmt: str):
        self.fh, self.fmt = fh, fmt
        self.parquet = None
        self.rows = 0

    def write(self, table) -> None:
        import pyarrow.parquet as pq

        if self.fmt == "parquet":
            if self.parquet is None:
                self.parquet = pq.ParquetWriter(self.fh, table.schema)
            self.parquet.write_table(table)
        else:
            text = table.to_pandas().to_csv(index=False, header=self.rows == 0, date_format="%Y-%m-%d %H:%M:%S")
            self.fh.write(text.encode())
        self.rows += table.num_rows

    def close(self) -> None:
        if self.parquet is not None:
            self.parquet.close()
            self.parquet = None
        self.fh.flush()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        """Close the Parquet writer on every path (the unnamed file itself is discarded on errors)."""
        if self.parquet is not None:
            self.parquet.close()
            self.parquet = None

    def read_back(self) -> pd.DataFrame:
        import pyarrow.parquet as pq

        self.fh.seek(0)
        if self.fmt == "parquet":
            return pq.read_table(self.fh).to_pandas()
        return read_csv_output(self.fh)


def read_csv_output(fh) -> pd.DataFrame:
    """A forecast CSV with the output's dtypes (empty reasons stay '')."""
    return pd.read_csv(fh, dtype={"sensor_id": str, "model_version": str, "status": str, "reason": str},
                       keep_default_na=False, na_values={"value": [""]}, parse_dates=["issued_at", "target_time"])


def write_table(df: pd.DataFrame, output: str | Path, fmt: str) -> None:
    """A whole table to ``output``, atomically (temporary sibling, then rename)."""
    with atomic_path(output, f".{fmt}") as tmp:
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False, date_format="%Y-%m-%d %H:%M:%S")


def _link_fd(fd: int, path: Path) -> None:
    """Give the ``O_TMPFILE`` file ``fd`` the name ``path``: linkat(/proc/self/fd/<fd>, AT_SYMLINK_FOLLOW).

    A ``src_dir_fd`` is passed so that CPython calls ``linkat`` (plain ``link`` would not follow
    the /proc symlink and fails with EXDEV).
    """
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(str(fd), path, src_dir_fd=proc, follow_symlinks=True)
    finally:
        os.close(proc)


@contextlib.contextmanager
def unnamed_file(target: Path) -> Iterator[BinaryIO]:
    """An open file in ``target``'s folder that gets the name ``target`` only if the block succeeds.

    On Linux the file is created with ``O_TMPFILE`` (no name at all): an exception, a crash or
    SIGKILL leaves nothing behind.  Where ``O_TMPFILE`` is unavailable it is a hidden temporary
    sibling (``stlink.io.atomic_path``), removed on exceptions.  Folders created for ``target``
    are removed again on failure when they are still empty.
    """
    target = Path(target)
    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        try:
            fd = os.open(target.parent, os.O_TMPFILE | os.O_RDWR, 0o644)
        except (AttributeError, OSError):  # not Linux, or the file system has no O_TMPFILE
            with atomic_path(target, target.suffix) as tmp, open(tmp, "w+b") as fh:
                yield fh
            return
        with os.fdopen(fd, "w+b") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
            link = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            _link_fd(fd, link)
            try:
                os.replace(link, target)
            finally:
                if link.exists():
                    link.unlink()
    except BaseException:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
