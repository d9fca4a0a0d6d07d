"""The two deployments, served from this process: a nightly retrain and a batch forecast schedule.

    prefect server start --host 127.0.0.1 &        # the UI at http://127.0.0.1:4200
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve [--cron "0 2 * * *"] [--timezone Europe/Paris] \\
        [--every-minutes 15] [--no-dvc] [--task-runner threads]

``stlink-nightly-retrain`` runs ``training_pipeline`` on a cron (default 02:00 in ``--timezone``, default
``$STLINK_TZ`` or UTC), at most one run at a time (further runs wait); ``stlink-batch-forecast`` runs
``batch_forecast`` every ``--every-minutes`` (default 15; a run due while the last one still runs is
cancelled: its forecast would already be stale).  Both can be triggered from the UI with
other parameters.  Runs execute in this process, in the working directory (the project root).
"""
from __future__ import annotations

import argparse
import datetime
import os

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron, Interval

from flows.forecast import batch_forecast
from flows.training import training_pipeline

RETRAIN = "stlink-nightly-retrain"
FORECAST = "stlink-batch-forecast"
DEFAULT_CRON = "0 2 * * *"
DEFAULT_EVERY_MINUTES = 15.0


def default_timezone() -> str:
    """``$STLINK_TZ`` (an IANA name such as ``Europe/Paris``), else UTC."""
    return os.environ.get("STLINK_TZ") or "UTC"


def deployments(*, cron: str = DEFAULT_CRON, timezone: str | None = None,
                every_minutes: float = DEFAULT_EVERY_MINUTES, params_path: str = "params.yaml", use_dvc: bool = True,
                task_runner: str = "threads") -> list[RunnerDeployment]:
    """The nightly retrain (``cron`` in ``timezone``, one run at a time) and the batch forecast (every
    ``every_minutes``); nothing is registered until they are served."""
    tz = timezone or default_timezone()
    retrain = training_pipeline.to_deployment(
        RETRAIN, schedules=[Cron(cron, timezone=tz)], concurrency_limit=1,
        parameters={"params_path": params_path, "use_dvc": use_dvc, "resume": True},
        tags=["stlink", "training"], description=f"ingest -> ... -> promote, {cron} ({tz})")
    forecast = batch_forecast.to_deployment(
        FORECAST, schedules=[Interval(datetime.timedelta(minutes=every_minutes), timezone=tz)],
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        parameters={"params_path": params_path, "task_runner": task_runner},
        tags=["stlink", "forecast"], description=f"champion forecasts every {every_minutes:g} min")
    return [retrain, forecast]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default=DEFAULT_CRON, help=f"nightly retrain schedule (default {DEFAULT_CRON!r})")
    parser.add_argument("--timezone", default=None, help="IANA time zone of the schedules (default $STLINK_TZ or UTC)")
    parser.add_argument("--every-minutes", type=float, default=DEFAULT_EVERY_MINUTES,
                        help=f"batch forecast interval (default {DEFAULT_EVERY_MINUTES:g})")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-dvc", action="store_true", help="retrain with direct stlink calls, not `dvc repro`")
    parser.add_argument("--task-runner", default="threads", help="threads[:n] | dask[:n] | dask:<scheduler address>")
    args = parser.parse_args(argv)
    serve(*deployments(cron=args.cron, timezone=args.timezone, every_minutes=args.every_minutes,
                       params_path=args.params, use_dvc=not args.no_dvc, task_runner=args.task_runner))


if __name__ == "__main__":
    main()
