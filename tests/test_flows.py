"""The Prefect flows under a real (ephemeral, SQLite) Prefect API: the training pipeline end to end on a
tiny configuration, a run that fails validation, the chunked batch forecast, the deployments' schedules,
retries of I/O tasks and the one-training-at-a-time slot.

One tiny project (a temp dir holding only ``params.yaml``) is trained once per module with the real
stlink steps (``use_dvc=False``; the DVC stages call the same functions).
"""
import functools
import hashlib
import http.server
import importlib.util
import os
import threading
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from prefect import flow  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.client.schemas.objects import ConcurrencyLimitStrategy  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

import flows.forecast  # noqa: E402
import flows.training  # noqa: E402
from fixtures_gen import byo_long, write_byo  # noqa: E402
from flows import tasks as ft  # noqa: E402
from flows.forecast import batch_forecast, make_task_runner, split_issue_times  # noqa: E402
from flows.serve import DEFAULT_CRON, FORECAST, RETRAIN, deployments  # noqa: E402
from flows.training import (evaluate_task, export_task, ingest_task, prepare_task, promote_task,  # noqa: E402
                            train_task, training_pipeline, validate_task)
from stlink.config import ConfigError, load_params  # noqa: E402

DATASET = "tiny"
MODEL = f"stlink-{DATASET}"
TINY = {
    "data": {"dataset": DATASET, "synthetic": {"n_corridors": 1, "sensors_per_corridor": 2, "days": 8,
                                               "freq_minutes": 30, "outage_rate_per_sensor": 0.0}},
    "validation": {"data_docs": False},
    "model": {"backbone": "tiny", "n_layers": 1, "tiny_hidden": 32, "tiny_heads": 2, "patch_len": 3,
              "spatial_dim": 2, "lora_rank": 4},
    "train": {"epochs": 1, "batch_size": 16, "warmup_steps": 2, "max_train_batches": 4, "max_val_batches": 2,
              "device": "cpu"},
    "evaluate": {"batch_size": 64, "plot_sensors": 2},
}
STEPS = ["ingest", "validate", "prepare", "train", "evaluate", "export", "promote"]


@pytest.fixture(scope="session")
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def task_runs(flow_run_id) -> list:
    """Task runs of a flow run, in start order."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.start_time or r.expected_start_time)


def artifacts(flow_run_id) -> dict:
    """key -> artifact of a flow run."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def registry(root):
    from stlink.tracking import TrackingConfig
    from stlink.tracking.mlflow_log import client_for

    return client_for(TrackingConfig(), root)


@pytest.fixture(scope="module")
def project(prefect_api, tmp_path_factory):
    """The training flow, run once on the tiny configuration in a temp project (cwd = project root)."""
    root = tmp_path_factory.mktemp("flow-project")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        state = training_pipeline(params_path="params.yaml", use_dvc=False, return_state=True)
        yield {"root": root, "state": state, "result": state.result(raise_on_failure=False), "mp": mp}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def champion(project):
    """The trained version as champion: promoted by the gate, or else by hand as an operator would."""
    from stlink.tracking import CHAMPION

    result = project["result"]
    if not result["promoted"]:
        registry(project["root"]).set_registered_model_alias(MODEL, CHAMPION, result["version"])
    return result["version"]


