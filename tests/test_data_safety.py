"""Data files are data: no loader runs code from a file, no file name leaves its folder, no link out.

Each crafted file carries a pickle payload that creates a marker file when unpickled; the
loader must refuse the file with a one-line error and the marker must not exist afterwards.
"""
import hashlib
import os
import pickle

import h5py
import numpy as np
import pandas as pd
import pytest
from fixtures_gen import byo_long, write_byo, write_metrla_h5

from stlink.cli import main
from stlink.config import DataConfig
from stlink.data.formats import DataError
from stlink.data.sources import load_source

IDS = ["773869", "767541", "767542"]


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears when code from the data runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def object_h5(path, marker):
    """The probe's file: a pandas ``fixed`` HDF whose only column holds pickled objects."""
    idx = pd.date_range("2024-01-01", periods=30, freq="5min")
    pd.DataFrame({"a": [Payload(marker)] * 30}, index=idx, dtype=object).to_hdf(path, key="df", format="fixed")
    return path


def ingest_cli(tmp_path, monkeypatch, capsys, source, folder, *extra):
    """``stlink -S ... ingest`` in ``tmp_path``; returns (exit code, stderr)."""
    monkeypatch.chdir(tmp_path)
    rc = main(["-S", "data.dataset=probe", "-S", f"data.source={source}", "-S", f"data.path={folder}", *extra,
               "ingest"])
    return rc, capsys.readouterr().err


def test_the_crafted_h5_really_runs_code_through_pandas(tmp_path):
    """The reproduction is live: pandas' own reader runs the payload (why we never use it)."""
    marker = tmp_path / "PWNED-by-pandas"
    object_h5(tmp_path / "m.h5", marker)
    pd.read_hdf(tmp_path / "m.h5")
    assert marker.exists()


def test_h5_with_pickled_objects_is_refused_and_nothing_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "PWNED"
    (tmp_path / "x").mkdir()
    object_h5(tmp_path / "x" / "m.h5", marker)
    rc, err = ingest_cli(tmp_path, monkeypatch, capsys, "metrla", "x")
    assert rc != 0 and "holds pickled Python objects; refused" in err and "m.h5" in err
    assert len(err.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "data/raw/probe").exists()


