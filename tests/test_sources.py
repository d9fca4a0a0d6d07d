"""Source loaders: each format parsed into RawData as written (no repair), bad files named in errors."""
import hashlib
import os
import pickle

import numpy as np
import pandas as pd
import pytest
from fixtures_gen import (byo_long, cube, serve_folder, truncate, write_adj_pkl, write_byo, write_locations,
                          write_metrla_h5, write_pems, write_py2_pickle, write_tgcn)

from stlink.config import DataConfig
from stlink.data.download import ChecksumError
from stlink.data.formats import DataError, RawData
from stlink.data.sources import load_byo, load_metrla, load_pems, load_source, load_tgcn


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_contract(raw: RawData, channels):
    """The RawData contract of formats.py."""
    r = raw.readings
    assert list(r.columns) == ["timestamp", "sensor_id", *channels]
    assert r["timestamp"].dtype == "datetime64[ns]"
    assert all(isinstance(s, str) for s in r["sensor_id"].head(20))
    assert all(r[c].dtype == np.float64 for c in channels)
    assert list(raw.sensors.columns) == ["sensor_id", "lat", "lon"]
    assert raw.meta["channels"] == list(channels)
    assert {"source", "files", "null_value", "units", "freq"} <= set(raw.meta)


# --- PEMS ----------------------------------------------------------------------------------------

def test_pems_cube_edges_and_timestamps(tmp_path):
    values = cube(6, 4, 3)
    values[2, 1, 0] = 0.0        # a missing reading (null value) stays as written
    values[3, 2, 1] = np.nan
    npz, csv = write_pems(tmp_path, values, [(0, 1, 310.5), (1, 2, 20.0), (3, 0, 7.0)])
    raw = load_pems(npz, csv, "2018-09-01 00:00", "5min", ["flow", "occupancy"], 0.0, units=["veh/5min"])
    assert_contract(raw, ["flow", "occupancy", "ch2"])
    assert raw.sensor_ids == ["0", "1", "2", "3"]
    assert len(raw.readings) == 6 * 4
    got = raw.readings[["flow", "occupancy", "ch2"]].to_numpy().reshape(6, 4, 3)  # time-major
    np.testing.assert_array_equal(got, values)
    assert list(raw.readings["sensor_id"][:5]) == ["0", "1", "2", "3", "0"]
    expected_ts = pd.date_range("2018-09-01", periods=6, freq="5min")
    assert (pd.DatetimeIndex(raw.readings["timestamp"].unique()) == expected_ts).all()
    assert raw.edges.to_dict("list") == {"from": ["0", "1", "3"], "to": ["1", "2", "0"], "value": [310.5, 20.0, 7.0]}
    assert raw.meta["value_kind"] == "distance" and raw.meta["freq"] == "5min"
    assert raw.meta["units"] == ["veh/5min", "unknown", "unknown"]
    assert raw.meta["files"] == {npz.name: sha(npz), csv.name: sha(csv)}
    assert raw.sensors["lat"].isna().all()


def test_pems_2d_and_sensor_id_list(tmp_path):
    npz, csv = write_pems(tmp_path, cube(5, 3, 1)[..., 0], [(317842, 318711, 0.8)], value_header="distance")
    ids = tmp_path / "PEMS99.txt"
    ids.write_text("318711\n317842\n311903\n")
    raw = load_pems(npz, csv, "2018-09-01", "5min", ["flow"], 0.0, sensor_ids=ids)
    assert_contract(raw, ["flow"])
    assert raw.sensor_ids == ["318711", "317842", "311903"]
    assert raw.edges["from"].tolist() == ["317842"]
    ids.write_text("1\n2\n")
    with pytest.raises(DataError, match="PEMS99.txt: 2 sensor ids for 3 sensors"):
        load_pems(npz, csv, "2018-09-01", "5min", ["flow"], 0.0, sensor_ids=ids)


@pytest.mark.parametrize("start, freq", [(None, "5min"), ("2018-09-01", None)])
def test_pems_needs_start_time_and_freq(tmp_path, start, freq):
    npz, _ = write_pems(tmp_path, cube(4, 2, 1))
    with pytest.raises(DataError, match="PEMS99.npz has no timestamps: set data.start_time"):
        load_pems(npz, None, start, freq, ["flow"], 0.0)


def test_pems_bad_freq(tmp_path):
    npz, _ = write_pems(tmp_path, cube(4, 2, 1))
    with pytest.raises(DataError, match="data.freq='fortnightish'"):
        load_pems(npz, None, "2018-09-01", "fortnightish", ["flow"], 0.0)


