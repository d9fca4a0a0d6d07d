"""Variants of the exported model (optimised graph, int8, fp16), their gates, and the scorer's session options."""
import contextlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import make_processed, tiny_params, trained_like
from stlink.config import ConfigError, ExportConfig, load_params
from stlink.data.formats import load_processed
from stlink.data.windows import WindowDataset
from stlink.export.card import ExportError, read_card, sidecar_path
from stlink.export.onnx_export import export_onnx, random_inputs
from stlink.export.optimize import (
    CUDA, accuracy_gate, convert_fp16, export_variants, masked_mae, session_options, session_options_from_params,
    gate_windows, variant_path,
)

N, L = 4, 12


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("optimize")
    folder = make_processed(tmp, N=N)
    data = load_processed(folder)
    model, _ = trained_like(tiny_params(), data)
    path = tmp / "out" / "model.onnx"
    export_onnx(model, path, n_sensors=N, input_len=L, n_channels=1,
                meta={**data.meta, "sensor_ids": data.sensor_ids, "bounds": {"speed": [0.0, 120.0]}})
    stale = variant_path(path, "fp16")  # a variant of an earlier export, not asked for this time
    stale.write_bytes(b"old")
    records = export_variants(model, path, ExportConfig(optimize=True, quantize="int8", max_mae_change=0.01),
                              data_dir=folder)
    return {"tmp": tmp, "folder": folder, "data": data, "model": model, "path": path, "records": records,
            "stale": stale}


def independent_mae(path, data, batch=32) -> float:
    """Masked test MAE computed here without the module's helpers: every test window, one session.

    Batches of 32 as the gate: int8 activation scales are computed per call, over the whole batch."""
    ds = WindowDataset(data, "test", L, 12)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    err, count = 0.0, 0
    for a in range(0, len(ds), batch):
        items = [ds[i] for i in range(a, min(a + batch, len(ds)))]
        feed = {"values": np.stack([it["x"] for it in items]), "mask": np.stack([it["x_mask"] for it in items]),
                "tod": np.stack([it["tod"] for it in items]), "dow": np.stack([it["dow"] for it in items])}
        y, m = np.stack([it["y"] for it in items]), np.stack([it["y_mask"] for it in items])
        err += float((np.abs(session.run(None, feed)[0] - y) * m).sum())
        count += int(m.sum())
    return err / count


