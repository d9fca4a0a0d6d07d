"""Naive baselines on series with known answers, the abrupt slice, and the evaluate step's files."""
import csv
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import make_processed, tiny_params
from stlink.config import ConfigError
from stlink.data.formats import ProcessedData, load_processed, save_processed
from stlink.data.windows import WindowDataset, time_features
from stlink.training.baselines import HistoricalAverage, build_baselines, last_value
from stlink.training.checkpoint import CheckpointError, load_trained
from stlink.training.evaluate import abrupt_pairs, evaluate, training_jump_threshold
from stlink.training.metrics import MetricAccumulator
from stlink.training.train import train


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def split_metrics(data, split, forecast, H=12):
    ds = WindowDataset(data, split, 12, H)
    acc = MetricAccumulator(H)
    for i in range(len(ds)):
        w = ds[i]
        acc.update(w["y"], forecast(w), w["y_mask"])
    return acc.result()


# --- baselines ------------------------------------------------------------------------------

def test_last_value_takes_the_last_valid_reading_else_the_training_mean():
    x = np.array([[1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 99, 5]], np.float32)[None, :, :, None]  # (1, 4, 3, 1)
    m = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0], [1, 0, 0]], bool)[None]
    f = last_value(x, m, output_len=2, fallback=np.array([0.0, 0.0, 7.0]))
    assert f.shape == (1, 2, 3)
    np.testing.assert_array_equal(f[0], [[4, 3, 7], [4, 3, 7]])


def test_seasonal_naive_is_exact_on_a_daily_periodic_series(tmp_path):
    data = load_processed(make_processed(tmp_path, noise=0.0, missing=0.0))
    fs = build_baselines(data, 12)
    assert split_metrics(data, "test", fs["seasonal_naive"])["mae"] < 1e-4
    assert split_metrics(data, "test", fs["historical_average"])["mae"] < 1e-4
    assert split_metrics(data, "test", fs["last_value"])["mae"] > 1.0


def test_seasonal_naive_falls_back_and_never_reads_the_future(tmp_path):
    # 8 steps per day < 12 horizon steps: targets 9..12 must look back two days, not into the targets
    data = load_processed(make_processed(tmp_path, steps_per_day=8, days=40, noise=1.0, missing=0.0))
    ds = WindowDataset(data, "test", 12, 12)
    w = ds[3]
    t0 = int(w["t0"])
    data.mask = data.mask.copy()
    data.mask[t0 - 8, 1] = False  # one day before the first target, sensor 1: missing
    fs = build_baselines(data, 12)
    before = fs["seasonal_naive"](w)
    assert before.shape == (12, 4)
    expected = data.values[t0 - 8: t0, :, 0]
    np.testing.assert_allclose(before[:8, [0, 2, 3]], expected[:, [0, 2, 3]])
    np.testing.assert_allclose(before[8:, [0, 2, 3]], expected[:4, [0, 2, 3]])  # two days back
    ha = fs["historical_average"](w)
    np.testing.assert_allclose(before[[0, 8], 1], ha[[0, 8], 1])  # the fallback for the missing reading
    assert np.abs(before[[0, 8], 1] - data.values[[t0 - 8, t0 - 8], 1, 0]).min() > 1e-3
    data.values = data.values.copy()
    data.values[t0:] += 1000.0  # the targets and everything after them
    np.testing.assert_array_equal(build_baselines(data, 12)["seasonal_naive"](w), before)


def test_historical_average_uses_valid_training_readings_only(tmp_path):
    data = load_processed(make_processed(tmp_path, noise=2.0, missing=0.1))
    a, b = data.meta["splits"]["train"]
    ha = HistoricalAverage(data)
    tod, _ = time_features(data.timestamps)
    slot = np.rint(tod * 48).astype(int) % 48
    sel = (slot[a:b] == 5) & data.mask[a:b, 2]
    assert ha.by_slot[5, 2] == pytest.approx(data.values[a:b, 2, 0][sel].mean())

    changed = load_processed(make_processed(tmp_path / "c", noise=2.0, missing=0.1))
    changed.values = changed.values.copy()
    changed.values[b:] += 500.0                            # validation and test readings
    invalid = ~changed.mask[a:b]
    changed.values[a:b][invalid] = 1e6                     # masked training readings
    np.testing.assert_array_equal(HistoricalAverage(changed).by_slot, ha.by_slot)
    changed.values[a:b][~invalid] += 1.0                   # a valid training reading moves it
    assert not np.array_equal(HistoricalAverage(changed).by_slot, ha.by_slot)


