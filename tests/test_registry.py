"""Registry, promotion gate, rollback and models:/ resolution on a real MLflow SQLite store.

The registered "models" are tiny real ONNX graphs with the forecaster's I/O contract (forecast =
mean of the input window + a bias that differs per version), each logged with ``log_onnx`` in
its own MLflow run, so a resolved file can be told apart by what it computes.
"""
import itertools
import json
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from stlink.io import sha256_file  # noqa: E402
from stlink.tracking import (CHALLENGER, CHAMPION, RegistryError, TrackingConfig, champion_history,  # noqa: E402
                             log_evaluation, log_onnx, promote, promote_step, resolve_model, resolve_model_uri,
                             rollback, start_run)
from stlink.tracking.mlflow_log import client_for  # noqa: E402
from stlink.tracking.registry import gate_vs_baseline, gate_vs_champion, parse_models_uri  # noqa: E402

L, H, N = 12, 12, 3
_names = itertools.count(1)


def stand_in_onnx(path, bias: float) -> None:
    """values (B, L, N, 1), mask, tod, dow -> forecast (B, H, N) = window mean + bias."""
    weight = numpy_helper.from_array(np.full((L, H), 1.0 / L, np.float32), "W")
    b = numpy_helper.from_array(np.array(bias, np.float32), "b")
    nodes = [helper.make_node("Transpose", ["values"], ["t"], perm=[0, 2, 3, 1]),    # (B, N, 1, L)
             helper.make_node("MatMul", ["t", "W"], ["m"]),                          # (B, N, 1, H)
             helper.make_node("ReduceMean", ["m"], ["r"], axes=[2], keepdims=0),     # (B, N, H)
             helper.make_node("Transpose", ["r"], ["f"], perm=[0, 2, 1]),            # (B, H, N)
             helper.make_node("Add", ["f", "b"], ["forecast"])]
    graph = helper.make_graph(nodes, "stand_in", [
        helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", L, N, 1]),
        helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", L, N]),
        helper.make_tensor_value_info("tod", TensorProto.FLOAT, ["batch", L]),
        helper.make_tensor_value_info("dow", TensorProto.INT64, ["batch", L])],
        [helper.make_tensor_value_info("forecast", TensorProto.FLOAT, ["batch", H, N])], [weight, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    path.with_suffix(".json").write_text(json.dumps({"format": "stand-in", "bias": bias}))


def example(batch: int = 2) -> dict:
    rng = np.random.default_rng(0)
    return {"values": (50 + 10 * rng.standard_normal((batch, L, N, 1))).astype(np.float32),
            "mask": np.ones((batch, L, N), bool), "tod": np.zeros((batch, L), np.float32),
            "dow": np.zeros((batch, L), np.int64)}


def run_onnx(path, feed: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["forecast"], feed)[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{root}/mlflow.db", artifact_location=(root / "artifacts").as_uri())
    return cfg, client_for(cfg), root


def add_version(store, name: str, bias: float, *, parity_passed: bool = True, dataset: str = "tiny",
                val_mae: float | None = None):
    """A run with the stand-in ONNX (and, given ``val_mae``, evaluation metrics) -> new version."""
    cfg, client, root = store
    path = root / f"{name}-file{next(_names)}" / "model.onnx"
    path.parent.mkdir()
    stand_in_onnx(path, bias)
    with start_run(cfg, run_name=name, tags={"stlink.dataset": dataset}) as run:
        if val_mae is not None:
            log_evaluation(run, {"val": evaluation(val_mae)}, None)
        mv = log_onnx(run, path, registered_model=name, input_example=example(),
                      parity={"passed": parity_passed, "max_abs_diff": 2e-6 if parity_passed else 0.5,
                              "tolerance": {"atol": 1e-4, "rtol": 1e-4}})
    return mv, path


def evaluation(model_mae: float, baselines=(("last_value", 7.0), ("seasonal_naive", 5.5))) -> dict:
    """A split's metrics in ``evaluate()``'s shape."""
    def entry(mae):
        return {"mae": mae, "rmse": mae * 1.2, "mape": 10.0, "mape_floor": 1.0, "count": 100,
                "per_step": [{"step": k, "mae": mae, "rmse": mae, "mape": 10.0, "count": 10} for k in (1, 2)]}
    return {"model": entry(model_mae), **{b: entry(m) for b, m in baselines},
            "abrupt": {"threshold": 0.2, "count": 3, "fraction": 0.03}, "n_windows": 10, "horizon_steps": 2}


def gate_args(val_mae=3.0, baseline=4.0, parity=True, output=True):
    return dict(val_mae=val_mae, baseline_best_val_mae=baseline, parity_passed=parity,
                output_validation_passed=output, dataset="tiny", baseline_name="seasonal_naive")


@pytest.fixture(scope="module")
def with_champion(store):
    """A registered model whose v1 (val MAE 3.40) passed the gate and is champion."""
    name = f"gate-{next(_names)}"
    mv, _ = add_version(store, name, 1.0)
    result = promote(store[1], name, mv.version, **gate_args(val_mae=3.40))
    assert result.promoted and result.gates[0].tag == "pass: 3.4000, no champion yet"
    return name


def test_each_logged_onnx_is_a_new_version_with_the_challenger_alias(store):
    cfg, client, _ = store
    name = f"versions-{next(_names)}"
    v1, p1 = add_version(store, name, 1.0)
    v2, p2 = add_version(store, name, 2.0, parity_passed=False)
    assert (str(v1.version), str(v2.version)) == ("1", "2")
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["onnx_sha256"] == sha256_file(p2) and tags["dataset"] == "tiny"
    assert (tags["parity.passed"], tags["parity.max_abs_diff"], tags["parity.tolerance"]) == \
        ("false", "0.5", "atol=0.0001 rtol=0.0001")
    assert client.get_model_version(name, "1").tags["parity.passed"] == "true"
    info = __import__("mlflow").models.get_model_info(f"models:/{name}/1")
    assert "onnx" in info.flavors and [i.name for i in info.signature.inputs.inputs] == ["values", "mask", "tod", "dow"]
    assert info.signature.inputs.inputs[0].shape == (-1, L, N, 1) and info.saved_input_example_info is not None


def test_gate_promotes_a_better_model_and_records_the_figures(store):
    client = store[1]
    name = f"better-{next(_names)}"
    v1, _ = add_version(store, name, 1.0)
    assert promote(client, name, v1.version, **gate_args(val_mae=3.40)).promoted
    v2, _ = add_version(store, name, 2.0)
    result = promote(client, name, v2.version, **gate_args(val_mae=3.21))
    assert result.promoted and (result.champion_before, result.champion_after) == ("1", "2")
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "2"
    tags = client.get_model_version(name, "2").tags
    assert tags["gate.a_vs_champion"] == "pass: 3.2100 < 3.4000 (champion v1)"
    assert tags["gate.b_vs_baseline"] == "pass: 3.2100 < 4.0000 (seasonal_naive)"
    assert tags["gate.c_onnx_parity"].startswith("pass") and tags["gate.d_output_validation"].startswith("pass")
    assert tags["gate.decision"] == "promoted to champion" and float(tags["val_mae"]) == 3.21
    assert champion_history(client, name) == ["1", "2"]
    assert CHALLENGER not in client.get_registered_model(name).aliases  # the promoted challenger is champion now
    assert client.get_model_version(name, "2").current_stage in (None, "None")  # aliases only, never stages
    assert "gate.a_vs_champion: pass: 3.2100 < 3.4000 (champion v1)" in result.describe()
    again = promote(client, name, v2.version, **gate_args(val_mae=3.21))
    assert again.promoted and not again.gates and champion_history(client, name) == ["1", "2"]


@pytest.mark.parametrize("case, args, failing", [
    ("worse", gate_args(val_mae=3.50), "a_vs_champion"),
    ("equal", gate_args(val_mae=3.40), "a_vs_champion"),
    ("parity failed", gate_args(parity=False), "c_onnx_parity"),
    ("baseline not beaten", gate_args(val_mae=3.0, baseline=2.9), "b_vs_baseline"),
    ("output validation failed", gate_args(output=False), "d_output_validation"),
])
def test_gate_refuses_and_leaves_the_champion(store, with_champion, case, args, failing):
    client, name = store[1], with_champion
    mv, _ = add_version(store, name, 5.0 + len(case))
    result = promote(client, name, mv.version, **args)
    assert not result.promoted and result.champion_after == "1"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == str(mv.version)
    assert champion_history(client, name) == ["1"]
    tags = client.get_model_version(name, str(mv.version)).tags
    for gate in ("a_vs_champion", "b_vs_baseline", "c_onnx_parity", "d_output_validation"):
        assert tags[f"gate.{gate}"].startswith("fail: " if gate == failing else "pass: "), (gate, tags[f"gate.{gate}"])
    assert tags["gate.decision"] == f"refused: gate {failing[0]} failed"
    if failing == "a_vs_champion":
        assert tags["gate.a_vs_champion"] == f"fail: {args['val_mae']:.4f} >= 3.4000 (champion v1)"


def test_gate_refuses_a_champion_of_another_dataset(store):
    client = store[1]
    name = f"dataset-{next(_names)}"
    v1, _ = add_version(store, name, 1.0)
    promote(client, name, v1.version, **gate_args())
    v2, _ = add_version(store, name, 2.0, dataset="other")
    with pytest.raises(RegistryError, match=r"champion v1 is for dataset 'tiny', v2 for 'other'"):
        promote(client, name, v2.version, **{**gate_args(val_mae=1.0), "dataset": "other"})
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"


def test_gate_functions_are_strict_and_reject_nan():
    assert not gate_vs_champion(3.4, 3.4, "1").passed
    assert not gate_vs_champion(float("nan"), None, None).passed
    assert not gate_vs_champion(3.0, None, "2").passed  # a champion without figures cannot be beaten
    assert not gate_vs_baseline(float("nan"), 4.0).passed and gate_vs_baseline(3.9, 4.0).passed


def test_rollback_moves_the_champion_back_and_errors_without_a_previous_one(store):
    client = store[1]
    name = f"rollback-{next(_names)}"
    v1, _ = add_version(store, name, 1.0)
    with pytest.raises(RegistryError, match=f"{name}: no champion to roll back"):
        rollback(client, name)
    promote(client, name, v1.version, **gate_args(val_mae=3.4))
    with pytest.raises(RegistryError, match=r"no previous champion to roll back to \(champion_history: 1\)"):
        rollback(client, name)
    v2, _ = add_version(store, name, 2.0)
    promote(client, name, v2.version, **gate_args(val_mae=3.0))
    assert rollback(client, name) == "1"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert champion_history(client, name) == ["1"]
    assert "champion back to v1" in client.get_model_version(name, "2").tags["rolled_back"]
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(client, name)
    v3, _ = add_version(store, name, 3.0)   # after a rollback, the gate compares with the restored champion
    result = promote(client, name, v3.version, **gate_args(val_mae=3.2))
    assert result.promoted and result.gates[0].tag == "pass: 3.2000 < 3.4000 (champion v1)"


def test_resolve_champion_returns_the_logged_onnx_file(store, tmp_path):
    client = store[1]
    name = f"resolve-{next(_names)}"
    v1, p1 = add_version(store, name, 1.0)
    v2, p2 = add_version(store, name, 7.0)
    promote(client, name, v2.version, **gate_args())
    resolved = resolve_model(f"models:/{name}@champion", client=client, cache_dir=tmp_path)
    assert (resolved.name, resolved.version, resolved.label) == (name, "2", f"{name}/2")
    assert resolved.path.name == "model.onnx" and sha256_file(resolved.path) == sha256_file(p2)
    assert (resolved.path.parent / "model.json").read_text() == p2.with_suffix(".json").read_text()
    feed = example(3)
    assert np.allclose(run_onnx(resolved.path, feed), feed["values"][..., 0].mean(1)[:, None, :] + 7.0, atol=1e-4)
    stamp = resolved.path.stat().st_mtime_ns
    assert resolve_model_uri(f"models:/{name}@champion", client=client, cache_dir=tmp_path) == resolved.path
    assert resolved.path.stat().st_mtime_ns == stamp  # served from the cache
    assert sha256_file(resolve_model_uri(f"models:/{name}/1", client=client, cache_dir=tmp_path)) == sha256_file(p1)
    assert resolve_model_uri(p1) == p1
    with pytest.raises(RegistryError, match=f"models:/{name}@nobody: no version of {name} has the alias 'nobody'"):
        resolve_model(f"models:/{name}@nobody", client=client, cache_dir=tmp_path)
    with pytest.raises(RegistryError, match="no such model file"):
        resolve_model(tmp_path / "missing.onnx")


def test_resolve_refuses_a_corrupted_download(store, tmp_path):
    client = store[1]
    name = f"corrupt-{next(_names)}"
    v1, _ = add_version(store, name, 1.0)
    path = resolve_model_uri(f"models:/{name}/1", client=client, cache_dir=tmp_path)
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(RegistryError, match="does not match the version's onnx_sha256"):
        resolve_model(f"models:/{name}/1", client=client, cache_dir=tmp_path)
    assert sha256_file(resolve_model_uri(f"models:/{name}/1", client=client, cache_dir=tmp_path)) == \
        client.get_model_version(name, "1").tags["onnx_sha256"]


def test_parse_models_uri():
    assert parse_models_uri("models:/stlink-x@champion") == ("stlink-x", None, "champion")
    assert parse_models_uri("models:/stlink-x/12") == ("stlink-x", "12", None)
    with pytest.raises(RegistryError, match="expected models:/<name>@<alias>"):
        parse_models_uri("models:/stlink-x")


def test_promote_step_reads_figures_from_the_run_and_records_output_validation(store, tmp_path):
    """The CLI step gates the challenger with the val MAEs logged by log_evaluation."""
    cfg, client, _ = store
    from conftest import tiny_params

    params = tiny_params(dataset="step")
    params.tracking = TrackingConfig(cfg.tracking_uri, cfg.artifact_location, cfg.experiment, f"step-{next(_names)}")
    name = params.tracking.registered_model
    seen = []

    def output_check(path, label):
        seen.append((sha256_file(path), label))
        return True, "42 rows ok"

    v1, p1 = add_version(store, name, 1.0, val_mae=5.0, dataset="step")
    result = promote_step(params, client=client, output_check=output_check, cache_dir=tmp_path)
    assert result.promoted and result.version == "1" and seen == [(sha256_file(p1), f"{name}/1")]
    tags = client.get_model_version(name, "1").tags
    assert tags["gate.b_vs_baseline"] == "pass: 5.0000 < 5.5000 (seasonal_naive)"
    assert tags["output_validation.passed"] == "true" and tags["output_validation.detail"] == "42 rows ok"
    assert tags["gate.c_onnx_parity"] == "pass: max |ort - torch| 2e-06, tolerance atol=0.0001 rtol=0.0001"

    v2, _ = add_version(store, name, 2.0, val_mae=4.0, dataset="step")
    refused = promote_step(params, client=client, output_check=lambda path, label: (False, "3 rows with NaN"),
                           cache_dir=tmp_path)
    assert not refused.promoted and str(client.get_model_version_by_alias(name, CHAMPION).version) == "1"
    assert client.get_model_version(name, "2").tags["gate.d_output_validation"] == "fail: 3 rows with NaN"
