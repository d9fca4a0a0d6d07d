"""Training of the real forecaster (``tiny`` random backbone) on a tiny generated dataset."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_processed, tiny_params
from stlink.config import to_dict
from stlink.data.formats import load_processed, save_processed
from stlink.data.windows import WindowDataset
from stlink.model.lora import trainable_parameters
from stlink.training.baselines import build_baselines
from stlink.training.checkpoint import data_checksum, load_checkpoint, load_trained
from stlink.training.metrics import MetricAccumulator
from stlink.training.train import masked_mae_loss, train, warmup_cosine


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_processed(tmp_path_factory.mktemp("data"), days=10, seed=1)


def run(data_dir, out, cache, **train_cfg):
    return train(tiny_params(**train_cfg), out, data_dir=data_dir, cache_dir=cache)


def test_masked_loss_ignores_invalid_targets():
    y = torch.tensor([[[1.0, float("nan")], [3.0, 0.0]]])
    m = torch.tensor([[[True, False], [True, False]]])
    yhat = torch.tensor([[[2.0, 5.0], [1.0, 7.0]]], requires_grad=True)
    loss = masked_mae_loss(yhat, y, m)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert torch.isfinite(yhat.grad).all() and yhat.grad[0, :, 1].abs().sum() == 0


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(4, 20)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == pytest.approx(1.0) and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_learns_to_beat_last_value(data_dir, tmp_path):
    summary = run(data_dir, tmp_path / "m", tmp_path / "bb", epochs=6, max_train_batches=None,
                  max_val_batches=None, lr=5e-3)
    data = load_processed(data_dir)
    val = WindowDataset(data, "val", 12, 12)
    acc = MetricAccumulator(12)
    last_value = build_baselines(data, 12)["last_value"]
    for i in range(len(val)):
        acc.update(val[i]["y"], last_value(val[i]), val[i]["y_mask"])
    losses = [h["train_loss"] for h in summary["history"]]
    assert losses[-1] < 0.5 * losses[0]
    assert summary["best_val_mae"] < 0.5 * acc.result()["mae"], (summary["best_val_mae"], acc.result()["mae"])


def test_outputs_and_reload_reproduce_the_best_val_mae(data_dir, tmp_path):
    out = tmp_path / "m"
    params = tiny_params(epochs=2)
    summary = train(params, out, data_dir=data_dir, cache_dir=tmp_path / "bb")
    assert {"best.pt", "last.pt", "config.json", "data_meta.json", "train_metrics.json"} <= set(os.listdir(out))
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(to_dict(params)))
    meta = json.loads((out / "data_meta.json").read_text())
    assert meta["data_sha256"] == data_checksum(data_dir) == summary["data_sha256"]
    assert meta["sensor_ids"] == ["s0", "s1", "s2", "s3"]
    on_disk = json.loads((out / "train_metrics.json").read_text())
    assert on_disk["best_val_mae"] == summary["best_val_mae"]
    assert [h["epoch"] for h in on_disk["history"]] == [1, 2]
    for key in ("train_loss", "val_mae", "seconds", "samples_per_s", "lr", "batches"):
        assert all(h[key] is not None for h in on_disk["history"]), key
    assert on_disk["history"][0]["batches"] == 6  # max_train_batches
    assert on_disk["peak_memory_mb"] > 0 and on_disk["num_processes"] == 1

    model, p2, meta2 = load_trained(out, cache_dir=tmp_path / "bb")
    assert to_dict(p2) == to_dict(params) and meta2["steps_per_day"] == 48
    assert summary["trainable_params"] == sum(trainable_parameters(model).values()) > 0
    # best.pt reproduces the val MAE it was chosen for (same capped validation windows)
    assert _capped_val_mae(model, data_dir) == pytest.approx(summary["best_val_mae"], rel=1e-5)
    assert load_checkpoint(out / "best.pt")["epoch"] == summary["best_epoch"]


def _capped_val_mae(model, data_dir, batches: int = 2, batch_size: int = 16) -> float:
    """Val MAE over the evenly spaced windows that training validates on (max_val_batches x batch_size)."""
    val = WindowDataset(load_processed(data_dir), "val", 12, 12)
    idx = np.linspace(0, len(val) - 1, min(len(val), batches * batch_size)).round().astype(int)
    acc = MetricAccumulator(12)
    with torch.no_grad():
        for i in idx:
            w = {k: torch.as_tensor(v)[None] for k, v in val[int(i)].items()}
            acc.update(w["y"], model(w["x"], w["x_mask"], w["tod"], w["dow"]), w["y_mask"])
    return acc.result()["mae"]


def test_weight_average_is_validated_kept_and_resumed(data_dir, tmp_path):
    """train.ema_decay: the moving average is what validation scores and best.pt holds; last.pt keeps the
    raw weights and the average, so a resumed run ends exactly like an uninterrupted one."""
    from stlink.training.train import WeightAverage

    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    avg = WeightAverage(layer, decay=0.5)
    with torch.no_grad():
        layer.weight.fill_(3.0)
    avg.update(layer)                                            # d = min(0.5, 2 / 11)
    expected = 2 / 11 * 1.0 + 9 / 11 * 3.0
    with avg.swapped(layer):
        assert torch.allclose(layer.weight, torch.full_like(layer.weight, expected))
    assert torch.equal(layer.weight, torch.full_like(layer.weight, 3.0))  # the raw weights are back

    cache = tmp_path / "bb"
    full = run(data_dir, tmp_path / "full", cache, epochs=3, ema_decay=0.9)
    plain = run(data_dir, tmp_path / "plain", cache, epochs=3)
    assert [h["train_loss"] for h in full["history"]] == [h["train_loss"] for h in plain["history"]]  # same steps
    assert [h["val_mae"] for h in full["history"]] != [h["val_mae"] for h in plain["history"]]  # other weights scored
    model, _, _ = load_trained(tmp_path / "full", cache_dir=cache)
    assert _capped_val_mae(model, data_dir) == pytest.approx(full["best_val_mae"], rel=1e-5)
    last = load_checkpoint(tmp_path / "full" / "last.pt")
    shadow = last["ema"]["shadow"]                               # every trainable parameter, averaged
    assert set(shadow) == set(trainable_parameters(model)) and set(shadow) <= set(last["model"])
    assert any(not torch.equal(shadow[k], last["model"][k]) for k in shadow)  # last.pt: the raw weights

    def crash_after_first(epoch, record):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny_params(epochs=3, ema_decay=0.9), tmp_path / "cut", data_dir=data_dir, cache_dir=cache,
              on_epoch_end=crash_after_first)
    resumed = train(tiny_params(epochs=3, ema_decay=0.9), tmp_path / "cut", resume=True, data_dir=data_dir,
                    cache_dir=cache)
    assert [h["val_mae"] for h in resumed["history"]] == [h["val_mae"] for h in full["history"]]
    cut = load_checkpoint(tmp_path / "cut" / "last.pt")
    for name, value in last["ema"]["shadow"].items():
        assert torch.equal(cut["ema"]["shadow"][name], value), name


class Interrupted(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(data_dir, tmp_path):
    cache = tmp_path / "bb"
    full = run(data_dir, tmp_path / "full", cache, epochs=3)

    def crash_after_first(epoch, record):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny_params(epochs=3), tmp_path / "cut", data_dir=data_dir, cache_dir=cache,
              on_epoch_end=crash_after_first)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["state"]["epoch"] == 1
    seen, inits = [], []
    resumed = train(tiny_params(epochs=3), tmp_path / "cut", resume=True, data_dir=data_dir, cache_dir=cache,
                    on_epoch_end=lambda e, r: seen.append(e), init=inits.append)
    assert seen == [2, 3]  # epoch 1 was not trained again
    assert inits == []     # a resumed run keeps its own weights: no warm start
    for key in ("train_loss", "val_mae", "lr"):
        assert [h[key] for h in resumed["history"]] == [h[key] for h in full["history"]], key
    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("full", "cut"))
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert full["history"][0]["val_mae"] != full["history"][-1]["val_mae"]  # the weights did move


def test_resume_continues_only_the_same_data_and_params(data_dir, tmp_path):
    folder = tmp_path / "data"
    data = load_processed(data_dir)
    save_processed(data, folder)
    first = run(folder, tmp_path / "m", tmp_path / "bb", epochs=1)
    seen = []

    def again(**train_cfg):
        seen.clear()
        return train(tiny_params(**train_cfg), tmp_path / "m", resume=True, data_dir=folder,
                     cache_dir=tmp_path / "bb", on_epoch_end=lambda e, r: seen.append(e))

    same = again(epochs=1)
    assert same["history"] == first["history"] and same["best_val_mae"] == first["best_val_mae"]
    assert seen == []  # a finished run of the same config: nothing to do (an idempotent DVC stage)
    again(epochs=1, lr=1e-3)
    assert seen == [1]  # other params: a fresh run, not a continuation
    data.values = data.values.copy()
    data.values[0, 0, 0] += 1.0
    save_processed(data, folder)
    again(epochs=1, lr=1e-3)
    assert seen == [1]  # other data: a fresh run
    assert load_checkpoint(tmp_path / "m" / "last.pt")["data_sha256"] == data_checksum(folder)


def test_early_stopping_stops_after_patience(data_dir, tmp_path):
    # lr 0: the val MAE never improves after epoch 1, so patience 2 stops after epoch 3
    summary = run(data_dir, tmp_path / "m", tmp_path / "bb", epochs=10, lr=0.0, patience=2,
                  max_train_batches=1, max_val_batches=1)
    assert summary["stopped_early"] is True
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 1
    assert len({h["val_mae"] for h in summary["history"]}) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_data_parallel(data_dir, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo): each process trains on half
    the batches and only the main process writes."""
    out = tmp_path / "m"
    script = tmp_path / "run_train.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "torch.set_num_threads(1)\n"
        "from pathlib import Path\n"
        "from conftest import tiny_params\n"
        "from stlink.training.train import train\n"
        f"train(tiny_params(epochs=1, max_train_batches=None, max_val_batches=None), Path({str(out)!r}),\n"
        f"      data_dir=Path({str(data_dir)!r}), cache_dir=Path({str(tmp_path / 'bb')!r}))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(_free_port()), str(script)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["num_processes"] == 2
    n_train = len(WindowDataset(load_processed(data_dir), "train", 12, 12))
    assert metrics["history"][0]["batches"] == -(-n_train // (16 * 2))  # each process: half the batches
    assert (out / "best.pt").exists() and (out / "last.pt").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no stray temp files from a second writer
    load_trained(out, cache_dir=tmp_path / "bb")


def test_lora_matrices_get_their_own_learning_rate():
    from stlink.config import ModelConfig
    from stlink.model import build_forecaster
    from stlink.training.train import make_optimizer

    net = build_forecaster(ModelConfig(backbone="tiny", mrffn="off", lora_rank=2), n_sensors=3, n_channels=1,
                           input_len=12, output_len=12, steps_per_day=48, adjacency=np.eye(3, dtype=np.float32),
                           scaler_mean=[50.0], scaler_std=[10.0], memory_keys=None)
    opt = make_optimizer(net, lr=1e-3, weight_decay=0.1, lora_lr=2e-4)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        group = by_param[id(p)]
        assert group["lr"] == (2e-4 if ".lora_" in name else 1e-3), name
        assert group["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0), name
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in net.parameters())


def test_step_budget_sets_the_schedule_and_stops_training(data_dir, tmp_path):
    """train.max_steps=7 with 3 epochs x 4 batches: 7 optimizer steps in all, LR annealed to 0."""
    summary = run(data_dir, tmp_path / "m", tmp_path / "bb", epochs=3, max_train_batches=4, max_steps=7,
                  warmup_steps=1)
    hist = summary["history"]
    assert [h["batches"] for h in hist] == [4, 3]
    assert hist[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert summary["windows_seen"] == 7 * 16 and summary["train_cpu_seconds"] > 0


def test_precision_choice():
    from stlink.config import ConfigError
    from stlink.training.train import cpu_bf16_flags, cpu_bf16_is_faster, mixed_precision

    assert mixed_precision("fp32", use_cuda=False) == "no"
    assert mixed_precision("bf16", use_cuda=False) == "bf16"
    assert mixed_precision("auto", use_cuda=False) == ("bf16" if cpu_bf16_is_faster(cpu_bf16_flags()) else "no")
    assert not cpu_bf16_is_faster({"avx512_bf16"}) and cpu_bf16_is_faster({"avx512_bf16", "amx_bf16"})
    with pytest.raises(ConfigError, match="train.precision"):
        mixed_precision("fp16", use_cuda=False)


def test_hiding_readings_masks_only_inputs_at_the_rate():
    from stlink.training.train import hide_readings

    torch.manual_seed(0)
    mask = torch.rand(32, 12, 40) > 0.2
    batch = {"x": torch.randn(32, 12, 40, 1), "x_mask": mask, "y": torch.randn(32, 12, 40),
             "y_mask": torch.ones(32, 12, 40, dtype=torch.bool)}
    assert hide_readings(batch, 0.0) is batch
    out = hide_readings(batch, 0.25)
    assert not (out["x_mask"] & ~mask).any()                       # hides, never reveals
    hidden = (mask & ~out["x_mask"]).sum() / mask.sum()
    assert 0.22 < float(hidden) < 0.28
    assert out["y_mask"] is batch["y_mask"] and out["x"] is batch["x"]  # targets and values untouched


def test_warm_start_hook_sets_the_starting_weights(data_dir, tmp_path):
    """``train(init=...)`` runs once on the fresh model before the first step: warm-started from a trained
    model, the first epoch's training loss is that model's level, not a random start's."""
    cache = tmp_path / "bb"
    trained = run(data_dir, tmp_path / "trained", cache, epochs=3)
    state = load_checkpoint(tmp_path / "trained" / "best.pt")["model"]
    calls = []

    def warm(model):
        calls.append(type(model).__name__)
        model.load_state_dict(state, strict=False)

    fresh = run(data_dir, tmp_path / "fresh", cache, epochs=1)
    warmed = train(tiny_params(epochs=1), tmp_path / "warm", data_dir=data_dir, cache_dir=cache, init=warm)
    assert calls == ["Forecaster"]
    first = warmed["history"][0]["train_loss"]
    assert first < fresh["history"][0]["train_loss"]
    assert first <= 1.1 * trained["history"][-1]["train_loss"]
