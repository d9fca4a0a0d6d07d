"""The embedded default: the seeded road-traffic simulator (``stlink/data/synthetic.py``); reads no files."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stlink.data.formats import RawData

if TYPE_CHECKING:
    from stlink.config import DataConfig


def load(cfg: "DataConfig", f: dict[str, Path | None]) -> RawData:
    from stlink.data.synthetic import simulate

    if cfg.synthetic.live != "off":  # a growing series from one seeded simulation (stlink/monitoring/live.py)
        from stlink.monitoring.live import live_simulate

        return live_simulate(cfg, Path("data/raw") / cfg.dataset)
    return simulate(cfg.synthetic, null_value=cfg.null_value)
