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
    try:
        drift = drift_check(params, input) if retrain else drift_step(params, input)
    except MonitoringError as exc:
        log.warning("drift check skipped: %s", exc)
    report = report_step(params, output, drift=drift)
    return {"drifted": None if drift is None else drift["drifted"],
            "drift": None if drift is None else drift["paths"]["json"], "report": str(report)}
