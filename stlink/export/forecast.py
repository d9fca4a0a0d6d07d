"""Pipeline step ``score``: batch forecasts from an exported ONNX model with onnxruntime.

No PyTorch here: the model is the ``.onnx`` file plus its sidecar (``stlink.export.card``).

Input, one of
  - a processed dataset folder (``data/processed/<dataset>``): the latest window, or a backfill
    over every issue time in ``[start, end]``;
  - a raw dataset folder (``data/raw/<dataset>``, ``readings.parquet`` + ``source.json``);
  - readings in any supported source format (a folder or file parsed by ``stlink.data.sources``).
The issue time of a forecast is the timestamp of the last input step; its targets are the next
``output_len`` steps at the model's frequency.

Before anything runs the input is validated: exactly the model's sensors, the model's
frequency, every scored input window complete (``input_len`` steps on the regular grid, no gap,
no off-grid timestamp, no duplicate reading), readings within the physical bounds, no burst of
more than ``max_missing_run`` consecutive missing readings (NaN or the null value) for a sensor,
then the great-expectations raw suite on the readings used.  Each failure is a ``DataError``
naming the input, the sensor and the timestamp.

Forecasts are computed in chunks of issue times (a tqdm bar counts "rows scored") and streamed
into a file that has no name yet (Linux ``O_TMPFILE``; elsewhere a hidden temporary sibling).
The complete file is read back and validated (no NaN, within bounds, exactly one row per sensor
x horizon step x issue time, correct target times) and only then linked in under its name, so a
failed, interrupted or SIGKILLed run leaves no output and no temporary file.

Output (``docs/conventions.md``): ``sensor_id, issued_at, target_time, horizon_step, value,
model_version``, value in original units, Parquet (or CSV on request).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
import pandas as pd

from stlink.config import ConfigError, DataConfig, Params, ValidationConfig
from stlink.data.formats import DataError, ProcessedData, RawData, load_processed, load_raw
from stlink.data.windows import time_features
from stlink.export.card import INPUT_NAMES, OUTPUT_NAME, ModelCard, read_card
from stlink.io import atomic_path

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
FORMATS = ("parquet", "csv")
OUTPUT_COLUMNS = ("sensor_id", "issued_at", "target_time", "horizon_step", "value", "model_version")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class DeviceError(ConfigError):
    """The requested ``--device`` cannot be what onnxruntime actually runs on."""


class OutputValidationError(DataError):
    """The forecast table failed its own checks (it is not written)."""


# ---------------------------------------------------------------------------------------------
# input -> windows


@dataclass
class Windows:
    """The regular stretch of input the forecasts need, in the model's sensor order.

    values (T, N, C) float32 as read (NaN or the null value where missing), mask (T, N) valid
    channel-0 readings, timestamps (T,) regular at the model's frequency, issue_idx (K,) the
    positions of the issue times (each with ``input_len`` steps up to and including it).
    """

    values: np.ndarray
    mask: np.ndarray
    timestamps: np.ndarray
    issue_idx: np.ndarray
    where: str

    @property
    def issue_times(self) -> np.ndarray:
        return self.timestamps[self.issue_idx]


def _ts(t: Any) -> str:
    return str(pd.Timestamp(t))


def _freq_text(step: pd.Timedelta) -> str:
    """``5min``, ``90s``: the step in the units people write frequencies in."""
    seconds = int(step.total_seconds())
    return f"{seconds // 60}min" if seconds % 60 == 0 else f"{step.total_seconds():g}s"


def source_kind(source: str | None, data_cfg: DataConfig | None) -> str:
    """The loader for readings files: ``source``, else ``data.source`` (``byo`` for synthetic data)."""
    if source:
        return source
    if data_cfg is not None and data_cfg.source != "synthetic":
        return data_cfg.source
    return "byo"


def read_input(path: str | Path, card: ModelCard, *, source: str | None = None,
               data_cfg: DataConfig | None = None) -> ProcessedData | RawData:
    """A processed folder, a raw folder, or readings files of ``source_kind(source, data_cfg)``."""
    from stlink.data.sources import load_source

    path = Path(path)
    if path.is_dir() and (path / "meta.json").is_file() and (path / "values.npy").is_file():
        return load_processed(path)
    if path.is_dir() and (path / "readings.parquet").is_file() and (path / "source.json").is_file():
        return load_raw(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    cfg = dataclasses.replace(data_cfg or DataConfig(), source=source_kind(source, data_cfg), path=str(path),
                              url=None, sha256={}, files={}, channels=list(card.channels),
                              units=list(card.units), null_value=card.null_value)
    raw, _ = load_source(cfg)
    return raw


def sensor_positions(input_ids: list[str], card: ModelCard, where: str) -> np.ndarray:
    """Index of each model sensor in ``input_ids``; unknown or missing sensors are an error."""
    known = set(card.sensor_ids)
    have = set(input_ids)
    unknown = [s for s in dict.fromkeys(input_ids) if s not in known]
    missing = [s for s in card.sensor_ids if s not in have]
    problems = []
    if unknown:
        problems.append(f"unknown sensor ids {unknown[:10]} ({len(unknown)}): the model was trained on "
                        f"{len(known)} other sensors")
    if missing:
        problems.append(f"missing sensors {missing[:10]} ({len(missing)}): no readings for them, and the "
                        f"model needs all of its {len(known)} sensors")
    if problems:
        raise DataError(f"{where}: " + "; ".join(problems))
    return pd.Index(input_ids).get_indexer(card.sensor_ids)


def _check_channels(channels: list[str], card: ModelCard, where: str) -> None:
    if list(channels)[: len(card.channels)] != card.channels:
        raise DataError(f"{where}: channels {list(channels)}, the model reads {card.channels}")


def _check_frequency(step: pd.Timedelta, card: ModelCard, where: str) -> None:
    if step != card.freq:
        raise DataError(f"{where}: wrong frequency: readings are every {_freq_text(step)}, the model was "
                        f"trained on {_freq_text(card.freq)} steps ({card.steps_per_day} per day)")


def issue_positions(timestamps: pd.DatetimeIndex, input_len: int, start: Any, end: Any, where: str) -> np.ndarray:
    """Positions in a regular ``timestamps`` of the issue times asked for.

    No start/end: the last timestamp.  ``end`` only: the last timestamp <= end.  ``start``
    (backfill): every timestamp in ``[start, end or last]``.  Each needs ``input_len`` steps.
    """
    t = len(timestamps)
    first_ok = input_len - 1
    span = f"the input covers {_ts(timestamps[0])} .. {_ts(timestamps[-1])}" if t else "the input is empty"
    lo = pd.Timestamp(start) if start is not None else None
    hi = pd.Timestamp(end) if end is not None else timestamps[-1]
    if lo is not None and lo > hi:
        raise DataError(f"{where}: start {_ts(lo)} is after end {_ts(hi)}")
    inside = np.flatnonzero((timestamps <= hi) & (timestamps >= (lo if lo is not None else timestamps[0])))
    if len(inside) == 0:
        raise DataError(f"{where}: no time step in [{lo if lo is not None else '...'}, {_ts(hi)}]; {span}")
    pos = inside if lo is not None else inside[-1:]
    if pos[0] < first_ok:
        what = "the last window" if lo is None else f"issue time {_ts(timestamps[pos[0]])}"
        raise DataError(
            f"{where}: {what} is too short: {pos[0] + 1} input steps up to {_ts(timestamps[pos[0]])}, the model "
            f"needs input_len={input_len}"
            + (f"; the first possible issue time is {_ts(timestamps[first_ok])}" if t > first_ok else f"; {span}"))
    return pos.astype(np.int64)


def windows_from_processed(data: ProcessedData, card: ModelCard, start: Any, end: Any, where: str) -> Windows:
    """The windows of a processed dataset (already validated at ``prepare``), model sensor order."""
    pos = sensor_positions([str(s) for s in data.sensor_ids], card, where)
    _check_channels(data.meta.get("channels", []), card, where)
    ts = pd.DatetimeIndex(data.timestamps)
    if len(ts) > 1:
        steps = np.unique(np.diff(ts.asi8))
        if len(steps) != 1:
            raise DataError(f"{where}: irregular time index ({len(steps)} different steps)")
        _check_frequency(pd.Timedelta(int(steps[0]), "ns"), card, where)
    issue = issue_positions(ts, card.input_len, start, end, where)
    a, b = issue[0] - card.input_len + 1, issue[-1] + 1  # only the stretch the windows read
    return Windows(values=np.asarray(data.values[a:b][:, pos], dtype=np.float32),
                   mask=np.asarray(data.mask[a:b][:, pos], dtype=bool),
                   timestamps=ts[a:b].to_numpy("datetime64[ns]"), issue_idx=issue - a, where=where)


def _first_irregularity(times: pd.DatetimeIndex, step: pd.Timedelta, issue: pd.Timestamp, where: str) -> None:
    """Raise on the first gap or off-grid step in sorted unique ``times`` (which end at ``issue``)."""
    d = np.diff(times.asi8)
    bad = np.flatnonzero(d != step.value)
    if not len(bad):
        return
    j = int(bad[0])
    a, b, gap = times[j], times[j + 1], pd.Timedelta(int(d[j]), "ns")
    if gap.value % step.value == 0:
        raise DataError(f"{where}: the input window ending {_ts(issue)} is not complete: no readings at "
                        f"{_ts(a + step)}" + (f" .. {_ts(b - step)}" if gap > 2 * step else "")
                        + f" (a gap of {gap // step - 1} step(s) of {_freq_text(step)})")
    raise DataError(f"{where}: irregular time index in the input window ending {_ts(issue)}: {_ts(a)} -> "
                    f"{_ts(b)} is a step of {_freq_text(gap)}, the model's frequency is {_freq_text(step)}")


def windows_from_raw(raw: RawData, card: ModelCard, start: Any, end: Any, where: str) -> Windows:
    """Check the readings of a raw/source input and pivot the needed stretch onto the regular grid."""
    r = raw.readings
    if len(r) == 0:
        raise DataError(f"{where}: no readings")
    sensor_positions(pd.unique(r["sensor_id"].astype(str)).tolist(), card, where)
    _check_channels(raw.channels, card, where)
    times = pd.DatetimeIndex(np.sort(r["timestamp"].unique()))
    L, step = card.input_len, card.freq
    if len(times) < 2:
        raise DataError(f"{where}: the last window is too short: readings at {len(times)} timestamp(s), "
                        f"the model needs input_len={L} steps of {_freq_text(step)}")
    _check_frequency(pd.Series(times[1:] - times[:-1]).mode().iloc[0], card, where)
    hi = pd.Timestamp(end) if end is not None else times[-1]
    at_or_before = times[times <= hi]
    if not len(at_or_before):
        raise DataError(f"{where}: no readings at or before end {_ts(hi)}; the input starts at {_ts(times[0])}")
    anchor = at_or_before[-1]
    if start is None:
        issues = pd.DatetimeIndex([anchor])
    else:
        lo = pd.Timestamp(start)
        if lo > anchor:
            raise DataError(f"{where}: no readings in [{_ts(lo)}, {_ts(hi)}]")
        issues = pd.date_range(anchor - ((anchor - lo) // step) * step, anchor, freq=step)
    grid0 = issues[0] - (L - 1) * step
    if times[0] > grid0:
        n_have = int((issues[0] - times[0]) // step) + 1
        what = "the last window" if start is None else f"the window of issue time {_ts(issues[0])}"
        raise DataError(f"{where}: {what} is too short: {n_have} step(s) of readings from {_ts(times[0])} to "
                        f"{_ts(issues[0])}, the model needs input_len={L} steps of {_freq_text(step)} "
                        f"(from {_ts(grid0)})")
    # from grid0, or from the last reading before it when grid0 itself is missing or off-grid
    first = grid0 if grid0 in times else times[times < grid0][-1]
    _first_irregularity(times[(times >= first) & (times <= anchor)], step, anchor, where)
    grid = pd.date_range(grid0, anchor, freq=step)
    rows = r[(r["timestamp"] >= grid0) & (r["timestamp"] <= anchor)]
    keys = rows[["timestamp", "sensor_id"]].astype({"sensor_id": str})
    dup = keys.duplicated()
    if dup.any():
        twice = keys[dup].iloc[0]
        raise DataError(f"{where}: sensor {twice['sensor_id']!r} has {int(dup.sum())} duplicate reading(s), e.g. "
                        f"two at {_ts(twice['timestamp'])}")
    t_idx = grid.get_indexer(pd.DatetimeIndex(rows["timestamp"]))
    s_idx = pd.Index(card.sensor_ids).get_indexer(keys["sensor_id"])
    values = np.full((len(grid), len(card.sensor_ids), len(card.channels)), np.nan, np.float32)  # (T, N, C)
    values[t_idx, s_idx] = rows[card.channels].to_numpy(np.float32)
    target = values[..., 0]
    mask = np.isfinite(target) & (target != card.null_value)                                       # (T, N)
    return Windows(values=values, mask=mask, timestamps=grid.to_numpy("datetime64[ns]"),
                   issue_idx=grid.get_indexer(issues).astype(np.int64), where=where)


def check_bounds(w: Windows, card: ModelCard, bounds: dict[str, list[float]]) -> None:
    """Every valid reading the windows use lies within its channel's physical bounds."""
    for c, name in enumerate(card.channels):
        if name not in bounds:
            continue
        lo, hi = bounds[name]
        v = w.values[..., c]                                                     # (T, N)
        bad = np.isfinite(v) & (v != card.null_value) & ((v < lo) | (v > hi))
        if bad.any():
            t, n = np.argwhere(bad)[0]
            unit = card.units[c] if c < len(card.units) else ""
            raise DataError(f"{w.where}: {int(bad.sum())} reading(s) of {name!r} outside the physical bounds "
                            f"[{lo}, {hi}] {unit}, e.g. sensor {card.sensor_ids[n]!r} at {_ts(w.timestamps[t])}: "
                            f"{float(v[t, n])}")


