"""Checkpoints: what is saved, how it is written, and how a trained model is rebuilt.

A model directory (``train``'s ``out_dir``) holds:

  best.pt             the best epoch: trainable state, the build inputs of the model (adjacency,
                      scaler, memory keys, sizes), a fingerprint of the frozen backbone, val MAE
  last.pt             the latest epoch: best.pt's model part plus optimizer, scheduler, epoch,
                      early-stopping state and RNG states, so ``train(resume=True)`` continues
                      exactly where a killed run stopped
  config.json         the exact params of the run
  data_meta.json      the processed dataset's meta.json plus sensor_ids and its sha256
  train_metrics.json  per-epoch history and the run summary

Only trainable parameters and persistent buffers are saved: the frozen backbone is rebuilt
from ``config.json`` (pretrained weights from the backbone cache, or the seeded ``tiny``
initialisation) and checked against the saved fingerprint.  Files are written atomically and
read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stlink.config import Params, params_from_dict
from stlink.data.formats import DataError, ProcessedData
from stlink.io import atomic_path, sha256_file

DEFAULT_CACHE_DIR = Path("models/backbones")


class CheckpointError(DataError):
    """A checkpoint that is missing or does not fit the model or data it is used with."""


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    with atomic_path(path, ".pt") as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not Path(path).exists():
        raise CheckpointError(f"{path}: no checkpoint here; run `stlink train` first")
    return torch.load(path, map_location="cpu", weights_only=True)


def data_checksum(folder: Path) -> str:
    """sha256 over the (name, sha256) list of the files of a processed dataset folder."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no processed dataset files")
    lines = "".join(f"{p.name}:{sha256_file(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and persistent buffers (not the frozen weights), on CPU."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in frozen}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """Load ``trainable_state`` output; anything missing or unknown is a ``CheckpointError``."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    result = model.load_state_dict(state, strict=False)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{where}: checkpoint does not fit the model built from its config: "
                              f"missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}")


def frozen_fingerprint(model: nn.Module, n_values: int = 4096) -> str:
    """sha256 over names, shapes and the first ``n_values`` values of every frozen parameter."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(p.detach().flatten()[:n_values].float().cpu().numpy().tobytes())
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states in a ``weights_only``-loadable form."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_inputs(params: Params, data: ProcessedData, memory_keys: np.ndarray | None) -> dict[str, Any]:
    """Everything ``build_forecaster`` needs besides the model config, as tensors (saved in best.pt)."""
    return {
        "n_sensors": int(data.values.shape[1]),
        "n_channels": int(data.values.shape[2]),
        "input_len": params.prepare.input_len,
        "output_len": params.prepare.output_len,
        "steps_per_day": data.steps_per_day,
        "adjacency": torch.as_tensor(np.asarray(data.adjacency, dtype=np.float32)),
        "scaler_mean": [float(v) for v in data.meta["scaler"]["mean"]],
        "scaler_std": [float(v) for v in data.meta["scaler"]["std"]],
        "memory_keys": None if memory_keys is None else torch.as_tensor(np.asarray(memory_keys, np.float32)),
    }


def build_model(params: Params, inputs: dict[str, Any], cache_dir: Path = DEFAULT_CACHE_DIR) -> nn.Module:
    """The forecaster (LoRA applied) from params and ``build_inputs``; random init seeded by train.seed."""
    from stlink.model import build_forecaster

    keys = inputs["memory_keys"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.train.seed)
        return build_forecaster(
            params.model,
            n_sensors=inputs["n_sensors"], n_channels=inputs["n_channels"],
            input_len=inputs["input_len"], output_len=inputs["output_len"],
            steps_per_day=inputs["steps_per_day"], adjacency=inputs["adjacency"].numpy(),
            scaler_mean=np.asarray(inputs["scaler_mean"], np.float32),
            scaler_std=np.asarray(inputs["scaler_std"], np.float32),
            memory_keys=None if keys is None else keys.numpy(), cache_dir=Path(cache_dir))


def model_payload(model: nn.Module, inputs: dict[str, Any], fingerprint: str) -> dict[str, Any]:
    """The part of a checkpoint that rebuilds the model: trainable state, build inputs, fingerprint."""
    return {"model": trainable_state(model), "build": inputs, "frozen_fingerprint": fingerprint}


def load_trained(model_dir: Path | str, cache_dir: Path = DEFAULT_CACHE_DIR,
                 checkpoint: str = "best.pt") -> tuple[nn.Module, Params, dict[str, Any]]:
    """Rebuild the model from ``config.json`` and load ``best.pt`` -> (model in eval mode, params, data meta).

    ``data_meta`` is the processed dataset's meta (scaler, splits, steps_per_day, freq, ...) plus
    ``sensor_ids`` and ``data_sha256`` of the data the model was trained on.
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise CheckpointError(f"{model_dir}: no config.json; run `stlink train` first")
    params = params_from_dict(json.loads((model_dir / "config.json").read_text()))
    meta = json.loads((model_dir / "data_meta.json").read_text())
    ckpt = load_checkpoint(model_dir / checkpoint)
    model = build_model(params, ckpt["build"], cache_dir)
    if frozen_fingerprint(model) != ckpt["frozen_fingerprint"]:
        raise CheckpointError(f"{model_dir / checkpoint}: the frozen backbone rebuilt from config.json "
                              f"(model.backbone={params.model.backbone!r}, cache {cache_dir}) differs "
                              f"from the one the model was trained with")
    load_trainable_state(model, ckpt["model"], model_dir / checkpoint)
    model.eval()
    return model, params, meta