def test_pems_truncated_npz(tmp_path):
    npz, _ = write_pems(tmp_path, cube(50, 20, 3))
    truncate(npz)
    with pytest.raises(DataError, match=f"{npz}: not a readable npz"):
        load_pems(npz, None, "2018-09-01", "5min", ["flow"], 0.0)


def test_pems_npz_without_data_key(tmp_path):
    npz = tmp_path / "x.npz"
    np.savez(npz, speed=np.zeros((3, 2)))
    with pytest.raises(DataError, match=r"x.npz: no array 'data' \(found \['speed'\]\)"):
        load_pems(npz, None, "2018-09-01", "5min", ["flow"], 0.0)


def test_pems_edges_missing_cost_column(tmp_path):
    npz, _ = write_pems(tmp_path, cube(4, 2, 1))
    csv = tmp_path / "PEMS99.csv"
    csv.write_text("from,to,length\n0,1,3.0\n")
    with pytest.raises(DataError, match="PEMS99.csv: missing column 'distance'"):
        load_pems(npz, csv, "2018-09-01", "5min", ["flow"], 0.0)
    csv.write_text("src,to,cost\n0,1,3.0\n")
    with pytest.raises(DataError, match=r"PEMS99.csv: missing column\(s\) \['from'\]"):
        load_pems(npz, csv, "2018-09-01", "5min", ["flow"], 0.0)


def test_empty_files(tmp_path):
    for name in ("e.npz", "e.h5", "e.csv", "readings.parquet"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(DataError, match="e.npz: empty file"):
        load_pems(tmp_path / "e.npz", None, "2018-09-01", "5min", ["flow"], 0.0)
    with pytest.raises(DataError, match="e.h5: empty file"):
        load_metrla(tmp_path / "e.h5", None, None, ["speed"], 0.0)
    with pytest.raises(DataError, match="e.csv: empty file"):
        load_tgcn(tmp_path / "e.csv", None, "2012-03-01", "5min", ["speed"], 0.0)
    with pytest.raises(DataError, match="readings.parquet: empty file"):
        load_byo(tmp_path / "readings.parquet", None, None, ["speed"], 0.0)


# --- METR-LA -------------------------------------------------------------------------------------

IDS = ["773869", "767541", "767542", "717447"]


def metrla_files(tmp_path, h5_ids=IDS):
    values = cube(8, len(h5_ids), 1)[..., 0]
    values[3, 1] = 0.0  # METR-LA stores missing readings as 0: kept as 0
    h5 = write_metrla_h5(tmp_path / "metr-la.h5", values, h5_ids)
    adj = np.arange(16, dtype=np.float64).reshape(4, 4) / 16  # entry (i, j) identifies the pair
    pkl = write_adj_pkl(tmp_path / "adj_mx.pkl", IDS, adj)
    loc = write_locations(tmp_path / "graph_sensor_locations.csv", IDS[::-1], [34.0, 34.1, 34.2, 34.3],
                          [-118.0, -118.1, -118.2, -118.3])
    return values, adj, h5, pkl, loc


def test_metrla_reorders_adjacency_to_h5_columns(tmp_path):
    h5_ids = [IDS[2], IDS[0], IDS[3], IDS[1]]
    values, adj, h5, pkl, loc = metrla_files(tmp_path, h5_ids)
    raw = load_metrla(h5, pkl, loc, ["speed"], 0.0, units=["mph"])
    assert_contract(raw, ["speed"])
    assert raw.sensor_ids == h5_ids
    perm = [IDS.index(s) for s in h5_ids]
    np.testing.assert_allclose(raw.adjacency, adj[np.ix_(perm, perm)], rtol=1e-6)
    np.testing.assert_array_equal(raw.readings["speed"].to_numpy().reshape(8, 4), values)
    assert raw.readings["speed"].iloc[3 * 4 + 1] == 0.0
    assert raw.readings["timestamp"].iloc[0] == pd.Timestamp("2012-03-01")
    # locations were written in reverse id order: 773869 is the last row (34.3)
    assert raw.sensors.set_index("sensor_id").loc["773869", "lat"] == 34.3
    assert raw.sensors.set_index("sensor_id").loc["767542", "lon"] == -118.1
    assert raw.meta["freq"] == "5min" and raw.meta["units"] == ["mph"]
    assert set(raw.meta["files"]) == {"metr-la.h5", "adj_mx.pkl", "graph_sensor_locations.csv"}


def test_metrla_graph_sensor_mismatch_named(tmp_path):
    _, _, h5, pkl, _ = metrla_files(tmp_path, IDS[:3] + ["999999"])
    with pytest.raises(DataError, match=r"adj_mx.pkl: sensor ids differ.*\['999999'\].*\['717447'\]"):
        load_metrla(h5, pkl, None, ["speed"], 0.0)


def test_metrla_corrupt_h5(tmp_path):
    _, _, h5, _, _ = metrla_files(tmp_path)
    truncate(h5, 0.3)
    with pytest.raises(DataError, match="metr-la.h5: not a readable pandas HDF file"):
        load_metrla(h5, None, None, ["speed"], 0.0)
    h5.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(DataError, match="metr-la.h5: not a readable pandas HDF file"):
        load_metrla(h5, None, None, ["speed"], 0.0)


class Exploit:
    """A pickle that runs a shell command when loaded by a plain ``pickle.load``."""

    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


def test_metrla_corrupt_or_unsafe_pickle(tmp_path):
    _, _, h5, pkl, _ = metrla_files(tmp_path)
    truncate(pkl)
    with pytest.raises(DataError, match="adj_mx.pkl: not a readable DCRNN pickle"):
        load_metrla(h5, pkl, None, ["speed"], 0.0)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(Exploit(f"touch {marker}"), protocol=2))
    with pytest.raises(DataError, match=r"evil.pkl: .*refusing to load global \w+\.system"):
        load_metrla(h5, evil, None, ["speed"], 0.0)
    assert not marker.exists()  # nothing but numpy arrays and containers is built
    odd = write_py2_pickle(tmp_path / "odd.pkl", (b"a", b"b"))
    with pytest.raises(DataError, match="odd.pkl: expected a"):
        load_metrla(h5, odd, None, ["speed"], 0.0)


