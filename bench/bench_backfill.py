"""Backfill benchmark: every issue time of ``--days`` days of LOS-LOOP-sized data through the batch-forecast
flow (``flows.forecast.batch_forecast``) on the thread runner and on Dask LocalClusters of 1 and 2 workers.

    # the full measurement (issue 10): 30 days x 207 sensors at 5 minutes
    python bench/bench_backfill.py --days 30 --sensors 207 --out bench/results/backfill_30d.json
    # small, to check it works (0.05 days = 14 issue times)
    python bench/bench_backfill.py --days 0.05 --sensors 207 --chunks 2

Data: LOS-LOOP itself is one week, so the input is the project's synthetic simulator
(``stlink.data.synthetic.simulate``) configured to ``--sensors`` sensors (three corridors with at least
that many sensors, cut to the first ``--sensors``) at 5 minutes over ``--days`` days (rounded up) plus
one day before them for the first windows; written as a processed dataset (values, mask, timestamps).
The backfill covers every 5-minute issue time of the last ``--days`` days.

Model: ``--model`` (an exported ``model.onnx`` with its card, for ``--sensors`` = its sensor count; the
data's sensor ids are renamed to the card's) or, by default, an untrained model of the ``params.yaml``
architecture (``bench/bench_onnx.py``'s ``spec_for`` / ``build``, seeded) exported with
``stlink.export.onnx_export.export_onnx`` (parity checked).  Speed does not depend on training.

Each runner runs in its own process (``python bench/bench_backfill.py --worker ...``) that calls the flow
once with ``score.intra_op_threads=1`` (one core per task; a Dask worker has one thread) and
``monitor.after_forecast=false`` (the drift check and the report are not scoring); Prefect runs on a
temporary local server (``prefect_test_harness``).  Measured per runner: the flow's wall time, rows/s and
forecasts/s, and the peak of the summed RSS of the process tree (the flow process and every Dask worker
and nanny it starts), sampled every ``--sample-s`` seconds by this parent with psutil; the Prefect
server's processes are left out of that sum (reported apart).  The outputs of all runners are
compared row group by row group (``row_identical``) and byte for byte (``byte_identical``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------
# data and model


def simulate_processed(folder: Path, n_sensors: int, days: int, seed: int = 0) -> dict:
    """``days + 1`` days of simulated 5-minute speeds of ``n_sensors`` sensors -> a processed dataset folder."""
    import pandas as pd

    from stlink.config import SyntheticConfig
    from stlink.data.formats import ProcessedData, save_processed
    from stlink.data.prepare import to_tensors
    from stlink.data.synthetic import simulate

    corridors = 3 if n_sensors >= 6 else 1
    per = -(-n_sensors // (2 * corridors))                                  # N = corridors x 2 x per >= n_sensors
    raw = simulate(SyntheticConfig(n_corridors=corridors, sensors_per_corridor=max(per, 2), days=days + 1,
                                   freq_minutes=5, seed=seed))
    keep = [str(s) for s in raw.sensors["sensor_id"].astype(str)][:n_sensors]
    raw.readings = raw.readings[raw.readings["sensor_id"].astype(str).isin(keep)].reset_index(drop=True)
    raw.sensors = raw.sensors[raw.sensors["sensor_id"].astype(str).isin(keep)].reset_index(drop=True)
    values, mask, grid = to_tensors(raw, 0.0)                               # (T, N, C), (T, N), (T,)
    ids = [str(s) for s in raw.sensors["sensor_id"]]
    n = len(ids)
    meta = {"dataset": "backfill-bench", "source": "synthetic", "freq": "5min", "freq_seconds": 300,
            "steps_per_day": 288, "null_value": 0.0, "channels": list(raw.channels)[:1], "units": ["mph"],
            "n_steps": len(grid), "n_sensors": n, "splits": {"train": [0, len(grid)], "val": [0, 0],
                                                            "test": [0, 0]}}
    save_processed(ProcessedData(values=values[..., :1].astype(np.float32), mask=mask,
                                 timestamps=pd.DatetimeIndex(grid).to_numpy("datetime64[ns]"),
                                 adjacency=np.eye(n, dtype=np.float32), sensor_ids=ids, meta=meta), folder)
    return {"sensors": n, "steps": len(grid), "first": str(grid[0]), "last": str(grid[-1])}


def rename_sensors(folder: Path, sensor_ids: list[str]) -> None:
    """A given model's sensor ids on the simulated data (same count)."""
    path = folder / "sensor_ids.json"
    have = json.loads(path.read_text())
    if len(have) != len(sensor_ids):
        raise SystemExit(f"--model has {len(sensor_ids)} sensors, the data {len(have)}: pass --sensors {len(sensor_ids)}")
    path.write_text(json.dumps(list(sensor_ids)))