def test_historical_average_by_day_of_week(tmp_path):
    data = load_processed(make_processed(tmp_path, noise=0.0, missing=0.0, days=21))
    data.values = data.values.copy()
    _, dow = time_features(data.timestamps)
    data.values[dow == 2] += 10.0                         # Wednesdays run 10 higher
    ha_week, ha_day = HistoricalAverage(data, by_day_of_week=True), HistoricalAverage(data)
    t = np.array([np.flatnonzero(dow == 2)[7], np.flatnonzero(dow == 4)[7]])
    np.testing.assert_allclose(ha_week.at(t), data.values[t, :, 0], atol=1e-4)
    assert np.abs(ha_day.at(t) - data.values[t, :, 0]).max() > 1.0


def test_abrupt_pairs_rule():
    y = np.array([[[50, 50], [50, 35], [50, 36]]], float)       # (1, H=3, N=2): sensor 1 drops by 15
    m = np.ones_like(y, bool)
    x_last, x_ok = np.array([[50.0, 50.0]]), np.array([[True, True]])
    scale = np.array([50.0, 50.0])
    np.testing.assert_array_equal(abrupt_pairs(x_last, x_ok, y, m, scale, 0.2), [[False, True]])
    np.testing.assert_array_equal(abrupt_pairs(x_last, x_ok, y, m, scale, 0.4), [[False, False]])
    m[0, 1, 1] = False  # the drop is now next to a missing reading: 50 -> ? -> 36 has no valid jump
    np.testing.assert_array_equal(abrupt_pairs(x_last, x_ok, y, m, scale, 0.2), [[False, False]])
    y2 = np.array([[[50, 35], [50, 35], [50, 35]]], float)    # the drop happens at the issue time
    np.testing.assert_array_equal(abrupt_pairs(x_last, x_ok, y2, np.ones_like(y2, bool), scale, 0.2),
                                  [[False, True]])


# --- the evaluate step ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    folder = make_processed(root, days=10, seed=3)
    data = load_processed(folder)
    a = data.meta["splits"]["test"][0]
    data.values = data.values.copy()
    data.values[a + 30: a + 36, 1, 0] -= 25.0  # an incident on sensor 1 in the test split
    save_processed(data, folder)
    params = tiny_params(epochs=2)
    train(params, root / "model", data_dir=folder, cache_dir=root / "bb")
    results = evaluate(params, root / "model", root / "reports", data_dir=folder, cache_dir=root / "bb")
    return root, folder, params, results


def test_evaluate_writes_metrics_per_split_with_steps_and_baselines(trained):
    root, folder, params, results = trained
    methods = ("model", "last_value", "historical_average", "seasonal_naive")
    for split in ("val", "test"):
        on_disk = json.loads((root / "reports" / "metrics" / f"{split}.json").read_text())
        # the interval figures go to metrics/intervals.json (stlink.monitoring), not into <split>.json
        assert on_disk == json.loads(json.dumps({k: v for k, v in results[split].items() if k != "intervals"}))
        for m in methods:
            r = on_disk[m]
            assert r["mape_floor"] == 1.0 and r["mae"] > 0 and r["rmse"] >= r["mae"]
            assert [s["step"] for s in r["per_step"]] == list(range(1, 13))
            for k in (3, 6, 12):
                assert r[f"step_{k}"]["mae"] == r["per_step"][k - 1]["mae"]
        assert on_disk["n_windows"] == len(WindowDataset(load_processed(folder), split, 12, 12))


def test_evaluate_model_metrics_match_a_direct_computation(trained):
    root, folder, params, results = trained
    model, _, _ = load_trained(root / "model", cache_dir=root / "bb")
    ds = WindowDataset(load_processed(folder), "test", 12, 12)
    abs_sum, sq_sum, count = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            w = {k: torch.as_tensor(v)[None] for k, v in ds[i].items()}
            err = (model(w["x"], w["x_mask"], w["tod"], w["dow"]) - w["y"]).double()[w["y_mask"]]
            abs_sum, sq_sum, count = abs_sum + err.abs().sum().item(), sq_sum + (err ** 2).sum().item(), count + len(err)
    assert results["test"]["model"]["count"] == count
    assert results["test"]["model"]["mae"] == pytest.approx(abs_sum / count, rel=1e-5)
    assert results["test"]["model"]["rmse"] == pytest.approx(np.sqrt(sq_sum / count), rel=1e-5)