def test_metrla_locations_missing_column(tmp_path):
    _, _, h5, _, loc = metrla_files(tmp_path)
    pd.read_csv(loc).drop(columns="longitude").to_csv(loc, index=False)
    with pytest.raises(DataError, match=r"graph_sensor_locations.csv: missing column\(s\) \['lon'\]"):
        load_metrla(h5, None, loc, ["speed"], 0.0)


# --- T-GCN ---------------------------------------------------------------------------------------

def test_tgcn_wide_csv_and_dense_adjacency(tmp_path):
    values = cube(7, 3, 1)[..., 0]
    adj = np.array([[1, 0.5, 0], [0.5, 1, 0.2], [0, 0.2, 1]])
    speed, adj_csv = write_tgcn(tmp_path, values, ["773869", "767541", "767542"], adj)
    raw = load_tgcn(speed, adj_csv, "2012-03-01 00:00", "5min", ["speed"], 0.0)
    assert_contract(raw, ["speed"])
    assert raw.sensor_ids == ["773869", "767541", "767542"]
    np.testing.assert_array_equal(raw.readings["speed"].to_numpy().reshape(7, 3), values)
    np.testing.assert_array_equal(raw.adjacency, adj)
    assert raw.readings["timestamp"].iloc[-1] == pd.Timestamp("2012-03-01 00:30")
    assert raw.edges is None and raw.meta["value_kind"] == "weight"


def test_tgcn_adjacency_header_reordered(tmp_path):
    adj = np.array([[1, 0.5, 0], [0.3, 1, 0.2], [0, 0.1, 1]])  # in order c, a, b
    speed, adj_csv = write_tgcn(tmp_path, cube(4, 3, 1)[..., 0], ["a", "b", "c"], adj, adj_header=["c", "a", "b"])
    raw = load_tgcn(speed, adj_csv, "2012-03-01", "5min", ["speed"], 0.0)
    np.testing.assert_array_equal(raw.adjacency, adj[np.ix_([1, 2, 0], [1, 2, 0])])


def test_tgcn_adjacency_header_of_numeric_ids_is_matched_by_id(tmp_path):
    """METR-LA's ids are numbers: a header row of them is told apart from data by the shape (N+1 rows)."""
    adj = np.array([[1, 0.5, 0], [0.3, 1, 0.2], [0, 0.1, 1]])  # in order 767542, 773869, 767541
    ids = ["773869", "767541", "767542"]
    speed, adj_csv = write_tgcn(tmp_path, cube(4, 3, 1)[..., 0], ids, adj, adj_header=["767542", "773869", "767541"])
    raw = load_tgcn(speed, adj_csv, "2012-03-01", "5min", ["speed"], 0.0)
    np.testing.assert_array_equal(raw.adjacency, adj[np.ix_([1, 2, 0], [1, 2, 0])])