def test_training_flow_runs_every_step_and_leaves_a_gated_registered_model(project):
    root, state, result = project["root"], project["state"], project["result"]
    assert state.is_completed(), state.message
    runs = task_runs(state.state_details.flow_run_id)
    assert [r.name.rsplit("-", 1)[0] for r in runs] == STEPS
    assert all(r.state.is_completed() for r in runs)
    for path in ("data/raw/tiny/readings.parquet", "reports/tiny/validation/raw.json", "data/processed/tiny/values.npy",
                 "reports/tiny/validation/processed.json", "models/tiny/best.pt", "models/tiny/last.pt",
                 "reports/tiny/metrics/test.json", "reports/tiny/plots/horizon_test.png",
                 "models/exported/tiny/model.onnx", "models/exported/tiny/model.json"):
        assert (root / path).is_file(), path
    assert result["onnx"] == "models/exported/tiny/model.onnx" and result["best_val_mae"] > 0

    client = registry(root)
    version = client.get_model_version(MODEL, result["version"])
    assert version.tags["onnx_sha256"] == sha(root / result["onnx"])
    run = client.get_run(version.run_id)                   # the training run, with the evaluation logged on it
    assert run.data.metrics["best_val_mae"] == pytest.approx(result["best_val_mae"])
    assert "val.model.mae" in run.data.metrics
    tags = version.tags
    passed = all(tags[f"gate.{g}"].startswith("pass") for g in
                 ("a_vs_champion", "b_vs_baseline", "c_onnx_parity", "d_output_validation"))
    assert tags["gate.c_onnx_parity"].startswith("pass")
    assert result["promoted"] == passed and result["decision"] == tags["gate.decision"]
    assert result["champion"] == (result["version"] if passed else None)
    gate = artifacts(state.state_details.flow_run_id)["promotion-tiny"]
    assert gate.type == "markdown" and tags["gate.b_vs_baseline"] in gate.data


def test_failed_validation_fails_the_run_publishes_the_expectations_and_keeps_the_champion(project, champion):
    from stlink.tracking import CHAMPION

    root = project["root"]
    client = registry(root)
    kept = ["models/tiny/best.pt", "models/tiny/last.pt", "models/exported/tiny/model.onnx",
            "data/processed/tiny/values.npy"]
    before = {p: sha(root / p) for p in kept}
    n_versions = len(client.search_model_versions(f"name = '{MODEL}'"))

    state = training_pipeline(params_path="params.yaml", overrides=["validation.bounds.speed=[0, 10]"],
                              use_dvc=False, return_state=True)

    assert state.is_failed()
    assert "speed" in state.message and "failed validation" in state.message
    runs = {r.name.rsplit("-", 1)[0]: r for r in task_runs(state.state_details.flow_run_id)}
    assert runs["validate"].state.is_failed() and runs["validate"].run_count == 1  # validation never retries
    assert set(runs) == {"ingest", "validate"}                                     # nothing after it ran
    artifact = artifacts(state.state_details.flow_run_id)["validation-tiny-raw"]
    assert artifact.type == "markdown"
    assert "failed expectation" in artifact.data and "| expect_column_values_to_be_between | speed |" in artifact.data
    assert (root / "reports/tiny/validation/raw.failed.json").is_file()
    assert str(client.get_model_version_by_alias(MODEL, CHAMPION).version) == champion
    assert len(client.search_model_versions(f"name = '{MODEL}'")) == n_versions
    assert {p: sha(root / p) for p in kept} == before


def test_batch_forecast_scores_issue_time_chunks_with_the_champion(project, champion, tmp_path):
    out = tmp_path / "out" / "forecast.parquet"
    state = batch_forecast(params_path="params.yaml", output=str(out), device="cpu", start="2024-01-08 20:30",
                           chunks=3, return_state=True)

    assert state.is_completed(), state.message
    result = state.result()
    runs = [r.name.rsplit("-", 1)[0] for r in task_runs(state.state_details.flow_run_id)]
    assert sorted(runs) == sorted(["load-model", "validate-input", "forecast-chunk", "forecast-chunk",
                                   "forecast-chunk", "write-output", "drift-and-report"])
    df = pd.read_parquet(out)
    issued = sorted(pd.DatetimeIndex(df["issued_at"].unique()))
    assert issued == list(pd.date_range("2024-01-08 20:30", "2024-01-08 23:30", freq="30min"))
    assert len(df) == result["rows"] == 7 * 4 * 12 and df["value"].notna().all()
    assert not df.duplicated(["sensor_id", "issued_at", "horizon_step"]).any()
    assert set(df["model_version"]) == {f"{MODEL}/{champion}"} == {result["model_version"]}
    assert result["model_uri"] == f"models:/{MODEL}@champion" and result["chunks"] == 3
    # the report beside the table (stlink.monitoring); no temporary file left
    assert sorted(p.name for p in out.parent.iterdir()) == ["forecast.html", "forecast.parquet"]
    assert result["monitoring"]["report"] == str(out.with_suffix(".html"))
    assert isinstance(result["monitoring"]["drifted"], bool)                     # the drift check ran


