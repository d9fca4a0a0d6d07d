"""Scoring input -> the regular stretch of readings the forecasts need (``Windows``).

Structural checks only: the input must be readable, hold at least one of the model's sensors,
carry the model's channels and frequency, be long enough for the first issue time, and have no
off-grid timestamps or duplicate readings.  Whether each sensor's window is usable is decided per
sensor in ``stlink.scoring.status``.  A timestamp that no sensor reported is a gap in the input
(structural); a sensor's absent rows are its missing readings.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stlink.config import DataConfig
from stlink.data.formats import ProcessedData, RawData, load_processed, load_raw
from stlink.errors import ConfigError, DataError
from stlink.export.card import ModelCard

log = logging.getLogger(__name__)


@dataclass
class Windows:
    """The regular stretch of input the forecasts need, in the model's sensor order.

    values (T, N, C) float32 as read (NaN or the null value where missing), mask (T, N) valid
    channel-0 readings, timestamps (T,) regular at the model's frequency, issue_idx (K,) the
    positions of the issue times (each with ``input_len`` steps up to and including it),
    absent: model sensors the input has no readings for at all.
    """

    values: np.ndarray
    mask: np.ndarray
    timestamps: np.ndarray
    issue_idx: np.ndarray
    where: str
    absent: tuple[str, ...] = ()

    @property
    def issue_times(self) -> np.ndarray:
        return self.timestamps[self.issue_idx]


def ts_text(t: Any) -> str:
    return str(pd.Timestamp(t))


def freq_text(step: pd.Timedelta) -> str:
    """``5min``, ``90s``: the step in the units people write frequencies in."""
    seconds = int(step.total_seconds())
    return f"{seconds // 60}min" if seconds % 60 == 0 else f"{step.total_seconds():g}s"


def parse_time(value: Any, what: str) -> pd.Timestamp | None:
    """``--start`` / ``--end`` text -> a timestamp; anything pandas cannot read is a ``ConfigError``."""
    if value is None or value == "":
        return None
    try:
        t = pd.Timestamp(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(f"{what}={value!r}: not a timestamp ({str(exc).splitlines()[0][:120]}); "
                          f"write e.g. \"2024-01-27 00:00\"") from None
    if t is pd.NaT:
        raise ConfigError(f"{what}={value!r}: not a timestamp; write e.g. \"2024-01-27 00:00\"")
    return t.tz_localize(None) if t.tzinfo is not None else t


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
        return load_processed(path, mmap=True)  # only the stretch the windows need is read (windows_from_processed)
    if path.is_dir() and (path / "readings.parquet").is_file() and (path / "source.json").is_file():
        return load_raw(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    cfg = dataclasses.replace(data_cfg or DataConfig(), source=source_kind(source, data_cfg), path=str(path),
                              url=None, sha256={}, files={}, channels=list(card.channels),
                              units=list(card.units), null_value=card.null_value)
    raw, _ = load_source(cfg)
    return raw


def sensor_positions(input_ids: list[str], card: ModelCard, where: str) -> tuple[np.ndarray, list[str]]:
    """(index of each model sensor in ``input_ids``, -1 when absent; the absent model sensors).

    Sensors the model does not know are ignored with a warning; an input with none of the model's
    sensors is an error (it is not this network's data).
    """
    known = set(card.sensor_ids)
    unknown = [s for s in dict.fromkeys(input_ids) if s not in known]
    pos = pd.Index(input_ids).get_indexer(card.sensor_ids)
    absent = [s for s, p in zip(card.sensor_ids, pos) if p < 0]
    if len(absent) == len(card.sensor_ids):
        raise DataError(f"{where}: none of the model's {len(known)} sensors is in the input"
                        + (f" (unknown sensor ids {unknown[:10]} ({len(unknown)}))" if unknown else ""))
    if unknown:
        log.warning("%s: ignoring unknown sensor ids %s (%d): the model was trained on %d other sensors",
                    where, unknown[:10], len(unknown), len(known))
    return pos, absent


def check_channels(channels: list[str], card: ModelCard, where: str) -> None:
    if list(channels)[: len(card.channels)] != card.channels:
        raise DataError(f"{where}: channels {list(channels)}, the model reads {card.channels}")


def check_frequency(step: pd.Timedelta, card: ModelCard, where: str) -> None:
    if step != card.freq:
        raise DataError(f"{where}: wrong frequency: readings are every {freq_text(step)}, the model was "
                        f"trained on {freq_text(card.freq)} steps ({card.steps_per_day} per day)")


def issue_positions(timestamps: pd.DatetimeIndex, input_len: int, start: Any, end: Any, where: str) -> np.ndarray:
    """Positions in a regular ``timestamps`` of the issue times asked for.

    No start/end: the last timestamp.  ``end`` only: the last timestamp <= end.  ``start``
    (backfill): every timestamp in ``[start, end or last]``.  Each needs ``input_len`` steps.
    """
    t = len(timestamps)
    first_ok = input_len - 1
    span = f"the input covers {ts_text(timestamps[0])} .. {ts_text(timestamps[-1])}" if t else "the input is empty"
    lo = parse_time(start, "start")
    hi = parse_time(end, "end")
    hi = hi if hi is not None else timestamps[-1]
    if lo is not None and lo > hi:
        raise DataError(f"{where}: start {ts_text(lo)} is after end {ts_text(hi)}")
    inside = np.flatnonzero((timestamps <= hi) & (timestamps >= (lo if lo is not None else timestamps[0])))
    if len(inside) == 0:
        raise DataError(f"{where}: no time step in [{lo if lo is not None else '...'}, {ts_text(hi)}]; {span}")
    pos = inside if lo is not None else inside[-1:]
    if pos[0] < first_ok:
        what = "the last window" if lo is None else f"issue time {ts_text(timestamps[pos[0]])}"
        raise DataError(
            f"{where}: {what} is too short: {pos[0] + 1} input steps up to {ts_text(timestamps[pos[0]])}, the model "
            f"needs input_len={input_len}"
            + (f"; the first possible issue time is {ts_text(timestamps[first_ok])}" if t > first_ok else f"; {span}"))
    return pos.astype(np.int64)


def windows_from_processed(data: ProcessedData, card: ModelCard, start: Any, end: Any, where: str) -> Windows:
    """The windows of a processed dataset (already validated at ``prepare``), model sensor order."""
    pos, absent = sensor_positions([str(s) for s in data.sensor_ids], card, where)
    check_channels(data.meta.get("channels", []), card, where)
    ts = pd.DatetimeIndex(data.timestamps)
    if len(ts) > 1:
        steps = np.unique(np.diff(ts.asi8))
        if len(steps) != 1:
            raise DataError(f"{where}: irregular time index ({len(steps)} different steps)")
        check_frequency(pd.Timedelta(int(steps[0]), "ns"), card, where)
    issue = issue_positions(ts, card.input_len, start, end, where)
    a, b = issue[0] - card.input_len + 1, issue[-1] + 1  # only the stretch the windows read
    n, c = len(card.sensor_ids), len(card.channels)
    values = np.full((b - a, n, c), np.nan, np.float32)                          # (T, N, C)
    mask = np.zeros((b - a, n), dtype=bool)                                      # (T, N)
    have = pos >= 0
    values[:, have] = np.asarray(data.values[a:b][:, pos[have], :c], dtype=np.float32)
    mask[:, have] = np.asarray(data.mask[a:b][:, pos[have]], dtype=bool)
    return Windows(values=values, mask=mask, timestamps=ts[a:b].to_numpy("datetime64[ns]"), issue_idx=issue - a,
                   where=where, absent=tuple(absent))


def _check_on_grid(times: pd.DatetimeIndex, step: pd.Timedelta, issue: pd.Timestamp, where: str) -> None:
    """Raise on the first gap or off-grid step in sorted unique ``times`` (which end at ``issue``).

    A timestamp that no sensor reported is a gap in the input itself (a feed outage, a cut file), not a
    broken sensor: structural.  Missing rows of single sensors are their missing readings."""
    d = np.diff(times.asi8)
    bad = np.flatnonzero(d != step.value)
    if not len(bad):
        return
    j = int(bad[0])
    a, b, gap = times[j], times[j + 1], pd.Timedelta(int(d[j]), "ns")
    if gap.value % step.value == 0:
        raise DataError(f"{where}: the input window ending {ts_text(issue)} is not complete: no readings of any "
                        f"sensor at {ts_text(a + step)}" + (f" .. {ts_text(b - step)}" if gap > 2 * step else "")
                        + f" (a gap of {gap // step - 1} step(s) of {freq_text(step)})")
    raise DataError(f"{where}: irregular time index in the input window ending {ts_text(issue)}: {ts_text(a)} -> "
                    f"{ts_text(b)} is a step of {freq_text(gap)}, the model's frequency is {freq_text(step)}")


def windows_from_raw(raw: RawData, card: ModelCard, start: Any, end: Any, where: str) -> Windows:
    """Check the readings of a raw/source input and pivot the needed stretch onto the regular grid.

    A sensor's absent rows inside the stretch are its missing readings (NaN)."""
    r = raw.readings
    if len(r) == 0:
        raise DataError(f"{where}: no readings")
    _, absent = sensor_positions(pd.unique(r["sensor_id"].astype(str)).tolist(), card, where)
    check_channels(raw.channels, card, where)
    times = pd.DatetimeIndex(np.sort(r["timestamp"].unique()))
    L, step = card.input_len, card.freq
    if len(times) < 2:
        raise DataError(f"{where}: the last window is too short: readings at {len(times)} timestamp(s), "
                        f"the model needs input_len={L} steps of {freq_text(step)}")
    check_frequency(pd.Series(times[1:] - times[:-1]).mode().iloc[0], card, where)
    hi = parse_time(end, "end")
    hi = hi if hi is not None else times[-1]
    at_or_before = times[times <= hi]
    if not len(at_or_before):
        raise DataError(f"{where}: no readings at or before end {ts_text(hi)}; the input starts at {ts_text(times[0])}")
    anchor = at_or_before[-1]
    lo = parse_time(start, "start")
    if lo is None:
        issues = pd.DatetimeIndex([anchor])
    else:
        if lo > anchor:
            raise DataError(f"{where}: no readings in [{ts_text(lo)}, {ts_text(hi)}]")
        issues = pd.date_range(anchor - ((anchor - lo) // step) * step, anchor, freq=step)
    grid0 = issues[0] - (L - 1) * step
    if times[0] > grid0:
        n_have = int((issues[0] - times[0]) // step) + 1
        what = "the last window" if start is None else f"the window of issue time {ts_text(issues[0])}"
        raise DataError(f"{where}: {what} is too short: {n_have} step(s) of readings from {ts_text(times[0])} to "
                        f"{ts_text(issues[0])}, the model needs input_len={L} steps of {freq_text(step)} "
                        f"(from {ts_text(grid0)})")
    # from grid0, or from the last reading before it when grid0 itself is missing or off-grid
    first = grid0 if grid0 in times else times[times < grid0][-1]
    _check_on_grid(times[(times >= first) & (times <= anchor)], step, anchor, where)
    grid = pd.date_range(grid0, anchor, freq=step)
    rows = r[(r["timestamp"] >= grid0) & (r["timestamp"] <= anchor)]
    keys = rows[["timestamp", "sensor_id"]].astype({"sensor_id": str})
    dup = keys.duplicated()
    if dup.any():
        twice = keys[dup].iloc[0]
        raise DataError(f"{where}: sensor {twice['sensor_id']!r} has {int(dup.sum())} duplicate reading(s), e.g. "
                        f"two at {ts_text(twice['timestamp'])}")
    t_idx = grid.get_indexer(pd.DatetimeIndex(rows["timestamp"]))
    s_idx = pd.Index(card.sensor_ids).get_indexer(keys["sensor_id"])
    keep = s_idx >= 0                                                             # unknown sensors ignored
    values = np.full((len(grid), len(card.sensor_ids), len(card.channels)), np.nan, np.float32)  # (T, N, C)
    values[t_idx[keep], s_idx[keep]] = rows[card.channels].to_numpy(np.float32)[keep]
    target = values[..., 0]
    mask = np.isfinite(target) & (target != card.null_value)                                       # (T, N)
    return Windows(values=values, mask=mask, timestamps=grid.to_numpy("datetime64[ns]"),
                   issue_idx=grid.get_indexer(issues).astype(np.int64), where=where, absent=tuple(absent))


def load_windows(input: str | Path, card: ModelCard, *, start: Any = None, end: Any = None, source: str | None = None,
                 data_cfg: DataConfig | None = None) -> tuple[ProcessedData | RawData, Windows]:
    """``read_input`` then the windows of the issue times asked for (structural checks only)."""
    parse_time(start, "start"), parse_time(end, "end")  # before reading anything
    data = read_input(input, card, source=source, data_cfg=data_cfg)
    make = windows_from_processed if isinstance(data, ProcessedData) else windows_from_raw
    return data, make(data, card, start, end, str(input))