def test_tgcn_time_column_and_errors(tmp_path):
    csv = tmp_path / "speed.csv"
    csv.write_text("time,s1,s2\n2012-03-01 00:00,60,61\n2012-03-01 00:05,59,\n2012-03-01 00:05,58,57\n")
    raw = load_tgcn(csv, None, None, None, ["speed"], 0.0)  # duplicate time and NaN pass through
    assert raw.readings["timestamp"].tolist() == list(pd.to_datetime(
        ["2012-03-01 00:00"] * 2 + ["2012-03-01 00:05"] * 4))
    assert np.isnan(raw.readings["speed"].iloc[3]) and len(raw.readings) == 6
    csv.write_text("time,s1,s2\n2012-03-01 00:00,60,61\nyesterday,59,58\n")
    with pytest.raises(DataError, match="speed.csv: column 'time' row 1: unreadable timestamp 'yesterday'"):
        load_tgcn(csv, None, None, None, ["speed"], 0.0)
    csv.write_text("s1,s2\n60,61\n59,fast\n")
    with pytest.raises(DataError, match="speed.csv: column 's2' row 1: not a number: 'fast'"):
        load_tgcn(csv, None, "2012-03-01", "5min", ["speed"], 0.0)
    with pytest.raises(DataError, match="speed.csv has no timestamps"):
        load_tgcn(csv, None, None, "5min", ["speed"], 0.0)


def test_tgcn_adjacency_wrong_size(tmp_path):
    speed, adj_csv = write_tgcn(tmp_path, cube(4, 3, 1)[..., 0], ["a", "b", "c"], np.eye(2))
    with pytest.raises(DataError, match="los_adj.csv: adjacency is 2 x 2 but .*los_speed.csv has 3 sensors"):
        load_tgcn(speed, adj_csv, "2012-03-01", "5min", ["speed"], 0.0)


# --- bring your own ------------------------------------------------------------------------------

TS = pd.date_range("2024-01-01", periods=5, freq="15min")


def byo_sensors(ids):
    return pd.DataFrame({"sensor_id": ids, "lat": np.linspace(52, 52.1, len(ids)),
                         "lon": np.linspace(4, 4.1, len(ids))})


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_byo_long(tmp_path, fmt):
    long = byo_long(TS, ["007", "b2", "a1"])
    long = pd.concat([long, long.iloc[[4]]], ignore_index=True)  # a duplicate row is not removed
    long.loc[2, "value"] = np.nan
    sensors = byo_sensors(["a1", "b2", "007"])
    edges = pd.DataFrame({"from": ["a1", "b2"], "to": ["b2", "007"], "distance": [1.5, 2.5]})
    path = write_byo(tmp_path, long, sensors, edges, fmt=fmt)
    raw = load_byo(path, tmp_path / "sensors.csv", tmp_path / "edges.csv", ["speed"], 0.0)
    assert_contract(raw, ["speed", "flow"])
    assert raw.sensor_ids == ["a1", "b2", "007"]  # sensors.csv order; leading zeros kept
    assert len(raw.readings) == len(long)
    np.testing.assert_array_equal(raw.readings["speed"], long["value"])
    np.testing.assert_array_equal(raw.readings["flow"], long["flow"])
    assert raw.readings["sensor_id"].tolist() == long["sensor_id"].tolist()
    np.testing.assert_allclose(raw.sensors["lat"], sensors["lat"])
    assert raw.edges["value"].tolist() == [1.5, 2.5] and raw.meta["value_kind"] == "distance"
    assert raw.meta["files"][path.name] == sha(path)


def test_byo_wide_without_sensors_file(tmp_path):
    wide = pd.DataFrame({"timestamp": TS.strftime("%Y-%m-%d %H:%M"), "z9": [1.0, 2, 3, 4, 5],
                         "a1": [6.0, 7, 8, 9, 10]})
    path = write_byo(tmp_path, wide)
    raw = load_byo(path, None, None, ["speed"], 0.0)
    assert_contract(raw, ["speed"])
    assert raw.sensor_ids == ["z9", "a1"]  # order of appearance
    assert raw.readings["speed"].tolist()[:4] == [1.0, 6.0, 2.0, 7.0]
    assert raw.sensors["lat"].isna().all() and raw.edges is None


