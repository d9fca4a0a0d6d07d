"""The training pipeline as a Prefect flow: ingest -> validate -> prepare -> train -> evaluate ->
export -> promote.

Each task runs the DVC stage of its step (``use_dvc=True``: ``dvc repro <stage>``, so ``dvc.lock``
records what was produced) or calls the step function that the stage's CLI command calls
(``use_dvc=False``): ``stlink.pipeline.*_step``, which also log the training run and the evaluation
to MLflow and register the export.  A step that ``dvc.yaml`` has no stage for is called directly.

Failure behaviour
  * Tasks that do I/O (ingest/download, export with its registration, promotion) retry with
    exponential back-off on transient errors only (``flows.tasks.is_transient``); validation,
    preparation, training and evaluation never retry.
  * A failed validation fails the flow run and publishes the failed expectations as a markdown
    artifact (``validation-<dataset>-raw`` / ``-processed``).
  * Promotion is gated (``stlink.tracking.registry``): a refused challenger (worse than the champion
    or a baseline, failed ONNX parity, failed output validation) leaves the champion serving; the
    gate figures are published as the ``promotion-<dataset>`` artifact either way.
  * One training pipeline at a time: the flow holds the global concurrency limit ``stlink-training``
    (limit 1, created when missing).
  * Training resumes from ``models/<dataset>/last.pt`` (``resume=True``), so a cancelled run continues
    where it stopped on the next run.

Run it:  ``python -m flows.training [--no-dvc] [-S key=value ...]``
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.tasks import (StageFailed, artifact_key, check_dvc_project, io_retries, read_json, run_step,
                         training_slot, validation_artifacts)
from stlink import pipeline
from stlink.config import Params, load_params
from stlink.errors import DataError


# --- data ----------------------------------------------------------------------------------------

@task(name="ingest", cache_policy=NO_CACHE, **io_retries())
def ingest_task(params: Params, use_dvc: bool) -> str:
    """Fetch or generate the source into ``data/raw/<dataset>`` (downloads retry)."""
    run_step("ingest", use_dvc, lambda: pipeline.ingest_step(params))
    return str(params.raw_dir)


@task(name="validate", cache_policy=NO_CACHE, retries=0)
def validate_task(params: Params, use_dvc: bool) -> str:
    """The great-expectations raw suites; a failure publishes its expectations and fails the run."""
    report_dir = params.report_dir / "validation"
    with validation_artifacts(report_dir, "raw", params.data.dataset):
        run_step("validate", use_dvc, lambda: pipeline.validate_step(params))
    return str(report_dir / "raw.json")


@task(name="prepare", cache_policy=NO_CACHE, retries=0)
def prepare_task(params: Params, use_dvc: bool) -> str:
    """Tensors, mask, adjacency, splits and scaler in ``data/processed/<dataset>``, validated."""
    with validation_artifacts(params.report_dir / "validation", "processed", params.data.dataset):
        run_step("prepare", use_dvc, lambda: pipeline.prepare_step(params))
    return str(params.processed_dir)


# --- model ---------------------------------------------------------------------------------------

@task(name="train", cache_policy=NO_CACHE, retries=0)
def train_task(params: Params, use_dvc: bool, resume: bool) -> dict[str, Any]:
    """LoRA fine-tuning into ``models/<dataset>`` and its MLflow run; continues from ``last.pt`` when
    ``resume`` (a finished run returns at once)."""
    summary = run_step("train", use_dvc, lambda: pipeline.train_step(params, resume=resume))
    return summary if summary is not None else read_json(params.model_dir / "train_metrics.json")


@task(name="evaluate", cache_policy=NO_CACHE, retries=0)
def evaluate_task(params: Params, use_dvc: bool) -> dict[str, Any]:
    """Masked metrics of the model and the naive baselines on val and test, plots; logged on the run."""
    metrics = run_step("evaluate", use_dvc, lambda: pipeline.evaluate_step(params))
    if metrics is not None:
        return metrics
    return {split: read_json(params.report_dir / "metrics" / f"{split}.json") for split in ("val", "test")}


@task(name="export", cache_policy=NO_CACHE, **io_retries())
def export_task(params: Params, use_dvc: bool) -> str:
    """The merged forecaster as ONNX (+ card) in ``models/exported/<dataset>``, checked against PyTorch and
    registered as the ``challenger``; its registry version.  (Retried only on transient errors: the
    registry.)

    A failed parity check does not stop the flow: the export is registered all the same and the gate
    refuses it with the figures, so the champion keeps serving."""
    onnx_path = params.export_dir / "model.onnx"
    started = time.time()
    try:
        run_step("export", use_dvc, lambda: pipeline.export_step(params))
    except (DataError, StageFailed):
        parity = pipeline.failed_parity_step(onnx_path)
        if parity is None or onnx_path.stat().st_mtime < started - 1:
            raise
        get_run_logger().error("ONNX parity failed (max |ort - torch| %s): %s is registered for the gate to "
                               "refuse", parity.get("max_abs_diff"), onnx_path)
    return pipeline.registered_version_step(params, onnx_path)


@task(name="promote", cache_policy=NO_CACHE, **io_retries())
def promote_task(params: Params, use_dvc: bool, version: str) -> dict[str, Any]:
    """Gate the new ``version`` (the challenger) against the champion and the baselines; a refusal keeps the
    champion serving."""
    logger = get_run_logger()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        result = run_step("promote", use_dvc, lambda: pipeline.promote_step(params))
    except StageFailed:  # `stlink promote` exits 3 on a refusal: a verdict, not a failure of the flow
        record = pipeline.promotion_record_step(params, version)
        if not (record["decision"].startswith("refused") and record["checked_at"][:19] >= started):
            raise
        result = None
    record = pipeline.promotion_record_step(params, version)
    name = record["model"]
    lines = [f"### {name} v{version}: {record['decision'] or 'no gate decision recorded'}", "",
             f"champion: {'v' + record['champion'] if record['champion'] else 'none'}", "",
             "| gate | result |", "|---|---|"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in record["gates"].items()]
    create_markdown_artifact(markdown="\n".join(lines), key=artifact_key("promotion", params.data.dataset),
                             description=f"promotion gate of {name} v{version}")
    if record["promoted"]:
        logger.info("%s v%s is the champion", name, version)
    else:
        logger.warning("%s v%s not promoted (%s); the champion stays %s", name, version, record["decision"],
                       f"v{record['champion']}" if record["champion"] else "unset")
    if result is not None:
        logger.info(result.describe())
    return record


# --- the flow ------------------------------------------------------------------------------------

@flow(name="training-pipeline", log_prints=True)
def training_pipeline(params_path: str = "params.yaml", overrides: list[str] | None = None, use_dvc: bool = True,
                      resume: bool = True) -> dict[str, Any]:
    """ingest -> validate -> prepare -> train -> evaluate -> export -> promote, in the working directory.

    ``use_dvc``: run each step's DVC stage (``dvc.lock`` stays the record; needs ./params.yaml and no
    ``overrides``), else call the stlink functions with ``load_params(params_path, overrides)``.
    ``resume``: continue an interrupted training from its last checkpoint.
    Returns the paths written, the best validation MAE, the registered version and the gate decision.
    """
    if use_dvc:
        check_dvc_project(params_path, overrides, resume)
    params = load_params(params_path, overrides)
    with training_slot():
        raw = ingest_task(params, use_dvc)
        validate_task(params, use_dvc)
        processed = prepare_task(params, use_dvc)
        summary = train_task(params, use_dvc, resume)
        evaluate_task(params, use_dvc)
        version = export_task(params, use_dvc)
        gate = promote_task(params, use_dvc, version)
    return {"raw": raw, "processed": processed, "model_dir": str(params.model_dir),
            "onnx": str(params.export_dir / "model.onnx"),
            "best_val_mae": summary.get("best_val_mae"), **gate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-dvc", action="store_true", help="call the stlink steps directly, not `dvc repro`")
    parser.add_argument("--fresh", action="store_true", help="do not resume from the last checkpoint")
    args = parser.parse_args(argv)
    result = training_pipeline(params_path=args.params, overrides=args.set or None, use_dvc=not args.no_dvc,
                               resume=not args.fresh)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
