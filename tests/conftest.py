"""Shared test set-up: offline, quiet tools, writable homes in temp dirs."""
import os
import tempfile

import pytest

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("PREFECT_HOME", os.path.join(tempfile.mkdtemp(prefix="stlink-prefect-"), "home"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


# --- tiny processed datasets and params for the training / evaluation tests ---------------------
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def make_processed(tmp_path, T: int | None = None, N: int = 4, seed: int = 0, *, steps_per_day: int = 48,
                   days: int = 8, noise: float = 0.5, missing: float = 0.03, amplitude: float = 15.0,
                   split: tuple[float, float, float] = (0.7, 0.1, 0.2), name: str = "tiny") -> Path:
    """Write a small ProcessedData to ``tmp_path/data/processed/<name>`` and return the folder.

    Channel 0 is a speed-like daily sinusoid per sensor (phase shifted along a chain of sensors)
    around 50 plus Gaussian ``noise``; a ``missing`` fraction of readings is stored as the null
    value 0 and masked.  ``noise=0, missing=0`` gives a series that is exactly periodic by day.
    Splits and scaler come from ``compute_splits`` / ``fit_scaler`` as in ``stlink prepare``.
    """
    from stlink.data.formats import ProcessedData, save_processed
    from stlink.data.windows import compute_splits, fit_scaler

    T = T or steps_per_day * days
    rng = np.random.default_rng(seed)
    t = np.arange(T)[:, None]                                          # (T, 1)
    phase = np.linspace(0, np.pi / 2, N)[None, :]                      # (1, N)
    speed = 50.0 + amplitude * np.sin(2 * np.pi * t / steps_per_day + phase) + noise * rng.standard_normal((T, N))
    mask = rng.random((T, N)) >= missing                               # (T, N)
    values = np.where(mask, speed, 0.0).astype(np.float32)[..., None]  # (T, N, 1), null value 0
    freq_s = 86400 // steps_per_day
    timestamps = pd.date_range("2024-01-01", periods=T, freq=f"{freq_s}s").to_numpy("datetime64[ns]")
    adjacency = np.eye(N, dtype=np.float32) + np.eye(N, k=1, dtype=np.float32) + np.eye(N, k=-1, dtype=np.float32)
    splits = compute_splits(T, list(split), min_len=24)
    meta = {"dataset": name, "source": "synthetic", "freq": f"{freq_s // 60}min", "freq_seconds": freq_s,
            "steps_per_day": steps_per_day, "null_value": 0.0, "channels": ["speed"], "units": ["mph"],
            "n_steps": T, "n_sensors": N, "split_fractions": list(split), "splits": splits,
            "scaler": fit_scaler(values, mask, splits["train"])}
    folder = Path(tmp_path) / "data" / "processed" / name
    save_processed(ProcessedData(values=values, mask=mask, timestamps=timestamps, adjacency=adjacency,
                                 sensor_ids=[f"s{i}" for i in range(N)], meta=meta), folder)
    return folder


def tiny_params(dataset: str = "tiny", **train):
    """Params for a fast CPU run of the real forecaster on the ``tiny`` random backbone."""
    from stlink.config import params_from_dict

    return params_from_dict({
        "data": {"dataset": dataset},
        "prepare": {"input_len": 12, "output_len": 12},
        "model": {"backbone": "tiny", "n_layers": 1, "tiny_hidden": 32, "tiny_heads": 2, "patch_len": 3,
                  "spatial_dim": 2, "memory_size": 8, "memory_topk": 2, "lora_rank": 4},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "warmup_steps": 4, "patience": 3, "seed": 7,
                  "max_train_batches": 6, "max_val_batches": 2, "device": "cpu", **train},
        "reference": {"model": "stid", "epochs": 2, "max_train_batches": 4, "batch_size": 16},
        "evaluate": {"batch_size": 64, "plot_sensors": 2},
    })


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest (and far more steadily on a shared 2-core box) on one thread."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def trained_like(params, data, input_len: int = 12, output_len: int = 12):
    """The real tiny forecaster with non-zero LoRA matrices and memory values (as after training;
    both start at zero), in eval mode."""
    import torch

    from stlink.data.windows import WindowDataset
    from stlink.training.checkpoint import build_inputs, build_model
    from stlink.training.train import memory_keys_for

    inputs = build_inputs(params, data, memory_keys_for(params, WindowDataset(data, "train", input_len, output_len)))
    model = build_model(params, inputs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or (name.startswith("memory.") and name.endswith(".values")):
                p.normal_(std=0.2)
    assert any(n.startswith("memory.") for n, _ in model.named_parameters()), "the test needs MRFFN on"
    return model.eval(), inputs
