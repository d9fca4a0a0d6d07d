"""The sidecar ``<name>.json`` beside an exported ``<name>.onnx`` (no PyTorch needed to read it).

It is the contract between ``export`` and ``forecast``: the graph's input/output names and
shapes, the sensors in model order, input/output lengths, frequency, null value, channels,
units, physical bounds, the ONNX file's sha256 and the parity result of the export.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from stlink.data.formats import DataError
from stlink.io import sha256_file

INPUT_NAMES = ("values", "mask", "tod", "dow")
OUTPUT_NAME = "forecast"
SIDECAR_FORMAT = "stlink-onnx/1"


class ExportError(DataError):
    """An export that failed, or an exported model (file or sidecar) that cannot be used."""


def sidecar_path(onnx_path: str | Path) -> Path:
    """``models/x/model.onnx`` -> ``models/x/model.json``."""
    return Path(onnx_path).with_suffix(".json")


@dataclass(frozen=True)
class ModelCard:
    """What the batch scorer knows about an exported model (read from its sidecar)."""

    path: Path
    sha256: str
    sensor_ids: list[str]
    channels: list[str]
    units: list[str]
    input_len: int
    output_len: int
    steps_per_day: int
    freq_seconds: int
    null_value: float
    bounds: dict[str, list[float]]
    parity: dict[str, Any]

    @property
    def freq(self) -> pd.Timedelta:
        return pd.Timedelta(seconds=self.freq_seconds)

    @property
    def default_version(self) -> str:
        """``model.onnx@sha256:<12 hex>``: names the exact file when no registry version is given."""
        return f"{self.path.name}@sha256:{self.sha256[:12]}"


def read_card(onnx_path: str | Path, *, require_parity: bool = True) -> ModelCard:
    """Read and check the sidecar of ``onnx_path``.

    ``ExportError`` (naming the file) when the model or its sidecar is missing, the sidecar
    belongs to another file (sha256 differs), or the export's parity check failed.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ExportError(f"{onnx_path}: no such ONNX model; run `stlink export` first")
    path = sidecar_path(onnx_path)
    if not path.is_file():
        raise ExportError(f"{path}: no sidecar beside {onnx_path.name}; export the model with `stlink export`")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON: {exc}") from None
    if raw.get("format") != SIDECAR_FORMAT:
        raise ExportError(f"{path}: format {raw.get('format')!r}, expected {SIDECAR_FORMAT!r}")
    digest = sha256_file(onnx_path)
    if digest != raw["sha256"]:
        raise ExportError(f"{path}: describes a file with sha256 {raw['sha256'][:12]}..., but {onnx_path.name} "
                          f"has {digest[:12]}...; re-export the model")
    parity = raw.get("parity") or {}
    accuracy = raw.get("accuracy")  # int8 / fp16 variants (stlink.export.optimize): the test-MAE gate replaces parity
    if require_parity and accuracy is not None and not accuracy.get("passed"):
        raise ExportError(f"{onnx_path}: the export's accuracy gate failed (test MAE change "
                          f"{accuracy.get('relative_change')}, allowed {accuracy.get('max_relative_change')}); "
                          "refusing to score with it")
    if require_parity and accuracy is None and not parity.get("passed"):
        raise ExportError(f"{onnx_path}: the export's parity check failed (max |ort - torch| = "
                          f"{parity.get('max_abs_diff')}, tolerance {parity.get('tolerance')}); refusing to score with it")
    return ModelCard(
        path=onnx_path, sha256=digest, sensor_ids=[str(s) for s in raw["sensor_ids"]],
        channels=list(raw["channels"]), units=list(raw["units"]), input_len=int(raw["input_len"]),
        output_len=int(raw["output_len"]), steps_per_day=int(raw["steps_per_day"]),
        freq_seconds=int(raw["freq_seconds"]), null_value=float(raw["null_value"]),
        bounds={k: [float(v[0]), float(v[1])] for k, v in raw.get("bounds", {}).items()}, parity=parity)
