"""Split-conformal prediction intervals (stlink.monitoring.intervals): the guarantee on synthetic
exchangeable errors, the two scopes, the card round trip and the forecast columns."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from stlink.monitoring import MonitoringError
from stlink.monitoring.intervals import (IntervalEvaluation, add_interval_columns, attach_calibration,
                                         calibrate, calibration_for, conformal_quantiles, conformal_rank,
                                         interval_bands, interval_metrics, key)


def test_conformal_rank_is_the_finite_sample_correction():
    assert conformal_rank(9, 0.8) == 8                    # ceil(10 * 0.8)
    assert conformal_rank(19, 0.95) == 19                 # ceil(20 * 0.95): exactly n
    assert conformal_rank(18, 0.95) == 19                 # > n: no finite quantile
    assert conformal_rank(99, 0.9) == 90                  # no float round-up to 91
    s = np.arange(1.0, 19.0)[:, None]                     # 18 scores 1..18
    assert np.isinf(conformal_quantiles(s, np.ones_like(s, bool), 0.95)[0])
    assert conformal_quantiles(s, np.ones_like(s, bool), 0.8)[0] == 16.0   # ceil(19 * 0.8) = 16th smallest


@pytest.mark.parametrize("n,coverage", [(10, 0.8), (19, 0.95), (50, 0.9)])
def test_coverage_guarantee_on_exchangeable_errors(n, coverage):
    """For n iid calibration scores and one more, P(new <= q) = k / (n + 1) >= coverage exactly
    (continuous scores); 40 000 independent trials must land within 4 standard errors of it."""
    rng = np.random.default_rng(0)
    trials = 40_000
    scores = np.abs(rng.standard_t(3, size=(n + 1, trials)))       # heavy-tailed, exchangeable
    q = conformal_quantiles(scores[:n], np.ones((n, trials), bool), coverage)   # (trials,)
    covered = (scores[n] <= q).mean()
    expected = conformal_rank(n, coverage) / (n + 1)
    assert expected >= coverage
    assert abs(covered - expected) < 4 * np.sqrt(expected * (1 - expected) / trials)
    # the uncorrected empirical quantile under-covers at small n
    naive = np.quantile(scores[:n], coverage, axis=0, method="inverted_cdf")
    naive_k = int(np.ceil(n * coverage))
    if naive_k < conformal_rank(n, coverage):
        assert (scores[n] <= naive).mean() < coverage < covered


def test_masked_scores_are_ignored():
    s = np.array([[1.0], [2.0], [100.0], [3.0]])
    valid = np.array([[True], [True], [False], [True]])
    # n = 3 valid, coverage 0.5: k = ceil(4 * 0.5) = 2 -> 2.0; the masked 100 never counts
    assert conformal_quantiles(s, valid, 0.5)[0] == 2.0


def test_calibrate_sensor_scope_falls_back_to_pooled_and_pooled_fails_clearly():
    rng = np.random.default_rng(1)
    err = np.abs(rng.normal(size=(40, 2, 3)))             # (W, H, N)
    err[5:, :, 2] = np.nan                                  # sensor 2: 5 valid scores, too few for 0.95
    q = calibrate(err, [0.8, 0.95])
    assert q["pooled"].shape == q["sensor"].shape == (2, 2, 3)
    assert np.allclose(q["sensor"][1, :, 2], q["pooled"][1, :, 2])       # fallback
    assert not np.allclose(q["sensor"][0, :, 0], q["pooled"][0, :, 0])
    err[:, 1, :] = np.nan
    err[:3, 1, 0] = 1.0
    with pytest.raises(MonitoringError, match="step 2 has 3 valid validation errors"):
        calibrate(err, [0.8])


def synthetic_errors(rng, W, H=3, N=6):
    """Exchangeable forecasts: y = yhat + noise whose scale differs per sensor and grows with the step."""
    scale = np.linspace(0.5, 3.0, N)[None, None, :] * (1 + 0.2 * np.arange(H))[None, :, None]
    yhat = 50 + rng.normal(size=(W, H, N))
    y = yhat + scale * rng.standard_normal((W, H, N))
    mask = rng.random((W, H, N)) > 0.05
    return y, yhat, mask


def test_interval_evaluation_covers_the_test_split_and_measures_both_scopes():
    rng = np.random.default_rng(2)
    hook = IntervalEvaluation([0.8, 0.95], scope="sensor")
    for _ in range(4):
        hook.update("val", "model", *synthetic_errors(rng, 200))
    for _ in range(8):
        hook.update("test", "model", *synthetic_errors(rng, 500))
    res = hook.result()
    for scope in ("pooled", "sensor"):
        for cov in (0.8, 0.95):
            r = res["model"][scope][key(cov)]
            assert abs(r["coverage"] - cov) < 0.015, (scope, cov, r["coverage"])
            assert len(r["by_step"]) == 3 and all(s["mean_width"] > 0 for s in r["by_step"])
            assert r["by_step"][0]["mean_width"] < r["by_step"][2]["mean_width"]   # noise grows with step
    # sensors with different noise: pooled widths miss per-sensor coverage, per-sensor widths do not
    assert res["model"]["sensor"]["80"]["sensor_coverage_mean_abs_gap"] < 0.02
    assert res["model"]["pooled"]["80"]["sensor_coverage_mean_abs_gap"] > 0.08
    assert hook.calibration().shape == (2, 3, 6)
    names = {k for k, _, _ in interval_metrics(res)}
    assert "test.intervals.model.sensor.cov95.coverage" in names
    assert "test.intervals.model.pooled.cov80.mean_width_by_step" in names


def test_bad_scope_and_coverage_fail_clearly():
    with pytest.raises(MonitoringError, match="intervals.scope='both'"):
        IntervalEvaluation([0.8], scope="both")
    with pytest.raises(MonitoringError, match="1.5 is not in"):
        conformal_quantiles(np.ones((3, 1)), np.ones((3, 1), bool), 1.5)


def write_card(folder, sensors=("a", "b")):
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "model.json").write_text(json.dumps({"sensor_ids": list(sensors), "output_len": 2}))
    return folder / "model.onnx"


def test_card_round_trip_and_forecast_columns(tmp_path):
    onnx = write_card(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "best.pt").write_bytes(b"weights")
    half = {"80": [[1.0, 2.0], [3.0, 4.0]], "95": [[2.0, 3.0], [5.0, 6.0]]}          # (H=2, N=2)
    from stlink.io import sha256_file, write_json

    write_json(tmp_path / "calibration.json", {
        "format": "stlink-intervals/1", "method": "m", "scope": "sensor", "coverages": [0.8, 0.95],
        "calibrated_on": "val", "sensor_ids": ["a", "b"], "half_width": half,
        "checkpoint_sha256": sha256_file(tmp_path / "m" / "best.pt")})
    assert attach_calibration(onnx.with_suffix(".json"), calibration_for(tmp_path / "calibration.json", tmp_path / "m"))
    bands = interval_bands(onnx, [0.8, 0.95], "required")
    rows = pa.table({"sensor_id": ["b", "a", "b"], "horizon_step": pa.array([1, 2, 2], pa.int32()),
                     "value": pa.array([10.0, 1.0, 50.0], pa.float32())})
    out = add_interval_columns(rows, bands, ["a", "b"], bounds=(0.0, 52.0)).to_pandas()
    assert out["lower_80"].tolist() == [8.0, 0.0, 46.0]           # b@1: 10-2; a@2: 1-3 clipped to 0; b@2: 50-4
    assert out["upper_80"].tolist() == [12.0, 4.0, 52.0]          # b@2: 54 clipped to 52
    assert out["upper_95"].tolist() == [13.0, 6.0, 52.0]
    df = add_interval_columns(rows.to_pandas(), bands, ["a", "b"])
    assert df["upper_95"].tolist() == [13.0, 6.0, 56.0]
    # the checkpoint changed since the calibration: refused, naming the file
    (tmp_path / "m" / "best.pt").write_bytes(b"other weights")
    with pytest.raises(MonitoringError, match="calibration.json: calibrated for another checkpoint"):
        calibration_for(tmp_path / "calibration.json", tmp_path / "m")


def test_interval_request_without_calibration_is_a_one_line_error(tmp_path):
    onnx = write_card(tmp_path)
    with pytest.raises(MonitoringError, match=r"model.json: the model carries no interval calibration") as exc:
        interval_bands(onnx, [0.8], "required")
    assert "\n" not in str(exc.value)
    assert interval_bands(onnx, [0.8], "auto") is None
    assert interval_bands(onnx, [0.8], "off") is None
    assert calibration_for(tmp_path / "nothing.json", tmp_path) is None
    with pytest.raises(MonitoringError, match="unknown to the calibration"):
        add_interval_columns(pd.DataFrame({"sensor_id": ["zz"], "horizon_step": [1], "value": [1.0]}),
                             {"80": np.ones((2, 2))}, ["a", "b"])


# --- the pipeline: evaluate calibrates, export carries the widths -----------------------------------

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny model trained, evaluated and exported in a temp project (cwd-relative params paths)."""
    import os

    import torch

    from conftest import make_processed, tiny_params
    from stlink.export.onnx_export import export_step
    from stlink.training.evaluate import evaluate
    from stlink.training.train import train

    root = tmp_path_factory.mktemp("intervals")
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(root)
    torch.set_num_threads(1)
    try:
        folder = make_processed(root, days=10, seed=5)
        params = tiny_params(epochs=1)
        train(params, params.model_dir, data_dir=folder, cache_dir=root / "bb")
        results = evaluate(params, params.model_dir, params.report_dir, data_dir=folder, cache_dir=root / "bb")
        record = export_step(params, params.model_dir, params.export_dir)
        yield root, params, results, record
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)


def test_evaluate_reports_coverage_and_export_carries_the_calibration(evaluated):
    root, params, results, record = evaluated
    res = results["test"]["intervals"]
    for method in ("model", "last_value", "historical_average", "seasonal_naive"):
        for scope in ("pooled", "sensor"):
            r = res[method][scope]["95"]
            assert 0.0 < r["coverage"] <= 1.0 and r["mean_width"] > 0 and len(r["by_step"]) == 12
    on_disk = json.loads((root / params.report_dir / "metrics" / "intervals.json").read_text())
    assert on_disk["model"]["pooled"]["80"]["coverage"] == res["model"]["pooled"]["80"]["coverage"]
    cal = json.loads((root / params.report_dir / "calibration.json").read_text())
    assert cal["scope"] == "pooled" and np.asarray(cal["half_width"]["80"]).shape == (12, 4)
    # widths recomputed from the model's own validation forecasts
    assert record["intervals"] is True
    card = json.loads((root / params.export_dir / "model.json").read_text())
    assert card["intervals"]["half_width"] == cal["half_width"]
    bands = interval_bands(root / params.export_dir / "model.onnx", [0.8, 0.95], "required")
    assert (bands["95"] >= bands["80"]).all()
