"""great-expectations plumbing: one ephemeral context per process, suites run on dataframes.

Importing GX takes ~6 s, so it happens here, lazily, once; the context is cached and reused by
every validation of the process (and emptied between them, so each run and its Data Docs see
only their own suites and results).  A lock makes concurrent validations (e.g. Prefect tasks in
threads) take turns on it.  Nothing is written to disk except the Data Docs site, and only into
the folder handed to ``Session.build_docs``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from stlink.validation.suites import parameter_names

DATASOURCE = "stlink"
SITE = "stlink"
_LOCK = threading.Lock()


@functools.lru_cache(maxsize=1)
def gx_context() -> Any:
    """The process's ephemeral GX context: in-memory stores, no default docs site, no analytics."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are noise in the CLI
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                               analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False))
    context = gx.get_context(project_config=config, mode="ephemeral")
    context.data_sources.add_pandas(DATASOURCE)
    return context


@contextlib.contextmanager
def session() -> Iterator[Session]:
    """Exclusive use of the (emptied) cached context for one validation."""
    with _LOCK:
        context = gx_context()
        _empty(context)
        try:
            yield Session(context)
        finally:
            _empty(context)


def _empty(context: Any) -> None:
    """Drop every validation definition, suite, stored result and asset from ``context``."""
    for definition in list(context.validation_definitions.all()):
        context.validation_definitions.delete(definition.name)
    for suite in list(context.suites.all()):
        context.suites.delete(suite.name)
    store = context.validation_results_store
    for key in store.list_keys():
        store.remove_key(key)
    source = context.data_sources.get(DATASOURCE)
    for asset in list(source.assets):
        source.delete_asset(asset.name)


class Session:
    """Runs suites (plain dicts, see ``suites.py``) on dataframes in one GX context."""

    def __init__(self, context: Any):
        self.context = context

    @property
    def gx_version(self) -> str:
        import great_expectations as gx

        return gx.__version__

    def run(self, suite: dict[str, Any], table: pd.DataFrame, parameters: dict[str, Any],
            sample: int) -> list[dict[str, Any]]:
        """Validate ``table`` against ``suite``; one result dict per expectation, in suite order.

        Each result: type, kwargs (parameters filled in), description, success, observed (GX's
        result, without its index lists), unexpected_index (up to ``sample`` row labels of
        ``table``) and exception (GX's message when the expectation raised).
        """
        import great_expectations as gx
        from great_expectations.core.expectation_suite import ExpectationSuite

        name = suite["name"]
        asset = self.context.data_sources.get(DATASOURCE).add_dataframe_asset(name)
        batch = asset.add_batch_definition_whole_dataframe("whole")
        gx_suite = self.context.suites.add(ExpectationSuite(
            name=name, meta=suite.get("meta", {}), expectations=suite["expectations"]))
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=gx_suite))
        used = {k: parameters[k] for k in parameter_names(suite["expectations"])}
        result = definition.run(
            batch_parameters={"dataframe": table}, expectation_parameters=used,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": max(sample, 1)})
        order = {e.id: i for i, e in enumerate(gx_suite.expectations)}
        ordered = sorted(result.results, key=lambda r: order.get(r.expectation_config.id, len(order)))
        return [_result(r, sample) for r in ordered]

    def build_docs(self, folder: Path) -> None:
        """Render the suites and results of this session as a Data Docs site in ``folder``."""
        self.context.add_data_docs_site(SITE, {
            "class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(folder.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}})
        try:
            self.context.build_data_docs(site_names=[SITE])
        finally:
            self.context.delete_data_docs_site(SITE)


def _result(r: Any, sample: int) -> dict[str, Any]:
    """A GX ExpectationValidationResult as a plain dict (see ``Session.run``)."""
    config = r.expectation_config
    kwargs = {k: v for k, v in config.to_json_dict()["kwargs"].items() if k != "batch_id"}
    observed = {k: v[:sample] if isinstance(v, list) else v for k, v in (r.result or {}).items()
                if k not in ("partial_unexpected_index_list", "partial_unexpected_counts")}
    return {"type": config.type, "kwargs": kwargs, "description": config.description,
            "success": bool(r.success), "observed": observed,
            "unexpected_index": list((r.result or {}).get("partial_unexpected_index_list") or [])[:sample],
            "exception": _exception(r.exception_info)}


def _exception(info: Any) -> str | None:
    """GX's exception message(s), or None; ``info`` is one record or a dict of them per metric."""
    records = [info] if isinstance(info, dict) and "raised_exception" in info else (
        list(info.values()) if isinstance(info, dict) else [])
    messages = [rec.get("exception_message") for rec in records
                if isinstance(rec, dict) and rec.get("raised_exception")]
    return "; ".join(dict.fromkeys(str(m) for m in messages)) or None
