"""Pipeline step ``ingest``: fetch or generate a source and store it as ``RawData``.

The one implementation behind ``stlink ingest``, the DVC stage ``ingest`` and the Prefect task.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from stlink.config import Params
from stlink.data.formats import RawData, save_raw

log = logging.getLogger(__name__)


def read_source(params: Params) -> tuple[RawData, dict[str, Path]]:
    """Parse the configured source (a row of ``stlink.data.sources.SOURCES``); returns the raw
    data and the source files to keep."""
    from stlink.data.sources import get_source

    cfg = params.data
    if get_source(cfg.source).generated:
        return get_source(cfg.source).load(cfg, {}), {}
    from stlink.data.sources import load_source

    return load_source(cfg)


def fingerprint_path(params: Params) -> Path:
    """Where the DVC stage ``source`` keeps the content fingerprint of ``data.path``."""
    return Path("data/fingerprint") / f"{params.data.dataset}.json"


def write_fingerprint(params: Params, out: Path | None = None) -> tuple[Path, bool]:
    """Write the source's content fingerprint (``source_fingerprint``); returns (path, changed).

    The file is rewritten only when the fingerprint changed, so its content hash (what DVC
    compares) moves only with the source files' content.
    """
    from stlink.data.sources import source_fingerprint
    from stlink.io import write_json

    out = Path(out or fingerprint_path(params))
    fp = source_fingerprint(params.data)
    text = json.dumps(fp, indent=2, sort_keys=True) + "\n"
    if out.is_file() and out.read_text() == text:
        return out, False
    write_json(out, fp)
    return out, True


def ingest(params: Params, out_dir: Path | None = None) -> Path:
    """Write ``data/raw/<dataset>/`` atomically; a failure leaves an earlier copy untouched."""
    out_dir = Path(out_dir or params.raw_dir)
    raw, files = read_source(params)
    save_raw(raw, out_dir, extra_files=files)
    n_sensors = raw.readings["sensor_id"].nunique()
    log.info("ingested %s: %d rows, %d sensors, channels %s -> %s",
             params.data.source, len(raw.readings), n_sensors, raw.channels, out_dir)
    return out_dir
