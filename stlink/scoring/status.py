"""Per-sensor input checks: which (issue time, sensor) windows can be forecast, and why not.

A sensor's window is usable unless
  * the input has no readings of the sensor at all                    -> ``no readings of this sensor in the input``
  * a reading in the window lies outside its channel's physical bounds -> ``reading(s) outside ...``
  * it has more than ``max_missing_run`` consecutive missing readings  -> ``<k> consecutive missing readings ...``
An unusable window is not forecast: its inputs are masked before the model sees them (so a broken
sensor cannot disturb its neighbours' forecasts) and its rows in the output carry
``status = no_forecast`` and the reason.  The run fails only when nothing at all can be forecast.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stlink.errors import DataError
from stlink.export.card import ModelCard
from stlink.scoring.inputs import Windows, ts_text

OK = "ok"
NO_FORECAST = "no_forecast"
STATUSES = (OK, NO_FORECAST)

# reason codes, (K, N) int8
FINE, ABSENT, OUT_OF_BOUNDS, MISSING_RUN = 0, 1, 2, 3


@dataclass
class SensorStatus:
    """code (K, N) int8 per issue time and model sensor; longest (K, N) missing run inside each window;
    bad_value (N,) the first out-of-bounds reading per sensor (for the reason text)."""

    code: np.ndarray
    longest: np.ndarray
    max_run: int
    bounds_text: list[str]

    @property
    def usable(self) -> np.ndarray:
        return self.code == FINE                                                 # (K, N)

    def reason(self, k: int, n: int) -> str:
        code = int(self.code[k, n])
        if code == ABSENT:
            return "no readings of this sensor in the input"
        if code == OUT_OF_BOUNDS:
            return self.bounds_text[n]
        if code == MISSING_RUN:
            return (f"{int(self.longest[k, n])} consecutive missing readings in the input window "
                    f"(at most {self.max_run} accepted)")
        return ""

    def reasons(self, k: np.ndarray) -> np.ndarray:
        """Reason texts (B, N) for the issue positions ``k`` (B,) ('' where usable)."""
        out = np.full((len(k), self.code.shape[1]), "", dtype=object)
        for b, kk in enumerate(k):
            for n in np.flatnonzero(self.code[kk] != FINE):
                out[b, n] = self.reason(int(kk), int(n))
        return out

    def summary(self, sensor_ids: list[str], limit: int = 5) -> str:
        """``2 of 18 sensors not forecast at some issue time: 's3' (12 consecutive ...), ...``."""
        bad = np.flatnonzero((self.code != FINE).any(axis=0))
        if not len(bad):
            return f"all {len(sensor_ids)} sensors forecast"
        parts = []
        for n in bad[:limit]:
            k = int(np.flatnonzero(self.code[:, n] != FINE)[0])
            parts.append(f"{sensor_ids[n]!r} ({self.reason(k, int(n))}; {int((self.code[:, n] != FINE).sum())} "
                         f"of {self.code.shape[0]} issue time(s))")
        more = f", and {len(bad) - limit} more" if len(bad) > limit else ""
        return f"{len(bad)} of {len(sensor_ids)} sensors not forecast at some issue time: {', '.join(parts)}{more}"


def missing_runs(mask: np.ndarray) -> np.ndarray:
    """run[t, n] = number of consecutive missing readings of sensor n ending at step t.  (T, N) int."""
    run = np.zeros(mask.shape, dtype=np.int64)
    count = np.zeros(mask.shape[1], dtype=np.int64)
    for t in range(mask.shape[0]):
        count = np.where(mask[t], 0, count + 1)
        run[t] = count
    return run


def longest_missing_runs(w: Windows, input_len: int, chunk: int = 1024) -> np.ndarray:
    """Longest run of missing readings inside each issue time's window, per sensor.  (K, N) int."""
    L = input_len
    run = missing_runs(w.mask)                                                   # (T, N)
    offsets = np.arange(1, L + 1)[None, :, None]                                 # (1, L, 1)
    out = np.zeros((len(w.issue_idx), w.mask.shape[1]), dtype=np.int64)
    for a in range(0, len(w.issue_idx), chunk):
        idx = w.issue_idx[a:a + chunk]
        rows = idx[:, None] - L + 1 + np.arange(L)                               # (K, L)
        out[a:a + chunk] = np.minimum(run[rows], offsets).max(axis=1)            # (K, N) runs cut at window start
    return out


def window_counts(bad: np.ndarray, issue_idx: np.ndarray, input_len: int) -> np.ndarray:
    """Number of ``bad`` (T, N) steps inside each issue time's window.  (K, N) int."""
    cs = np.concatenate([np.zeros((1, bad.shape[1]), np.int64), np.cumsum(bad, axis=0, dtype=np.int64)])  # (T+1, N)
    return cs[issue_idx + 1] - cs[np.maximum(issue_idx + 1 - input_len, 0)]


def sensor_status(w: Windows, card: ModelCard, bounds: dict[str, list[float]], max_run: int) -> SensorStatus:
    """The per-sensor verdict for every issue time of ``w`` (see module doc)."""
    k, n = len(w.issue_idx), len(card.sensor_ids)
    code = np.zeros((k, n), dtype=np.int8)
    longest = longest_missing_runs(w, card.input_len)                            # (K, N)
    code[longest > max_run] = MISSING_RUN
    bounds_text = [""] * n
    out = np.zeros(w.mask.shape, dtype=bool)                                     # (T, N)
    for c, name in enumerate(card.channels):
        if name not in bounds:
            continue
        lo, hi = bounds[name]
        v = w.values[..., c]                                                     # (T, N)
        bad = np.isfinite(v) & (v != card.null_value) & ((v < lo) | (v > hi))
        unit = card.units[c] if c < len(card.units) else ""
        for j in np.flatnonzero(bad.any(axis=0)):
            if not bounds_text[j]:
                t = int(np.flatnonzero(bad[:, j])[0])
                bounds_text[j] = (f"reading(s) of {name!r} outside the physical bounds [{lo}, {hi}] {unit}, e.g. "
                                  f"{float(v[t, j])} at {ts_text(w.timestamps[t])}")
        out |= bad
    code[window_counts(out, w.issue_idx, card.input_len) > 0] = OUT_OF_BOUNDS
    absent = np.isin(card.sensor_ids, list(w.absent))
    code[:, absent] = ABSENT
    return SensorStatus(code=code, longest=longest, max_run=max_run, bounds_text=bounds_text)


def require_some_forecast(status: SensorStatus, card: ModelCard, w: Windows) -> None:
    """``DataError`` when no (issue time, sensor) window at all can be forecast; quotes the first reasons."""
    if status.usable.any():
        return
    reasons = "; ".join(f"sensor {card.sensor_ids[n]!r}: {status.reason(0, n)}"
                        for n in range(min(3, len(card.sensor_ids))))
    span = ts_text(w.issue_times[0]) + (f" .. {ts_text(w.issue_times[-1])}" if len(w.issue_idx) > 1 else "")
    raise DataError(f"{w.where}: no sensor can be forecast for issue time(s) {span}: {reasons}"
                    + (f" (and {len(card.sensor_ids) - 3} more)" if len(card.sensor_ids) > 3 else ""))
