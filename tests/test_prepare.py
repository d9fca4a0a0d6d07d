"""prepare: long raw readings -> processed tensors; errors and atomicity."""
import json

import numpy as np
import pandas as pd
import pytest

from stlink.config import Params
from stlink.data.formats import DataError, RawData, load_processed, save_raw
from stlink.data.prepare import prepare


def make_raw(n_sensors=3, periods=4 * 24 * 6, freq="15min", null_value=0.0, seed=0) -> RawData:
    rng = np.random.default_rng(seed)
    ts = pd.date_range("2024-03-04", periods=periods, freq=freq)
    ids = [f"s{i}" for i in range(n_sensors)]
    rows = pd.MultiIndex.from_product([ts, ids], names=["timestamp", "sensor_id"]).to_frame(index=False)
    rows["speed"] = rng.uniform(30, 70, len(rows))
    sensors = pd.DataFrame({"sensor_id": ids, "lat": np.linspace(34, 34.1, n_sensors),
                            "lon": np.linspace(-118, -118.1, n_sensors)})
    edges = pd.DataFrame({"from": ids[:-1], "to": ids[1:], "value": np.arange(1, n_sensors, dtype=float)})
    meta = {"source": "byo", "files": {}, "null_value": null_value, "channels": ["speed"],
            "units": ["mph"], "freq": None, "value_kind": "distance"}
    return RawData(rows, sensors, edges, None, meta)


@pytest.fixture
def params(tmp_path):
    p = Params()
    p.data.dataset = "t"
    return p


def test_prepare_derives_frequency_and_masks_nulls(tmp_path, params):
    raw = make_raw()
    raw.readings.loc[5, "speed"] = 0.0                       # a null reading
    raw.readings = raw.readings.drop(index=[7])               # a row absent altogether
    save_raw(raw, tmp_path / "raw")
    data = prepare(params, raw_dir=tmp_path / "raw", out_dir=tmp_path / "proc", report_dir=tmp_path / "rep")
    assert data.meta["freq_seconds"] == 900 and data.meta["steps_per_day"] == 96   # from timestamps
    assert data.shape == (576, 3, 1)
    t5, s5 = divmod(5, 3)
    t7, s7 = divmod(7, 3)
    assert not data.mask[t5, s5] and not data.mask[t7, s7]
    assert data.mask.sum() == 576 * 3 - 2
    assert data.meta["splits"] == {"train": [0, 403], "val": [403, 461], "test": [461, 576]}
    loaded = load_processed(tmp_path / "proc")
    np.testing.assert_array_equal(loaded.values, data.values)
    assert loaded.sensor_ids == ["s0", "s1", "s2"]
    assert loaded.coords.shape == (3, 2)
    assert json.loads((tmp_path / "rep" / "processed.json").read_text())["success"] is True


def test_irregular_index_is_rejected_and_previous_output_kept(tmp_path, params):
    save_raw(make_raw(), tmp_path / "raw")
    prepare(params, raw_dir=tmp_path / "raw", out_dir=tmp_path / "proc", report_dir=tmp_path / "rep")
    before = {f.name: f.read_bytes() for f in (tmp_path / "proc").iterdir()}
    bad = make_raw()
    t = bad.readings["timestamp"]
    bad.readings.loc[t == t.iloc[30], "timestamp"] = t.iloc[30] + pd.Timedelta("7min")
    save_raw(bad, tmp_path / "raw")
    with pytest.raises(DataError, match="irregular time index: step 0 days 00:22:00 after 2024-03-04 02:15:00"):
        prepare(params, raw_dir=tmp_path / "raw", out_dir=tmp_path / "proc", report_dir=tmp_path / "rep")
    after = {f.name: f.read_bytes() for f in (tmp_path / "proc").iterdir()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".proc")]  # no temp left over
