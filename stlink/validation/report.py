"""Validation reports: the JSON-safe report dict, failure messages and the markdown summary.

Pure functions over plain dicts and the derived tables; no great-expectations import here.
A report is ``{"name", "success", "great_expectations_version", "parameters", "suites"}`` with
``suites[<suite>] = {"table", "rows", "success", "skipped", "expectations": [...]}`` and each
expectation ``{"type", "kwargs", "description", "success", "observed", "failed_rows", "message",
"exception"}`` (``exception``: GX's message when the expectation raised, else null).  It holds no
run time, so equal data gives an equal file.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from stlink.data.formats import DataError


class ValidationFailed(DataError):
    """A suite failed; ``.report`` is the full report dict (also written as ``<name>.failed.json``)."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def jsonable(obj: Any) -> Any:
    """``obj`` with only JSON types: NaN/inf as strings, timestamps as text, numpy as Python."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, np.ndarray)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if obj is pd.NaT:
        return "NaT"
    return str(obj)  # Timestamp, Timedelta, Condition objects, ...


def expectation_columns(kwargs: dict[str, Any]) -> list[str]:
    """The column(s) an expectation is about, in kwargs order."""
    if "column" in kwargs:
        return [kwargs["column"]]
    if "column_list" in kwargs:
        return list(kwargs["column_list"])
    return [kwargs[k] for k in ("column_A", "column_B") if k in kwargs]


def expectation_entry(result: dict[str, Any], table: pd.DataFrame, table_name: str, keys: list[str],
                      sample: int) -> dict[str, Any]:
    """One expectation of the report: ``result`` (from the runner) plus failed rows and a message."""
    columns = expectation_columns(result["kwargs"])
    shown = [c for c in dict.fromkeys(keys + columns) if c in table.columns]
    index = result.get("unexpected_index", [])[:sample]
    failed_rows = [jsonable(table.loc[i, shown].to_dict()) for i in index if i in table.index]
    entry = {k: v for k, v in result.items() if k != "unexpected_index"}
    entry.update(failed_rows=failed_rows, message=None)
    if not result["success"]:
        entry["message"] = failure_message(entry, table_name, keys)
    return jsonable(entry)


def failure_message(entry: dict[str, Any], table_name: str, keys: list[str]) -> str:
    """E.g. ``expect_column_values_to_be_between failed on column 'speed' of readings (...): 3 of
    4032 rows outside [0.0, 120.0]; e.g. sensor s7 at 2024-01-03 08:15:00: speed=-4.0``."""
    kw, obs = entry["kwargs"], entry["observed"]
    cols = expectation_columns(kw)
    where = (f"column '{cols[0]}'" if len(cols) == 1 else f"columns {cols}") if cols else "table"
    head = f"{entry['type']} failed on {where} of {table_name}"
    if entry.get("description"):
        head += f" ({entry['description']})"
    if entry.get("exception"):
        return f"{head}: raised {entry['exception']}"
    if "unexpected_count" not in obs:
        return f"{head}: observed {obs.get('observed_value')!r}, expected {_expected(kw)}"
    body = f"{obs['unexpected_count']} of {obs.get('element_count', '?')} rows {_condition(entry['type'], kw)}"
    if entry["failed_rows"]:
        body += "; e.g. " + "; ".join(describe_row(r, keys, cols) for r in entry["failed_rows"])
    return f"{head}: {body}"


def describe_row(row: dict[str, Any], keys: list[str], columns: list[str]) -> str:
    """``sensor s1 at 2024-01-01 00:15:00: speed=-4.0`` from a failed row."""
    used = [k for k in ("sensor_id", "timestamp") if k in keys and k in row]
    words = {"sensor_id": "sensor {}", "timestamp": "at {}"}
    head = " ".join(words[k].format(row[k]) for k in used)
    others = [f"{k}={_short(row[k])}" for k in keys if k in row and k not in used and k not in columns]
    head = ", ".join(p for p in [head, *others] if p)
    values = ", ".join(f"{c}={_short(row[c])}" for c in columns if c in row and c not in used)
    return f"{head}: {values}" if head and values else head or values


def _short(value: Any) -> Any:
    """Floats rounded to 6 decimals for messages (the report keeps them exact)."""
    return round(value, 6) if isinstance(value, float) else value


def _condition(kind: str, kw: dict[str, Any]) -> str:
    """What the unexpected rows are, in words."""
    if kind == "expect_column_values_to_be_between":
        lo, hi = kw.get("min_value"), kw.get("max_value")
        return f"outside [{lo}, {hi}]" if lo is not None and hi is not None else (
            f"above {hi}" if lo is None else f"below {lo}")
    if kind == "expect_column_values_to_not_be_null":
        return "null (NaN / NaT / none)"
    if kind == "expect_column_values_to_not_be_in_set":
        return f"in {kw.get('value_set')}"
    if kind == "expect_column_values_to_be_in_set":
        return f"not in {_preview(kw.get('value_set'))}"
    if kind in ("expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique"):
        return "duplicated" + (f" on ({', '.join(kw['column_list'])})" if "column_list" in kw else "")
    if kind == "expect_column_pair_values_to_be_equal":
        return f"where {kw['column_A']} != {kw['column_B']}"
    return "unexpected"


def _expected(kw: dict[str, Any]) -> str:
    if "min_value" in kw or "max_value" in kw:
        return f"[{kw.get('min_value')}, {kw.get('max_value')}]"
    return str({k: v for k, v in kw.items() if k not in ("column", "batch_id")})


def _preview(values: Any, n: int = 5) -> str:
    values = list(values or [])
    more = f", ... ({len(values)} in all)" if len(values) > n else ""
    return "[" + ", ".join(map(str, values[:n])) + more + "]"


def failed_expectations(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(suite name, expectation) for every failed expectation, in suite order."""
    return [(name, e) for name, suite in report["suites"].items()
            for e in suite["expectations"] if not e["success"]]


def summary_message(report: dict[str, Any], where: str) -> str:
    """The ``ValidationFailed`` text: a headline, then one line per failed expectation."""
    failed = failed_expectations(report)
    total = sum(len(s["expectations"]) for s in report["suites"].values())
    skipped = [f"{n} ({s['skipped']})" for n, s in report["suites"].items() if s["skipped"]]
    lines = [f"{report['name']} data failed validation: {len(failed)} of {total} expectations failed "
             f"(full report: {where})"]
    lines += [f"- {e['message']}" for _, e in failed]
    if skipped:
        lines.append(f"skipped: {'; '.join(skipped)}")
    return "\n".join(lines)


def failures_markdown(report: dict[str, Any]) -> str:
    """A markdown table of the failed expectations of ``report`` (e.g. for a Prefect artifact)."""
    failed = failed_expectations(report)
    if not failed:
        return f"All expectations of `{report['name']}` passed."
    lines = [f"### `{report['name']}`: {len(failed)} failed expectation(s)", "",
             "| suite | expectation | column | failed rows | example |", "|---|---|---|---|---|"]
    for suite, e in failed:
        obs = e["observed"]
        count = (f"{obs['unexpected_count']} of {obs.get('element_count', '?')}" if "unexpected_count" in obs
                 else f"observed {obs.get('observed_value')}")
        example = describe_row(e["failed_rows"][0], [], list(e["failed_rows"][0])) if e["failed_rows"] else ""
        cells = [suite, e["type"], ", ".join(map(str, expectation_columns(e["kwargs"]))), count,
                 e.get("exception") or example]
        lines.append("| " + " | ".join(_md(c) for c in cells) + " |")
    return "\n".join(lines)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