def untrained_model(work: Path, args) -> Path:
    """The params.yaml architecture, seeded, exported to ONNX (bench_onnx.py's helpers)."""
    from bench_onnx import build, spec_for

    from stlink.export.onnx_export import export_onnx

    spec = spec_for(argparse.Namespace(model_dir=None, cache_dir=args.cache_dir, params=args.params,
                                       backbone=args.backbone, n_sensors=args.sensors))
    ids = json.loads((work / "data" / "sensor_ids.json").read_text())
    path = work / "model" / "model.onnx"
    t0 = time.perf_counter()
    rec = export_onnx(build(spec), path, n_sensors=spec["n_sensors"], input_len=spec["input_len"], n_channels=1,
                      meta={"steps_per_day": 288, "freq_seconds": 300, "freq": "5min", "sensor_ids": ids,
                            "channels": ["speed"], "units": ["mph"], "bounds": {"speed": [-1.0e+9, 1.0e+9]}})
    print(f"exported the untrained {spec['model'].get('backbone')} model (N={spec['n_sensors']}) in "
          f"{time.perf_counter() - t0:.0f} s, parity passed: {rec['passed']}", flush=True)
    return path


# ---------------------------------------------------------------------------------------------
# one runner (a child process)


def worker(args) -> None:
    """Run the flow once on ``args.runner``; print one JSON line with the flow's own wall time."""
    import logging

    from prefect.testing.utilities import prefect_test_harness

    from flows.forecast import batch_forecast

    logging.getLogger("distributed").setLevel(logging.ERROR)
    overrides = ["score.device=cpu", "score.intra_op_threads=1", "score.inter_op_threads=0",
                 "monitor.after_forecast=false", f"score.batch_size={args.batch_size}",
                 "validation.bounds={speed: [-1.0e+9, 1.0e+9]}", "validation.data_docs=false"]
    with prefect_test_harness(server_startup_timeout=900):  # a loaded machine starts it slowly
        print("READY", flush=True)
        t0 = time.perf_counter()
        result = batch_forecast(params_path=args.params, overrides=overrides, model_uri=args.model,
                                input=args.input, output=args.output, start=args.start, chunks=args.chunks,
                                task_runner=args.runner, fmt="parquet")
        seconds = time.perf_counter() - t0
        print("RESULT " + json.dumps({"seconds": seconds, "rows": result["rows"],
                                      "issue_times": result["issue_times"], "chunks": result["chunks"]}), flush=True)


def is_prefect_server(p) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except Exception:
        return False
    return "uvicorn" in cmd or "prefect.server" in cmd or "prefect server" in cmd


def tree_rss(root) -> tuple[float, float]:
    """(MB of the tree without the Prefect server, MB of the server's processes)."""
    import psutil

    ours = server = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    for p in procs:
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        if is_prefect_server(p):
            server += rss
        else:
            ours += rss
    return ours / 2**20, server / 2**20