@contextlib.contextmanager
def sqlite_store(tmp_path):
    """MLflow tracking AND registry on a SQLite file in tmp_path, both restored afterwards (an earlier
    test's ``stlink.tracking.store.configure`` leaves the registry URI on its own store)."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def register_with_variants(exported, tmp_path, name: str):
    """Inside ``sqlite_store``: one run, the exported model.onnx registered as ``name`` with its
    variants logged beside it (the export step's own functions); returns the model version."""
    import mlflow

    from stlink.export.optimize import log_variants
    from stlink.tracking.mlflow_log import log_onnx

    exp = mlflow.create_experiment("variants", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp) as run:
        pass
    card = json.loads(sidecar_path(exported["path"]).read_text())
    mv = log_onnx(run.info.run_id, exported["path"], registered_model=name, parity=card["parity"])
    log_variants(mv, exported["path"], exported["records"])
    return mv


def test_optimised_graph_is_fused_written_with_its_card_and_matches_pytorch(exported):
    rec, path = exported["records"]["opt"], variant_path(exported["path"], "opt")
    assert rec["passed"] is True and rec["file"] == "model.opt.onnx" and path.is_file()
    assert rec["fused_ops"].get("SimplifiedLayerNormalization", 0) >= 1   # RMSNorm fused
    assert rec["nodes"] < rec["nodes_fp32"]
    card = read_card(path)
    assert card.sensor_ids == ["s0", "s1", "s2", "s3"]
    raw = json.loads(sidecar_path(path).read_text())
    assert raw["variant"]["kind"] == "opt" and raw["variant"]["source_sha256"] == read_card(exported["path"]).sha256
    assert raw["parity"]["passed"] is True and raw["parity"]["tolerance"] == {"atol": 1e-4, "rtol": 1e-4}
    args = random_inputs(5, L, N, 1, mean=np.array([50.0]), std=np.array([10.0]), steps_per_day=48, seed=21)
    with torch.no_grad():
        ref = exported["model"](*args).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {k: v.numpy() for k, v in zip(("values", "mask", "tod", "dow"), args)})[0]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_int8_gate_accepts_within_one_percent_and_records_the_figures(exported):
    rec, path = exported["records"]["int8"], variant_path(exported["path"], "int8")
    acc = rec["accuracy"]
    assert rec["passed"] is True and path.is_file() and acc["max_relative_change"] == 0.01
    assert abs(acc["relative_change"]) <= 0.01 and acc["windows"] == len(WindowDataset(exported["data"], "test", L, 12))
    # the recorded MAEs are the real ones (recomputed here independently), and int8 really changed the numbers
    assert acc["mae_fp32"] == pytest.approx(independent_mae(exported["path"], exported["data"]), rel=1e-6)
    assert acc["mae"] == pytest.approx(independent_mae(path, exported["data"]), rel=1e-6)
    assert acc["mae"] != acc["mae_fp32"]
    graph = onnx.load(str(path)).graph
    assert any(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat") for n in graph.node)
    raw = json.loads(sidecar_path(path).read_text())
    assert raw["accuracy"] == acc and raw["variant"]["quantized_from"] == "model.opt.onnx"
    assert read_card(path).output_len == 12            # the scorer accepts it: its gate is accuracy, not parity
    fp32_card = json.loads(sidecar_path(exported["path"]).read_text())
    assert fp32_card["variants"]["int8"]["accuracy"] == acc and fp32_card["variants"]["opt"]["passed"] is True


def test_variants_not_asked_for_are_removed(exported):
    assert not exported["stale"].exists() and "fp16" not in exported["records"]


def test_int8_gate_refuses_beyond_the_threshold_and_keeps_no_file(exported, tmp_path):
    path = tmp_path / "model.onnx"
    for src in (exported["path"], sidecar_path(exported["path"])):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    int8 = variant_path(path, "int8")
    int8.write_bytes(b"an int8 model of an earlier export")
    records = export_variants(exported["model"], path, ExportConfig(optimize=False, quantize="int8",
                                                                    max_mae_change=1e-9, accuracy_windows=20),
                              data_dir=exported["folder"])
    rec = records["int8"]
    assert rec["passed"] is False and rec["file"] is None and not int8.exists() and not sidecar_path(int8).exists()
    assert "refused" in rec["refused"] and "export.max_mae_change" in rec["refused"] and "20 test windows" in rec["refused"]
    assert rec["accuracy"]["windows"] == 20 and abs(rec["accuracy"]["relative_change"]) > 1e-9
    assert rec["quantized_from"] == "model.onnx"   # no optimised graph this time: quantised from fp32
    assert json.loads(sidecar_path(path).read_text())["variants"]["int8"]["passed"] is False
    assert read_card(path).sha256 == read_card(exported["path"]).sha256             # fp32 model untouched


def test_a_card_whose_accuracy_gate_failed_is_refused_by_the_scorer(exported, tmp_path):
    path = tmp_path / "model.int8.onnx"
    src = variant_path(exported["path"], "int8")
    path.write_bytes(src.read_bytes())
    card = json.loads(sidecar_path(src).read_text())
    card["accuracy"] = {**card["accuracy"], "passed": False}
    sidecar_path(path).write_text(json.dumps(card))
    with pytest.raises(ExportError, match="accuracy gate failed"):
        read_card(path)


@pytest.mark.parametrize("mae, ref, limit, passed", [
    (10.05, 10.0, 0.01, True), (9.95, 10.0, 0.01, True), (10.2, 10.0, 0.01, False), (9.8, 10.0, 0.01, False),
    (0.0, 0.0, 0.0, True), (1.0, 0.0, 0.5, False), (float("nan"), 10.0, 0.01, False)])
def test_accuracy_gate_closed_form(mae, ref, limit, passed):
    gate = accuracy_gate(mae, ref, limit)
    assert gate["passed"] is passed
    if ref > 0 and np.isfinite(mae):
        assert gate["relative_change"] == pytest.approx(mae / ref - 1)


def test_masked_mae_ignores_masked_targets(exported):
    w = gate_windows(exported["folder"], input_len=L, output_len=12, max_windows=5)
    base = masked_mae(exported["path"], w)
    y, valid = w.targets[0]
    y[~valid] = 1e6                        # junk where the target is missing changes nothing
    assert masked_mae(exported["path"], w) == base and w.n_windows == 5


def test_session_options_from_params(tmp_path):
    (tmp_path / "params.yaml").write_text("score:\n  device: cpu\n")
    params = load_params(tmp_path / "params.yaml", ["score.intra_op_threads=1", "score.inter_op_threads=2"])
    so = session_options_from_params(params.score)
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (1, 2)
    assert so.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    default = session_options_from_params(load_params(tmp_path / "params.yaml").score)
    assert (default.intra_op_num_threads, default.inter_op_num_threads) == (0, 0)
    assert default.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    with pytest.raises(ConfigError, match="score.intra_op_threads"):
        session_options(-1, 0)


def test_the_scorer_runs_with_these_options(exported):
    from stlink.scoring.session import make_session

    session, provider = make_session(exported["path"], "cpu", session_options(1, 1))
    assert provider == "CPUExecutionProvider"
    assert session.get_session_options().intra_op_num_threads == 1


def test_fp16_conversion_keeps_float32_inputs_and_outputs(exported):
    proto = convert_fp16(exported["path"])
    onnx.checker.check_model(proto)
    io = [v.type.tensor_type.elem_type for v in (*proto.graph.input, *proto.graph.output)]
    assert onnx.TensorProto.FLOAT16 not in io
    kinds = {i.data_type for i in proto.graph.initializer if len(i.dims) == 2}  # weight matrices
    assert onnx.TensorProto.FLOAT16 in kinds


def test_fp16_is_refused_without_cuda_and_bad_params_fail(exported, tmp_path):
    path = tmp_path / "model.onnx"
    for src in (exported["path"], sidecar_path(exported["path"])):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    if CUDA in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 is measured by test_fp16_on_cuda")
    rec = export_variants(exported["model"], path, ExportConfig(optimize=False, fp16=True, accuracy_windows=4),
                          data_dir=exported["folder"])["fp16"]
    assert rec["passed"] is False and "CUDA" in rec["refused"] and not variant_path(path, "fp16").exists()
    with pytest.raises(ConfigError, match="export.quantize"):
        export_variants(exported["model"], path, ExportConfig(quantize="int4"), data_dir=exported["folder"])


def test_fp16_on_cuda(exported, tmp_path):
    if not torch.cuda.is_available() or CUDA not in ort.get_available_providers():
        pytest.skip("no GPU on this machine: the fp16 variant is built and gated on the CUDA provider only")
    path = tmp_path / "model.onnx"
    for src in (exported["path"], sidecar_path(exported["path"])):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    rec = export_variants(exported["model"], path, ExportConfig(optimize=False, fp16=True, max_mae_change=0.01),
                          data_dir=exported["folder"])["fp16"]
    assert rec["accuracy"]["provider"] == CUDA and rec["passed"] == (abs(rec["accuracy"]["relative_change"]) <= 0.01)


def test_variants_are_tagged_and_stored_with_the_registered_version(exported, tmp_path):
    """A real SQLite MLflow store: the gate figures become version tags, the variant files travel with it."""
    import mlflow

    with sqlite_store(tmp_path):
        mv = register_with_variants(exported, tmp_path, "stlink-variants")
        client = mlflow.MlflowClient()
        tags = client.get_model_version("stlink-variants", mv.version).tags
        acc = exported["records"]["int8"]["accuracy"]
        assert tags["int8.passed"] == "true" and tags["opt.passed"] == "true" and tags["int8.file"] == "model.int8.onnx"
        assert float(tags["int8.test_mae"]) == pytest.approx(acc["mae"], rel=1e-5)
        assert float(tags["int8.mae_change"]) == pytest.approx(acc["relative_change"], rel=1e-4, abs=1e-9)
        got = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri("stlink-variants", mv.version), dst_path=str(tmp_path / "dl")))
        for name in ("model.int8.onnx", "model.int8.json", "model.opt.onnx", "model.opt.json"):
            assert (got / name).read_bytes() == (exported["path"].parent / name).read_bytes()


