"""Data tests: the great-expectations suites pass good data and reject each kind of bad input.

Real GX (one cached ephemeral context for the whole file); tiny data built here:
4 sensors x 1 day at 5 minutes, null value 0.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest

from stlink.config import ValidationConfig
from stlink.data.formats import DataError, ProcessedData, RawData, save_processed
from stlink.validation import ValidationFailed, failures_markdown, suites, validate_processed, validate_raw

IDS = ["s0", "s1", "s2", "s3"]
START = pd.Timestamp("2024-01-01 00:00:00")
T = 288  # one day at 5 minutes
NO_DOCS = ValidationConfig(data_docs=False)
FAIL = ValidationConfig(data_docs=False, sparse_sensors="fail")  # sparse sensors fail the run


def at(minutes: int) -> pd.Timestamp:
    return START + pd.Timedelta(minutes=minutes)


@pytest.fixture(scope="module")
def good_raw() -> RawData:
    """Speeds 30..70 mph; sensor s2 misses every 5th reading (stored as the null value 0)."""
    rng = np.random.default_rng(0)
    ts = pd.date_range(START, periods=T, freq="5min")
    readings = pd.MultiIndex.from_product([ts, IDS], names=["timestamp", "sensor_id"]).to_frame(index=False)
    readings["speed"] = rng.uniform(30, 70, len(readings))
    s2 = np.flatnonzero(readings["sensor_id"] == "s2")
    readings.loc[s2[::5], "speed"] = 0.0
    sensors = pd.DataFrame({"sensor_id": IDS, "lat": [34.0, 34.1, 34.2, 34.3], "lon": [-118.0] * 4})
    edges = pd.DataFrame({"from": IDS[:-1], "to": IDS[1:], "value": [1.5, 2.0, 0.7]})
    meta = {"source": "byo", "null_value": 0.0, "channels": ["speed"], "units": ["mph"]}
    return RawData(readings, sensors, edges, None, meta)


def clone(raw: RawData) -> RawData:
    return RawData(raw.readings.copy(), raw.sensors.copy(), None if raw.edges is None else raw.edges.copy(),
                   None if raw.adjacency is None else raw.adjacency.copy(), dict(raw.meta))


def row(raw: RawData, sensor: str, minutes: int) -> int:
    r = raw.readings
    return int(np.flatnonzero((r["sensor_id"] == sensor) & (r["timestamp"] == at(minutes)))[0])


# --- raw: good data ---------------------------------------------------------------------------

def test_good_raw_passes_and_writes_report_and_docs_only_under_report_dir(good_raw, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "reports"
    report = validate_raw(clone(good_raw), ValidationConfig(), report_dir=out)

    assert report["success"] is True
    assert json.loads((out / "raw.json").read_text()) == report
    assert sorted(os.listdir(out)) == ["raw.json", "raw_docs"]
    assert "raw_readings" in (out / "raw_docs" / "index.html").read_text()
    assert list(cwd.iterdir()) == []  # GX wrote nothing outside report_dir

    suites = report["suites"]
    assert suites["raw_edges"]["success"] is True
    assert suites["raw_adjacency_shape"]["skipped"] and suites["raw_adjacency"]["skipped"]  # edge list given
    types = {e["type"] for s in suites.values() for e in s["expectations"]}
    assert {"expect_compound_columns_to_be_unique", "expect_column_values_to_be_between",
            "expect_column_values_to_not_be_null", "expect_column_values_to_be_in_set"} <= types
    bounds = [e for e in suites["raw_readings"]["expectations"]
              if e["type"] == "expect_column_values_to_be_between"][0]
    assert (bounds["kwargs"]["min_value"], bounds["kwargs"]["max_value"]) == (0.0, 120.0)
    n_null = int((good_raw.readings["speed"] == 0).sum())
    assert n_null > 0 and bounds["observed"]["element_count"] == len(good_raw.readings) - n_null  # null allowed
    assert report["parameters"]["freq_seconds"] == 300.0


def test_null_value_outside_the_bounds_is_allowed_but_only_the_null_value(good_raw):
    raw = clone(good_raw)
    raw.meta["null_value"] = -1.0
    raw.readings.loc[raw.readings["speed"] == 0.0, "speed"] = -1.0  # s2's missing readings
    assert validate_raw(raw, NO_DOCS)["success"] is True
    _set("s0", 495, -2.0)(raw)
    with pytest.raises(ValidationFailed, match="1 of 1094 rows outside"):
        validate_raw(raw, NO_DOCS)


def test_importing_the_package_does_not_import_gx():
    code = "import sys, stlink.validation; assert 'great_expectations' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- raw: each bad input is rejected with a message naming it ---------------------------------

def _set(sensor: str, minutes: int, value: float) -> Callable[[RawData], None]:
    def mutate(raw: RawData) -> None:
        raw.readings.loc[row(raw, sensor, minutes), "speed"] = value
    return mutate


def _duplicate(raw: RawData) -> None:
    raw.readings = pd.concat([raw.readings, raw.readings.iloc[[row(raw, "s2", 300)]]], ignore_index=True)


def _gap(raw: RawData) -> None:
    raw.readings = raw.readings[raw.readings["timestamp"] != at(360)].reset_index(drop=True)


def _sensor_gap(raw: RawData) -> None:
    raw.readings = raw.readings.drop(index=row(raw, "s3", 600)).reset_index(drop=True)


def _irregular(raw: RawData) -> None:
    t = raw.readings["timestamp"]
    raw.readings.loc[t == at(420), "timestamp"] = at(422)


def _unknown_edge(raw: RawData) -> None:
    raw.edges.loc[1, "to"] = "ghost"


def _edge_value(value: float) -> Callable[[RawData], None]:
    def mutate(raw: RawData) -> None:
        raw.edges.loc[1, "value"] = value                  # s1 -> s2
        raw.meta["value_kind"] = "distance"
    return mutate


def _dense(matrix: np.ndarray) -> Callable[[RawData], None]:
    def mutate(raw: RawData) -> None:
        raw.edges, raw.adjacency = None, matrix
    return mutate


def _negative_entry() -> np.ndarray:
    a = np.eye(4)
    a[1, 2] = -1.0
    return a


def _too_many_missing(raw: RawData) -> None:
    s1 = np.flatnonzero(raw.readings["sensor_id"] == "s1")
    raw.readings.loc[s1[: 3 * len(s1) // 4], "speed"] = 0.0  # 75 % missing


def _unknown_reading_sensor(raw: RawData) -> None:
    extra = raw.readings[raw.readings["sensor_id"] == "s0"].assign(sensor_id="s9")
    raw.readings = pd.concat([raw.readings, extra], ignore_index=True)


def _sensor_without_readings(raw: RawData) -> None:
    raw.sensors = pd.concat([raw.sensors, pd.DataFrame({"sensor_id": ["s4"], "lat": [1.0], "lon": [1.0]})],
                            ignore_index=True)


def _flow_over_bound(raw: RawData) -> None:
    raw.readings["flow"] = 500.0
    raw.readings.loc[row(raw, "s3", 100), "flow"] = 5000.0


BAD_RAW = {
    "nan": (_set("s1", 180, np.nan),
            ["expect_column_values_to_not_be_null", "'speed'", "1 of 1152 rows",
             "sensor s1 at 2024-01-01 03:00:00: speed=NaN"]),
    "inf": (_set("s1", 185, np.inf),
            ["expect_column_values_to_not_be_in_set", "'speed'", "sensor s1 at 2024-01-01 03:05:00: speed=inf"]),
    "negative speed": (_set("s0", 495, -4.0),
                       ["expect_column_values_to_be_between", "'speed'", "rows outside [0.0, 120.0]",
                        "sensor s0 at 2024-01-01 08:15:00: speed=-4.0"]),
    "duplicate sensor x timestamp": (_duplicate,
                                     ["expect_compound_columns_to_be_unique", "duplicated on (sensor_id, timestamp)",
                                      "sensor s2 at 2024-01-01 05:00:00"]),
    "gap in the time index": (_gap,
                              ["no gap in the time index", "'step_seconds'",
                               "sensor (all sensors) at 2024-01-01 06:05:00", "step_seconds=600.0"]),
    "irregular frequency": (_irregular,
                            ["regular frequency", "'off_grid_seconds'", "at 2024-01-01 07:02:00",
                             "off_grid_seconds=120.0"]),
    "edge to an unknown sensor": (_unknown_edge,
                                  ["expect_column_values_to_be_in_set", "column 'to' of edges",
                                   "graph endpoints are known sensors", "to=ghost"]),
    "negative edge distance": (_edge_value(-3.0),
                               ["column 'value' of edges", "road distances are positive", "from=s1, to=s2: value=-3.0"]),
    "zero edge distance": (_edge_value(0.0),
                           ["road distances are positive", "from=s1, to=s2: value=0.0"]),
    "infinite edge distance": (_edge_value(np.inf),
                               ["edge values are finite", "from=s1, to=s2: value=inf"]),
    "non-square adjacency": (_dense(np.ones((4, 3))),
                             ["the adjacency is square", "axis=cols: size=3", "outside [4.0, 4.0]"]),
    "negative adjacency entry": (_dense(_negative_entry()),
                                 ["adjacency entries are non-negative", "from=s1, to=s2: value=-1.0"]),
    "too many missing for one sensor": (_too_many_missing,
                                        ["'missing_fraction'", "sensor s1, channel=speed: missing_fraction=0.75",
                                         "at most validation.max_missing_fraction"]),
    "sensor in readings not in sensors": (_unknown_reading_sensor,
                                          ["every sensor in the readings is in the sensors table", "sensor s9"]),
    "sensor without readings": (_sensor_without_readings,
                                ["every sensor in the sensors table has readings", "sensor s4"]),
    "second channel over its bound": (_flow_over_bound,
                                      ["'flow'", "outside [0.0, 3000.0]",
                                       "sensor s3 at 2024-01-01 01:40:00: flow=5000.0"]),
}


@pytest.mark.parametrize("case", list(BAD_RAW))
def test_bad_raw_is_rejected_naming_what_is_wrong(good_raw, case):
    mutate, expected = BAD_RAW[case]
    raw = clone(good_raw)
    mutate(raw)
    with pytest.raises(ValidationFailed) as info:
        validate_raw(raw, FAIL)
    message = str(info.value)
    for text in expected:
        assert text in message, f"{case}: {text!r} not in:\n{message}"
    assert info.value.report["success"] is False
    assert isinstance(info.value, DataError)


def test_gap_and_irregular_step_are_told_apart(good_raw):
    raw = clone(good_raw)
    _gap(raw)
    with pytest.raises(ValidationFailed) as info:
        validate_raw(raw, NO_DOCS)
    failed = [e["kwargs"].get("column") for s in info.value.report["suites"].values()
              for e in s["expectations"] if not e["success"]]
    assert failed == ["step_seconds"]  # a whole missing step is a gap, not an irregular frequency


def test_too_many_missing_names_only_that_sensor(good_raw):
    raw = clone(good_raw)
    _too_many_missing(raw)
    with pytest.raises(ValidationFailed) as info:
        validate_raw(raw, FAIL)
    missing = info.value.report["suites"]["raw_missing"]["expectations"][0]
    assert [r["sensor_id"] for r in missing["failed_rows"]] == ["s1"]
    assert missing["observed"]["unexpected_count"] == 1


def test_absent_rows_of_one_sensor_are_missing_readings_not_gaps(good_raw):
    """Long format: a sensor's absent rows are its missing readings; the global index is regular."""
    raw = clone(good_raw)
    _sensor_gap(raw)                                                   # s3 has no row at 10:00
    s0 = raw.readings.index[raw.readings["sensor_id"] == "s0"]
    raw.readings = raw.readings.drop(index=s0[100:200]).reset_index(drop=True)   # s0: 100 rows absent
    report = validate_raw(raw, FAIL)
    steps = report["suites"]["raw_time_index"]["expectations"][1]
    assert steps["success"] and steps["observed"]["unexpected_count"] == 0
    missing = report["suites"]["raw_missing"]
    assert missing["success"] and missing["rows"] == 4
    assert report["dropped_sensors"] == [] and report["warnings"] == []