def run_one(runner: str, out: Path, args, work: Path, model: Path, start: str) -> dict:
    import psutil

    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--runner", runner, "--params", args.params,
           "--model", str(model), "--input", str(work / "data"), "--output", str(out), "--start", start,
           "--chunks", str(args.chunks), "--batch-size", str(args.batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PREFECT_LOGGING_LEVEL": "WARNING"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = {"ours": 0.0, "server": 0.0, "after_ready": 0.0}
    ready = threading.Event()
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            ours, server = tree_rss(root)
            peak["ours"], peak["server"] = max(peak["ours"], ours), max(peak["server"], server)
            stop.wait(args.sample_s)

    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("READY"):
                peak["after_ready"] = tree_rss(root)[0]
                ready.set()

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read, daemon=True)]
    for t in threads:
        t.start()
    err = proc.stderr.read()
    proc.wait()
    stop.set()
    for t in threads:
        t.join(timeout=5)
    total = time.perf_counter() - t0
    res = [json.loads(ln[len("RESULT "):]) for ln in lines if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not res:
        raise SystemExit(f"{runner}: the flow failed (exit {proc.returncode}):\n{err[-4000:]}")
    r = res[0]
    return {"runner": runner, "seconds": r["seconds"], "process_seconds": total, "rows": r["rows"],
            "issue_times": r["issue_times"], "chunks": r["chunks"], "rows_per_s": r["rows"] / r["seconds"],
            "forecasts_per_s": r["issue_times"] / r["seconds"], "peak_rss_mb": peak["ours"],
            "rss_before_flow_mb": peak["after_ready"], "prefect_server_peak_rss_mb": peak["server"],
            "output_mb": out.stat().st_size / 2**20}


def same_rows(a: Path, b: Path) -> bool:
    """Row group by row group equality of two Parquet tables (bounded memory)."""
    import pyarrow.parquet as pq

    fa, fb = pq.ParquetFile(a), pq.ParquetFile(b)
    if fa.metadata.num_rows != fb.metadata.num_rows or fa.schema_arrow != fb.schema_arrow:
        return False
    ia = fa.iter_batches(batch_size=1 << 16)
    ib = fb.iter_batches(batch_size=1 << 16)
    for x, y in zip(ia, ib):
        if not x.equals(y):
            return False
    return True


def sha256(path: Path) -> str:
    from stlink.io import sha256_file

    return sha256_file(path)


# ---------------------------------------------------------------------------------------------
# parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--days", type=float, default=30, help="days of issue times to backfill (every 5 minutes; "
                    "a fraction for a quick check, e.g. 0.05 = 14 issue times)")
    ap.add_argument("--sensors", type=int, default=207, help="sensors (207 = LOS-LOOP)")
    ap.add_argument("--model", default=None, help="an exported model.onnx (default: untrained params.yaml model)")
    ap.add_argument("--runners", default="threads:2,dask:1,dask:2")
    ap.add_argument("--chunks", type=int, default=None, help="issue-time ranges (flow tasks); default one per day")
    ap.add_argument("--batch-size", type=int, default=None, help="score.batch_size (default: params.yaml)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--backbone", default=None, help="override model.backbone of the untrained model (e.g. tiny)")
    ap.add_argument("--cache-dir", default=str(ROOT / "models" / "backbones"))
    ap.add_argument("--work", default=str(ROOT / "bench" / "work" / "backfill"))
    ap.add_argument("--sample-s", type=float, default=0.2)
    ap.add_argument("--out", default=None, help="JSON with every figure")
    # child mode
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--runner", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--input", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--output", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--start", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    from stlink.config import load_params

    args.params = str(Path(args.params).resolve())
    args.batch_size = args.batch_size or load_params(args.params).score.batch_size
    args.chunks = args.chunks or max(2, round(args.days))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = simulate_processed(work / "data", args.sensors, math.ceil(args.days))
    print(f"simulated {data['sensors']} sensors x {data['steps']} steps ({data['first']} .. {data['last']}) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    if args.model:
        from stlink.export.card import read_card

        model = Path(args.model).resolve()
        rename_sensors(work / "data", read_card(model).sensor_ids)
    else:
        model = untrained_model(work, args)
    import pandas as pd

    start = str(pd.Timestamp(data["last"]) - pd.Timedelta(days=args.days) + pd.Timedelta(minutes=5))
    runs, outputs = [], {}
    for runner in args.runners.split(","):
        out = work / "out" / runner.replace(":", "-") / "forecast.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        r = run_one(runner, out, args, work, model, start)
        runs.append(r)
        outputs[runner] = out
        print(f"{runner}: {r['rows']} rows ({r['issue_times']} issue times, {r['chunks']} chunks) in "
              f"{r['seconds']:.1f} s = {r['rows_per_s']:.0f} rows/s, {r['forecasts_per_s']:.1f} forecasts/s; "
              f"peak RSS of the tree {r['peak_rss_mb']:.0f} MB (Prefect server apart: "
              f"{r['prefect_server_peak_rss_mb']:.0f} MB)", flush=True)
    ref = next(iter(outputs))
    identical = {k: same_rows(outputs[ref], p) for k, p in outputs.items()}
    byte_same = {k: sha256(outputs[ref]) == sha256(p) for k, p in outputs.items()}
    load = os.getloadavg()
    result = {"days": args.days, "sensors": data["sensors"], "start": start, "end": data["last"],
              "model": str(model) if args.model else "untrained params.yaml model", "backbone": args.backbone,
              "batch_size": args.batch_size, "runs": runs, "row_identical_to": ref, "row_identical": identical,
              "byte_identical": byte_same, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                         "loadavg_end": load}}
    print()
    print("| runner | issue times | rows | wall s | rows/s | forecasts/s | peak RSS MB (tree) | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['runner']} | {r['issue_times']} | {r['rows']} | {r['seconds']:.1f} | {r['rows_per_s']:.0f} | "
              f"{r['forecasts_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {identical[r['runner']]} |")
    print(f"\nload average at the end: {load[0]:.1f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
