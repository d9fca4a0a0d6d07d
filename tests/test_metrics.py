"""Masked MAE / RMSE / MAPE against hand-computed values, with missing targets."""
import math

import numpy as np
import pytest
import torch

from stlink.training.metrics import MetricAccumulator

# Two batches of one window, H = 2 steps, N = 2 sensors; y[b, h, n].  Masked entries hold
# garbage (a null 0, a NaN, a wild forecast) that must not count.
Y1 = np.array([[[10.0, 0.0], [20.0, 0.5]]])
M1 = np.array([[[True, False], [True, True]]])
P1 = np.array([[[12.0, 99.0], [15.0, 1.5]]])
Y2 = np.array([[[np.nan, 4.0], [8.0, 10.0]]])
M2 = np.array([[[False, True], [True, False]]])
P2 = np.array([[[5.0, 6.0], [6.0, 1000.0]]])


def _acc(floor=1.0):
    acc = MetricAccumulator(horizon=2, mape_floor=floor)
    acc.update(Y1, P1, M1)
    acc.update(Y2, P2, M2)
    return acc.result()


def test_hand_computed_per_step_and_average():
    r = _acc()
    # step 1: errors 2 (y=10), 2 (y=4)          -> MAE 2, RMSE 2, MAPE (0.2 + 0.5) / 2
    # step 2: errors 5 (y=20), 1 (y=0.5), 2 (y=8) -> MAE 8/3, RMSE sqrt(30/3); MAPE skips y=0.5 (< floor 1)
    s1, s2 = r["per_step"]
    assert s1["step"] == 1 and s1["count"] == 2
    assert s1["mae"] == pytest.approx(2.0) and s1["rmse"] == pytest.approx(2.0)
    assert s1["mape"] == pytest.approx(35.0)
    assert s2["count"] == 3
    assert s2["mae"] == pytest.approx(8 / 3) and s2["rmse"] == pytest.approx(math.sqrt(10.0))
    assert s2["mape"] == pytest.approx(100 * (5 / 20 + 2 / 8) / 2)
    # pooled over both steps: |e| sum 12, e^2 sum 38, 5 valid targets, 4 of them >= the MAPE floor
    assert r["count"] == 5
    assert r["mae"] == pytest.approx(12 / 5)
    assert r["rmse"] == pytest.approx(math.sqrt(38 / 5))
    assert r["mape"] == pytest.approx(100 * (0.2 + 0.5 + 0.25 + 0.25) / 4)
    assert r["mape_floor"] == 1.0


def test_sums_accumulate_over_the_set_not_per_batch_averages():
    whole = MetricAccumulator(2, 1.0)
    whole.update(np.concatenate([Y1, Y2]), np.concatenate([P1, P2]), np.concatenate([M1, M2]))
    assert whole.result() == _acc()
    per_batch_rmse = np.mean([math.sqrt(30 / 3), math.sqrt(8 / 2)])
    assert _acc()["rmse"] != pytest.approx(per_batch_rmse)


def test_mape_floor_only_changes_mape_and_is_reported():
    low = _acc(floor=0.0)
    assert low["mape_floor"] == 0.0
    assert low["mae"] == _acc()["mae"] and low["rmse"] == _acc()["rmse"]
    # y = 0.5 with |error| 1 now counts as 200 %
    assert low["per_step"][1]["mape"] == pytest.approx(100 * (0.25 + 2.0 + 0.25) / 3)


def test_single_steps_are_not_cumulative_averages():
    H = 12
    y = np.full((3, H, 2), 50.0)
    yhat = y + np.arange(1, H + 1)[None, :, None]  # error = step number
    acc = MetricAccumulator(H, 1.0)
    acc.update(y, yhat, np.ones_like(y, bool))
    r = acc.result()
    assert [r[f"step_{k}"]["mae"] for k in (3, 6, 12)] == pytest.approx([3.0, 6.0, 12.0])
    assert r["mae"] == pytest.approx(6.5)
    assert set(r["step_12"]) == {"mae", "rmse", "mape"}
    assert len(r["per_step"]) == H


def test_accepts_torch_bf16_and_single_windows():
    acc = MetricAccumulator(2, 1.0)
    acc.update(torch.tensor(Y1[0]), torch.tensor(P1[0]).to(torch.bfloat16), torch.tensor(M1[0]))
    acc.update(Y2[0], P2[0], M2[0])
    assert acc.result()["mae"] == pytest.approx(12 / 5)


def test_no_valid_target_gives_none_and_bad_shapes_raise():
    acc = MetricAccumulator(2, 1.0)
    acc.update(Y1, P1, np.zeros_like(M1))
    r = acc.result()
    assert r["mae"] is None and r["rmse"] is None and r["mape"] is None and r["count"] == 0
    with pytest.raises(ValueError, match=r"\(B, 2, N\)"):
        acc.update(Y1, P1[:, :1], M1)
