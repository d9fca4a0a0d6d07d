"""Realised accuracy on the synthetic simulator in live mode: forecast day D, ingest day D+1, monitor.

One tiny project in a temp dir runs the real steps (stlink.pipeline: ingest, prepare, train,
evaluate, export, forecast, monitor) with a real MLflow store (SQLite) under it.
"""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from stlink import pipeline
from stlink.config import load_params
from stlink.monitoring import MonitoringError
from stlink.monitoring.monitor import daily_accuracy, interval_keys, monitor

DATASET = "tiny-live"
DAYS = 8
TINY = {
    "data": {"dataset": DATASET, "synthetic": {"n_corridors": 1, "sensors_per_corridor": 2, "days": DAYS,
                                               "freq_minutes": 30, "outage_rate_per_sensor": 0.0,
                                               "live": "day", "live_horizon_days": 12}},
    "validation": {"data_docs": False},
    "model": {"backbone": "tiny", "n_layers": 1, "tiny_hidden": 32, "tiny_heads": 2, "patch_len": 3,
              "spatial_dim": 2, "lora_rank": 4},
    "train": {"epochs": 1, "batch_size": 16, "warmup_steps": 2, "max_train_batches": 4, "max_val_batches": 2,
              "device": "cpu"},
    "evaluate": {"batch_size": 64, "plot_sensors": 2},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Day D: ingest (live), prepare, train, evaluate, export, forecast the latest window with
    registered version 1; keep a copy of day D's readings; then ingest day D+1."""
    root = tmp_path_factory.mktemp("monitor")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    torch.set_num_threads(1)
    try:
        params = load_params("params.yaml")
        pipeline.ingest_step(params)
        shutil.copytree(params.raw_dir, root / "raw_day_D")
        pipeline.validate_step(params)
        pipeline.prepare_step(params)
        pipeline.train_step(params, resume=False)
        pipeline.evaluate_step(params)
        pipeline.export_step(params)
        pipeline.forecast_step(params, model=f"models:/stlink-{DATASET}/1", device="cpu")
        pipeline.ingest_step(params)                 # live: one more simulated day (D+1)
        # the next scheduled forecast reads the new readings (raw folder, as the batch flow can)
        pipeline.forecast_step(params, model=f"models:/stlink-{DATASET}/1", device="cpu", input=params.raw_dir,
                               output=params.report_dir / "forecast_next.parquet")
        yield root, params
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def test_live_ingest_appends_one_day_and_keeps_the_earlier_readings(project):
    root, params = project
    before = pd.read_parquet(root / "raw_day_D" / "readings.parquet")
    after = pd.read_parquet(root / params.raw_dir / "readings.parquet")
    n = before["sensor_id"].nunique()
    assert len(after) == len(before) + 48 * n                       # 48 half-hours of D+1, every sensor
    pd.testing.assert_frame_equal(after.iloc[: len(before)].reset_index(drop=True), before)
    assert pd.Timestamp(after["timestamp"].max()) == pd.Timestamp("2024-01-09 23:30")


def test_monitor_scores_day_D_forecast_against_day_D_plus_1(project):
    root, params = project
    os.chdir(root)
    forecast = pd.read_parquet(root / params.report_dir / "forecast.parquet")
    assert forecast["issued_at"].max() == pd.Timestamp("2024-01-08 23:30")
    res = pipeline.monitor_step(params)
    hist = pd.read_parquet(root / params.report_dir / "monitor" / "history.parquet")
    assert set(hist["day"]) == {"2024-01-09"}
    assert sorted(hist["horizon_step"]) == list(range(1, 13))
    # the realised MAE recomputed by hand from the raw readings of D+1
    raw = pd.read_parquet(root / params.raw_dir / "readings.parquet")
    j = forecast.merge(raw.rename(columns={"timestamp": "target_time"}), on=["sensor_id", "target_time"])
    j = j[j["speed"] != 0]
    mae = (j["value"] - j["speed"]).abs().groupby(j["horizon_step"]).mean()
    np.testing.assert_allclose(hist.set_index("horizon_step")["mae"].sort_index(), mae.sort_index(), rtol=1e-5)
    # the champion's reference MAE comes from the registered version's MLflow run
    test_mae = json.loads((root / params.report_dir / "metrics" / "test.json").read_text())["model"]["mae"]
    assert res["days"][0]["reference_mae"] == pytest.approx(test_mae)
    assert res["days"][0]["model_version"] == f"stlink-{DATASET}/1"
    from mlflow.tracking import MlflowClient

    run = MlflowClient().get_run(res["mlflow_run_id"])
    assert run.data.metrics["realised.mae"] == pytest.approx(res["days"][0]["mae"])
    # the exported card carried the calibration: the forecast has intervals, the monitor their coverage
    assert interval_keys(list(forecast.columns)) == ["80", "95"]
    assert ((forecast["lower_95"] <= forecast["lower_80"]) & (forecast["lower_80"] <= forecast["value"])).all()
    assert hist["coverage_95"].between(0, 1).all() and (hist["coverage_95"] >= hist["coverage_80"]).all()


def test_the_forecast_step_wrote_drift_and_report_beside_the_table(project):
    root, params = project
    assert (root / params.report_dir / "forecast.html").is_file()
    drift = json.loads((root / params.report_dir / "drift" / "drift.json").read_text())
    assert drift["n_sensors"] == 4 and drift["window"]["steps"] == 48


def test_next_forecast_covers_the_new_issue_time_and_is_archived_unscored(project):
    root, params = project
    os.chdir(root)
    nxt = pd.read_parquet(root / params.report_dir / "forecast_next.parquet")
    assert nxt["issued_at"].max() == pd.Timestamp("2024-01-09 23:30")
    res = monitor(params, forecasts=[root / params.report_dir / "forecast_next.parquet"], log_mlflow=False)
    assert res["forecasts_archived"] == 2                        # day D's and D+1's issue times
    assert [d["day"] for d in res["days"]] == ["2024-01-09"]     # D+1's targets have no actuals yet


def test_monitor_flags_and_replaces_rather_than_duplicates(project):
    root, params = project
    os.chdir(root)
    strict = load_params("params.yaml", ["monitor.mae_threshold=-0.999"])
    res = pipeline.monitor_step(strict)
    assert res["flagged_days"] == ["2024-01-09"]
    hist = pd.read_parquet(root / params.report_dir / "monitor" / "history.parquet")
    assert len(hist) == 12 and hist["flagged"].all()


def test_monitor_without_overlapping_actuals_fails_and_writes_no_history(project, tmp_path):
    root, params = project
    os.chdir(root)
    with pytest.raises(MonitoringError, match=r"no actual reading overlaps the forecasts .*ingest newer readings") as e:
        monitor(params, forecasts=[root / params.report_dir / "forecast.parquet"], raw_dir=root / "raw_day_D",
                out_dir=tmp_path / "mon", log_mlflow=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "mon" / "history.parquet").exists() and not (tmp_path / "mon" / "latest.json").exists()


def test_daily_accuracy_counts_interval_coverage():
    t = pd.Timestamp("2024-01-02 00:00")
    joined = pd.DataFrame({
        "day": None, "model_version": "m/1", "sensor_id": ["a", "a", "b", "b"], "issued_at": t,
        "target_time": [t, t + pd.Timedelta("1h"), t, t + pd.Timedelta("1h")], "horizon_step": [1, 2, 1, 2],
        "value": [10.0, 10.0, 20.0, 20.0], "actual": [11.0, 14.0, 20.0, 30.0],
        "lower_80": [9.0, 9.0, 19.0, 19.0], "upper_80": [11.0, 11.0, 21.0, 21.0]}).drop(columns="day")
    rows = daily_accuracy(joined).set_index("horizon_step")
    assert rows.loc[1, "mae"] == 0.5 and rows.loc[2, "mae"] == 7.0
    assert rows.loc[1, "coverage_80"] == 1.0 and rows.loc[2, "coverage_80"] == 0.0
    assert (rows["count"] == 2).all() and (rows["day"] == "2024-01-02").all()
