"""ONNX export of the whole forecaster: LoRA merged, checker, dynamic batch, parity that can fail."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import make_processed, tiny_params, trained_like
from stlink.config import to_dict
from stlink.data.formats import load_processed
from stlink.export.card import ExportError, read_card, sidecar_path
from stlink.export.onnx_export import check_parity, export_onnx, export_step, random_inputs
from stlink.io import sha256_file, write_json
from stlink.training.checkpoint import data_checksum, frozen_fingerprint, model_payload, save_checkpoint

N, L = 4, 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    folder = make_processed(tmp, N=N)
    data = load_processed(folder)
    params = tiny_params()
    model, inputs = trained_like(params, data)
    meta = {**data.meta, "sensor_ids": data.sensor_ids, "bounds": {"speed": [0.0, 120.0]}}
    path = tmp / "out" / "model.onnx"
    record = export_onnx(model, path, n_sensors=N, input_len=L, n_channels=1, meta=meta)
    return {"tmp": tmp, "folder": folder, "data": data, "params": params, "model": model, "inputs": inputs,
            "path": path, "record": record}


def run_ort(path: Path, args) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {k: v.numpy() for k, v in zip(names, args)})[0]


def test_export_passes_checker_and_parity_and_writes_sidecar(setup):
    rec, path = setup["record"], setup["path"]
    assert rec["exporter"] in ("dynamo", "torchscript") and rec["passed"] is True
    assert rec["tolerance"] == {"atol": 1e-4, "rtol": 1e-4}
    assert 0 < rec["max_abs_diff"] < 1e-4 and 1 in rec["batch_sizes"] and max(rec["batch_sizes"]) > 1
    onnx.checker.check_model(str(path), full_check=True)
    card = json.loads(sidecar_path(path).read_text())
    assert card["sha256"] == sha256_file(path) == rec["sha256"]
    assert [i["name"] for i in card["inputs"]] == ["values", "mask", "tod", "dow"]
    assert card["inputs"][0]["shape"][1:] == [L, N, 1] and isinstance(card["inputs"][0]["shape"][0], str)
    assert card["outputs"] == [{"name": "forecast", "shape": [card["outputs"][0]["shape"][0], 12, N],
                                "dtype": "float32"}]
    assert card["sensor_ids"] == ["s0", "s1", "s2", "s3"] and card["input_len"] == L and card["output_len"] == 12
    assert (card["steps_per_day"], card["freq_seconds"], card["null_value"]) == (48, 1800, 0.0)
    assert card["channels"] == ["speed"] and card["units"] == ["mph"] and card["bounds"] == {"speed": [0.0, 120.0]}
    assert card["parity"]["passed"] is True and card["parity"]["exporter"] == rec["exporter"]
    assert read_card(path).sensor_ids == card["sensor_ids"]


def test_lora_is_merged_into_the_graph_and_the_caller_keeps_its_adapters(setup):
    names = [init.name for init in onnx.load(str(setup["path"])).graph.initializer]
    assert not [n for n in names if "lora" in n.lower()]
    assert hasattr(setup["model"].backbone, "merge_and_unload"), "export must not merge the caller's model"
    lora_b = [p for n, p in setup["model"].named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # the adapters change the output ...
    args = random_inputs(2, L, N, 1, mean=np.array([50.0]), std=np.array([10.0]), steps_per_day=48, seed=3)
    with torch.no_grad():
        ref = setup["model"](*args).numpy()
        with setup["model"].backbone.disable_adapter():
            base = setup["model"](*args).numpy()
    assert np.abs(ref - base).max() > 1e-3
    np.testing.assert_allclose(run_ort(setup["path"], args), ref, atol=1e-4, rtol=1e-4)  # ... and ONNX has them


def test_batch_axis_is_dynamic(setup):
    for batch in (1, 5):
        args = random_inputs(batch, L, N, 1, mean=np.array([50.0]), std=np.array([12.0]), steps_per_day=48,
                             seed=40 + batch)
        got = run_ort(setup["path"], args)
        with torch.no_grad():
            ref = setup["model"](*args).numpy()
        assert got.shape == (batch, 12, N)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_parity_fails_when_the_graph_is_perturbed(setup, tmp_path):
    graph = onnx.load(str(setup["path"]))
    bias = next(i for i in graph.graph.initializer if i.name.endswith("head.bias"))
    values = onnx.numpy_helper.to_array(bias) + 0.05
    bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
    bad = tmp_path / "perturbed.onnx"
    onnx.save(graph, str(bad))
    kwargs = dict(n_sensors=N, input_len=L, n_channels=1, steps_per_day=48)
    good = check_parity(setup["model"], setup["path"], **kwargs)
    broken = check_parity(setup["model"], bad, **kwargs)
    assert good["passed"] is True
    assert broken["passed"] is False and broken["max_abs_diff"] > 1e-2


def test_parity_fails_with_a_tiny_tolerance(setup):
    res = check_parity(setup["model"], setup["path"], n_sensors=N, input_len=L, n_channels=1, steps_per_day=48,
                       atol=0.0, rtol=0.0)
    assert res["passed"] is False and res["max_abs_diff"] > 0 and res["tolerance"] == {"atol": 0.0, "rtol": 0.0}


def test_torchscript_fallback_exporter_also_matches(setup, tmp_path):
    """The ``dynamo=False`` path (used when dynamo fails) exports the same model within tolerance."""
    rec = export_onnx(setup["model"], tmp_path / "ts.onnx", n_sensors=N, input_len=L, n_channels=1,
                      meta={**setup["data"].meta, "sensor_ids": setup["data"].sensor_ids}, exporter="torchscript")
    assert rec["exporter"] == "torchscript" and rec["passed"] is True
    assert json.loads(sidecar_path(tmp_path / "ts.onnx").read_text())["parity"]["exporter"] == "torchscript"
    args = random_inputs(5, L, N, 1, mean=np.array([50.0]), std=np.array([10.0]), steps_per_day=48, seed=5)
    with torch.no_grad():
        np.testing.assert_allclose(run_ort(tmp_path / "ts.onnx", args), setup["model"](*args).numpy(),
                                   atol=1e-4, rtol=1e-4)


def test_export_problems_write_nothing(setup, tmp_path):
    out = tmp_path / "m" / "model.onnx"
    with pytest.raises(ExportError, match="3 sensors"):
        export_onnx(setup["model"], out, n_sensors=N, input_len=L, n_channels=1,
                    meta={"sensor_ids": ["a", "b", "c"], "channels": ["speed"]})
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_export_step_from_a_model_directory(setup, tmp_path):
    """``stlink export``: rebuild from best.pt/config.json/data_meta.json, export, record bounds from params."""
    params, data, model = setup["params"], setup["data"], setup["model"]
    model_dir = tmp_path / "models" / "tiny"
    model_dir.mkdir(parents=True)
    write_json(model_dir / "config.json", to_dict(params))
    write_json(model_dir / "data_meta.json", {**data.meta, "sensor_ids": data.sensor_ids,
                                              "data_sha256": data_checksum(setup["folder"])})
    save_checkpoint(model_payload(model, setup["inputs"], frozen_fingerprint(model)), model_dir / "best.pt")
    rec = export_step(params, model_dir, model_dir)
    card = read_card(model_dir / "model.onnx")
    assert rec["passed"] and card.sensor_ids == ["s0", "s1", "s2", "s3"]
    assert rec["variants"]["opt"]["passed"] and read_card(model_dir / "model.opt.onnx").sha256 != card.sha256
    assert "int8" not in rec["variants"]      # export.quantize: none by default
    assert card.bounds == {"speed": params.validation.bounds["speed"]}
    args = random_inputs(3, L, N, 1, mean=np.array([50.0]), std=np.array([10.0]), steps_per_day=48, seed=9)
    with torch.no_grad():
        ref = model(*args).numpy()
    np.testing.assert_allclose(run_ort(model_dir / "model.onnx", args), ref, atol=1e-4, rtol=1e-4)


def test_stid_reference_exports_with_parity(tmp_path):
    """model.arch=stid goes through the same export (a production choice, docs/method.md)."""
    from stlink.config import ModelConfig
    from stlink.model import build_forecaster

    torch.manual_seed(0)
    stid = build_forecaster(ModelConfig(arch="stid", stid_dim=8, stid_layers=2), n_sensors=N, n_channels=1,
                            input_len=L, output_len=12, steps_per_day=48, adjacency=np.eye(N, dtype=np.float32),
                            scaler_mean=[50.0], scaler_std=[10.0], memory_keys=None).eval()
    rec = export_onnx(stid, tmp_path / "stid.onnx", n_sensors=N, input_len=L, n_channels=1)
    assert rec["passed"] is True and rec["max_abs_diff"] < 1e-4
    assert read_card(tmp_path / "stid.onnx").steps_per_day == 48


def test_road_graph_options_export_with_parity(tmp_path):
    """Neighbour features, the hop attention bias and the window skip are constants plus weights: they export."""
    from stlink.config import ModelConfig
    from stlink.model import build_forecaster

    adjacency = np.eye(N, dtype=np.float32) + np.eye(N, k=1, dtype=np.float32)
    torch.manual_seed(0)
    model = build_forecaster(ModelConfig(backbone="tiny", mrffn="off", patch_len=6, graph_features="diffusion",
                                         graph_bias="hops", window_skip="sensor"), n_sensors=N, n_channels=1, input_len=L,
                             output_len=12, steps_per_day=48, adjacency=adjacency, scaler_mean=[50.0],
                             scaler_std=[10.0], memory_keys=None).eval()
    with torch.no_grad():
        model.attn_bias.table.normal_()
        model.skip.weight.normal_()                                    # one map per sensor (an einsum)
    rec = export_onnx(model, tmp_path / "graph.onnx", n_sensors=N, input_len=L, n_channels=1)
    assert rec["passed"] is True and rec["max_abs_diff"] < 1e-4
    assert rec["exporter"] == "dynamo"  # a submodule named like a GraphModule attribute made it fall back
