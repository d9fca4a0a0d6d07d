"""Input drift (stlink.monitoring.drift): the simulator unshifted vs with an injected incident or outage,
the step's files and MLflow run, a missing reference, and the retrain it can start under Prefect."""
import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest

from conftest import make_processed, tiny_params
from stlink.config import params_from_dict, to_dict
from stlink.data.formats import load_processed, save_processed
from stlink.data.synthetic import simulate
from stlink.monitoring import MonitoringError
from stlink.monitoring.drift import detect_drift, drift_step


@pytest.fixture(scope="module")
def simulated():
    params = params_from_dict({})
    syn = dataclasses.replace(params.data.synthetic, days=14, n_corridors=2, sensors_per_corridor=4, seed=3)
    raw = simulate(syn)
    ids = raw.sensor_ids
    v = raw.readings.pivot_table(index="timestamp", columns="sensor_id", values="speed")[ids].to_numpy(float)
    v = np.where(v != 0, v, np.nan)                                             # (T, N)
    return params.drift, v, ids, 288


def test_unshifted_held_out_days_are_not_flagged(simulated):
    cfg, v, ids, spd = simulated
    a = int(len(v) * 0.7)
    flags = [detect_drift(v[:a], ids, v[s:s + spd], ids, cfg)["drifted"] for s in range(a, len(v) - spd + 1, spd // 4)]
    assert len(flags) >= 10 and not any(flags)


def test_injected_incident_and_outage_are_flagged_naming_the_sensors(simulated):
    cfg, v, ids, spd = simulated
    a = int(len(v) * 0.7)
    cur = v[a:a + spd].copy()
    hit = [1, 4, 6]
    inc = cur.copy()
    inc[:, hit] *= 0.6                                                            # a permanent incident
    res = detect_drift(v[:a], ids, inc, ids, cfg)
    calm = detect_drift(v[:a], ids, cur, ids, cfg)
    assert res["drifted"] and not calm["drifted"]
    assert set(res["drifted_sensors"]) - set(calm["drifted_sensors"]) == {ids[i] for i in hit}
    out = cur.copy()
    out[:, hit] = np.nan                                                          # an outage
    res = detect_drift(v[:a], ids, out, ids, cfg)
    rows = {r["sensor_id"]: r for r in res["sensors"]}
    assert res["drifted"] and all(rows[ids[i]]["missing_drift"] for i in hit)
    with pytest.raises(MonitoringError, match=r"sensor\(s\) \['c0"):
        detect_drift(v[:a], ids, cur[:, 1:], ids[1:], cfg)


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = make_processed(tmp_path, days=10, seed=4, N=5)
    shifted = tmp_path / "incoming"
    data = load_processed(folder)
    data.values = data.values.copy()
    data.values[-48:, :3, 0] *= 0.5                                              # the last day, 3 of 5 sensors
    save_processed(data, shifted)
    params = params_from_dict({**to_dict(tiny_params()), "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    return tmp_path, params, shifted


def test_drift_step_writes_json_html_and_mlflow(project):
    root, params, shifted = project
    calm = drift_step(params)
    assert not calm["drifted"]
    res = drift_step(params, shifted)
    assert res["drifted"] and res["drifted_sensors"] == ["s0", "s1", "s2"]
    on_disk = json.loads((root / "reports" / "tiny" / "drift" / "drift.json").read_text())
    assert on_disk["drifted_sensors"] == ["s0", "s1", "s2"] and on_disk["window"]["steps"] == 48
    html = (root / "reports" / "tiny" / "drift" / "drift.html").read_text()
    assert "<h1 id='drift-verdict'>DRIFT: 3 of 5 sensors drifted" in html
    assert "id='drift-table'" in html and "Plotly.newPlot" in html
    assert not re.search(r"<script[^>]+src=", html)                               # self-contained
    from mlflow.tracking import MlflowClient

    run = MlflowClient(params.tracking.tracking_uri).get_run(res["mlflow_run_id"])
    assert run.data.metrics["drift.share_drifted"] == pytest.approx(0.6)
    assert run.data.tags["stlink.kind"] == "drift"


def test_missing_reference_is_a_one_line_error_and_writes_nothing(project):
    root, params, shifted = project
    shutil.rmtree(root / "data" / "processed" / "tiny")
    with pytest.raises(MonitoringError, match=r"drift reference missing: data/processed/tiny holds no processed"
                                              r" dataset") as e:
        drift_step(params, shifted, log_mlflow=False)
    assert "\n" not in str(e.value)
    assert not (root / "reports").exists()


def test_drift_starts_the_retrain_deployment_under_prefect(project):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.testing.utilities import prefect_test_harness

    from flows.serve import RETRAIN, deployments
    from stlink.monitoring.drift import drift_check

    root, params, shifted = project
    on = params_from_dict({**to_dict(params), "drift": {**to_dict(params)["drift"], "retrain_on_drift": True}})

    @flow
    def scheduled_forecast(p, inp):
        return drift_check(p, inp)

    with prefect_test_harness(server_startup_timeout=120):
        for d in deployments(use_dvc=False):
            d.apply()
        calm = scheduled_forecast(on, None)
        res = scheduled_forecast(on, str(shifted))
        assert calm["retrain_flow_run"] is None and res["retrain_flow_run"] is not None
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[RETRAIN])))
            assert [str(r.id) for r in runs] == [res["retrain_flow_run"]] and "drift" in runs[0].tags
            arts = client.read_artifacts()
            assert any(a.key == "drift-tiny" and "DRIFT" in a.data for a in arts)
        assert os.path.exists(root / "reports" / "tiny" / "drift" / "drift.html")
