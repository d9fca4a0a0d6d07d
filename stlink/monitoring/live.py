"""Live mode of the synthetic source: fresh readings for the schedules to see.

``data.synthetic.live``:

* ``off``: the fixed ``days`` of readings (the default);
* ``day``: the first ingest writes ``days`` days; every later ingest into the same
  ``data/raw/<dataset>`` appends one more simulated day;
* ``now``: every ingest writes the readings up to the wall clock (``--now`` in tests).

Both live modes reveal one simulation of ``live_horizon_days`` days from the seed, so a day's readings
are the same whichever ingest revealed them (prefix-stable, deterministic).  Past the horizon an
ingest fails with a one-line error naming it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pandas as pd

from stlink.data.formats import RawData
from stlink.monitoring import MonitoringError

log = logging.getLogger(__name__)
MODES = ("off", "day", "now")


def previous_days(raw_dir: Path, cfg) -> int | None:
    """Days revealed by the last live ingest of the same simulation into ``raw_dir`` (None: none)."""
    meta_path = Path(raw_dir) / "source.json"
    if not meta_path.is_file():
        return None
    live = json.loads(meta_path.read_text()).get("live") or {}
    same = live.get("seed") == cfg.seed and live.get("horizon_days") == cfg.live_horizon_days \
        and live.get("start") == cfg.start
    return int(live["days"]) if same and "days" in live else None


def truncate(raw: RawData, end: pd.Timestamp) -> RawData:
    """Readings (and ground-truth events) before ``end``."""
    r = raw.readings
    keep = pd.to_datetime(r["timestamp"]) < end
    meta = json.loads(json.dumps(raw.meta))
    truth = meta.get("ground_truth") or {}
    for k in ("incidents", "outages"):
        truth[k] = [e for e in truth.get(k, []) if pd.Timestamp(e["start"]) < end]
    return dataclasses.replace(raw, readings=r[keep].reset_index(drop=True), meta=meta)


def live_simulate(data_cfg, raw_dir: Path, now: pd.Timestamp | None = None) -> RawData:
    """The readings a live ingest writes into ``raw_dir`` (see the module doc)."""
    from stlink.data.synthetic import simulate

    cfg = data_cfg.synthetic
    if cfg.live not in MODES:
        raise MonitoringError(f"data.synthetic.live={cfg.live!r}: expected one of {MODES}")
    start = pd.Timestamp(cfg.start)
    horizon_end = start + pd.Timedelta(days=cfg.live_horizon_days)
    if cfg.live == "day":
        prev = previous_days(raw_dir, cfg)
        days = cfg.days if prev is None else prev + 1
        end = start + pd.Timedelta(days=days)
    else:
        end = pd.Timestamp(now or pd.Timestamp.now()).floor(f"{cfg.freq_minutes}min") + pd.Timedelta(minutes=cfg.freq_minutes)
        days = (end - start) / pd.Timedelta(days=1)
    if end > horizon_end:
        raise MonitoringError(f"data.synthetic.live={cfg.live}: {end} is past the simulated horizon {horizon_end} "
                              f"(data.synthetic.live_horizon_days={cfg.live_horizon_days}); raise it")
    if end <= start:
        raise MonitoringError(f"data.synthetic.live=now: the clock {end} is before data.synthetic.start {start}")
    full = simulate(dataclasses.replace(cfg, days=cfg.live_horizon_days), null_value=data_cfg.null_value)
    raw = truncate(full, end)
    raw.meta["live"] = {"mode": cfg.live, "days": days, "end": end.isoformat(), "seed": cfg.seed,
                        "horizon_days": cfg.live_horizon_days, "start": cfg.start}
    log.info("live synthetic source: readings %s .. %s (%s days of the %d-day simulation)", start, end, days,
             cfg.live_horizon_days)
    return raw