def test_sparse_sensors_drop_removes_them_and_their_edges_with_a_warning(good_raw, tmp_path):
    raw = clone(good_raw)
    _too_many_missing(raw)                                             # s1: 75 % missing
    s3 = raw.readings.index[raw.readings["sensor_id"] == "s3"]
    raw.readings = raw.readings.drop(index=s3[: 2 * len(s3) // 3]).reset_index(drop=True)  # s3: rows absent
    report = validate_raw(raw, ValidationConfig(data_docs=False), report_dir=tmp_path)
    assert [d["sensor_id"] for d in report["dropped_sensors"]] == ["s1", "s3"]
    assert report["dropped_sensors"][0]["missing_fraction"] == 0.75
    assert "dropped 2 of 4 sensors" in report["warnings"][0] and "s1 (75%)" in report["warnings"][0]
    assert report["parameters"]["sensor_ids"] == ["s0", "s2"]
    assert report["suites"]["raw_edges"]["rows"] == 0                  # s0->s1, s1->s2, s2->s3 all touch them
    assert json.loads((tmp_path / "raw.json").read_text())["dropped_sensors"] == report["dropped_sensors"]
    assert (tmp_path / "raw_docs" / "README.txt").exists()   # a DVC output of `validate`, also without Data Docs


def test_when_every_sensor_is_sparse_nothing_is_dropped_and_the_run_fails(good_raw):
    raw = clone(good_raw)
    raw.readings["speed"] = 0.0
    with pytest.raises(ValidationFailed, match="missing_fraction"):
        validate_raw(raw, NO_DOCS)


def test_failure_leaves_last_good_report_byte_identical(good_raw, tmp_path):
    out = tmp_path / "reports"
    cfg = ValidationConfig()
    validate_raw(clone(good_raw), cfg, report_dir=out)
    before = (out / "raw.json").read_bytes()
    docs_before = (out / "raw_docs" / "index.html").read_bytes()

    bad = clone(good_raw)
    _set("s0", 495, -4.0)(bad)
    with pytest.raises(ValidationFailed) as info:
        validate_raw(bad, cfg, report_dir=out)
    assert str(out / "raw.failed.json") in str(info.value)
    assert (out / "raw.json").read_bytes() == before
    assert (out / "raw_docs" / "index.html").read_bytes() == docs_before
    failed = json.loads((out / "raw.failed.json").read_text())
    assert failed["success"] is False and failed == json.loads(json.dumps(info.value.report))
    assert (out / "raw.failed_docs" / "index.html").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left

    validate_raw(clone(good_raw), cfg, report_dir=out)
    assert (out / "raw.json").read_bytes() == before  # the report holds no run time: same data, same bytes
    assert not (out / "raw.failed.json").exists() and not (out / "raw.failed_docs").exists()


def test_channel_without_bounds_is_a_clear_error(good_raw):
    raw = clone(good_raw)
    raw.readings = raw.readings.rename(columns={"speed": "volume"})
    with pytest.raises(DataError, match="channel 'volume' has no physical bounds.*validation.bounds.volume"):
        validate_raw(raw, NO_DOCS)


def test_a_suite_that_raises_in_gx_fails_with_gx_reason(good_raw, tmp_path, monkeypatch):

    folder = tmp_path / "validation"
    shutil.copytree(suites.SUITES_DIR, folder)
    no_column = {"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "occupancy"}}
    (folder / "raw_extra.json").write_text(json.dumps({"name": "raw_extra", "meta": {"table": "readings"},
                                                        "expectations": [no_column]}))
    monkeypatch.setattr(suites, "SUITES_DIR", folder)
    with pytest.raises(ValidationFailed, match="column 'occupancy' of readings: raised .*occupancy.* does not exist"):
        validate_raw(clone(good_raw), NO_DOCS)

    (folder / "raw_extra.json").write_text(json.dumps({"name": "raw_extra", "meta": {"table": "nope"},
                                                        "expectations": []}))
    with pytest.raises(DataError, match="suite raw_extra: unknown meta.table 'nope'"):
        validate_raw(clone(good_raw), NO_DOCS)


def test_failures_markdown(good_raw):
    raw = clone(good_raw)
    _set("s0", 495, -4.0)(raw)
    with pytest.raises(ValidationFailed) as info:
        validate_raw(raw, NO_DOCS)
    md = failures_markdown(info.value.report)
    lines = md.splitlines()
    assert "| suite | expectation | column | failed rows | example |" in lines
    body = [ln for ln in lines if ln.startswith("| raw_")]
    n_checked = T * len(IDS) - 58  # the null readings of s2 (every 5th of 288) are not bounds-checked
    assert body == [f"| raw_readings | expect_column_values_to_be_between | speed | 1 of {n_checked} | "
                    "sensor_id=s0, timestamp=2024-01-01 08:15:00, speed=-4.0 |"]
    ok = {"name": "raw", "suites": {"s": {"expectations": [{"success": True}], "skipped": None}}}
    assert failures_markdown(ok) == "All expectations of `raw` passed."


# --- processed ----------------------------------------------------------------------------------

def write_processed(folder: Path, mutate: Callable[[ProcessedData], None] | None = None) -> Path:
    """A processed dataset of the good raw shape (288 x 4 x 1), optionally broken by ``mutate``."""
    rng = np.random.default_rng(1)
    values = rng.uniform(30, 70, (T, 4, 1)).astype(np.float32)  # (T, N, C)
    values[::7, 2, 0] = 0.0  # null readings
    data = ProcessedData(
        values=values, mask=values[..., 0] != 0.0,
        timestamps=pd.date_range(START, periods=T, freq="5min").to_numpy("datetime64[ns]"),
        adjacency=np.eye(4, dtype=np.float32), sensor_ids=list(IDS),
        meta={"freq": "5min", "freq_seconds": 300, "steps_per_day": 288, "null_value": 0.0,
              "channels": ["speed"], "units": ["mph"], "n_steps": T, "n_sensors": 4})
    if mutate is not None:
        mutate(data)
    save_processed(data, folder)
    return folder


def test_good_processed_passes(tmp_path):
    folder = write_processed(tmp_path / "proc")
    report = validate_processed(folder, NO_DOCS, report_dir=tmp_path / "rep")
    assert report["success"] is True
    assert json.loads((tmp_path / "rep" / "processed.json").read_text()) == report
    assert set(report["suites"]) == {"processed_shapes", "processed_values", "processed_mask", "processed_time_index"}
    assert all(s["success"] for s in report["suites"].values())


def _set_value(t: int, n: int, value: float, fix_mask: bool = True) -> Callable[[ProcessedData], None]:
    def mutate(d: ProcessedData) -> None:
        d.values[t, n, 0] = value
        if fix_mask:
            d.mask[t, n] = False
    return mutate


def _short_mask(d: ProcessedData) -> None:
    d.mask = d.mask[:-1]


def _flip_mask(d: ProcessedData) -> None:
    d.mask[20, 1] = not d.mask[20, 1]


def _adjacency_inf(d: ProcessedData) -> None:
    d.adjacency[3, 0] = np.inf


def _uneven_time(d: ProcessedData) -> None:
    d.timestamps = d.timestamps.copy()
    d.timestamps[100] += np.timedelta64(1, "m")


def _wrong_meta_freq(d: ProcessedData) -> None:
    d.meta["freq"], d.meta["freq_seconds"] = "10min", 600


BAD_PROCESSED = {
    "shape mismatch": (_short_mask, ["expect_column_pair_values_to_be_equal", "array=mask, axis=T",
                                     "size=287, expected=288"]),
    "extra sensor id": (lambda d: d.sensor_ids.append("s4"), ["array=sensor_ids, axis=N", "size=5, expected=4"]),
    "NaN in values": (_set_value(10, 2, np.nan), ["no NaN in values and adjacency", "'n_nan'",
                                                  "sensor s2, array=values[speed], first_at=2024-01-01 00:50:00"]),
    "mask inconsistent": (_flip_mask, ["the mask is consistent with the null value", "'n_mismatch'",
                                       "sensor s1, first_at=2024-01-01 01:40:00: n_mismatch=1"]),
    "inf in adjacency": (_adjacency_inf, ["no inf in values and adjacency", "array=adjacency, first_at=s0"]),
    "irregular timestamps": (_uneven_time, ["timestamps strictly increasing with a constant step",
                                            "rows outside [300.0, 300.0]", "step_seconds=360.0"]),
    "step differs from meta freq": (_wrong_meta_freq, ["'step_seconds'", "287 of 287 rows outside [600.0, 600.0]"]),
}


@pytest.mark.parametrize("case", list(BAD_PROCESSED))
def test_bad_processed_is_rejected_naming_what_is_wrong(tmp_path, case):
    mutate, expected = BAD_PROCESSED[case]
    folder = write_processed(tmp_path / "proc", mutate)
    with pytest.raises(ValidationFailed) as info:
        validate_processed(folder, NO_DOCS, report_dir=tmp_path / "rep")
    message = str(info.value)
    for text in expected:
        assert text in message, f"{case}: {text!r} not in:\n{message}"
    assert not (tmp_path / "rep" / "processed.json").exists()
    assert json.loads((tmp_path / "rep" / "processed.failed.json").read_text())["success"] is False


def test_shape_mismatch_skips_the_checks_that_need_shapes(tmp_path):
    folder = write_processed(tmp_path / "proc", _short_mask)
    with pytest.raises(ValidationFailed) as info:
        validate_processed(folder, NO_DOCS)
    suites = info.value.report["suites"]
    assert suites["processed_shapes"]["success"] is False
    for name in ("processed_values", "processed_mask", "processed_time_index"):
        assert suites[name]["skipped"] == "processed_shapes failed" and suites[name]["expectations"] == []


def test_processed_folder_missing_files_is_a_clear_error(tmp_path):
    folder = write_processed(tmp_path / "proc")
    (folder / "mask.npy").unlink()
    with pytest.raises(DataError, match=r"lacks \['mask.npy'\]"):
        validate_processed(folder, NO_DOCS)
