"""The expectation suites of ``validation/`` (data, not code) and how they are filled in.

A suite file is a great-expectations ``ExpectationSuite`` as JSON plus three conventions,
described in ``validation/README.md``: ``meta.table`` / ``meta.keys`` / ``meta.requires``,
``{"$PARAMETER": name}`` placeholders, and ``"meta": {"for_each": "channel"}`` templates whose
``${channel}`` is replaced by each channel name.  Everything here is plain JSON handling; GX
itself is only imported by ``runner.py``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from stlink.data.formats import DataError

SUITES_DIR = Path(__file__).resolve().parents[2] / "validation"
CHANNEL = "${channel}"


def load_suites(prefix: str, folder: Path | None = None) -> list[dict[str, Any]]:
    """The suites ``<folder>/<prefix>_*.json`` (default ``validation/``), each required suite
    before the suites needing it."""
    folder = folder or SUITES_DIR
    files = sorted(folder.glob(f"{prefix}_*.json"))
    if not files:
        raise DataError(f"{folder}: no {prefix}_*.json expectation suites")
    suites = []
    for path in files:
        try:
            suite = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if "table" not in suite.get("meta", {}):
            raise DataError(f"{path}: suite has no meta.table (the table it checks)")
        suites.append(suite)
    return dependency_order(suites)


def dependency_order(suites: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stable order in which every suite comes after the suites in its ``meta.requires``."""
    names = {s["name"] for s in suites}
    done: list[dict[str, Any]] = []
    pending = list(suites)
    while pending:
        ready = [s for s in pending
                 if all(r in {d["name"] for d in done} for r in s["meta"].get("requires", []))]
        if not ready:
            missing = {s["name"]: [r for r in s["meta"]["requires"] if r not in names] for s in pending}
            raise DataError(f"suites with unknown or circular meta.requires: {missing}")
        done += ready
        pending = [s for s in pending if s not in ready]
    return done


def expand_channels(suite: dict[str, Any], channels: list[str]) -> dict[str, Any]:
    """Repeat every ``for_each: channel`` expectation once per channel, ``${channel}`` filled in."""
    out = copy.deepcopy(suite)
    expectations = []
    for exp in suite["expectations"]:
        if exp.get("meta", {}).get("for_each") == "channel":
            expectations += [_substitute(exp, CHANNEL, ch) for ch in channels]
        else:
            expectations.append(copy.deepcopy(exp))
    out["expectations"] = expectations
    return out


def fill_row_conditions(suite: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """Resolve ``$PARAMETER`` inside ``row_condition`` kwargs (GX fills all other kwargs itself)."""
    out = copy.deepcopy(suite)
    for exp in out["expectations"]:
        if "row_condition" in exp["kwargs"]:
            exp["kwargs"]["row_condition"] = resolve_parameters(exp["kwargs"]["row_condition"], parameters)
    return out


def resolve_parameters(node: Any, parameters: dict[str, Any]) -> Any:
    """``node`` with every ``{"$PARAMETER": name}`` replaced by ``parameters[name]``."""
    if isinstance(node, dict):
        if set(node) == {"$PARAMETER"}:
            name = node["$PARAMETER"]
            if name not in parameters:
                raise DataError(f"suite parameter {name!r} has no value; known: {sorted(parameters)}")
            return parameters[name]
        return {k: resolve_parameters(v, parameters) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve_parameters(v, parameters) for v in node]
    return node


def parameter_names(node: Any) -> set[str]:
    """All ``$PARAMETER`` names used in ``node``."""
    if isinstance(node, dict):
        if set(node) == {"$PARAMETER"}:
            return {node["$PARAMETER"]}
        return set().union(*(parameter_names(v) for v in node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*(parameter_names(v) for v in node)) if node else set()
    return set()


def _substitute(node: Any, placeholder: str, value: str) -> Any:
    if isinstance(node, str):
        return node.replace(placeholder, value)
    if isinstance(node, dict):
        return {_substitute(k, placeholder, value): _substitute(v, placeholder, value) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, placeholder, value) for v in node]
    return node
