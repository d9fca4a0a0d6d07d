"""Data validation with great-expectations: the suites live in ``validation/`` (data), the code here.

    validate_raw(raw, cfg, report_dir=None, name="raw") -> report dict
    validate_processed(folder, cfg, report_dir=None, name="processed") -> report dict
    failures_markdown(report) -> str

Both validators raise ``ValidationFailed`` (a ``DataError``) naming the failed expectations,
columns, sensors and sample rows; its ``.report`` is the full report.  GX is imported lazily.
"""
from stlink.validation.report import ValidationFailed, failures_markdown
from stlink.validation.validate import validate_processed, validate_raw

__all__ = ["ValidationFailed", "failures_markdown", "validate_processed", "validate_raw"]
