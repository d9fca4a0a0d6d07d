"""The table of sources: ``data.source`` -> the files it reads and the function that parses them.

The CLI (``--source`` choices), the params check (``data.source``) and ``stlink ingest`` all read
their choices from ``SOURCES``; adding a format is one module with a ``load(cfg, files)`` and
one row here.  This module imports nothing heavy, so ``stlink.config`` may read it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from stlink.errors import DataError

if TYPE_CHECKING:
    from stlink.config import DataConfig
    from stlink.data.formats import RawData


@dataclass(frozen=True)
class Role:
    """One file a source reads: its default glob patterns, tried in order, and whether it is needed."""

    patterns: tuple[str, ...]
    required: bool = True
    exclude: str | None = None  # skip file names containing this (case-insensitive)


@dataclass(frozen=True)
class Source:
    """One row of the table: name, one-line summary, the files (roles) and the loader."""

    name: str
    summary: str
    loader: str                                  # "module:function", called as load(cfg, files) -> RawData
    roles: dict[str, Role] = field(default_factory=dict)  # empty: generated, reads no files

    @property
    def generated(self) -> bool:
        return not self.roles

    def load(self, cfg: "DataConfig", files: dict[str, Path | None]) -> "RawData":
        module, func = self.loader.split(":")
        return getattr(importlib.import_module(module), func)(cfg, files)


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("synthetic", "the embedded road-traffic simulator (data.synthetic.*); no files",
           "stlink.data.sources.synthetic:load"),
    Source("pems", "PEMS0x .npz (key data, [T, N, C]) + edge list from,to,cost; data.start_time, data.freq",
           "stlink.data.sources.pems:load",
           {"data": Role(("*.npz",)), "edges": Role(("*.csv",), False), "sensor_ids": Role(("*.txt",), False)}),
    Source("metrla", "DCRNN METR-LA / PEMS-BAY pandas HDF .h5 + adj_mx.pkl (+ sensor locations)",
           "stlink.data.sources.metrla:load",
           {"data": Role(("*.h5",)), "adj": Role(("adj_mx.pkl", "*.pkl"), False),
            "locations": Role(("graph_sensor_locations.csv", "*location*.csv"), False)}),
    Source("tgcn", "T-GCN wide speed CSV (header = sensor ids) + dense adjacency CSV; data.start_time, data.freq",
           "stlink.data.sources.tgcn:load",
           {"speed": Role(("*speed*.csv", "*.csv"), exclude="adj"), "adj": Role(("*adj*.csv",), False)}),
    Source("byo", "bring your own: readings.csv|parquet (long or wide) + sensors.csv + edges.csv",
           "stlink.data.sources.byo:load",
           {"readings": Role(("readings.*",)), "sensors": Role(("sensors.csv",), False),
            "edges": Role(("edges.csv",), False)}),
]}

SOURCE_NAMES: tuple[str, ...] = tuple(SOURCES)
FILE_SOURCES: tuple[str, ...] = tuple(n for n, s in SOURCES.items() if not s.generated)  # read from files
ROLES: dict[str, dict[str, Role]] = {n: SOURCES[n].roles for n in FILE_SOURCES}


def get_source(name: str) -> Source:
    """The row of ``data.source``; an unknown name is an error that lists the known ones."""
    if name not in SOURCES:
        raise DataError(f"data.source={name!r}: unknown source; one of {', '.join(SOURCE_NAMES)}")
    return SOURCES[name]


def describe() -> str:
    """One line per source, for ``--help`` texts."""
    return "\n".join(f"  {s.name:<10} {s.summary}" for s in SOURCES.values())