def missing_runs(mask: np.ndarray) -> np.ndarray:
    """run[t, n] = number of consecutive missing readings of sensor n ending at step t.  (T, N) int."""
    run = np.zeros(mask.shape, dtype=np.int64)
    count = np.zeros(mask.shape[1], dtype=np.int64)
    for t in range(mask.shape[0]):
        count = np.where(mask[t], 0, count + 1)
        run[t] = count
    return run


def check_missing_runs(w: Windows, card: ModelCard, max_run: int, chunk: int = 1024) -> None:
    """No sensor has more than ``max_run`` consecutive missing readings inside any scored window."""
    L = card.input_len
    run = missing_runs(w.mask)                                                   # (T, N)
    offsets = np.arange(1, L + 1)[None, :, None]                                 # (1, L, 1)
    for a in range(0, len(w.issue_idx), chunk):
        idx = w.issue_idx[a:a + chunk]
        rows = idx[:, None] - L + 1 + np.arange(L)                               # (K, L)
        inside = np.minimum(run[rows], offsets)                                  # (K, L, N) runs cut at window start
        longest = inside.max(axis=1)                                             # (K, N)
        if (longest > max_run).any():
            k, n = np.argwhere(longest > max_run)[0]
            t_end = rows[k, int(inside[k, :, n].argmax())]
            length = int(longest[k, n])
            raise DataError(
                f"{w.where}: sensor {card.sensor_ids[n]!r} has {length} consecutive missing readings (NaN or the "
                f"null value {card.null_value}) from {_ts(w.timestamps[t_end - length + 1])} to "
                f"{_ts(w.timestamps[t_end])}, in the input window ending {_ts(w.timestamps[idx[k]])}; at most "
                f"{max_run} are accepted")