# --- score.variant: which exported file the scorer loads -------------------------------------------------------

def variant_params(model: str, variant: str, tmp_path, **score):
    from stlink.config import params_from_dict

    raw = {"data": {"dataset": "tiny"}, "prepare": {"input_len": L, "output_len": 12},
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
           "score": {"model": model, "variant": variant, "device": "cpu", **score},
           "validation": {"bounds": {"speed": [0.0, 120.0]}}}
    return params_from_dict(raw)


def test_score_variant_selects_the_exported_file_of_a_path_and_scores_it(exported, tmp_path):
    """score.variant picks model.<v>.onnx beside the given path; the forecast is made by that file (real
    onnxruntime): int8 differs from fp32 by quantisation noise only, opt matches fp32 within parity."""
    import pandas as pd

    from stlink import pipeline
    from stlink.scoring import forecast

    ts = exported["data"].timestamps
    tables = {}
    for v in ("fp32", "opt", "int8"):
        m = pipeline.score_model_step(variant_params(str(exported["path"]), v, tmp_path))
        assert Path(m["path"]) == variant_path(exported["path"], v) and m["variant"] == v
        assert m["version"].startswith(Path(m["path"]).name + "@sha256:")  # the row label names the variant's file
        out = tmp_path / f"{v}.parquet"
        forecast(m["path"], exported["folder"], out, device="cpu", start=str(ts[-6]), progress=False)
        tables[v] = pd.read_parquet(out)["value"].to_numpy()
    assert np.abs(tables["opt"] - tables["fp32"]).max() < 1e-3
    assert 0 < np.abs(tables["int8"] - tables["fp32"]).max() < 10.0


