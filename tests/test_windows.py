import numpy as np
import pandas as pd
import pytest

from stlink.data.formats import DataError
from stlink.data.windows import compute_splits, fit_scaler, time_features, window_starts


def test_splits_are_contiguous_disjoint_and_cover():
    s = compute_splits(1000, [0.7, 0.1, 0.2], min_len=24)
    assert s == {"train": [0, 700], "val": [700, 800], "test": [800, 1000]}


def test_windows_never_straddle_a_split():
    s = compute_splits(500, [0.6, 0.2, 0.2], min_len=24)
    seen = {}
    for name, rng in s.items():
        starts = window_starts(rng, 12, 12)
        assert starts.min() == rng[0] and starts.max() + 24 == rng[1]
        steps = {int(t) for st in starts for t in range(st, st + 24)}
        assert all(rng[0] <= t < rng[1] for t in steps)
        seen[name] = steps
    assert not (seen["train"] & seen["val"]) and not (seen["val"] & seen["test"])
    assert not (seen["train"] & seen["test"])


def test_too_short_split_is_a_clear_error():
    with pytest.raises(DataError, match="split 'val' has 10 steps, fewer than one window"):
        compute_splits(100, [0.7, 0.1, 0.2], min_len=24)
    with pytest.raises(DataError, match="summing to 1"):
        compute_splits(100, [0.7, 0.2, 0.2])


def test_scaler_uses_valid_training_readings_only():
    T, N = 100, 3
    v = np.full((T, N, 1), 10.0, dtype=np.float32)
    v[50:] = 1000.0            # val/test: must not leak into the scaler
    mask = np.ones((T, N), bool)
    v[:10, 0, 0] = 0.0         # null readings inside train: must be ignored
    mask[:10, 0] = False
    sc = fit_scaler(v, mask, [0, 50])
    assert sc["mean"] == [10.0]
    assert sc["std"] == [1.0]  # zero std falls back to 1


def test_time_features():
    ts = pd.date_range("2024-01-06 00:00", periods=4, freq="6h").to_numpy()  # a Saturday
    tod, dow = time_features(ts)
    np.testing.assert_allclose(tod, [0.0, 0.25, 0.5, 0.75])
    assert dow.tolist() == [5, 5, 5, 5]
    _, dow2 = time_features(pd.date_range("2024-01-01", periods=7, freq="D").to_numpy())
    assert dow2.tolist() == [0, 1, 2, 3, 4, 5, 6]