def test_evaluate_abrupt_slice(trained):
    _, folder, params, results = trained
    ab = results["test"]["abrupt"]
    data = load_processed(folder)
    # the threshold is the top decile of the relative jumps over the TRAINING windows
    assert ab["quantile"] == params.evaluate.abrupt_quantile == 0.9
    assert ab["threshold"] == pytest.approx(training_jump_threshold(data, 12, 12, 0.9))
    ds = WindowDataset(data, "test", 12, 12)
    end = data.meta["splits"]["train"][1]
    mean = np.array([data.values[:end, n, 0][data.mask[:end, n]].mean() for n in range(4)])  # training means
    count = 0
    for i in range(len(ds)):
        w = ds[i]
        sel = abrupt_pairs(w["x"][None, -1, :, 0], w["x_mask"][None, -1], w["y"][None], w["y_mask"][None],
                           mean, ab["threshold"])[0]
        count += int((w["y_mask"] & sel[None, :]).sum())
    assert ab["count"] == count > 0 and 0 < ab["fraction"] < 0.5
    assert "per_step" not in ab["model"] and ab["model"]["mae"] > 0
    # persistence suffers most when the level jumps
    assert ab["last_value"]["mae"] > results["test"]["last_value"]["mae"]


def test_abrupt_threshold_is_a_training_quantile_of_relative_jumps():
    """Hand-built series: one sensor steps by 10 at one training step; the top-decile threshold
    selects the windows that contain that jump and nothing else."""
    T, N = 200, 2
    values = np.full((T, N, 1), 50.0, np.float32)
    values[100:, 0, 0] = 60.0                                   # a jump of 10 (0.2 x mean 50) at t = 100
    data = ProcessedData(values=values, mask=np.ones((T, N), bool),
                         timestamps=np.datetime64("2024-01-01") + np.arange(T) * np.timedelta64(5, "m"),
                         sensor_ids=["a", "b"],
                         adjacency=np.eye(N, dtype=np.float32),
                         meta={"splits": {"train": [0, 200], "val": [0, 0], "test": [0, 0]},
                               "scaler": {"mean": [55.0], "std": [5.0]}})
    # 177 windows x 2 sensors; the jump is inside 12 windows of sensor 0 (< 10 %): the 0.9 quantile is 0
    assert training_jump_threshold(data, 12, 12, 0.9) == 0.0
    # at 0.99 the quantile lies among the jump windows: relative jump 10 / mean of sensor 0
    mean0 = values[:, 0, 0].mean()
    assert training_jump_threshold(data, 12, 12, 0.99) == pytest.approx(10.0 / mean0)
    with pytest.raises(ConfigError, match="abrupt_quantile"):
        training_jump_threshold(data, 12, 12, 1.5)


def test_evaluate_writes_plots_and_dvc_plot_tables(trained):
    root, *_ = trained
    plots = root / "reports" / "plots"
    for name in ("horizon_val.png", "horizon_test.png", "forecast_test.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert (plots / name).stat().st_size > 10_000
    with open(plots / "horizon_test.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert {"model_mae", "last_value_mae", "historical_average_rmse", "seasonal_naive_mape"} <= set(rows[0])


def test_evaluate_refuses_data_the_model_was_not_trained_on(trained, tmp_path):
    root, folder, params, _ = trained
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    data = load_processed(other)
    data.values = data.values + 1.0
    save_processed(data, other)
    with pytest.raises(CheckpointError, match="retrain"):
        evaluate(params, root / "model", tmp_path / "reports", data_dir=other, cache_dir=root / "bb")


def test_stid_reference_is_trained_by_the_same_loop_and_reported_beside_the_baselines(tmp_path, one_torch_thread):
    from stlink.training.reference import reference_dir, reference_params, train_reference

    folder = make_processed(tmp_path)
    params = tiny_params()
    ref = reference_params(params)
    assert ref.model.arch == "stid" and ref.train.epochs == params.reference.epochs == 2
    assert params.model.arch == "stlink"  # the caller's params are untouched
    train(params, out_dir=tmp_path / "model", data_dir=folder, cache_dir=tmp_path / "bb")
    summary = train_reference(params, tmp_path / "model", data_dir=folder, cache_dir=tmp_path / "bb")
    assert summary["epochs_run"] == 2 and (reference_dir(tmp_path / "model") / "best.pt").exists()
    results = evaluate(params, model_dir=tmp_path / "model", out_dir=tmp_path / "rep", data_dir=folder,
                       cache_dir=tmp_path / "bb")
    for split in ("val", "test"):
        stid, model = results[split]["stid"], results[split]["model"]
        assert stid["count"] == model["count"] and stid["mae"] != model["mae"]
        assert "stid" in results[split]["abrupt"]
    rows = list(csv.DictReader((tmp_path / "rep" / "plots" / "horizon_test.csv").open()))
    assert "stid_mae" in rows[0]
    # reference.model=none: nothing trained, nothing reported
    params.reference.model = "none"
    assert reference_params(params) is None
    assert "stid" not in evaluate(params, model_dir=tmp_path / "model", out_dir=tmp_path / "rep2", data_dir=folder,
                                  cache_dir=tmp_path / "bb")["test"]
