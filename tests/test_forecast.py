"""Batch forecasting with onnxruntime on CPU: output table, backfill, devices, per-sensor status, bad inputs,
killed runs, output location checked before scoring."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_processed, tiny_params, trained_like
from stlink import pipeline
from stlink.config import DataConfig, ValidationConfig
from stlink.data.formats import load_processed, save_processed
from stlink.data.windows import time_features
from stlink.errors import ConfigError, DataError, ResourceError, StlinkError
from stlink.export.card import ExportError, sidecar_path
from stlink.export.onnx_export import export_onnx
from stlink.scoring import (OUTPUT_COLUMNS, DeviceError, OutputValidationError, forecast, make_session,
                            validate_output)

N, L, H = 4, 12, 12
FREQ = pd.Timedelta(minutes=30)  # make_processed: 48 steps per day


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A small processed dataset, the tiny forecaster (non-zero LoRA) and its ONNX export."""
    tmp = tmp_path_factory.mktemp("forecast")
    folder = make_processed(tmp, N=N)
    data = load_processed(folder)
    params = tiny_params()
    model, _ = trained_like(params, data, L, H)
    path = tmp / "model" / "model.onnx"
    rec = export_onnx(model, path, n_sensors=N, input_len=L, n_channels=1,
                      meta={**data.meta, "sensor_ids": data.sensor_ids, "bounds": {"speed": [0.0, 120.0]}})
    assert rec["passed"]
    return {"folder": folder, "data": data, "model": model, "onnx": path, "params": params}


def torch_forecast(s, end: int, masked: tuple[int, ...] = ()) -> np.ndarray:
    """The PyTorch model on the window of processed steps [end - L + 1, end], (H, N); sensors ``masked``
    have their whole window masked (value = the null value 0), as the scorer does for unusable sensors."""
    d = s["data"]
    tod, dow = time_features(d.timestamps)
    sl = slice(end - L + 1, end + 1)
    values, mask = d.values[sl].copy(), d.mask[sl].copy()
    values[:, list(masked)] = 0.0
    mask[:, list(masked)] = False
    args = (torch.as_tensor(values[None]), torch.as_tensor(mask[None]),
            torch.as_tensor(tod[sl][None]), torch.as_tensor(dow[sl][None]))
    with torch.no_grad():
        return s["model"](*args)[0].numpy()


def as_matrix(df: pd.DataFrame, issued) -> np.ndarray:
    """Rows of one issue time -> (H, N) in sensor order s0..s3."""
    one = df[df["issued_at"] == pd.Timestamp(issued)]
    return one.pivot(index="horizon_step", columns="sensor_id", values="value")[[f"s{i}" for i in range(N)]].to_numpy()


def readings_csv(s, path: Path, n_steps: int = 20, edit=None) -> Path:
    """The last ``n_steps`` of the processed data as a long readings CSV (missing = the null value 0)."""
    d = s["data"]
    ts = pd.DatetimeIndex(d.timestamps[-n_steps:])
    df = pd.DataFrame({"timestamp": np.repeat(ts, N), "sensor_id": np.tile(d.sensor_ids, n_steps),
                       "speed": d.values[-n_steps:, :, 0].reshape(-1)})
    if edit is not None:
        df = edit(df)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    return path


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_latest_window_of_processed_data(scored, tmp_path):
    out = tmp_path / "out" / "forecast.parquet"
    rec = forecast(scored["onnx"], scored["folder"], out, device="cpu", model_version="models:/stlink/3")
    df = pd.read_parquet(out)
    d = scored["data"]
    last = pd.Timestamp(d.timestamps[-1])
    assert list(df.columns) == ["sensor_id", "issued_at", "target_time", "horizon_step", "value", "model_version",
                                "status", "reason"]
    assert (df["status"] == "ok").all() and (df["reason"] == "").all() and rec["rows_no_forecast"] == 0
    assert len(df) == N * H and rec["rows"] == N * H and rec["provider"] == "CPUExecutionProvider"
    assert not df.duplicated(["sensor_id", "horizon_step"]).any()
    assert set(df["sensor_id"]) == set(d.sensor_ids) and set(df["horizon_step"]) == set(range(1, H + 1))
    assert (df["issued_at"] == last).all() and (df["model_version"] == "models:/stlink/3").all()
    assert (df["target_time"] == last + df["horizon_step"] * FREQ).all()
    np.testing.assert_allclose(as_matrix(df, last), torch_forecast(scored, len(d.timestamps) - 1), atol=1e-3)


