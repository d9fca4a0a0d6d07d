"""The embedded default: the seeded road-traffic simulator (``stlink/data/synthetic.py``); reads no files."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stlink.data.formats import RawData

if TYPE_CHECKING:
    from stlink.config import DataConfig


def load(cfg: "DataConfig", f: dict[str, Path | None]) -> RawData:
    from stlink.data.synthetic import simulate

    return simulate(cfg.synthetic, null_value=cfg.null_value)