def validate_readings_gx(raw: RawData, w: Windows, validation: ValidationConfig, name: str = "forecast_input") -> None:
    """The great-expectations raw suite on the readings the windows use (``ValidationFailed``)."""
    from stlink.validation import validate_raw

    r = raw.readings
    used = r[(r["timestamp"] >= w.timestamps[0]) & (r["timestamp"] <= w.timestamps[-1])].reset_index(drop=True)
    validate_raw(dataclasses.replace(raw, readings=used), validation, report_dir=None, name=name)


# ---------------------------------------------------------------------------------------------
# onnxruntime


def make_session(onnx_path: str | Path, device: str):
    """An onnxruntime session for ``device`` and the provider that actually runs it.

    ``cpu``: CPU only.  ``auto``: CUDA when the build and the machine allow it, else CPU.
    ``cuda``: ``DeviceError`` unless CUDA is what ``session.get_providers()`` reports active.
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise DeviceError(f"device={device!r}: one of {', '.join(DEVICES)}")
    ort.set_default_logger_severity(3)  # warnings off; errors (a failed CUDA start) are captured below
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise DeviceError(f"device=cuda: this onnxruntime build has no CUDA provider (available: {available}); "
                          "install onnxruntime-gpu or use --device cpu")
    if device == "cpu" or CUDA not in available:
        session = ort.InferenceSession(str(onnx_path), providers=[CPU])
        return session, session.get_providers()[0]
    with native_stderr() as printed:  # a failed CUDA start prints its reason there, not in an exception
        session = ort.InferenceSession(str(onnx_path), providers=[CUDA, CPU])
    active = session.get_providers()
    if CUDA in active:
        sys.stderr.write("".join(f"{line}\n" for line in printed))  # nothing failed: pass it on
    else:
        reason = cuda_failure(printed)
        if device == "cuda":
            raise DeviceError(f"device=cuda: onnxruntime could not start its CUDA provider ({reason}); it would "
                              f"run on {active}; use --device auto or cpu")
        log.warning("device=auto: CUDA provider unavailable (%s); running on %s", reason, active[0])
    return session, active[0]


@contextlib.contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Capture what native code writes to file descriptor 2 inside the block (lines, after it)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def cuda_failure(lines: list[str]) -> str:
    """The reason onnxruntime printed for not starting CUDA (ANSI colours and source locations cut)."""
    text = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in lines]
    errors = [ln.split(" : FAIL : ", 1)[-1] for ln in text if "FAIL" in ln or "CUDA" in ln or "cuda" in ln]
    if not errors:
        return "no usable GPU or CUDA libraries on this machine"
    return errors[0].replace(" with error: ", ": ")[:400]


class OrtRunner:
    """Runs one batch; with ``io_binding`` (CUDA only) inputs are copied once and the output is bound on the GPU."""

    def __init__(self, session, provider: str, io_binding: bool):
        self.session = session
        self.io_binding = io_binding and provider == CUDA

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([OUTPUT_NAME], feed)[0]
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(OUTPUT_NAME, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def batches(w: Windows, card: ModelCard, chunk_size: int) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(issue positions (B,), ONNX feed) per chunk; missing values are replaced by the null value."""
    tod, dow = time_features(w.timestamps)
    L = card.input_len
    for a in range(0, len(w.issue_idx), chunk_size):
        idx = w.issue_idx[a:a + chunk_size]
        rows = idx[:, None] - L + 1 + np.arange(L)                               # (B, L)
        x = w.values[rows]                                                       # (B, L, N, C)
        x = np.where(np.isfinite(x), x, np.float32(card.null_value)).astype(np.float32)
        yield idx, dict(zip(INPUT_NAMES, (x, w.mask[rows], tod[rows], dow[rows])))