def test_forecast_step_defaults_and_csv(scored, tmp_path):
    out = tmp_path / "f.csv"
    rec = pipeline.forecast_step(scored["params"], model=str(scored["onnx"]), input=scored["folder"], output=out,
                                 device="cpu", fmt="csv")
    path = Path(rec["output"])
    df = pd.read_csv(path, dtype={"sensor_id": str}, parse_dates=["issued_at", "target_time"])
    assert path == out and len(df) == N * H
    assert (df["model_version"] == f"model.onnx@sha256:{json.loads(sidecar_path(scored['onnx']).read_text())['sha256'][:12]}").all()
    assert (df["target_time"] == df["issued_at"] + df["horizon_step"] * FREQ).all()


def test_backfill_over_a_time_range(scored, tmp_path):
    d = scored["data"]
    ts = pd.DatetimeIndex(d.timestamps)
    start, end = ts[100], ts[130]
    out = tmp_path / "backfill.parquet"
    rec = forecast(scored["onnx"], scored["folder"], out, device="cpu", start=str(start), end=str(end),
                   chunk_size=8, progress=False)
    df = pd.read_parquet(out)
    assert rec["issue_times"] == 31 and len(df) == 31 * N * H
    assert sorted(df["issued_at"].unique()) == list(ts[100:131])
    assert not df.duplicated(["sensor_id", "issued_at", "horizon_step"]).any()
    for i in (100, 117, 130):
        np.testing.assert_allclose(as_matrix(df, ts[i]), torch_forecast(scored, i), atol=1e-3)
    with pytest.raises(DataError, match="first possible issue time is 2024-01-01 05:30:00"):
        forecast(scored["onnx"], scored["folder"], tmp_path / "early.parquet", device="cpu", start=str(ts[3]),
                 end=str(ts[20]))
    assert not (tmp_path / "early.parquet").exists()


def test_readings_file_gives_the_same_forecast_as_processed_data(scored, tmp_path):
    csv = readings_csv(scored, tmp_path / "in" / "readings.csv")
    out = tmp_path / "from_readings.parquet"
    forecast(scored["onnx"], csv, out, device="cpu")  # byo long CSV, validated with great-expectations too
    df = pd.read_parquet(out)
    d = scored["data"]
    np.testing.assert_allclose(as_matrix(df, d.timestamps[-1]), torch_forecast(scored, len(d.timestamps) - 1),
                               atol=1e-3)


def _last_steps(s, n_steps=16):
    d = s["data"]
    return pd.DatetimeIndex(d.timestamps[-n_steps:]), d.values[-n_steps:, :, 0]  # (T,), (T, N), null value 0


def _tgcn(s, folder: Path) -> DataConfig:
    ts, vals = _last_steps(s)
    wide = pd.DataFrame(vals, columns=s["data"].sensor_ids)
    wide.insert(0, "timestamp", ts.strftime("%Y-%m-%d %H:%M:%S"))
    wide.to_csv(folder / "speed.csv", index=False)
    return DataConfig(source="tgcn")


def _pems(s, folder: Path) -> DataConfig:
    ts, vals = _last_steps(s)
    np.savez(folder / "PEMSX.npz", data=vals[:, :, None])  # (T, N, 1)
    (folder / "PEMSX.txt").write_text("\n".join(s["data"].sensor_ids))
    return DataConfig(source="pems", start_time=str(ts[0]), freq="30min")


def _byo_wide_parquet(s, folder: Path) -> DataConfig:
    ts, vals = _last_steps(s)
    wide = pd.DataFrame(vals, columns=s["data"].sensor_ids)
    wide.insert(0, "timestamp", ts)
    wide.to_parquet(folder / "readings.parquet", index=False)
    return DataConfig(source="byo")