def test_a_variant_that_was_not_exported_or_was_refused_is_a_clear_error(exported, tmp_path):
    from stlink import pipeline
    from stlink.export.optimize import VariantError

    with pytest.raises(VariantError, match=r"score.variant=fp16: model .*model.onnx has no fp16 variant "
                                           r"\(model.fp16.onnx was not exported.*export.fp16: true"):
        pipeline.score_model_step(variant_params(str(exported["path"]), "fp16", tmp_path))
    # refused by its accuracy gate: the fp32 card's record says why
    path = tmp_path / "refused" / "model.onnx"
    path.parent.mkdir()
    for src in (exported["path"], sidecar_path(exported["path"])):
        (path.parent / src.name).write_bytes(src.read_bytes())
    export_variants(exported["model"], path, ExportConfig(optimize=False, quantize="int8", max_mae_change=1e-9,
                                                          accuracy_windows=8), data_dir=exported["folder"])
    with pytest.raises(VariantError, match=r"score.variant=int8: model .*refused/model.onnx has no int8 variant "
                                           r"\(its gate refused it at export: .*export.quantize: int8"):
        pipeline.score_model_step(variant_params(str(path), "int8", tmp_path))
    with pytest.raises(ConfigError, match="score.variant='int4': one of fp32, opt, int8, fp16"):
        variant_params(str(path), "int4", tmp_path)


def test_score_variant_of_a_registered_champion(exported, tmp_path, monkeypatch):
    """A real SQLite MLflow registry: models:/...@champion with score.variant=int8 downloads the version's
    model.int8.onnx (stored by log_variants) and scores it; a variant the version lacks names the URI."""
    import mlflow

    from stlink import pipeline
    from stlink.export.optimize import VariantError
    from stlink.scoring import forecast

    monkeypatch.chdir(tmp_path)  # the registry cache (mlruns/registry-cache) lands here
    with sqlite_store(tmp_path):
        mv = register_with_variants(exported, tmp_path, "stlink-tiny")
        mlflow.MlflowClient().set_registered_model_alias("stlink-tiny", "champion", mv.version)
    uri = "models:/stlink-tiny@champion"
    m = pipeline.score_model_step(variant_params(uri, "int8", tmp_path))
    assert Path(m["path"]).name == "model.int8.onnx" and m["version"] == f"stlink-tiny/{mv.version}+int8"
    assert Path(m["path"]).read_bytes() == variant_path(exported["path"], "int8").read_bytes()
    rec = forecast(m["path"], exported["folder"], tmp_path / "f.parquet", device="cpu", progress=False,
                   model_version=m["version"])
    assert rec["rows_ok"] == N * 12
    # the realised-accuracy monitor compares int8 rows with the int8 gate's MAE (the version's tag)
    from stlink.monitoring.monitor import reference_mae

    with sqlite_store(tmp_path):
        int8_mae = reference_mae(variant_params(uri, "int8", tmp_path), m["version"])
        assert int8_mae == pytest.approx(exported["records"]["int8"]["accuracy"]["mae"], rel=1e-5)
    with pytest.raises(VariantError, match=r"score.variant=fp16: model models:/stlink-tiny@champion has no fp16 "
                                           r"variant .*export.fp16: true.*stlink export"):
        pipeline.score_model_step(variant_params(uri, "fp16", tmp_path))


def test_score_batch_size_splits_onnxruntime_calls_without_changing_fp32_forecasts(exported, tmp_path):
    """score.batch_size: windows per onnxruntime call inside a chunk; fp32 forecasts do not depend on it."""
    from stlink.scoring.score import run_batches

    session = ort.InferenceSession(str(exported["path"]), providers=["CPUExecutionProvider"])
    g = np.random.default_rng(0)
    slot = g.integers(0, 7 * 48, size=(10, 1)) + np.arange(L)                                 # (B, L)
    feed = {"values": (50 + 10 * g.standard_normal((10, L, N, 1))).astype(np.float32),
            "mask": g.random((10, L, N)) > 0.1, "tod": ((slot % 48) / 48).astype(np.float32),
            "dow": ((slot // 48) % 7).astype(np.int64)}
    calls = []

    def runner(f):
        calls.append(len(f["values"]))
        return session.run(None, f)[0]

    whole = run_batches(runner, feed, None)
    assert calls == [10]
    calls.clear()
    split = run_batches(runner, feed, 4)
    assert calls == [4, 4, 2] and split.shape == whole.shape
    np.testing.assert_allclose(split, whole, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="score.batch_size=0: must be at least 1"):
        variant_params(str(exported["path"]), "fp32", tmp_path, batch_size=0)
    assert load_params(None).score.batch_size >= 1