# ---------------------------------------------------------------------------------------------
# output table


def forecast_rows(y: np.ndarray, issue_times: np.ndarray, sensor_ids: list[str], freq: pd.Timedelta,
                  model_version: str):
    """Forecasts (B, H, N) -> the long output table (pyarrow), issue-major, then sensor, then step."""
    import pyarrow as pa

    b, h, n = y.shape
    value = y.transpose(0, 2, 1).reshape(-1)                                     # (B*N*H,)
    issued = np.repeat(np.asarray(issue_times, "datetime64[ns]"), n * h)         # (B*N*H,)
    step = np.tile(np.arange(1, h + 1, dtype=np.int32), b * n)                   # (B*N*H,)
    return pa.table({
        "sensor_id": pa.array(np.tile(np.repeat(np.asarray(sensor_ids, dtype=object), h), b), pa.string()),
        "issued_at": pa.array(issued, pa.timestamp("ns")),
        "target_time": pa.array(issued + step.astype(np.int64) * freq.to_timedelta64(), pa.timestamp("ns")),
        "horizon_step": pa.array(step, pa.int32()),
        "value": pa.array(value.astype(np.float32), pa.float32()),
        "model_version": pa.array(np.full(len(value), model_version, dtype=object), pa.string()),
    })


def validate_output(df: pd.DataFrame, *, sensor_ids: list[str], horizon: int, issue_times: np.ndarray,
                    freq: pd.Timedelta, bounds: list[float] | None, model_version: str, where: str) -> None:
    """No NaN, within bounds, exactly one row per sensor x step x issue time, right target times."""
    def fail(msg: str) -> None:
        raise OutputValidationError(f"{where}: output validation failed: {msg}; nothing written")

    if tuple(df.columns) != OUTPUT_COLUMNS:
        fail(f"columns {list(df.columns)}, expected {list(OUTPUT_COLUMNS)}")
    nan = df.isna().any(axis=1).to_numpy()
    if nan.any():
        row = df[nan].iloc[0]
        fail(f"{int(nan.sum())} row(s) with NaN, e.g. sensor {row['sensor_id']!r} issued {row['issued_at']} "
             f"step {row['horizon_step']}")
    if bounds is not None:
        out = ((df["value"] < bounds[0]) | (df["value"] > bounds[1])).to_numpy()
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
        return pd.read_csv(self.fh, dtype={"sensor_id": str, "model_version": str},
                           parse_dates=["issued_at", "target_time"])


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