@pytest.mark.parametrize("write", [_tgcn, _pems, _byo_wide_parquet], ids=["tgcn", "pems", "byo-wide-parquet"])
def test_other_source_formats_give_the_same_forecast(scored, tmp_path, write):
    folder = tmp_path / "in"
    folder.mkdir()
    cfg = write(scored, folder)
    out = tmp_path / "f.parquet"
    forecast(scored["onnx"], folder, out, device="cpu", data_cfg=cfg, progress=False)
    d = scored["data"]
    np.testing.assert_allclose(as_matrix(pd.read_parquet(out), d.timestamps[-1]),
                               torch_forecast(scored, len(d.timestamps) - 1), atol=1e-3)


def test_device_cuda_fails_clearly_and_auto_reports_cpu(scored, tmp_path, capfd):
    out = tmp_path / "cuda.parquet"
    with pytest.raises(DeviceError, match="device=cuda: .*CUDA"):
        forecast(scored["onnx"], scored["folder"], out, device="cuda")
    assert not out.exists()
    _, provider = make_session(scored["onnx"], "auto")
    assert "onnxruntime" not in capfd.readouterr().err  # the CUDA loader's error lines do not leak to stderr
    rec = forecast(scored["onnx"], scored["folder"], tmp_path / "auto.parquet", device="auto", progress=False)
    assert provider == rec["provider"] == "CPUExecutionProvider" and rec["device"] == "auto"
    with pytest.raises(ConfigError, match="one of auto, cuda, cpu"):
        forecast(scored["onnx"], scored["folder"], tmp_path / "x.parquet", device="gpu")


def _drop_sensor(df):
    return df[df["sensor_id"] != "s2"]


def _rename_sensor(df):
    return df.assign(sensor_id=df["sensor_id"].replace({"s3": "x9"}))


def _irregular(df):
    ts = sorted(df["timestamp"].unique())
    return df.assign(timestamp=df["timestamp"].replace({ts[-3]: ts[-3] + pd.Timedelta(minutes=7)}))


def _gap(df):
    ts = sorted(df["timestamp"].unique())
    return df[df["timestamp"] != ts[-5]]


def _nan_burst(df):
    ts = sorted(df["timestamp"].unique())
    burst = (df["sensor_id"] == "s1") & df["timestamp"].isin(ts[-9:-1])
    return df.assign(speed=df["speed"].mask(burst))


def _every_other_step(df):
    ts = sorted(df["timestamp"].unique())
    return df[df["timestamp"].isin(ts[::2])]


def _out_of_bounds(df):
    return df.assign(speed=df["speed"].mask((df["sensor_id"] == "s0") & (df["timestamp"] == df["timestamp"].max()), 250.0))


def _duplicate(df):
    return pd.concat([df, df.tail(1)])


