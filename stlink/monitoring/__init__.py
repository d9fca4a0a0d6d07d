"""Operating the forecaster (issue 11): what an operator asks of a forecast table.

    intervals.py   split-conformal prediction intervals (calibrated on the validation split)
    drift.py       the input window(s) of a batch forecast vs the training distribution
    monitor.py     realised accuracy: earlier forecasts joined with the actuals that arrived since
    report.py      a static, self-contained HTML report per batch forecast

Every error raised here is a ``MonitoringError`` (a ``DataError``): one line that names the
file, the model or the sensor that is missing.
"""
from stlink.data.formats import DataError


class MonitoringError(DataError):
    """Missing calibration, missing drift reference, no overlapping actuals, ..."""


__all__ = ["MonitoringError"]
