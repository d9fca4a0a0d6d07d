"""What follows every batch forecast (``pipeline.forecast_step`` and the ``batch-forecast`` flow):
the drift check of its input and the HTML report beside its table (``monitor.after_forecast``).

Neither may cost the forecast: a missing drift reference (or an input the drift check cannot read)
is a warning naming it, and the report then says there is no drift summary; an MLflow store that
refuses the report's run is a warning too.  The table is already written when this runs.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stlink.monitoring import MonitoringError

log = logging.getLogger(__name__)


def after_forecast(params, output: str | Path, input: str | Path | None = None, *,
                   retrain: bool = False) -> dict[str, Any]:
    """Drift of ``input`` (``drift_check`` with ``retrain``: may start the retrain deployment), then
    ``<output>.html``; returns {"drifted", "drift", "report"} (None for what was skipped)."""
    from stlink.monitoring.drift import drift_check, drift_step
    from stlink.monitoring.report import report_step

    if not params.monitor.after_forecast:
        return {"drifted": None, "drift": None, "report": None}
    drift = None
    tracked = store_exists(params)
    try:
        check = drift_check if retrain else drift_step
        drift = check(params, input, log_mlflow=tracked)
    except MonitoringError as exc:
        log.warning("drift check skipped: %s", exc)
    report = report_step(params, output, drift=drift, log_mlflow=tracked)
    return {"drifted": None if drift is None else drift["drifted"],
            "drift": None if drift is None else drift["paths"]["json"], "report": str(report)}


def store_exists(params) -> bool:
    """Log drift and report runs only to an MLflow store that exists (a server, or a SQLite file the
    training steps created): scoring somewhere without the project's store must not create one."""
    from stlink.tracking import tracking_config, tracking_uri

    uri = tracking_uri(tracking_config(params))
    if uri.startswith("sqlite:///"):
        found = Path(uri[len("sqlite:///"):]).is_file()
        if not found:
            log.info("no MLflow store at %s: drift and report not logged", uri)
        return found
    return True
