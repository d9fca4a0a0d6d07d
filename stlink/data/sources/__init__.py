"""The source formats, one module each, and the table that names them (``registry.SOURCES``).

    synthetic  the embedded simulator (no files)                     sources/synthetic.py
    pems       PEMS0x .npz + edge list                               sources/pems.py
    metrla     DCRNN METR-LA / PEMS-BAY .h5 + adj_mx.pkl             sources/metrla.py
    tgcn       T-GCN wide speed CSV + dense adjacency CSV            sources/tgcn.py
    byo        bring your own: readings + sensors.csv + edges.csv    sources/byo.py

``load_source(cfg)`` finds the files of ``cfg.source`` in ``data.path`` (``files.py``) and calls
the loader of its row; every loader returns a ``RawData``.  Shared parsing is in ``common.py``.
Names are resolved lazily, so importing the table (``stlink.config`` does) loads no pandas.
"""
from __future__ import annotations

import importlib
from typing import Any

from stlink.data.sources.registry import FILE_SOURCES, ROLES, SOURCE_NAMES, SOURCES, Role, Source, get_source

_LAZY = {
    "load_source": "files", "locate": "files", "safe_name": "files", "source_fingerprint": "files",
    "load_pems": "pems", "read_npz": "pems",
    "load_metrla": "metrla", "read_hdf": "metrla", "read_dcrnn_pickle": "metrla",
    "load_tgcn": "tgcn",
    "load_byo": "byo",
    "read_edges": "common", "read_dense_matrix": "common", "read_coords": "common", "read_sensors": "common",
}

__all__ = ["FILE_SOURCES", "ROLES", "SOURCES", "SOURCE_NAMES", "Role", "Source", "get_source", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"stlink.data.sources.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'stlink.data.sources' has no attribute {name!r}")
