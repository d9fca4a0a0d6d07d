"""Resumable backfills: each finished chunk of forecasts is kept as a part file until the whole table is written.

``<output folder>/.<output name>.parts/`` holds ``plan.json`` (what the run scores: model sha256, input,
issue-time range, chunk size, version label, checks) and ``part-<chunk>.parquet`` files, each written
atomically (temporary sibling, then rename), so a part either exists complete or not at all.  A run
with the same plan skips the chunks whose part exists; a different plan starts the parts afresh.
The folder is removed once the output has its name.  A killed backfill therefore continues from its
last written chunk, and the output still holds exactly one row per (sensor, issue time, step).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from stlink.io import atomic_path

log = logging.getLogger(__name__)


class PartStore:
    def __init__(self, output: str | Path, plan: dict[str, Any]):
        output = Path(output)
        self.folder = output.parent / f".{output.name}.parts"
        self.plan = json.loads(json.dumps(plan, default=str))
        plan_file = self.folder / "plan.json"
        if self.folder.is_dir():
            old = json.loads(plan_file.read_text()) if plan_file.is_file() else None
            if old != self.plan:
                log.warning("%s: parts of a different run (plan changed); starting the backfill afresh", self.folder)
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not plan_file.is_file():
            with atomic_path(plan_file, ".json") as tmp:
                Path(tmp).write_text(json.dumps(self.plan, indent=1, sort_keys=True))
        self.done = {int(p.stem.split("-")[1]) for p in self.folder.glob("part-*.parquet")}
        if self.done:
            log.info("%s: resuming after %d finished chunk(s)", self.folder, len(self.done))

    def path(self, i: int) -> Path:
        return self.folder / f"part-{i:06d}.parquet"

    def has(self, i: int) -> bool:
        return i in self.done

    def read(self, i: int):
        import pyarrow.parquet as pq

        return pq.read_table(self.path(i))

    def write(self, i: int, table) -> None:
        import pyarrow.parquet as pq

        with atomic_path(self.path(i), ".parquet") as tmp:
            pq.write_table(table, tmp)
        self.done.add(i)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
