"""stlink.io: atomic outputs get the permissions of ordinary files and folders."""
import os
import stat

import pandas as pd

from stlink.data.formats import RawData, save_raw
from stlink.io import atomic_dir


def test_atomic_dir_gets_normal_permissions_under_umask_022(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
        raw = RawData(pd.DataFrame({"timestamp": pd.to_datetime(["2024-01-01"]), "sensor_id": ["s"], "speed": [1.0]}),
                      pd.DataFrame({"sensor_id": ["s"], "lat": [None], "lon": [None]}), meta={"source": "byo"})
        save_raw(raw, tmp_path / "raw")                       # data/raw/<dataset> is an atomic_dir too
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "raw").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "raw" / "readings.parquet").stat().st_mode) == 0o644


def test_atomic_dir_follows_a_stricter_umask(tmp_path):
    old = os.umask(0o077)
    try:
        with atomic_dir(tmp_path / "out"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o700
