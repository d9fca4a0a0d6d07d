"""The naive baselines every forecast is reported beside.

Each baseline is a callable ``forecast(batch) -> (B, H, N)`` built from the processed data by
``build_baselines``; a batch is collated windows of ``WindowDataset`` (keys ``x`` (B, L, N, C),
``x_mask`` (B, L, N), ``t0`` (B,) index of the first target step), numpy arrays or torch tensors.
A single window ``ds[i]`` gives an (H, N) forecast.

- ``last_value`` (persistence): the last *valid* input reading of each sensor, repeated over the
  horizon; a sensor with no valid input reading falls back to its training mean.
- ``historical_average``: the mean of the valid *training* readings of each sensor in the target's
  time-of-day slot (optionally slot x day of week); empty cells fall back to the coarser table
  (slot only, then the sensor's training mean).  Nothing outside the training split is read.
- ``seasonal_naive``: the reading one period (a day) before each target time; when that reading
  is missing (or lies before the data), the historical average.  A target more than one period
  ahead of the issue time looks back whole periods until the reading is in the past.

The training mean of a sensor without any valid training reading is the global scaler mean.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from stlink.data.formats import ProcessedData
from stlink.data.windows import time_features

Baseline = Callable[[dict[str, Any]], np.ndarray]
BASELINES = ("last_value", "historical_average", "seasonal_naive")


def _np(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def sensor_training_mean(data: ProcessedData) -> np.ndarray:
    """(N,) mean of the valid training readings of channel 0 per sensor."""
    a, b = data.meta["splits"]["train"]
    v = np.asarray(data.values[a:b, :, 0], dtype=np.float64)  # (Tt, N)
    m = np.asarray(data.mask[a:b], dtype=bool)               # (Tt, N)
    n = m.sum(axis=0)
    s = np.where(m, v, 0.0).sum(axis=0)
    glob = float(data.meta["scaler"]["mean"][0])
    return np.where(n > 0, s / np.maximum(n, 1), glob)


def last_value(x: np.ndarray, x_mask: np.ndarray, output_len: int, fallback: np.ndarray) -> np.ndarray:
    """Persistence. x: (B, L, N, C), x_mask: (B, L, N), fallback: (N,) -> (B, H, N)."""
    L = x_mask.shape[1]
    pos = np.where(x_mask, np.arange(L)[None, :, None], -1).max(axis=1)       # (B, N) last valid step
    last = np.take_along_axis(x[..., 0], np.maximum(pos, 0)[:, None, :], axis=1)[:, 0]  # (B, N)
    last = np.where(pos >= 0, last, fallback[None, :])
    return np.repeat(last[:, None, :], output_len, axis=1).astype(np.float32)  # (B, H, N)


class HistoricalAverage:
    """Mean of valid training readings per sensor x time-of-day slot (x day of week)."""

    def __init__(self, data: ProcessedData, by_day_of_week: bool = False):
        self.steps_per_day = data.steps_per_day
        self.by_day_of_week = by_day_of_week
        tod, dow = time_features(data.timestamps)
        self.slot = np.rint(tod * self.steps_per_day).astype(np.int64) % self.steps_per_day  # (T,)
        self.dow = dow                                                                       # (T,)
        a, b = data.meta["splits"]["train"]
        v = np.asarray(data.values[a:b, :, 0], dtype=np.float64)   # (Tt, N)
        m = np.asarray(data.mask[a:b], dtype=bool)                 # (Tt, N)
        n_sensors = v.shape[1]
        self.sensor_mean = sensor_training_mean(data)              # (N,)
        self.by_slot = self._table(v, m, self.slot[a:b], self.steps_per_day, self.sensor_mean[None])  # (S, N)
        if by_day_of_week:
            key = self.dow[a:b] * self.steps_per_day + self.slot[a:b]
            fallback = np.tile(self.by_slot, (7, 1))                            # (7 S, N)
            self.by_week = self._table(v, m, key, 7 * self.steps_per_day, fallback)
        assert self.by_slot.shape == (self.steps_per_day, n_sensors)

    @staticmethod
    def _table(v: np.ndarray, m: np.ndarray, key: np.ndarray, n_keys: int, fallback: np.ndarray) -> np.ndarray:
        """Mean of v over rows sharing ``key`` (valid entries only); empty cells from ``fallback``."""
        s = np.zeros((n_keys, v.shape[1]))
        n = np.zeros((n_keys, v.shape[1]))
        np.add.at(s, key, np.where(m, v, 0.0))
        np.add.at(n, key, m.astype(np.float64))
        return np.where(n > 0, s / np.maximum(n, 1), fallback)

    def at(self, t: np.ndarray) -> np.ndarray:
        """Forecasts for absolute time indices t (...,) -> (..., N)."""
        if self.by_day_of_week:
            return self.by_week[self.dow[t] * self.steps_per_day + self.slot[t]]
        return self.by_slot[self.slot[t]]


def target_indices(t0: np.ndarray, output_len: int) -> np.ndarray:
    """(B,) first target index -> (B, H) absolute time indices of the targets."""
    return t0[:, None] + np.arange(output_len)[None, :]


def seasonal_naive(data: ProcessedData, t0: np.ndarray, output_len: int, period: int,
                   fallback: np.ndarray) -> np.ndarray:
    """Reading ``period`` steps before each target (whole periods back until before t0).

    t0: (B,); fallback: (B, H, N) used where that reading is missing or before the data.
    """
    t = target_indices(t0, output_len)                          # (B, H)
    k = (t - t0[:, None]) // period + 1                         # fewest periods back with t - k p < t0
    src = t - k * period                                        # (B, H)
    ok_t = src >= 0
    src_c = np.where(ok_t, src, 0)
    vals = np.asarray(data.values[:, :, 0])[src_c]              # (B, H, N)
    valid = np.asarray(data.mask)[src_c] & ok_t[..., None]      # (B, H, N)
    return np.where(valid, vals, fallback).astype(np.float32)


def build_baselines(data: ProcessedData, output_len: int, by_day_of_week: bool = False) -> dict[str, Baseline]:
    """name -> ``forecast(batch) -> (B, H, N)`` for the three baselines, fitted on training data."""
    ha = HistoricalAverage(data, by_day_of_week=by_day_of_week)
    period = data.steps_per_day

    def f_last(batch: dict[str, Any]) -> np.ndarray:
        return last_value(_np(batch["x"]), _np(batch["x_mask"]).astype(bool), output_len, ha.sensor_mean)

    def f_ha(batch: dict[str, Any]) -> np.ndarray:
        return ha.at(target_indices(_np(batch["t0"]).astype(np.int64), output_len)).astype(np.float32)

    def f_seasonal(batch: dict[str, Any]) -> np.ndarray:
        t0 = _np(batch["t0"]).astype(np.int64)
        return seasonal_naive(data, t0, output_len, period, f_ha(batch))

    fs = {"last_value": f_last, "historical_average": f_ha, "seasonal_naive": f_seasonal}
    return {name: _accept_single_window(f) for name, f in fs.items()}


def _accept_single_window(f: Baseline) -> Baseline:
    """Let ``f`` also take one unbatched window (``ds[i]``) and return (H, N)."""
    def wrapped(batch: dict[str, Any]) -> np.ndarray:
        if np.ndim(_np(batch["t0"])) == 0:
            return f({k: _np(v)[None] for k, v in batch.items()})[0]
        return f(batch)

    return wrapped
