"""Chronological splits, the training scaler, time features and the lazy window dataset.

A window is ``input_len`` input steps followed by ``output_len`` target steps.  Splits are
contiguous ranges of the time axis and a window never straddles a split boundary, so no
validation or test timestamp is seen in training, scaler fitting or memory building.
"""
from __future__ import annotations

import numpy as np

from stlink.data.formats import DataError, ProcessedData

SPLITS = ("train", "val", "test")


def default_split(source: str) -> list[float]:
    """Field conventions: 6:2:2 for PEMS0x, 7:1:2 for METR-LA / PEMS-BAY style data."""
    return [0.6, 0.2, 0.2] if source == "pems" else [0.7, 0.1, 0.2]


def compute_splits(n_steps: int, fractions: list[float], min_len: int = 1) -> dict[str, list[int]]:
    """Contiguous ``[start, end)`` time ranges for train/val/test from fractions of ``n_steps``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"prepare.split: expected three non-negative fractions summing to 1, got {fractions}")
    n_train = int(round(n_steps * fractions[0]))
    n_val = int(round(n_steps * fractions[1]))
    bounds = [0, n_train, n_train + n_val, n_steps]
    out = {name: [bounds[i], bounds[i + 1]] for i, name in enumerate(SPLITS)}
    for name, (a, b) in out.items():
        if b - a < min_len:
            raise DataError(
                f"split '{name}' has {b - a} steps, fewer than one window ({min_len} steps); "
                f"the dataset has {n_steps} steps: use more data or shorter windows")
    return out


def window_starts(split_range: list[int], input_len: int, output_len: int) -> np.ndarray:
    """Start indices s with the whole window [s, s + input_len + output_len) inside the range."""
    a, b = split_range
    last = b - input_len - output_len
    return np.arange(a, last + 1, dtype=np.int64) if last >= a else np.zeros(0, dtype=np.int64)


def fit_scaler(values: np.ndarray, mask: np.ndarray, train_range: list[int]) -> dict[str, list[float]]:
    """Per-channel z-score fitted on valid training readings only.

    values: (T, N, C); mask: (T, N) valid readings.
    """
    a, b = train_range
    v = np.asarray(values[a:b], dtype=np.float64)  # (Tt, N, C)
    m = np.asarray(mask[a:b], dtype=bool)          # (Tt, N)
    if not m.any():
        raise DataError(f"no valid training readings in time steps [{a}, {b})")
    sel = v[m]                                     # (K, C)
    mean = sel.mean(axis=0)
    std = sel.std(axis=0)
    std = np.where(std < 1e-6, 1.0, std)
    return {"mean": mean.tolist(), "std": std.tolist()}


def time_features(timestamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Time of day as a fraction of the day (T,) float32 and day of week 0=Mon..6 (T,) int64."""
    ts = np.asarray(timestamps).astype("datetime64[ns]")
    day = ts.astype("datetime64[D]")
    tod = (ts - day).astype("timedelta64[s]").astype(np.float64) / 86400.0
    dow = (day.astype(np.int64) + 3) % 7  # 1970-01-01 was a Thursday
    return tod.astype(np.float32), dow.astype(np.int64)


class WindowDataset:
    """Serves windows of one split on demand (a torch ``Dataset``; nothing is materialised).

    ``ds[i]`` -> dict of numpy arrays:
      x (L, N, C) float32 original units, x_mask (L, N) bool, tod (L,) float32, dow (L,) int64,
      y (H, N) float32 (channel 0), y_mask (H, N) bool, t0 () int64 index of the first target step.
    """

    def __init__(self, data: ProcessedData, split: str, input_len: int, output_len: int):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.data = data
        self.split = split
        self.input_len = input_len
        self.output_len = output_len
        self.range = data.meta["splits"][split]
        self.starts = window_starts(self.range, input_len, output_len)
        self.tod, self.dow = time_features(data.timestamps)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = int(self.starts[i])
        L, H = self.input_len, self.output_len
        return {
            "x": np.asarray(self.data.values[s:s + L], dtype=np.float32),
            "x_mask": np.asarray(self.data.mask[s:s + L], dtype=bool),
            "tod": self.tod[s:s + L],
            "dow": self.dow[s:s + L],
            "y": np.asarray(self.data.values[s + L:s + L + H, :, 0], dtype=np.float32),
            "y_mask": np.asarray(self.data.mask[s + L:s + L + H], dtype=bool),
            "t0": np.int64(s + L),
        }