# ---------------------------------------------------------------------------------------------
# the step


def forecast(model: str | Path, input: str | Path, output: str | Path, *, device: str = "auto",
             start: Any = None, end: Any = None, fmt: str = "parquet", model_version: str | None = None,
             source: str | None = None, data_cfg: DataConfig | None = None,
             validation: ValidationConfig | None = None, gx: bool = True, chunk_size: int = 256,
             max_missing_run: int | None = None, io_binding: bool = True, progress: bool = True,
             on_chunk: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score ``input`` with the ONNX ``model`` and write the forecast table to ``output``.

    ``start``/``end``: issue-time range (see ``issue_positions``); none = the latest window.
    ``model_version``: written in every row (default ``<file>@sha256:<12 hex>``).
    ``validation``: bounds and the great-expectations settings (default: the sidecar's bounds);
    ``gx`` runs the raw suite on readings inputs.  ``max_missing_run``: longest accepted run of
    missing readings per sensor in a window (default ``input_len // 2``).  ``on_chunk(i, rows)``
    is called after each chunk is written (progress hooks, tests).

    Returns a record: output, format, rows, issue_times, first_issue, last_issue, sensors,
    horizon, device, provider (what onnxruntime actually ran on), io_binding, model_version,
    seconds, rows_per_s.
    """
    t0 = time.perf_counter()
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: one of {', '.join(FORMATS)}")
    output = Path(output)
    card = read_card(model)
    session, provider = make_session(model, device)
    validation = validation or ValidationConfig(bounds=card.bounds or ValidationConfig().bounds)
    where = str(input)
    data = read_input(input, card, source=source, data_cfg=data_cfg)
    if isinstance(data, ProcessedData):
        w = windows_from_processed(data, card, start, end, where)
    else:
        w = windows_from_raw(data, card, start, end, where)
    check_bounds(w, card, validation.bounds)
    check_missing_runs(w, card, card.input_len // 2 if max_missing_run is None else max_missing_run)
    if gx and isinstance(data, RawData):
        validate_readings_gx(data, w, validation)

    runner = OrtRunner(session, provider, io_binding)
    log.info("onnxruntime runs %s on %s (device=%s%s)", Path(model).name, provider, device,
             ", IO binding" if runner.io_binding else "")
    version = model_version or card.default_version
    n, h, k = len(card.sensor_ids), card.output_len, len(w.issue_idx)
    from tqdm.auto import tqdm

    with unnamed_file(output) as fh, tqdm(total=k * n * h, desc="rows scored", unit=" rows", unit_scale=True,
                                          disable=not progress) as bar:
        with RowWriter(fh, fmt) as writer:
            for i, (idx, feed) in enumerate(batches(w, card, chunk_size)):
                y = runner(feed)                                                      # (B, H, N)
                writer.write(forecast_rows(y, w.timestamps[idx], card.sensor_ids, card.freq, version))
                bar.update(len(idx) * n * h)
                if on_chunk is not None:
                    on_chunk(i, writer.rows)
            writer.close()
        validate_output(writer.read_back(), sensor_ids=card.sensor_ids, horizon=h, issue_times=w.issue_times,
                        freq=card.freq, bounds=validation.bounds.get(card.channels[0]), model_version=version,
                        where=str(output))
    seconds = time.perf_counter() - t0
    record = {"output": str(output), "format": fmt, "rows": writer.rows, "issue_times": k,
              "first_issue": _ts(w.issue_times[0]), "last_issue": _ts(w.issue_times[-1]), "sensors": n,
              "horizon": h, "device": device, "provider": provider, "io_binding": runner.io_binding,
              "model_version": version, "seconds": seconds, "rows_per_s": writer.rows / max(seconds, 1e-9)}
    log.info("wrote %d forecasts (%d issue times x %d sensors x %d steps) -> %s on %s in %.1fs",
             writer.rows, k, n, h, output, provider, seconds)
    return record


def forecast_step(params: Params, *, model: str | Path, input: str | Path | None = None,
                  output: str | Path | None = None, device: str = "auto", start: Any = None, end: Any = None,
                  fmt: str = "parquet", model_version: str | None = None, source: str | None = None) -> Path:
    """``stlink forecast``: ``input`` defaults to ``params.processed_dir`` (its latest window), ``output``
    to ``reports/<dataset>/forecast.<fmt>``; bounds and the input suite come from ``params.validation``."""
    out = Path(output) if output else params.report_dir / f"forecast.{fmt}"
    record = forecast(model, Path(input) if input else params.processed_dir, out, device=device, start=start,
                      end=end, fmt=fmt, model_version=model_version, source=source, data_cfg=params.data,
                      validation=params.validation)
    print(f"forecast: {record['rows']} rows ({record['issue_times']} issue time(s), {record['first_issue']} .. "
          f"{record['last_issue']}) on {record['provider']} -> {out}")
    return out