def test_batch_forecast_on_a_dask_local_cluster_equals_the_thread_runner(project, champion, tmp_path):
    """Issue 10 item 4: the chunks on a 2-worker LocalCluster (loopback) give the thread runner's table."""
    pytest.importorskip("prefect_dask")
    tables = {}
    for runner in ("threads:2", "dask:2"):
        out = tmp_path / runner.replace(":", "-") / "forecast.parquet"
        state = batch_forecast(params_path="params.yaml", output=str(out), device="cpu", start="2024-01-08 21:00",
                               chunks=2, task_runner=runner, return_state=True)
        assert state.is_completed(), state.message
        tables[runner] = pd.read_parquet(out)
    assert len(tables["dask:2"]) == 6 * 4 * 12
    pd.testing.assert_frame_equal(tables["threads:2"], tables["dask:2"])


def test_deployments_carry_the_intended_schedules(monkeypatch):
    monkeypatch.setenv("STLINK_TZ", "Europe/Paris")
    retrain, forecast = deployments()
    assert (retrain.name, forecast.name) == (RETRAIN, FORECAST)
    cron = retrain.schedules[0].schedule
    assert (cron.cron, cron.timezone) == (DEFAULT_CRON, "Europe/Paris") == ("0 2 * * *", "Europe/Paris")
    every = forecast.schedules[0].schedule
    assert every.interval.total_seconds() == 15 * 60 and every.timezone == "Europe/Paris"
    assert retrain.concurrency_limit == 1
    assert forecast.concurrency_limit == 1
    assert forecast.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
    for deployment, module, name in ((retrain, flows.training, "training_pipeline"),
                                     (forecast, flows.forecast, "batch_forecast")):
        path, _, entry = deployment.entrypoint.partition(":")
        assert (Path(path).resolve(), entry) == (Path(module.__file__).resolve(), name)
    assert training_pipeline.validate_parameters(retrain.parameters)["resume"] is True
    assert batch_forecast.validate_parameters(forecast.parameters)["task_runner"] == "threads"

    monkeypatch.delenv("STLINK_TZ")
    retrain, forecast = deployments(cron="30 1 * * 1-5", timezone="America/New_York", every_minutes=60)
    assert (retrain.schedules[0].schedule.cron, retrain.schedules[0].schedule.timezone) == \
        ("30 1 * * 1-5", "America/New_York")
    assert forecast.schedules[0].schedule.interval.total_seconds() == 3600
    assert deployments()[0].schedules[0].schedule.timezone == "UTC"


class FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Answers 503 to the first request of each file, then serves it; logs every request to a file."""

    def __init__(self, *args, log_file, **kwargs):
        self.log_file = log_file
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        seen = self.log_file.read_text().splitlines() if self.log_file.exists() else []
        with open(self.log_file, "a") as fh:
            fh.write(self.path + "\n")
        if self.path not in seen:
            self.send_error(503, "try again")
            return
        super().do_GET()


@pytest.fixture
def flaky_server(tmp_path):
    folder, log_file = tmp_path / "served", tmp_path / "requests.log"
    write_byo(folder, byo_long(pd.date_range("2024-01-01", periods=48, freq="30min"), ["a", "b"]))
    handler = functools.partial(FlakyHandler, directory=str(folder), log_file=log_file)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", sha(folder / "readings.csv"), log_file
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_io_tasks_retry_transient_failures_only(prefect_api, flaky_server, tmp_path, monkeypatch):
    url, digest, log_file = flaky_server
    monkeypatch.chdir(tmp_path)
    fast_ingest = ingest_task.with_options(retry_delay_seconds=0.1, retry_jitter_factor=None)

    @flow
    def fetch(sha256: str) -> str:
        params = load_params(None, ["data.dataset=byo", "data.source=byo", f"data.url={url}",
                                           f"data.sha256={{readings.csv: '{sha256}'}}"])
        return fast_ingest(params, use_dvc=False)

    state = fetch(digest, return_state=True)
    assert state.is_completed() and (tmp_path / "data/raw/byo/readings.parquet").is_file()
    assert log_file.read_text().splitlines() == ["/readings.csv", "/readings.csv"]  # 503, then the file
    assert task_runs(state.state_details.flow_run_id)[0].run_count == 2

    log_file.unlink()
    state = fetch("0" * 64, return_state=True)  # the 503 is retried, the checksum mismatch after it is not
    assert state.is_failed() and "sha256 mismatch" in state.message
    assert log_file.read_text().splitlines() == ["/readings.csv", "/readings.csv"]
    assert task_runs(state.state_details.flow_run_id)[0].run_count == 2

    for io in (ingest_task, export_task, promote_task):
        assert io.retries == ft.IO_RETRIES == 3 and io.retry_delay_seconds == [10.0, 20.0, 40.0], io.name
        assert io.retry_condition_fn is ft.retry_if_transient
    for step in (validate_task, prepare_task, train_task, evaluate_task):
        assert step.retries == 0, step.name


def test_a_second_training_waits_for_the_slot(prefect_api):
    with ft.training_slot():
        errors = []
        other = threading.Thread(target=lambda: _acquire(errors))
        other.start()
        other.join(timeout=30)
        assert errors and isinstance(errors[0], TimeoutError)
    with ft.training_slot(timeout_seconds=5):  # released again
        pass
    assert ft.ensure_limit() == 1


def _acquire(errors: list) -> None:
    try:
        with ft.training_slot(timeout_seconds=1):
            pass
    except BaseException as exc:  # noqa: BLE001 - handed to the test
        errors.append(exc)


def test_dvc_mode_refuses_what_dvc_lock_would_not_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"not a DVC project.*overrides \['train.epochs=1'\].*resume=False"):
        ft.check_dvc_project("params.yaml", ["train.epochs=1"], resume=False)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages:\n  ingest:\n    cmd: stlink ingest\n")
    ft.check_dvc_project("params.yaml", None, resume=True)
    with pytest.raises(ConfigError, match="params_path=other.yaml: DVC stages read ./params.yaml"):
        ft.check_dvc_project("other.yaml", None, resume=True)
    assert ft.dvc_stages() == {"ingest"}


def test_chunks_and_task_runners():
    times = [f"t{i}" for i in range(7)]
    assert split_issue_times(times, 3) == [("t0", "t2"), ("t3", "t4"), ("t5", "t6")]
    assert split_issue_times(times[:2], 4) == [("t0", "t0"), ("t1", "t1")]
    with pytest.raises(ConfigError, match="chunks=0"):
        split_issue_times(times, 0)
    assert make_task_runner("threads:3")._max_workers == 3
    if importlib.util.find_spec("prefect_dask") is None:
        with pytest.raises(ConfigError, match="pip install prefect-dask"):
            make_task_runner("dask:tcp://127.0.0.1:8786")
    else:
        assert type(make_task_runner("dask:tcp://127.0.0.1:8786")).__name__ == "DaskTaskRunner"
        local = make_task_runner("dask:3")
        assert local.cluster_kwargs["n_workers"] == 3 and local.cluster_kwargs["host"] == "127.0.0.1"
    with pytest.raises(ConfigError, match="one of threads"):
        make_task_runner("ray:ray://head:10001")  # not offered: untested
    with pytest.raises(ConfigError, match="one of threads"):
        make_task_runner("spark")
    assert ft.is_transient(OSError("connection reset")) and not ft.is_transient(ConfigError("bad"))
    assert ft.artifact_key("validation", "PEMS_08.v2", "raw") == "validation-pems-08-v2-raw"