def test_byo_value_column_and_channel_names(tmp_path):
    long = byo_long(TS, ["s1"]).rename(columns={"value": "kmh"})
    path = write_byo(tmp_path, long)
    raw = load_byo(path, None, None, ["speed"], 0.0, value_column="kmh")
    assert_contract(raw, ["speed", "flow"])
    np.testing.assert_array_equal(raw.readings["speed"], long["kmh"])
    with pytest.raises(DataError, match="readings.csv: missing column 'value'"):
        load_byo(path, None, None, ["speed"], 0.0)


def test_byo_missing_columns_named(tmp_path):
    path = write_byo(tmp_path, byo_long(TS, ["s1"]).drop(columns="timestamp"))
    with pytest.raises(DataError, match=r"readings.csv: missing column\(s\) \['timestamp'\]"):
        load_byo(path, None, None, ["speed"], 0.0)
    path = write_byo(tmp_path, byo_long(TS, ["s1"]), sensors=byo_sensors(["s1"]).drop(columns="lat"))
    with pytest.raises(DataError, match=r"sensors.csv: missing column\(s\) \['lat'\]"):
        load_byo(path, tmp_path / "sensors.csv", None, ["speed"], 0.0)


def test_byo_unreadable_timestamp(tmp_path):
    long = byo_long(TS, ["s1"]).astype({"timestamp": str})
    long.loc[3, "timestamp"] = "2024-13-45 99:00"
    path = write_byo(tmp_path, long)
    with pytest.raises(DataError, match="readings.csv: column 'timestamp' row 3: unreadable timestamp '2024-13-45"):
        load_byo(path, None, None, ["speed"], 0.0)
    long["timestamp"] = np.arange(len(long)) * 900  # epoch seconds: not silently read as nanoseconds of 1970
    path = write_byo(tmp_path, long)
    with pytest.raises(DataError, match="readings.csv: column 'timestamp' holds numbers"):
        load_byo(path, None, None, ["speed"], 0.0)


def test_byo_corrupt_parquet(tmp_path):
    path = write_byo(tmp_path, byo_long(TS, ["s1", "s2"]), fmt="parquet")
    truncate(path)
    with pytest.raises(DataError, match="readings.parquet: not a readable Parquet file"):
        load_byo(path, None, None, ["speed"], 0.0)


# --- load_source ---------------------------------------------------------------------------------

def test_load_source_finds_default_files(tmp_path):
    write_pems(tmp_path / "pems", cube(6, 3, 1), [(0, 1, 5.0)])
    raw, files = load_source(DataConfig(source="pems", path=str(tmp_path / "pems"), start_time="2018-09-01",
                                        freq="5min", channels=["flow"], units=["veh"]))
    assert sorted(files) == ["PEMS99.csv", "PEMS99.npz"] and all(p.is_file() for p in files.values())
    assert raw.meta["units"] == ["veh"] and raw.meta["roles"] == {"data": "PEMS99.npz", "edges": "PEMS99.csv"}

    (tmp_path / "m").mkdir()
    metrla_files(tmp_path / "m")
    raw, files = load_source(DataConfig(source="metrla", path=str(tmp_path / "m")))
    assert sorted(files) == ["adj_mx.pkl", "graph_sensor_locations.csv", "metr-la.h5"]
    assert raw.adjacency.shape == (4, 4) and raw.sensors["lat"].notna().all()

    write_tgcn(tmp_path / "t", cube(4, 2, 1)[..., 0], ["a", "b"], np.eye(2))
    raw, files = load_source(DataConfig(source="tgcn", path=str(tmp_path / "t"), start_time="2012-03-01",
                                        freq="5min"))
    assert sorted(files) == ["los_adj.csv", "los_speed.csv"] and raw.adjacency.shape == (2, 2)

    write_byo(tmp_path / "b", byo_long(TS, ["s1", "s2"]), byo_sensors(["s2", "s1"]), fmt="parquet")
    raw, files = load_source(DataConfig(source="byo", path=str(tmp_path / "b")))
    assert sorted(files) == ["readings.parquet", "sensors.csv"] and raw.sensor_ids == ["s2", "s1"]


