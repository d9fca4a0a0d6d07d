"""prepare: long raw readings -> processed tensors; errors and atomicity."""
import json

import numpy as np
import pandas as pd
import pytest

from stlink.config import Params, ValidationConfig
from stlink.data.formats import DataError, RawData, load_processed, load_raw, save_raw
from stlink.data.prepare import prepare, to_tensors
from stlink.validation import ValidationFailed, validate_raw

NO_DOCS = ValidationConfig(data_docs=False)


def ingested(raw: RawData, tmp_path, cfg: ValidationConfig = NO_DOCS) -> None:
    """``stlink ingest`` + ``stlink validate`` in short: raw folder and its validation report."""
    save_raw(raw, tmp_path / "raw")
    validate_raw(load_raw(tmp_path / "raw"), cfg, report_dir=tmp_path / "rep")


def run_prepare(params, tmp_path):
    return prepare(params, raw_dir=tmp_path / "raw", out_dir=tmp_path / "proc", report_dir=tmp_path / "rep")


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
    ingested(raw, tmp_path)
    data = run_prepare(params, tmp_path)
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


def test_irregular_index_is_rejected():
    bad = make_raw()
    t = bad.readings["timestamp"]
    bad.readings.loc[t == t.iloc[30], "timestamp"] = t.iloc[30] + pd.Timedelta("7min")
    with pytest.raises(DataError, match="irregular time index: step 0 days 00:22:00 after 2024-03-04 02:15:00"):
        to_tensors(bad, 0.0)


def _duplicate(raw):
    raw.readings = pd.concat([raw.readings, raw.readings.iloc[[40]].assign(speed=1e9)], ignore_index=True)


def _huge(raw):
    raw.readings.loc[40, "speed"] = 1e9


def _negative_edge(raw):
    raw.edges.loc[0, "value"] = -3.0


@pytest.mark.parametrize("breakage", [_duplicate, _huge, _negative_edge])
def test_prepare_after_a_failed_validate_refuses_and_keeps_the_good_output(tmp_path, params, breakage):
    """The probe: validate failed, prepare still ran (exit 0) and replaced good processed data."""
    ingested(make_raw(), tmp_path)
    run_prepare(params, tmp_path)
    before = {f.name: f.read_bytes() for f in (tmp_path / "proc").iterdir()}
    bad = make_raw()
    breakage(bad)
    with pytest.raises(ValidationFailed):
        ingested(bad, tmp_path)                  # raw.json stays the report of the earlier, good data
    with pytest.raises(DataError, match="failed validation .*raw.failed.json.*prepare refuses it"):
        run_prepare(params, tmp_path)
    assert {f.name: f.read_bytes() for f in (tmp_path / "proc").iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".proc")]  # no temp left over


def test_prepare_without_a_report_or_after_a_new_ingest_refuses(tmp_path, params):
    save_raw(make_raw(), tmp_path / "raw")
    with pytest.raises(DataError, match="rep/raw.json: no validation report of .*run `stlink validate` first"):
        run_prepare(params, tmp_path)
    ingested(make_raw(), tmp_path)
    save_raw(make_raw(seed=1), tmp_path / "raw")          # ingested again, not validated
    with pytest.raises(DataError, match="report of other data than .* holds now"):
        run_prepare(params, tmp_path)
    assert not (tmp_path / "proc").exists()


def test_sparse_sensors_dropped_by_validation_are_left_out(tmp_path, params):
    raw = make_raw(n_sensors=4)
    s1 = raw.readings.index[raw.readings["sensor_id"] == "s1"]
    raw.readings = raw.readings.drop(index=s1[: 3 * len(s1) // 4]).reset_index(drop=True)  # s1: 75 % absent
    ingested(raw, tmp_path)
    params.data.adjacency.method = "binary"
    data = run_prepare(params, tmp_path)
    assert data.sensor_ids == ["s0", "s2", "s3"] and data.shape == (576, 3, 1)
    assert data.meta["dropped_sensors"] == ["s1"]
    assert data.adjacency.shape == (3, 3)
    assert data.adjacency[1, 2] == 1 and data.adjacency[0, 1] == 0    # s2->s3 kept; s0->s1->s2 gone with s1
    assert data.coords.shape == (3, 2)


def test_no_coordinates_no_coords_file(tmp_path, params):
    raw = make_raw()
    raw.sensors = raw.sensors.assign(lat=np.nan, lon=np.nan)
    ingested(raw, tmp_path)
    data = run_prepare(params, tmp_path)
    assert data.coords is None and not (tmp_path / "proc" / "coords.npy").exists()