def test_h5_table_format_with_a_pickled_attribute_is_refused(tmp_path):
    """pandas ``table`` format keeps column names in pickled attributes: no global may load."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "m.h5"
    idx = pd.date_range("2024-01-01", periods=10, freq="5min")
    pd.DataFrame(np.ones((10, 2)), index=idx, columns=["a", "b"]).to_hdf(path, key="df", format="table")
    with h5py.File(path, "r+") as f:
        f["df/table"].attrs["values_block_0_kind"] = np.bytes_(pickle.dumps(Payload(marker), protocol=0))
    with pytest.raises(DataError, match="refusing to load global"):
        load_source(DataConfig(dataset="t", source="metrla", path=str(path)))
    assert not marker.exists()


def test_h5_fixed_and_table_formats_read_as_pandas_writes_them(tmp_path):
    values = np.arange(24, dtype=float).reshape(8, 3)
    for fmt in ("fixed", "table"):
        folder = tmp_path / fmt
        folder.mkdir()
        idx = pd.date_range("2012-03-01", periods=8, freq="5min")
        pd.DataFrame(values, index=idx, columns=IDS).to_hdf(folder / "m.h5", key="df", format=fmt)
        raw, _ = load_source(DataConfig(dataset="t", source="metrla", path=str(folder)))
        assert raw.sensor_ids == IDS and raw.meta["freq"] == "5min"
        np.testing.assert_array_equal(raw.readings["speed"].to_numpy().reshape(8, 3), values)
        assert raw.readings["timestamp"].iloc[-1] == pd.Timestamp("2012-03-01 00:35")


def test_npz_with_an_object_array_is_refused_and_nothing_runs(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "PWNED"
    (tmp_path / "x").mkdir()
    np.savez(tmp_path / "x" / "PEMS99.npz", data=np.array([[Payload(marker)]], dtype=object))
    rc, err = ingest_cli(tmp_path, monkeypatch, capsys, "pems", "x", "-S", "data.start_time=2024-01-01",
                         "-S", "data.freq=5min")
    assert rc != 0 and "holds a pickled object array; refused" in err
    assert not marker.exists()


def test_graph_pickle_with_a_payload_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "PWNED"
    write_metrla_h5(tmp_path / "m.h5", np.ones((6, 3)), IDS)
    (tmp_path / "adj_mx.pkl").write_bytes(pickle.dumps((IDS, Payload(marker), np.eye(3)), protocol=2))
    with pytest.raises(DataError, match="adj_mx.pkl: not a readable DCRNN pickle.*refusing to load global"):
        load_source(DataConfig(dataset="t", source="metrla", path=str(tmp_path)))
    assert not marker.exists()


def test_parquet_and_csv_cells_are_data_not_code(tmp_path):
    marker = tmp_path / "PWNED"
    ts = pd.date_range("2024-01-01", periods=4, freq="5min")
    long = byo_long(ts, ["s1"]).drop(columns="flow")
    blob = long.assign(value=[pickle.dumps(Payload(marker))] * len(long))  # pickle bytes in Parquet cells
    write_byo(tmp_path / "pq", blob, fmt="parquet")
    with pytest.raises(DataError, match="column 'value' row 0: not a number"):
        load_source(DataConfig(dataset="t", source="byo", path=str(tmp_path / "pq")))
    long["value"] = long["value"].astype(object)
    long.loc[1, "value"] = f"__import__('builtins').open({str(marker)!r}, 'w')"
    write_byo(tmp_path / "csv", long)
    with pytest.raises(DataError, match="column 'value' row 1: not a number"):
        load_source(DataConfig(dataset="t", source="byo", path=str(tmp_path / "csv")))
    assert not marker.exists()


# --- file names and links ------------------------------------------------------------------------

def byo_folder(folder):
    ts = pd.date_range("2024-01-01", periods=6, freq="5min")
    return write_byo(folder, byo_long(ts, ["s1", "s2"]).drop(columns="flow"))


@pytest.mark.parametrize("name", ["../X.csv", "../../../../X.csv", "/tmp/X.csv", "sub/../../X.csv"])
def test_data_files_names_cannot_leave_the_folder(tmp_path, name):
    byo_folder(tmp_path / "outside_target")
    src = tmp_path / "d" / "src"
    byo_folder(src)
    with pytest.raises(DataError, match=r"data.files.readings: file name .* must be a plain name inside"):
        load_source(DataConfig(dataset="t", source="byo", path=str(src), files={"readings": name}))


def test_a_download_named_by_sha256_keys_stays_in_its_folder(tmp_path):
    served = tmp_path / "served"
    byo_folder(served)
    digest = hashlib.sha256((served / "readings.csv").read_bytes()).hexdigest()
    down = tmp_path / "a" / "b" / "down"
    cfg = DataConfig(dataset="t", source="byo", path=str(down), url=served.as_uri() + "/x/y",
                     sha256={"../../readings.csv": digest})
    with pytest.raises(DataError, match=r"data.sha256: file name '../../readings.csv' must be a plain name"):
        load_source(cfg)
    assert not (tmp_path / "a" / "readings.csv").exists() and not list((tmp_path / "a").rglob("readings.csv"))


def test_a_link_out_of_data_path_is_refused_a_link_inside_is_followed(tmp_path):
    outside = byo_folder(tmp_path / "elsewhere")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(outside, src / "readings.csv")
    with pytest.raises(DataError, match=r"readings.csv: resolves to .*elsewhere/readings.csv, outside data.path"):
        load_source(DataConfig(dataset="t", source="byo", path=str(src)))
    (src / "readings.csv").unlink()
    byo_folder(src / "2024")
    os.symlink(src / "2024" / "readings.csv", src / "readings.csv")
    raw, files = load_source(DataConfig(dataset="t", source="byo", path=str(src)))
    assert raw.sensor_ids == ["s1", "s2"] and files["readings.csv"] == src / "readings.csv"


def test_the_cli_and_the_params_check_read_the_table_of_sources():
    from stlink.cli import build_parser
    from stlink.config import ConfigError, params_from_dict
    from stlink.data.sources import FILE_SOURCES, SOURCE_NAMES, SOURCES

    assert SOURCE_NAMES == ("synthetic", "pems", "metrla", "tgcn", "byo") and "synthetic" not in FILE_SOURCES
    forecast = build_parser()._subparsers._group_actions[0].choices["forecast"]
    source = next(a for a in forecast._actions if a.dest == "source")
    assert list(source.choices) == list(FILE_SOURCES)
    with pytest.raises(ConfigError, match="data.source='pmes': one of synthetic, pems, metrla, tgcn, byo"):
        params_from_dict({"data": {"source": "pmes"}})
    import importlib

    for spec in SOURCES.values():                         # every row names a loader that exists
        module, func = spec.loader.split(":")
        assert callable(getattr(importlib.import_module(module), func)), spec.name