def test_load_source_roles_and_ambiguity(tmp_path):
    write_tgcn(tmp_path, cube(4, 2, 1)[..., 0], ["a", "b"], np.eye(2), name="one")
    write_tgcn(tmp_path, cube(5, 2, 1)[..., 0], ["a", "b"], None, name="two")
    cfg = DataConfig(source="tgcn", path=str(tmp_path), start_time="2012-03-01", freq="5min")
    with pytest.raises(DataError, match=r"several files could be the 'speed' file.*data.files.speed"):
        load_source(cfg)
    cfg.files = {"speed": "two_speed.csv"}
    raw, files = load_source(cfg)
    assert sorted(files) == ["one_adj.csv", "two_speed.csv"] and raw.readings["timestamp"].nunique() == 5
    cfg.files = {"speeds": "two_speed.csv"}
    with pytest.raises(DataError, match=r"unknown role\(s\) \['speeds'\]"):
        load_source(cfg)
    cfg.files = {"speed": "three_speed.csv"}
    with pytest.raises(DataError, match="three_speed.csv: no such file"):
        load_source(cfg)


def test_load_source_checksums(tmp_path):
    speed, adj = write_tgcn(tmp_path, cube(4, 2, 1)[..., 0], ["a", "b"], np.eye(2))
    cfg = DataConfig(source="tgcn", path=str(tmp_path), start_time="2012-03-01", freq="5min",
                     sha256={speed.name: sha(speed)})
    raw, _ = load_source(cfg)
    assert raw.meta["files"] == {speed.name: sha(speed), adj.name: sha(adj)}
    cfg.sha256 = {adj.name: "ab" * 32}
    with pytest.raises(ChecksumError, match=f"los_adj.csv: sha256 mismatch: expected {'ab' * 32}, got {sha(adj)}"):
        load_source(cfg)
    cfg.sha256 = {"los_speeds.csv": sha(speed)}
    with pytest.raises(DataError, match=r"data.sha256 names \['los_speeds.csv'\]"):
        load_source(cfg)


def test_load_source_rejects_synthetic_and_unknown(tmp_path):
    with pytest.raises(DataError, match="synthetic"):
        load_source(DataConfig(source="synthetic", path=str(tmp_path)))
    with pytest.raises(DataError, match="data.source='csv'"):
        load_source(DataConfig(source="csv", path=str(tmp_path)))
    with pytest.raises(DataError, match="set data.path"):
        load_source(DataConfig(source="byo"))


def test_load_source_downloads_from_url(tmp_path):
    served = tmp_path / "served"
    long = byo_long(TS, ["s1", "s2"])
    write_byo(served, long, byo_sensors(["s1", "s2"]))
    digests = {p.name: sha(p) for p in served.iterdir()}
    down = tmp_path / "download"
    with serve_folder(served) as base:
        cfg = DataConfig(source="byo", path=str(down), url=base + "/", sha256=digests)
        raw, files = load_source(cfg)
        assert sorted(files) == ["readings.csv", "sensors.csv"]
        assert all(files[n].parent == down and sha(files[n]) == d for n, d in digests.items())
        np.testing.assert_array_equal(raw.readings["speed"], long["value"])
        (served / "readings.csv").write_text("timestamp,sensor_id,value\n")  # served file changes
        load_source(cfg)  # the intact local copy is reused, not fetched again
        assert sha(down / "readings.csv") == digests["readings.csv"]
        (down / "readings.csv").write_bytes(b"stale")  # a bad local copy is fetched again: checksum fails
        with pytest.raises(ChecksumError, match="readings.csv: sha256 mismatch"):
            load_source(cfg)
    assert (down / "readings.csv").read_bytes() == b"stale"
    assert sorted(p.name for p in down.iterdir()) == ["readings.csv", "sensors.csv"]


def test_load_source_url_needs_checksums(tmp_path):
    with pytest.raises(DataError, match="data.sha256"):
        load_source(DataConfig(source="byo", path=str(tmp_path), url="http://127.0.0.1:9/"))


def test_byo_sensors_without_coordinates(tmp_path):
    """The probe: a sensors.csv with only sensor_id was refused (missing column(s) ['lat', 'lon'])."""
    long = byo_long(TS, ["s1", "s2"])
    path = write_byo(tmp_path, long.drop(index=[3, 5]), sensors=pd.DataFrame({"sensor_id": ["s2", "s1"]}))
    raw = load_byo(path, tmp_path / "sensors.csv", None, ["speed"], 0.0)
    assert raw.sensor_ids == ["s2", "s1"] and raw.sensors[["lat", "lon"]].isna().all().all()
    assert len(raw.readings) == len(long) - 2                      # absent rows stay absent (missing readings)
