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
from typing import BinaryIO, Iterable, Iterator

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


class OutputValidator:
    """``validate_output`` one chunk of rows at a time, with running checks (bounded memory).

    Per chunk: columns, status, reasons, NaN, bounds, sensor ids, steps, target times, model version.
    Across chunks, exactly one row per (sensor, issue time, step) is checked with state that grows with
    the number of issue times (a row count per issue time), not with the rows: an issue time is *open*
    while consecutive chunks hold its rows (their keys are kept, bounded by the rows of one chunk plus
    one issue time's N x H), *closed* when a chunk without it follows; rows of a closed issue time
    are refused.  The scorer writes every issue time's rows together (chunks cover disjoint, ascending
    issue times), so its tables never reopen one.  ``finish()`` checks the totals.
    """

    KEYS = ["sensor_id", "issued_at", "horizon_step"]

    def __init__(self, *, sensor_ids: list[str], horizon: int, issue_times: np.ndarray, freq: pd.Timedelta,
                 bounds: list[float] | None, model_version: str, where: str):
        self.sensor_ids, self.horizon, self.freq = list(sensor_ids), int(horizon), freq
        self.bounds, self.model_version, self.where = bounds, model_version, where
        self.expected_issues = pd.DatetimeIndex(issue_times).as_unit("ns")
        self.known_sensors = pd.Index(self.sensor_ids)
        self.per_issue = len(self.sensor_ids) * self.horizon
        self.open = pd.DataFrame({"sensor_id": pd.Series([], dtype=object),
                                  "issued_at": pd.Series([], dtype="datetime64[ns]"),
                                  "horizon_step": pd.Series([], dtype=np.int64)})
        self.counts: dict[int, int] = {}     # issue time (ns) -> rows, every issue time seen (K entries)
        self.closed: set[int] = set()
        self.rows = self.ok = self.chunks = 0
        self.columns: list[str] | None = None

    def fail(self, msg: str) -> None:
        raise OutputValidationError(f"{self.where}: output validation failed: {msg}; nothing written")

    def expected_text(self, rows: int) -> str:
        k = len(self.expected_issues)
        return (f"{rows} rows, expected one per sensor x step x issue time = {len(self.sensor_ids)} x "
                f"{self.horizon} x {k} = {self.per_issue * k}")

    def add(self, df: pd.DataFrame) -> None:
        """Check one chunk of rows (any split of the table; the scorer's chunks are whole issue times)."""
        fail = self.fail
        cols = list(df.columns)
        extra = [c for c in cols[len(OUTPUT_COLUMNS):] if not c.startswith(("lower_", "upper_"))]
        if tuple(cols[:len(OUTPUT_COLUMNS)]) != OUTPUT_COLUMNS or extra or \
                (self.columns is not None and cols != self.columns):
            fail(f"columns {cols}, expected {list(OUTPUT_COLUMNS)} (then lower_<k>/upper_<k> intervals)")
        self.columns = cols
        unknown = ~df["status"].isin(STATUSES)
        if unknown.any():
            fail(f"status {df.loc[unknown, 'status'].iloc[0]!r}: one of {', '.join(STATUSES)}")
        ok = (df["status"] == OK).to_numpy()
        reason = df["reason"].fillna("").astype(str)
        no_reason = ~ok & (reason == "").to_numpy()
        if no_reason.any():
            fail(f"{int(no_reason.sum())} {NO_FORECAST} row(s) without a reason")
        nan = (df[[c for c in OUTPUT_COLUMNS if c not in ("value", "reason")]].isna().any(axis=1).to_numpy()
               | (ok & df["value"].isna().to_numpy()))
        if nan.any():
            row = df[nan].iloc[0]
            fail(f"{int(nan.sum())} row(s) with NaN, e.g. sensor {row['sensor_id']!r} issued {row['issued_at']} "
                 f"step {row['horizon_step']}")
        if self.bounds is not None:
            v = df["value"].to_numpy()
            out = ok & ((v < self.bounds[0]) | (v > self.bounds[1]))
            if out.any():
                row = df[out].iloc[0]
                fail(f"{int(out.sum())} forecast(s) outside the physical bounds {self.bounds}, e.g. sensor "
                     f"{row['sensor_id']!r} at {row['target_time']}: {row['value']}")
        if not pd.Index(df["sensor_id"].unique()).isin(self.known_sensors).all() or \
                not pd.Index(df["horizon_step"].unique()).isin(range(1, self.horizon + 1)).all() or \
                not pd.DatetimeIndex(df["issued_at"].unique()).isin(self.expected_issues).all():
            fail(self.expected_text(len(df)) + " (rows of other sensors, steps or issue times)")
        target = pd.DatetimeIndex(df["issued_at"]) + df["horizon_step"].to_numpy() * self.freq
        if (pd.DatetimeIndex(df["target_time"]) != target).any():
            fail("target_time != issued_at + horizon_step x frequency")
        if (df["model_version"] != self.model_version).any():
            fail(f"model_version differs from {self.model_version!r}")
        self._add_keys(df[self.KEYS])
        self.rows += len(df)
        self.ok += int(ok.sum())
        self.chunks += 1

    def _add_keys(self, keys: pd.DataFrame) -> None:
        """Uniqueness across chunks: duplicates within the open issue times; a closed issue time may not return."""
        issued_at = pd.DatetimeIndex(keys["issued_at"]).as_unit("ns")
        keys = keys.assign(issued_at=issued_at, horizon_step=keys["horizon_step"].astype(np.int64))
        issued = issued_at.asi8                                                      # (rows,)
        here, n_here = np.unique(issued, return_counts=True)
        back = [t for t in here.tolist() if t in self.closed]
        if back:
            self.fail(f"rows of issue time {pd.Timestamp(back[0])} after rows of other issue times: duplicate "
                      f"(sensor_id, issued_at, horizon_step) row(s) or rows out of order")
        open_issued = pd.DatetimeIndex(self.open["issued_at"]).asi8
        still = np.isin(open_issued, here)
        self.closed.update(np.unique(open_issued[~still]).tolist())
        keys = pd.concat([self.open[still], keys], ignore_index=True)
        dup = keys.duplicated()
        if dup.any():
            self.fail(f"{int(dup.sum())} duplicate (sensor_id, issued_at, horizon_step) row(s)")
        self.open = keys
        for t, c in zip(here.tolist(), n_here.tolist()):
            self.counts[t] = self.counts.get(t, 0) + c

    def finish(self) -> dict[str, int]:
        """The totals: every issue time asked for, N x H rows each.  Returns ``{"ok": rows, "no_forecast": rows}``."""
        expected = self.per_issue * len(self.expected_issues)
        short = [t for t in self.expected_issues.asi8.tolist() if self.counts.get(t, 0) != self.per_issue]
        if self.rows != expected or short or len(self.counts) != len(self.expected_issues):
            self.fail(self.expected_text(self.rows)
                      + (f"; issue time {pd.Timestamp(short[0])} has {self.counts.get(short[0], 0)}" if short else ""))
        return {OK: self.ok, NO_FORECAST: self.rows - self.ok}


