"""Batch forecasting as a Prefect flow: the champion from the registry -> validate the latest readings ->
forecast in chunks of issue times, mapped as Prefect tasks -> concatenate -> validate and write.

Each task calls one ``stlink.pipeline`` step (the same checks, rows and writer as ``stlink forecast``):
``forecast_plan_step`` once, ``forecast_chunk_step`` per chunk of issue times, ``forecast_write_step``
at the end; the chunks run on the task runner named by the ``task_runner`` parameter:

    threads[:<workers>]   local threads (default)
    dask[:<workers>]      ``prefect_dask.DaskTaskRunner`` on a ``distributed.LocalCluster`` of single-threaded
                          worker processes on 127.0.0.1 (default 2 workers)
    dask:<address>        the workers of an existing Dask scheduler, e.g. ``tcp://10.0.0.5:8786``

Distributed workers must see the model file (the registry cache, ``mlruns/registry-cache``), the
input and the output's folder at the same paths (a shared file system): each chunk task writes its
forecasts as a Parquet file in ``.<output name>.chunks/`` beside the output and returns only the
path; the write step streams those files into the output, validating one row group at a time, so
neither the flow nor a worker holds more than one chunk's rows (``docs/benchmarks.md``, Backfill).
The sensor axis is never split: the model reads the whole network.

Run it:  ``python -m flows.forecast [--model models:/stlink-<dataset>@champion] [--input ...] [--start ...]``
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.tasks import artifact_key, io_retries, publish_validation_failure
from stlink import pipeline
from stlink.config import Params, load_params
from stlink.errors import ConfigError
from stlink.errors import DataError
from stlink.monitoring.batch import after_forecast

RUNNERS = ("threads", "dask")
DASK_LOCAL_WORKERS = 2


def make_task_runner(spec: str) -> TaskRunner:
    """``threads[:n]`` | ``dask`` | ``dask:<n workers>`` | ``dask:<scheduler address>`` -> a Prefect task runner.

    ``dask`` / ``dask:<n>``: a ``distributed.LocalCluster`` of ``n`` single-threaded worker processes
    (default 2) on 127.0.0.1 only, no dashboard, closed with the flow.  ``dask:tcp://host:8786``: the
    workers of an existing scheduler (they must see the model file and the input at the same paths)."""
    kind, _, arg = spec.partition(":")
    if kind == "threads":
        if arg and not arg.isdigit():
            raise ConfigError(f"task_runner={spec!r}: threads:<number of workers>")
        return ThreadPoolTaskRunner(max_workers=int(arg) if arg else None)
    if kind not in RUNNERS:
        raise ConfigError(f"task_runner={spec!r}: one of threads[:n], dask, dask:<n workers>, dask:<address>")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError(f"task_runner={spec!r} needs prefect-dask: pip install prefect-dask distributed") from None
    if arg and not arg.isdigit():
        return DaskTaskRunner(address=arg)
    workers = int(arg) if arg else DASK_LOCAL_WORKERS
    if workers < 1:
        raise ConfigError(f"task_runner={spec!r}: at least one Dask worker")
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": None})


def split_issue_times(issue_times: list[str], chunks: int) -> list[tuple[str, str]]:
    """Contiguous (first, last) issue-time ranges, at most ``chunks`` of them, sizes differing by <= 1."""
    if chunks < 1:
        raise ConfigError(f"chunks={chunks}: at least 1")
    parts = np.array_split(np.arange(len(issue_times)), min(chunks, len(issue_times)))
    return [(issue_times[p[0]], issue_times[p[-1]]) for p in parts]


def publish_error(exc: Exception, dataset: str, what: str) -> None:
    """A failed check that is not a great-expectations suite, as a markdown artifact."""
    create_markdown_artifact(markdown=f"### {what} failed\n\n```\n{exc}\n```",
                             key=artifact_key(what, dataset), description=f"{what} of {dataset}")


# --- tasks: each calls one stlink.pipeline step ----------------------------------------------------

@task(name="load-model", cache_policy=NO_CACHE, **io_retries())
def load_model_task(params: Params, model_uri: str | None) -> dict[str, str]:
    """A local ONNX file for ``model_uri`` (default ``score.model``: the champion), downloaded once from
    the registry, and the version label written in every row."""
    model = pipeline.score_model_step(params, model_uri)
    get_run_logger().info("%s -> %s (%s)", model["uri"], model["path"], model["version"])
    return model


@task(name="validate-input", cache_policy=NO_CACHE, retries=0)
def validate_input_task(params: Params, model_path: str, input: str | None, start: str | None, end: str | None,
                        source: str | None = None) -> list[str]:
    """``pipeline.forecast_plan_step``: the scorer's input checks, once for the whole range; the issue times.
    A failure is published as an artifact."""
    from stlink.validation import ValidationFailed

    try:
        return pipeline.forecast_plan_step(params, model_path, input, start, end, source)
    except ValidationFailed as exc:
        publish_validation_failure(exc.report, params.data.dataset)
        raise
    except DataError as exc:
        publish_error(exc, params.data.dataset, "forecast-input")
        raise


@task(name="forecast-chunk", cache_policy=NO_CACHE, retries=0)
def forecast_chunk_task(params: Params, model_path: str, input: str | None, first: str, last: str, device: str,
                        model_version: str, output: str, source: str | None = None) -> str:
    """``pipeline.forecast_chunk_step``: the rows of the issue times ``[first, last]``, as a file; its path."""
    return pipeline.forecast_chunk_step(params, model_path, first, last, input=input, device=device,
                                        model_version=model_version, source=source, output=output)


@task(name="write-output", cache_policy=NO_CACHE, retries=0)
def write_output_task(params: Params, model_path: str, parts: list[str], issue_times: list[str],
                      model_version: str, output: str, fmt: str) -> int:
    """``pipeline.forecast_write_step``: stream the chunk files into the output, validating them chunk by chunk,
    atomically; the row count."""
    try:
        return pipeline.forecast_write_step(params, model_path, parts, issue_times, model_version, output, fmt)
    except DataError as exc:
        publish_error(exc, params.data.dataset, "forecast-output")
        raise


# --- the flow ------------------------------------------------------------------------------------

@flow(name="batch-forecast", log_prints=True)
def batch_forecast(params_path: str = "params.yaml", overrides: list[str] | None = None, model_uri: str | None = None,
                   input: str | None = None, output: str | None = None, device: str | None = None,
                   start: str | None = None, end: str | None = None, fmt: str | None = None, chunks: int = 4,
                   task_runner: str = "threads") -> dict[str, Any]:
    """Forecast with the registry's champion (or ``model_uri``: ``champion``, ``models:/name@alias``,
    ``models:/name/3`` or an ONNX file; default ``score.model``) from ``input`` (default, as for
    ``stlink forecast``: ``data/processed/<dataset>``) into ``output`` (default
    ``reports/<dataset>/forecast.<fmt>``); ``device`` and ``fmt`` default to ``score.device`` / ``score.format``.

    No ``start``/``end``: the latest window; ``start`` (and ``end``): every issue time in the range
    (backfill), split into ``chunks`` ranges scored in parallel on ``task_runner``.
    """
    params = load_params(params_path, overrides)
    device, fmt = device or params.score.device, fmt or params.score.format
    output = str(pipeline.forecast_output(params, output, fmt))
    pipeline.check_forecast_output(output, fmt)  # a folder or a read-only place fails before any scoring
    model = load_model_task(params, model_uri)
    issue_times = validate_input_task(params, model["path"], input, start, end)
    ranges = split_issue_times(issue_times, chunks)
    try:
        with make_task_runner(task_runner) as runner:
            futures = runner.map(forecast_chunk_task, {
                "params": unmapped(params), "model_path": unmapped(model["path"]), "input": unmapped(input),
                "first": [a for a, _ in ranges], "last": [b for _, b in ranges], "device": unmapped(device),
                "model_version": unmapped(model["version"]), "output": unmapped(output)})
            parts = futures.result()
        rows = write_output_task(params, model["path"], parts, issue_times, model["version"], output, fmt)
    finally:
        pipeline.forecast_chunks_cleanup(params, output, fmt)
    # input drift (may start the retrain deployment: drift.retrain_on_drift) and the HTML report beside the table
    monitoring = task(name="drift-and-report", cache_policy=NO_CACHE)(after_forecast)(
        params, output, pipeline.forecast_input(params, input), retrain=True)
    print(f"batch forecast: {rows} rows ({len(issue_times)} issue time(s) {issue_times[0]} .. {issue_times[-1]}, "
          f"{len(ranges)} chunk(s) on {task_runner}) by {model['version']} -> {output}")
    return {"output": output, "rows": rows, "issue_times": len(issue_times), "first_issue": issue_times[0],
            "monitoring": monitoring,
            "last_issue": issue_times[-1], "chunks": len(ranges), "model_uri": model["uri"],
            "model_version": model["version"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.forecast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model", default=None, help="champion | models:/<name>@<alias> | models:/<name>/<version> | "
                        "a path (default: score.model)")
    parser.add_argument("--input", default=None)
    parser.add_argument("--output", default=None)
    parser.add_argument("--device", default=None, choices=("auto", "cuda", "cpu"), help="default: score.device")
    parser.add_argument("--start", default=None)
    parser.add_argument("--end", default=None)
    parser.add_argument("--format", dest="fmt", default=None, choices=("parquet", "csv"), help="default: score.format")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--task-runner", default="threads", help="threads[:n] | dask[:n] | dask:<scheduler address>")
    args = parser.parse_args(argv)
    result = batch_forecast(params_path=args.params, overrides=args.set or None, model_uri=args.model,
                            input=args.input, output=args.output, device=args.device, start=args.start,
                            end=args.end, fmt=args.fmt, chunks=args.chunks, task_runner=args.task_runner)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
