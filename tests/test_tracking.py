"""MLflow tracking of a real (tiny-backbone) training, evaluation and export, on a SQLite store.

One module-scoped project in a temp dir (a git repo with a ``dvc.lock``): the real ``train`` and
``evaluate`` run once on a generated dataset, the tracking steps log them, and the tests read the
run back through the MLflow client.  The last test exports the model to ONNX, registers it and
runs the promotion gate with the real output validation (a forecast of the latest window).
"""
import hashlib
import json
import re
import os
import subprocess

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from conftest import make_processed, tiny_params  # noqa: E402
from stlink.config import flatten, to_dict  # noqa: E402
from stlink.data.formats import load_processed, save_processed  # noqa: E402
from stlink.io import sha256_file  # noqa: E402
from stlink.tracking import (CHALLENGER, TrackingConfig, TrackingError, find_run, log_model,  # noqa: E402
                             promote_step, register_export_step, resolve_model, track_evaluate_step,
                             track_train_step, tracking_uri)
from stlink.tracking.mlflow_log import (TORCH_MODEL_TAG, artifact_location, client_for, configure,  # noqa: E402
                                        example_inputs)
from stlink.training.checkpoint import load_trained  # noqa: E402


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Trained, evaluated and tracked tiny model in a temp project (cwd = project root)."""
    from stlink.training.evaluate import evaluate
    from stlink.training.reference import train_reference
    from stlink.training.train import train

    root = tmp_path_factory.mktemp("project")
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "add", "dvc.lock"], check=True)
    subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
                   check=True)
    data_dir = make_processed(root, days=8, seed=3)
    data = load_processed(data_dir)
    data.meta["source_files"] = {"readings.csv": "ab" * 32}  # as `stlink prepare` records the sources
    for split in ("val", "test"):                             # incidents: 30 mph drops -> an abrupt slice
        start = data.meta["splits"][split][0]
        data.values[start + 30:start + 36, 1, 0] = 20.0
    save_processed(data, data_dir)
    params = tiny_params()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = train(params, params.model_dir, data_dir=data_dir, cache_dir=root / "cache")
        train_reference(params, params.model_dir, data_dir=data_dir, cache_dir=root / "cache")  # STID beside it
        metrics = evaluate(params, params.model_dir, params.report_dir, data_dir=data_dir, cache_dir=root / "cache")
        run_id = track_train_step(params, summary, wall_time_s=12.5, project_dir=root, cache_dir=root / "cache")
        assert track_evaluate_step(params, metrics, project_dir=root) == run_id
        yield {"root": root, "params": params, "summary": summary, "metrics": metrics, "run_id": run_id,
               "client": client_for(TrackingConfig(), root), "data_dir": data_dir, "mp": mp}
    torch.set_num_threads(threads)


def history(client, run_id, key) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric, by step."""
    ms = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in ms], [m.value for m in ms]