BAD_INPUTS = {  # structurally wrong input: the run fails, nothing is written
    "short last window": (None, 7, r"last window is too short: 7 step\(s\)"),
    "irregular last window": (_irregular, 20, r"irregular time index .* step of 37min, .* frequency is 30min"),
    "gap in last window": (_gap, 20, r"not complete: no readings of any sensor at 2024-01-08 21:30:00"),
    "wrong frequency": (_every_other_step, 30, r"wrong frequency: readings are every 60min, .* 30min"),
    "duplicate readings": (_duplicate, 20, r"sensor 's3' has 1 duplicate reading"),
    "no sensor of the model": (lambda df: df.assign(sensor_id="x" + df["sensor_id"]), 20,
                               r"none of the model's 4 sensors is in the input \(unknown sensor ids \['xs0'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_readings_give_clear_errors_and_write_nothing(scored, tmp_path, case):
    edit, n_steps, message = BAD_INPUTS[case]
    csv = readings_csv(scored, tmp_path / "in" / "readings.csv", n_steps=n_steps, edit=edit)
    out_dir = tmp_path / "out"
    with pytest.raises(DataError, match=message):
        forecast(scored["onnx"], csv, out_dir / "forecast.parquet", device="cpu")
    assert files_in(out_dir) == []


BROKEN_SENSORS = {  # one sensor's input is unusable: that sensor is not forecast, the others are, the run is green
    "missing sensor": (_drop_sensor, 2, r"no readings of this sensor in the input"),
    "unknown sensor id instead of s3": (_rename_sensor, 3, r"no readings of this sensor in the input"),
    "NaN burst": (_nan_burst, 1, r"8 consecutive missing readings in the input window \(at most 6 accepted\)"),
    "out of bounds": (_out_of_bounds, 0, r"outside the physical bounds \[0.0, 120.0\] mph, e.g. 250.0 at"),
}


@pytest.mark.parametrize("case", list(BROKEN_SENSORS))
def test_a_broken_sensor_is_marked_and_the_others_are_forecast(scored, tmp_path, case):
    edit, bad, reason = BROKEN_SENSORS[case]
    csv = readings_csv(scored, tmp_path / "in" / "readings.csv", n_steps=20, edit=edit)
    out = tmp_path / "out" / "forecast.parquet"
    rec = forecast(scored["onnx"], csv, out, device="cpu", progress=False)
    df = pd.read_parquet(out)
    assert len(df) == N * H and rec["rows_ok"] == (N - 1) * H and rec["rows_no_forecast"] == H
    broken = df[df["sensor_id"] == f"s{bad}"]
    assert (broken["status"] == "no_forecast").all() and broken["value"].isna().all()
    assert broken["reason"].str.contains(reason).all(), broken["reason"].iloc[0]
    ok = df[df["sensor_id"] != f"s{bad}"]
    assert (ok["status"] == "ok").all() and ok["value"].notna().all() and (ok["reason"] == "").all()
    assert rec["sensors_not_forecast"] == [f"s{bad}"]
    # the broken sensor's readings never reach the model: the others equal the model with its window masked
    d = scored["data"]
    want = torch_forecast(scored, len(d.timestamps) - 1, masked=(bad,))
    got = df.pivot(index="horizon_step", columns="sensor_id", values="value")[[f"s{i}" for i in range(N)]].to_numpy()
    keep = [i for i in range(N) if i != bad]
    np.testing.assert_allclose(got[:, keep], want[:, keep], atol=1e-3)


def test_backfill_through_a_sensor_outage_stays_green(scored, tmp_path):
    """Defect 9: the README's backfill over a day with a simulated outage (here: sensor s2 dark for 20 steps)
    used to abort the whole batch; now the windows that contain the outage are marked for s2 only."""
    d = scored["data"]
    broken = tmp_path / "processed"
    shutil.copytree(scored["folder"], broken)
    data = load_processed(broken)
    data.mask[200:220, 2] = False
    data.values[200:220, 2] = 0.0
    save_processed(data, broken)
    ts = pd.DatetimeIndex(d.timestamps)
    out = tmp_path / "backfill.parquet"
    rec = forecast(scored["onnx"], broken, out, device="cpu", start=str(ts[190]), end=str(ts[240]), progress=False)
    df = pd.read_parquet(out)
    assert rec["issue_times"] == 51 and len(df) == 51 * N * H
    dark = df[df["status"] == "no_forecast"]
    assert set(dark["sensor_id"]) == {"s2"}
    # windows of s2 with more than 6 of the 20 dark steps: issue times 206 .. 225 (run > 6 inside the window)
    runs = {i: min(i, 219) - max(i - L + 1, 200) + 1 for i in range(190, 241)}
    expect = sorted(ts[i] for i, r in runs.items() if r > L // 2)
    assert sorted(pd.DatetimeIndex(dark["issued_at"].unique())) == expect
    assert df.loc[df["status"] == "ok", "value"].notna().all()


def test_empty_file_is_an_error_and_writes_nothing(scored, tmp_path):
    empty = tmp_path / "in" / "readings.csv"
    empty.parent.mkdir()
    empty.write_text("")
    with pytest.raises(DataError, match="readings.csv: empty file"):
        forecast(scored["onnx"], empty, tmp_path / "out" / "f.parquet", device="cpu")
    header_only = tmp_path / "in2" / "readings.csv"
    header_only.parent.mkdir()
    header_only.write_text("timestamp,sensor_id,speed\n")
    with pytest.raises(DataError, match="header only, no rows"):
        forecast(scored["onnx"], header_only, tmp_path / "out" / "f.parquet", device="cpu")
    assert files_in(tmp_path / "out") == []


def test_refuses_a_model_whose_parity_failed_or_whose_file_changed(scored, tmp_path):
    onnx_path = tmp_path / "m" / "model.onnx"
    onnx_path.parent.mkdir()
    shutil.copy(scored["onnx"], onnx_path)
    card = json.loads(sidecar_path(scored["onnx"]).read_text())
    card["parity"]["passed"] = False
    sidecar_path(onnx_path).write_text(json.dumps(card))
    with pytest.raises(ExportError, match="parity check failed"):
        forecast(onnx_path, scored["folder"], tmp_path / "f.parquet", device="cpu")
    card["parity"]["passed"] = True
    card["sha256"] = "0" * 64
    sidecar_path(onnx_path).write_text(json.dumps(card))
    with pytest.raises(ExportError, match="re-export"):
        forecast(onnx_path, scored["folder"], tmp_path / "f.parquet", device="cpu")
    assert not (tmp_path / "f.parquet").exists()


def test_exception_inside_the_chunk_loop_leaves_no_output(scored, tmp_path):
    out = tmp_path / "new" / "deeper" / "f.parquet"

    def boom(i, rows):
        if i == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises; BaseException, not Exception

    ts = scored["data"].timestamps
    with pytest.raises(KeyboardInterrupt):
        forecast(scored["onnx"], scored["folder"], out, device="cpu", start=str(ts[50]), chunk_size=4,
                 on_chunk=boom, progress=False)
    assert not (tmp_path / "new").exists()  # the folders created for the output are gone too
    assert files_in(tmp_path) == []


KILLED = """
import sys, time
from stlink.scoring import forecast
def hook(i, rows):
    print("chunk", i, rows, "torch" in sys.modules, flush=True)
    time.sleep(60)
forecast(sys.argv[1], sys.argv[2], sys.argv[3], device="cpu", start=sys.argv[4], chunk_size=4, on_chunk=hook,
         progress=False)
"""


def test_sigkill_during_scoring_leaves_no_output_and_no_temp_file(scored, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(scored["onnx"]), str(scored["folder"]),
                             str(out_dir / "f.parquet"), str(scored["data"].timestamps[50])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        line = proc.stdout.readline()
        assert line.split() == ["chunk", "0", str(4 * N * H), "False"], proc.stderr.read()  # scoring needs no torch
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert files_in(out_dir) == []


def test_output_validation_catches_bad_tables():
    issued = pd.Timestamp("2024-01-02 10:00")
    rows = pd.DataFrame({
        "sensor_id": np.repeat(["a", "b"], 2), "issued_at": issued,
        "target_time": issued + np.tile([1, 2], 2) * FREQ, "horizon_step": np.tile([1, 2], 2),
        "value": np.array([50.0, 51.0, 52.0, 53.0], np.float32), "model_version": "v1", "status": "ok",
        "reason": ""})
    kwargs = dict(sensor_ids=["a", "b"], horizon=2, issue_times=np.array([issued.to_datetime64()]), freq=FREQ,
                  bounds=[0.0, 120.0], model_version="v1", where="out.parquet")
    validate_output(rows, **kwargs)
    bad = {
        "with NaN": rows.assign(value=[50.0, np.nan, 52.0, 53.0]),
        "outside the physical bounds": rows.assign(value=[50.0, 51.0, 520.0, 53.0]),
        "duplicate": rows.assign(horizon_step=[1, 1, 1, 2], target_time=issued + np.array([1, 1, 1, 2]) * FREQ),
        "expected one per sensor x step x issue time": rows.iloc[:3],
        "target_time": rows.assign(target_time=issued),
        "model_version": rows.assign(model_version="v2"),
        "without a reason": rows.assign(status=["ok", "ok", "no_forecast", "no_forecast"]),
        "status 'maybe'": rows.assign(status="maybe"),
    }
    for message, frame in bad.items():
        with pytest.raises(OutputValidationError, match=message):
            validate_output(frame, **kwargs)
    marked = rows.assign(status=["ok", "ok", "no_forecast", "no_forecast"], reason=["", "", "dark", "dark"],
                         value=[50.0, 51.0, np.nan, np.nan])
    assert validate_output(marked, **kwargs) == {"ok": 2, "no_forecast": 2}


def test_tighter_bounds_from_params_reject_the_input(scored, tmp_path):
    strict = ValidationConfig(bounds={"speed": [0.0, 1.0]})  # every sensor has readings above: nothing to forecast
    with pytest.raises(DataError, match=r"no sensor can be forecast.*outside the physical bounds \[0.0, 1.0\]"):
        forecast(scored["onnx"], scored["folder"], tmp_path / "f.parquet", device="cpu", validation=strict)
    assert files_in(tmp_path) == []


# --- defect 8: one-line errors, the output location checked before any scoring -----------------------------

def _count_chunks():
    calls = []
    return calls, (lambda i, rows: calls.append(i))


def test_output_naming_a_folder_or_a_read_only_place_fails_before_scoring(scored, tmp_path):
    calls, hook = _count_chunks()
    (tmp_path / "dir").mkdir()
    with pytest.raises(ConfigError, match=r"--output .*dir: is a folder; name the file"):
        forecast(scored["onnx"], scored["folder"], tmp_path / "dir", device="cpu", on_chunk=hook)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ResourceError, match=r"afile is a file, not a folder"):
        forecast(scored["onnx"], scored["folder"], tmp_path / "afile" / "f.parquet", device="cpu", on_chunk=hook)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):  # (as root every folder is writable)
            with pytest.raises(ResourceError, match=r"the folder .*ro is not writable"):
                forecast(scored["onnx"], scored["folder"], ro / "sub" / "f.parquet", device="cpu", on_chunk=hook)
    finally:
        ro.chmod(0o755)
    assert calls == []  # nothing was scored


def test_a_corrupt_onnx_whose_card_matches_is_a_one_line_error(scored, tmp_path):
    from stlink.io import sha256_file

    bad = tmp_path / "m" / "model.onnx"
    bad.parent.mkdir()
    bad.write_bytes(scored["onnx"].read_bytes()[: 2000])  # truncated
    card = json.loads(sidecar_path(scored["onnx"]).read_text())
    card["sha256"] = sha256_file(bad)  # the card matches the corrupt file
    sidecar_path(bad).write_text(json.dumps(card))
    with pytest.raises(DataError, match=r"model.onnx: onnxruntime cannot load this model \(.*\); re-export"):
        forecast(bad, scored["folder"], tmp_path / "f.parquet", device="cpu")


def test_a_card_whose_sensor_list_does_not_match_the_graph_is_refused(scored, tmp_path):
    other = tmp_path / "m" / "model.onnx"
    other.parent.mkdir()
    shutil.copy(scored["onnx"], other)
    card = json.loads(sidecar_path(scored["onnx"]).read_text())
    card["sensor_ids"] = card["sensor_ids"] + ["s4"]
    sidecar_path(other).write_text(json.dumps(card))
    with pytest.raises(DataError, match=r"the graph reads 4 sensors, its card model.json lists 5"):
        forecast(other, scored["folder"], tmp_path / "f.parquet", device="cpu")


def test_an_unreadable_start_is_a_config_error(scored, tmp_path):
    with pytest.raises(ConfigError, match=r"start='yesterday-ish': not a timestamp"):
        forecast(scored["onnx"], scored["folder"], tmp_path / "f.parquet", device="cpu", start="yesterday-ish")
    assert issubclass(ConfigError, StlinkError) and issubclass(DataError, StlinkError)


def test_gate_output_check_uses_test_split_windows_not_the_latest_window(scored, tmp_path):
    """Item 3 / issue step 5: promotion judges the model on held-out test windows; a dead latest window
    (every sensor dark at the end, so a latest-window forecast cannot run) does not block it."""
    from stlink.scoring import output_check_on_test_windows

    broken = tmp_path / "processed"
    shutil.copytree(scored["folder"], broken)
    data = load_processed(broken)
    data.mask[-10:] = False
    data.values[-10:] = 0.0
    save_processed(data, broken)
    with pytest.raises(DataError, match="no sensor can be forecast"):
        forecast(scored["onnx"], broken, tmp_path / "latest.parquet", device="cpu")
    passed, detail = output_check_on_test_windows(scored["onnx"], broken, "v1", max_windows=20, scratch=tmp_path)
    a = data.meta["splits"]["test"][0]
    ts = pd.DatetimeIndex(data.timestamps)
    assert passed, detail
    assert detail.startswith(f"{20 * N * H} forecasts on 20 test-split window(s) issued {ts[a + L - 1]} .. "
                             f"{ts[a + L + 18]}"), detail
    strict = ValidationConfig(bounds={"speed": [0.0, 1.0]})
    passed, detail = output_check_on_test_windows(scored["onnx"], broken, "v1", max_windows=5, scratch=tmp_path,
                                                  validation=strict)
    assert not passed and "no sensor can be forecast" in detail


KILLED_BACKFILL = """
import sys, time
from stlink.scoring import forecast
def hook(i, rows):
    print("chunk", i, flush=True)
    if i == 2:
        time.sleep(60)
forecast(sys.argv[1], sys.argv[2], sys.argv[3], device="cpu", start=sys.argv[4], chunk_size=4, on_chunk=hook,
         progress=False, resume=True)
"""


def test_a_killed_backfill_resumes_from_its_last_chunk_without_duplicates(scored, tmp_path):
    """Issue 10 item 5: SIGKILL midway, rerun with resume: the finished chunks are not scored again and the
    table equals an uninterrupted run's, one row per (sensor, issue time, step)."""
    ts = scored["data"].timestamps
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "f.parquet"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_BACKFILL, str(scored["onnx"]), str(scored["folder"]),
                             str(out), str(ts[-30])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        for expect in range(3):
            line = proc.stdout.readline()
            assert line.split() == ["chunk", str(expect)], proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not out.exists()
    parts = out_dir / ".f.parquet.parts"
    assert sorted(p.name for p in parts.glob("part-*.parquet")) == [f"part-00000{i}.parquet" for i in range(3)]
    scored_again = []
    rec = forecast(scored["onnx"], scored["folder"], out, device="cpu", start=str(ts[-30]), chunk_size=4,
                   on_chunk=lambda i, rows: scored_again.append(i), progress=False, resume=True)
    assert scored_again == list(range(3, 8))  # 30 issue times in chunks of 4: chunks 0-2 came from the parts
    df = pd.read_parquet(out)
    assert rec["issue_times"] == 30 and len(df) == 30 * N * H
    assert not df.duplicated(["sensor_id", "issued_at", "horizon_step"]).any()
    whole = tmp_path / "whole.parquet"
    forecast(scored["onnx"], scored["folder"], whole, device="cpu", start=str(ts[-30]), chunk_size=4, progress=False)
    pd.testing.assert_frame_equal(df, pd.read_parquet(whole))
    assert files_in(out_dir) == ["f.parquet"]  # the parts are gone


def test_output_validation_streams_one_row_group_at_a_time(scored, tmp_path, monkeypatch):
    """Issue 10 item 5 (bounded memory): the backfill's output is read back for validation one Parquet row
    group (one chunk of issue times) at a time, never as a whole table -- in ``forecast`` and in the flow's
    write step, which streams several real chunk files into the output."""
    from stlink.scoring import output as output_module

    seen: list[int] = []
    real = output_module.read_row_group

    def spy(pf, i):
        df = real(pf, i)
        seen.append(len(df))
        return df

    monkeypatch.setattr(output_module, "read_row_group", spy)
    ts = scored["data"].timestamps
    out = tmp_path / "f.parquet"
    rec = forecast(scored["onnx"], scored["folder"], out, device="cpu", start=str(ts[-30]), chunk_size=4,
                   batch_size=3, progress=False)
    per_chunk = 4 * N * H
    assert rec["rows"] == 30 * N * H and len(seen) == 8                 # 30 issue times in chunks of 4
    assert max(seen) == per_chunk and sum(seen) == rec["rows"]
    # the flow's chunk and write steps: three chunk files (real Parquet, by the scorer) -> one output
    params = tiny_params()
    whole = tmp_path / "whole.parquet"
    parts = [pipeline.forecast_chunk_step(params, scored["onnx"], str(ts[a]), str(ts[b]), input=scored["folder"],
                                          device="cpu", model_version=rec["model_version"], output=whole)
             for a, b in ((-30, -21), (-20, -11), (-10, -1))]
    assert all(Path(p).parent == pipeline.forecast_chunk_dir(whole) for p in parts)
    seen.clear()
    rows = pipeline.forecast_write_step(params, scored["onnx"], parts, [str(t) for t in ts[-30:]],
                                        rec["model_version"], whole, "parquet")
    assert rows == 30 * N * H and len(seen) == 3 and max(seen) == 10 * N * H  # one row group per 10-issue-time chunk
    pd.testing.assert_frame_equal(pd.read_parquet(whole), pd.read_parquet(out))
    pipeline.forecast_chunks_cleanup(params, whole)
    assert files_in(tmp_path) == ["f.parquet", "whole.parquet"]


def test_chunked_validation_keeps_exactly_one_row_per_key_across_chunks():
    """The running checks catch what a whole-table check catches, wherever the table is cut."""
    from stlink.scoring import validate_chunks

    issued = pd.date_range("2024-01-02 10:00", periods=3, freq=FREQ)
    rows = pd.DataFrame({
        "sensor_id": np.tile(np.repeat(["a", "b"], 2), 3), "issued_at": np.repeat(issued, 4),
        "horizon_step": np.tile([1, 2], 6), "value": np.float32(50.0), "model_version": "v1", "status": "ok",
        "reason": ""})
    rows.insert(2, "target_time", rows["issued_at"] + rows["horizon_step"].to_numpy() * FREQ)
    kwargs = dict(sensor_ids=["a", "b"], horizon=2, issue_times=issued.to_numpy(), freq=FREQ, bounds=[0.0, 120.0],
                  model_version="v1", where="out.parquet")
    for cuts in ([12], [4, 8, 12], [3, 6, 12], [1, 2, 5, 11, 12]):          # whole issue times or anywhere
        edges = [0, *cuts]
        assert validate_chunks([rows.iloc[a:b] for a, b in zip(edges, edges[1:])], **kwargs) == {"ok": 12,
                                                                                                  "no_forecast": 0}
    dup_next = pd.concat([rows.iloc[:6], rows.iloc[5:6], rows.iloc[6:]])   # a key twice, in adjacent chunks
    with pytest.raises(OutputValidationError, match="1 duplicate"):
        validate_chunks([dup_next.iloc[:6], dup_next.iloc[6:]], **kwargs)
    later = pd.concat([rows.iloc[:8], rows.iloc[0:1]])                       # an issue time back after another
    with pytest.raises(OutputValidationError, match="rows of issue time 2024-01-02 10:00:00 after rows of other"):
        validate_chunks([later.iloc[:4], later.iloc[4:8], later.iloc[8:]], **kwargs)
    with pytest.raises(OutputValidationError, match="11 rows, expected one per sensor x step x issue time"):
        validate_chunks([rows.iloc[:4], rows.iloc[4:11]], **kwargs)
    swapped = rows.copy()
    swapped.loc[11, "horizon_step"] = 1                                       # a duplicate key + a missing one
    swapped.loc[11, "target_time"] = swapped.loc[11, "issued_at"] + FREQ
    with pytest.raises(OutputValidationError, match="duplicate"):
        validate_chunks([swapped.iloc[:8], swapped.iloc[8:10], swapped.iloc[10:]], **kwargs)