def validate_output(df: pd.DataFrame, **kwargs) -> dict[str, int]:
    """``ok`` rows: no NaN, within bounds; ``no_forecast`` rows: a reason; exactly one row per sensor x step x
    issue time, right target times.  A whole table in memory; see ``validate_chunks`` for a long one.
    Keywords: sensor_ids, horizon, issue_times, freq, bounds, model_version, where.
    Returns ``{"ok": rows, "no_forecast": rows}``."""
    return validate_chunks([df], **kwargs)


def validate_chunks(chunks: Iterable[pd.DataFrame], **kwargs) -> dict[str, int]:
    """``validate_output`` over a table given chunk by chunk (``OutputValidator``); memory: one chunk."""
    v = OutputValidator(**kwargs)
    for df in chunks:
        v.add(df)
    return v.finish()


def read_row_group(pf, i: int) -> pd.DataFrame:
    """Row group ``i`` of an open ``pyarrow.parquet.ParquetFile`` as a DataFrame (the only parquet read of
    ``output_chunks``)."""
    return pf.read_row_group(i).to_pandas()


def output_chunks(source, fmt: str, csv_rows: int = 1 << 18) -> Iterator[pd.DataFrame]:
    """A forecast table (a path or an open binary file) chunk by chunk: Parquet row groups (the scorer
    writes one or more per chunk of issue times), CSV ``csv_rows`` rows at a time."""
    import pyarrow.parquet as pq

    if hasattr(source, "seek"):
        source.seek(0)
    if fmt == "parquet":
        pf = pq.ParquetFile(source)
        for i in range(pf.num_row_groups):
            yield read_row_group(pf, i)
        return
    yield from read_csv_output(source, chunksize=max(1, int(csv_rows)))


class RowWriter:
    """Appends pyarrow tables to an open binary file as Parquet or CSV (read back with ``output_chunks``)."""

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


def read_csv_output(fh, chunksize: int | None = None):
    """A forecast CSV with the output's dtypes (empty reasons stay ''); with ``chunksize`` an iterator of
    DataFrames of that many rows."""
    return pd.read_csv(fh, dtype={"sensor_id": str, "model_version": str, "status": str, "reason": str},
                       keep_default_na=False, na_values={"value": [""]}, parse_dates=["issued_at", "target_time"],
                       chunksize=chunksize)


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