def test_tracking_uri_from_params_then_env_then_project_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = tracking_uri(TrackingConfig(), tmp_path)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert artifact_location(TrackingConfig(), default) == (tmp_path.resolve() / "mlruns" / "artifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking_uri(TrackingConfig(), tmp_path) == "sqlite:////elsewhere/x.db"
    assert tracking_uri(TrackingConfig(tracking_uri="http://127.0.0.1:5000"), tmp_path) == "http://127.0.0.1:5000"
    assert artifact_location(TrackingConfig(), "http://127.0.0.1:5000") is None


def test_default_store_and_artifacts_live_in_the_project(project):
    root, client = project["root"], project["client"]
    assert (root / "mlruns" / "mlflow.db").is_file()
    experiment = client.get_experiment_by_name("stlink")
    assert experiment.artifact_location == (root / "mlruns" / "artifacts").as_uri()
    assert client.get_run(project["run_id"]).info.artifact_uri.startswith((root / "mlruns" / "artifacts").as_uri())


def test_training_run_has_all_params_and_provenance(project):
    run = project["client"].get_run(project["run_id"])
    params, summary, root = project["params"], project["summary"], project["root"]
    flat = {k: str(v) for k, v in flatten(to_dict(params)).items()}
    assert run.data.params == flat and run.data.params["model.lora_rank"] == "4"
    tags = run.data.tags
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and tags["git.dirty"] == "false"
    assert tags["data.processed_sha256"] == summary["data_sha256"]
    assert tags["data.source_sha256.readings.csv"] == "ab" * 32
    assert tags["data.dvc_lock_sha256"] == hashlib.sha256((root / "dvc.lock").read_bytes()).hexdigest()
    assert tags["version.torch"] == torch.__version__ and tags["version.mlflow"] == mlflow.__version__
    assert {"version.transformers", "version.peft", "version.onnx", "version.onnxruntime"} <= set(tags)
    assert tags["device"] == "cpu" and tags["stlink.dataset"] == "tiny"
    assert tags["stlink.model_sha256"] == sha256_file(root / "models" / "tiny" / "best.pt")


def test_training_run_has_epoch_metrics_with_steps_and_the_summary(project):
    client, run_id, summary = project["client"], project["run_id"], project["summary"]
    epochs = summary["history"]
    for key, field in (("val_mae", "val_mae"), ("train_loss", "train_loss"), ("epoch_seconds", "seconds")):
        steps, values = history(client, run_id, key)
        assert steps == [h["epoch"] for h in epochs] == [1, 2]
        assert values == pytest.approx([h[field] for h in epochs])
    m = client.get_run(run_id).data.metrics
    assert m["trainable_params"] == summary["trainable_params"] and m["total_params"] == summary["total_params"]
    assert m["peak_memory_mb"] == pytest.approx(summary["peak_memory_mb"])
    assert m["best_val_mae"] == pytest.approx(summary["best_val_mae"]) and m["wall_time_s"] == 12.5


def test_evaluation_metrics_per_step_for_the_model_and_every_baseline(project):
    client, run_id, metrics = project["client"], project["run_id"], project["metrics"]
    m = client.get_run(run_id).data.metrics
    for split in ("val", "test"):
        for method in ("model", "stid", "last_value", "historical_average", "seasonal_naive"):
            ref = metrics[split][method]
            assert m[f"{split}.{method}.mae"] == pytest.approx(ref["mae"])
            assert m[f"{split}.{method}.rmse"] == pytest.approx(ref["rmse"])
            assert m[f"{split}.{method}.step_3.mae"] == pytest.approx(ref["step_3"]["mae"])
            steps, values = history(client, run_id, f"{split}.{method}.mae_by_step")
            assert steps == list(range(1, 13)) and values == pytest.approx([r["mae"] for r in ref["per_step"]])
            assert m[f"{split}.abrupt.{method}.mae"] == pytest.approx(metrics[split]["abrupt"][method]["mae"])
        assert m[f"{split}.abrupt.fraction"] == pytest.approx(metrics[split]["abrupt"]["fraction"])
        assert m[f"{split}.mape_floor"] == metrics[split]["model"]["mape_floor"]
    # the naive baselines gate promotion; the learned reference is logged and tagged, not gating
    assert client.get_run(run_id).data.tags["stlink.baselines"] == "last_value,historical_average,seasonal_naive"
    assert client.get_run(run_id).data.tags["stlink.references"] == "stid"


def test_run_artifacts_hold_plots_metrics_and_training_files(project):
    client, run_id, root = project["client"], project["run_id"], project["root"]
    plots = {p.name for p in (root / "reports" / "tiny" / "plots").glob("*.png")}
    assert plots and {a.path for a in client.list_artifacts(run_id, "plots")} == {f"plots/{p}" for p in plots}
    logged = json.loads(open(client.download_artifacts(run_id, "metrics/test.json")).read())
    assert logged["model"]["mae"] == pytest.approx(project["metrics"]["test"]["model"]["mae"])
    assert {a.path for a in client.list_artifacts(run_id, "training")} >= \
        {"training/config.json", "training/train_metrics.json", "training/data_meta.json"}
    assert [a.path for a in client.list_artifacts(run_id, "data")] == ["data/dvc.lock"]


def test_logged_torch_model_has_signature_example_and_reproduces_the_forecasts(project):
    client, run_id, root, params = project["client"], project["run_id"], project["root"], project["params"]
    uri = client.get_run(run_id).data.tags[TORCH_MODEL_TAG]
    info = mlflow.models.get_model_info(uri)
    assert info.run_id == run_id and info.saved_input_example_info is not None
    specs = info.signature.inputs.inputs
    assert [s.name for s in specs] == ["x", "x_mask", "tod", "dow"] and specs[0].shape == (-1, 12, 4, 1)
    assert info.signature.outputs.inputs[0].shape == (-1, 12, 4)
    model, _, _ = load_trained(root / "models" / "tiny", root / "cache")
    feed = example_inputs(params, project["data_dir"], 12, 12, n=3)  # batch 3: the batch axis is dynamic
    with torch.no_grad():
        ref = model(*[torch.from_numpy(v) for v in feed.values()]).numpy()
    got = mlflow.pyfunc.load_model(uri).predict(feed)
    np.testing.assert_allclose(got, ref, atol=1e-4)  # LoRA merged: same function up to float rounding


def test_log_model_refuses_a_batch_of_one(project):
    model, _, _ = load_trained(project["root"] / "models" / "tiny", project["root"] / "cache")
    feed = example_inputs(project["params"], project["data_dir"], 12, 12, n=1)
    with pytest.raises(TrackingError, match="batch of at least 2"):
        log_model(project["run_id"], model, feed)


def test_find_run_names_a_model_that_was_never_logged(project, tmp_path):
    (tmp_path / "best.pt").write_bytes(b"another model")
    experiment_id = configure(TrackingConfig(), project["root"])
    with pytest.raises(TrackingError, match=r"best.pt \(sha256 [0-9a-f]{12}\) was never logged"):
        find_run(project["client"], experiment_id, tmp_path)


def test_export_registers_a_challenger_and_the_gate_uses_the_real_figures(project):
    """export -> register (challenger) -> promote_step with the real parity and output validation.

    Parity must pass on a trained model; the baseline gate follows the real figures.
    """
    from stlink.export.onnx_export import export_step

    params, client, root = project["params"], project["client"], project["root"]
    onnx_path = root / "models" / "tiny" / "model.onnx"
    export_step(params, params.model_dir, params.model_dir)
    parity = json.loads(onnx_path.with_suffix(".json").read_text())["parity"]
    assert parity["passed"] is True
    mv = register_export_step(params, onnx_path, project_dir=root)
    assert str(client.get_model_version_by_alias("stlink-tiny", CHALLENGER).version) == str(mv.version)
    assert mv.run_id == project["run_id"] and mv.tags["parity.passed"] == str(parity["passed"]).lower()
    assert mv.tags["parity.max_abs_diff"] == str(parity["max_abs_diff"])
    assert str(register_export_step(params, onnx_path, project_dir=root).version) == str(mv.version)  # no duplicate
    resolved = resolve_model("models:/stlink-tiny@challenger", client=client)
    assert sha256_file(resolved.path) == sha256_file(onnx_path)
    assert (resolved.path.parent / "model.json").read_bytes() == onnx_path.with_suffix(".json").read_bytes()

    result = promote_step(params, client=client)
    tags = client.get_model_version("stlink-tiny", str(mv.version)).tags
    val = project["metrics"]["val"]
    best = min(val[b]["mae"] for b in ("last_value", "historical_average", "seasonal_naive"))
    beats_baseline = val["model"]["mae"] < best
    assert tags["gate.b_vs_baseline"].startswith("pass: " if beats_baseline else "fail: ")
    assert f"{val['model']['mae']:.4f}" in tags["gate.b_vs_baseline"] and f"{best:.4f}" in tags["gate.b_vs_baseline"]
    assert tags["gate.c_onnx_parity"] == f"{'pass' if parity['passed'] else 'fail'}: max |ort - torch| " \
        f"{parity['max_abs_diff']}, tolerance atol={parity['tolerance']['atol']} rtol={parity['tolerance']['rtol']}"
    gate_d = tags["gate.d_output_validation"]
    if parity["passed"]:  # gate d forecasts held-out test-split windows (the briefly trained model may leave bounds)
        assert re.match(r"pass: \d+ forecasts on \d+ test-split window\(s\) issued", gate_d) or \
            (gate_d.startswith("fail: ") and "outside the physical bounds" in gate_d), gate_d
    else:  # the scorer refuses a model whose parity failed, so output validation fails too
        assert gate_d.startswith("fail: ") and "parity check failed" in gate_d
    d_passed = gate_d.startswith("pass: ")
    assert tags["output_validation.passed"] == str(d_passed).lower()
    assert result.promoted == (beats_baseline and parity["passed"] and d_passed)
    assert ("champion" in client.get_registered_model("stlink-tiny").aliases) == result.promoted


def test_forecast_from_the_champion_equals_forecast_from_the_file(project, tmp_path):
    """`stlink forecast` with models:/...@champion scores exactly what the exported file scores."""
    import pandas as pd

    from stlink.pipeline import forecast_step

    params, client, root = project["params"], project["client"], project["root"]
    onnx_path = root / "models" / "tiny" / "model.onnx"
    mv = register_export_step(params, onnx_path, project_dir=root)
    client.set_registered_model_alias("stlink-tiny", "champion", str(mv.version))  # as a passed gate does
    via_registry = pd.read_parquet(forecast_step(params, model="champion", input=project["data_dir"],
                                                 output=tmp_path / "champion.parquet")["output"])
    via_file = pd.read_parquet(forecast_step(params, model=str(onnx_path), input=project["data_dir"],
                                             output=tmp_path / "file.parquet")["output"])
    assert (via_registry["model_version"] == f"stlink-tiny/{mv.version}").all()
    assert via_file["model_version"].str.startswith("model.onnx@sha256:").all()  # a plain file: the card's label
    cols = ["sensor_id", "issued_at", "target_time", "horizon_step", "value"]
    pd.testing.assert_frame_equal(via_registry[cols], via_file[cols])
    assert len(via_file) == 4 * 12


def test_a_re_export_is_the_challenger_again_unless_it_is_the_champion(project):
    """Defect 10: re-registering the same file printed "(challenger)" but set no alias."""
    params, client, root = project["params"], project["client"], project["root"]
    onnx_path = root / "models" / "tiny" / "model.onnx"
    mv = register_export_step(params, onnx_path, project_dir=root)
    for alias in ("challenger", "champion"):
        if alias in client.get_model_version("stlink-tiny", str(mv.version)).aliases:
            client.delete_registered_model_alias("stlink-tiny", alias)
    again = register_export_step(params, onnx_path, project_dir=root)
    assert str(again.version) == str(mv.version) and "challenger" in again.aliases
    assert str(client.get_model_version_by_alias("stlink-tiny", CHALLENGER).version) == str(mv.version)
    client.delete_registered_model_alias("stlink-tiny", CHALLENGER)
    client.set_registered_model_alias("stlink-tiny", "champion", str(mv.version))
    as_champion = register_export_step(params, onnx_path, project_dir=root)
    assert "champion" in as_champion.aliases and "challenger" not in as_champion.aliases
