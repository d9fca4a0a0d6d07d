"""Batch forecasting as a Prefect flow: the champion from the registry -> validate the latest readings ->
forecast in chunks of issue times, mapped as Prefect tasks -> concatenate -> validate and write.

The scoring itself is ``stlink.export.forecast.forecast`` (onnxruntime, no PyTorch) on each chunk's
issue-time range; the chunks run on the task runner named by the ``task_runner`` parameter:

    threads[:<workers>]   local threads (default)
    dask[:<address>]      ``prefect_dask.DaskTaskRunner`` (``pip install prefect-dask``); no address: a local
                          cluster, else the scheduler at e.g. ``tcp://10.0.0.5:8786``
    ray[:<address>]       ``prefect_ray.RayTaskRunner`` (``pip install prefect-ray``), e.g. ``ray://head:10001``

Distributed workers must see the model file (the registry cache, ``mlruns/registry-cache``) and the
input at the same paths (a shared file system); each chunk's forecasts travel back as a table and only
the flow writes the output.  The sensor axis is never split: the model reads the whole network.

Run it:  ``python -m flows.forecast [--model models:/stlink-<dataset>@champion] [--input ...] [--start ...]``
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.tasks import artifact_key, io_retries, publish_validation_failure
from stlink import pipeline
from stlink.config import ConfigError, Params, load_params
from stlink.data.formats import DataError

RUNNERS = ("threads", "dask", "ray")


def make_task_runner(spec: str) -> TaskRunner:
    """``threads[:n]`` | ``dask[:address]`` | ``ray[:address]`` -> a Prefect task runner (see module doc)."""
    kind, _, arg = spec.partition(":")
    if kind == "threads":
        if arg and not arg.isdigit():
            raise ConfigError(f"task_runner={spec!r}: threads:<number of workers>")
        return ThreadPoolTaskRunner(max_workers=int(arg) if arg else None)
    if kind not in RUNNERS:
        raise ConfigError(f"task_runner={spec!r}: one of threads[:n], dask[:address], ray[:address]")
    try:
        if kind == "dask":
            from prefect_dask import DaskTaskRunner

            return DaskTaskRunner(address=arg) if arg else DaskTaskRunner()
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=arg) if arg else RayTaskRunner()
    except ImportError:
        raise ConfigError(f"task_runner={spec!r} needs prefect-{kind}: pip install prefect-{kind}") from None


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


# --- tasks ---------------------------------------------------------------------------------------

@task(name="load-model", cache_policy=NO_CACHE, **io_retries())
def load_model_task(params: Params, model_uri: str | None) -> dict[str, str]:
    """A local ONNX file for ``model_uri`` (default ``score.model``: the champion), downloaded once from
    the registry, and the version label written in every row."""
    from stlink.export.card import read_card

    resolved = pipeline.resolve_score_model(params, model_uri)
    label = resolved.label if resolved.name else read_card(resolved.path).default_version
    get_run_logger().info("%s -> %s (%s)", resolved.uri, resolved.path, label)
    return {"uri": resolved.uri, "path": str(resolved.path), "version": label}


@task(name="validate-input", cache_policy=NO_CACHE, retries=0)
def validate_input_task(params: Params, model_path: str, input: str, start: str | None, end: str | None,
                        max_missing_run: int | None) -> list[str]:
    """The checks ``forecast`` makes on its input, once for the whole range, plus the great-expectations
    raw suite for readings; the issue times to score.  A failure is published as an artifact."""
    from stlink.data.formats import RawData
    from stlink.export import forecast as fc
    from stlink.export.card import read_card
    from stlink.validation import ValidationFailed

    card = read_card(model_path)
    try:
        data = fc.read_input(input, card, data_cfg=params.data)
        make = fc.windows_from_raw if isinstance(data, RawData) else fc.windows_from_processed
        w = make(data, card, start, end, str(input))
        fc.check_bounds(w, card, params.validation.bounds)
        fc.check_missing_runs(w, card, card.input_len // 2 if max_missing_run is None else max_missing_run)
        if isinstance(data, RawData):
            fc.validate_readings_gx(data, w, params.validation)
    except ValidationFailed as exc:
        publish_validation_failure(exc.report, params.data.dataset)
        raise
    except DataError as exc:
        publish_error(exc, params.data.dataset, "forecast-input")
        raise
    return [str(pd.Timestamp(t)) for t in w.issue_times]


@task(name="forecast-chunk", cache_policy=NO_CACHE, retries=0)
def forecast_chunk_task(params: Params, model_path: str, input: str, first: str, last: str, device: str,
                        model_version: str, max_missing_run: int | None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Forecasts of the issue times ``[first, last]`` (the suite ran once in ``validate-input``)."""
    from stlink.export.forecast import forecast

    with tempfile.TemporaryDirectory(prefix="stlink-chunk-") as tmp:
        part = Path(tmp) / "part.parquet"
        record = forecast(model_path, input, part, device=device, start=first, end=last, model_version=model_version,
                          data_cfg=params.data, validation=params.validation, gx=False, progress=False,
                          max_missing_run=max_missing_run)
        return pd.read_parquet(part), record


