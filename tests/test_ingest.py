"""ingest: the one step that writes data/raw/<dataset>/; a failed ingest keeps the earlier copy."""
import pandas as pd
import pytest

from fixtures_gen import byo_long, truncate, write_byo
from stlink.config import Params
from stlink.data.formats import DataError, load_raw
from stlink.data.ingest import ingest


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def params(tmp_path):
    p = Params()
    p.data.dataset, p.data.source, p.data.path = "city", "byo", str(tmp_path / "src")
    p.data.channels = ["speed", "flow"]
    ts = pd.date_range("2024-05-06", periods=48, freq="5min")
    readings = byo_long(ts, ["A1", "B7"]).rename(columns={"value": "speed"})
    sensors = pd.DataFrame({"sensor_id": ["A1", "B7"], "lat": [34.05, 34.06], "lon": [-118.25, -118.24]})
    edges = pd.DataFrame({"from": ["A1"], "to": ["B7"], "distance": [1.2]})
    write_byo(tmp_path / "src", readings, sensors, edges, fmt="parquet")
    return p


def test_ingest_keeps_the_source_files_and_their_checksums(params, tmp_path):
    out = ingest(params, out_dir=tmp_path / "raw")
    raw = load_raw(out)
    assert raw.sensor_ids == ["A1", "B7"] and raw.channels == ["speed", "flow"]
    assert set(raw.meta["files"]) == {"readings.parquet", "sensors.csv", "edges.csv"}
    assert {p.name for p in (out / "source").iterdir()} == {"readings.parquet", "sensors.csv", "edges.csv"}


@pytest.mark.parametrize("breakage", ["truncated parquet", "missing column", "bad checksum"])
def test_a_failed_ingest_leaves_the_earlier_copy_untouched(params, tmp_path, breakage):
    out = ingest(params, out_dir=tmp_path / "raw")
    before = snapshot(out)
    src = tmp_path / "src"
    if breakage == "truncated parquet":
        truncate(src / "readings.parquet")
        match = "readings.parquet"
    elif breakage == "missing column":
        pd.read_csv(src / "edges.csv").drop(columns=["to"]).to_csv(src / "edges.csv", index=False)
        match = "edges.csv.*to"
    else:
        params.data.sha256 = {"sensors.csv": "0" * 64}
        match = "sensors.csv"
    with pytest.raises(DataError, match=match):
        ingest(params, out_dir=tmp_path / "raw")
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")] == []