@task(name="write-output", cache_policy=NO_CACHE, retries=0)
def write_output_task(params: Params, model_path: str, parts: list[pd.DataFrame], issue_times: list[str],
                      model_version: str, output: str, fmt: str) -> int:
    """Concatenate the chunks, validate the whole table, write it atomically; the row count."""
    from stlink.export.card import read_card
    from stlink.export.forecast import FORMATS, validate_output
    from stlink.io import atomic_path

    if fmt not in FORMATS:
        raise ConfigError(f"fmt={fmt!r}: one of {', '.join(FORMATS)}")
    card = read_card(model_path)
    df = pd.concat(parts, ignore_index=True)
    try:
        validate_output(df, sensor_ids=card.sensor_ids, horizon=card.output_len,
                        issue_times=pd.DatetimeIndex(issue_times).to_numpy("datetime64[ns]"), freq=card.freq,
                        bounds=params.validation.bounds.get(card.channels[0]), model_version=model_version,
                        where=output)
    except DataError as exc:
        publish_error(exc, params.data.dataset, "forecast-output")
        raise
    with atomic_path(output, f".{fmt}") as tmp:
        if fmt == "parquet":
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False, date_format="%Y-%m-%d %H:%M:%S")
    return len(df)


# --- the flow ------------------------------------------------------------------------------------

@flow(name="batch-forecast", log_prints=True)
def batch_forecast(params_path: str = "params.yaml", overrides: list[str] | None = None, model_uri: str | None = None,
                   input: str | None = None, output: str | None = None, device: str | None = None,
                   start: str | None = None, end: str | None = None, fmt: str | None = None, chunks: int = 4,
                   task_runner: str = "threads", max_missing_run: int | None = None) -> dict[str, Any]:
    """Forecast with the registry's champion (or ``model_uri``: ``champion``, ``models:/name@alias``,
    ``models:/name/3`` or an ONNX file; default ``score.model``) from ``input`` (default
    ``data/raw/<dataset>``, the latest ingested readings) into ``output`` (default
    ``reports/<dataset>/forecast.<fmt>``); ``device`` and ``fmt`` default to ``score.device`` / ``score.format``.

    No ``start``/``end``: the latest window; ``start`` (and ``end``): every issue time in the range
    (backfill), split into ``chunks`` ranges scored in parallel on ``task_runner``.
    """
    params = load_params(params_path, overrides)
    device, fmt = device or params.score.device, fmt or params.score.format
    input = input or str(params.raw_dir)
    output = output or str(params.report_dir / f"forecast.{fmt}")
    model = load_model_task(params, model_uri)
    issue_times = validate_input_task(params, model["path"], input, start, end, max_missing_run)
    ranges = split_issue_times(issue_times, chunks)
    with make_task_runner(task_runner) as runner:
        futures = runner.map(forecast_chunk_task, {
            "params": unmapped(params), "model_path": unmapped(model["path"]), "input": unmapped(input),
            "first": [a for a, _ in ranges], "last": [b for _, b in ranges], "device": unmapped(device),
            "model_version": unmapped(model["version"]), "max_missing_run": unmapped(max_missing_run)})
        results = futures.result()
    rows = write_output_task(params, model["path"], [df for df, _ in results], issue_times, model["version"],
                             output, fmt)
    providers = sorted({rec["provider"] for _, rec in results})
    print(f"batch forecast: {rows} rows ({len(issue_times)} issue time(s) {issue_times[0]} .. {issue_times[-1]}, "
          f"{len(ranges)} chunk(s) on {task_runner}, onnxruntime {', '.join(providers)}) by {model['version']} "
          f"-> {output}")
    return {"output": output, "rows": rows, "issue_times": len(issue_times), "first_issue": issue_times[0],
            "last_issue": issue_times[-1], "chunks": len(ranges), "model_uri": model["uri"],
            "model_version": model["version"], "providers": providers}


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
    parser.add_argument("--task-runner", default="threads", help="threads[:n] | dask[:address] | ray[:address]")
    args = parser.parse_args(argv)
    result = batch_forecast(params_path=args.params, overrides=args.set or None, model_uri=args.model,
                            input=args.input, output=args.output, device=args.device, start=args.start,
                            end=args.end, fmt=args.fmt, chunks=args.chunks, task_runner=args.task_runner)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
