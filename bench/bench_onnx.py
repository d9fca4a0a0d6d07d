"""Forecasts per second and peak memory: onnxruntime vs PyTorch eager, same inputs, same batch sizes.

    python bench/bench_onnx.py                                   # tiny and smollm2 (2 layers), 36 sensors
    python bench/bench_onnx.py --backbones tiny --batch-sizes 1,8,32 --n-sensors 170

For each backbone the parent process builds the forecaster (seeded; LoRA applied, then merged),
exports it with ``stlink.export.onnx_export.export_onnx`` (parity checked) and writes the input
batches to an ``.npz``.  Each engine then runs in its own process, so that peak memory (VmHWM)
belongs to that engine alone: ``ort`` loads only onnxruntime and numpy (the deployment
footprint, no torch import), ``torch`` rebuilds the model and loads the exported weights.  A
"forecast" is one input window -> H steps for all N sensors.  Per batch size: warm-up calls,
then ``--rounds`` timed rounds (``--min-seconds`` in all); each engine's worker runs
``--repeats`` times, alternating engines.  The best round is the headline figure (as ``timeit``
does: on a shared machine noise only ever slows a round down), the median round is shown beside
it.  ``--threads`` sets the intra-op threads of both engines (0 = each library's default).  The
outputs of both engines on one batch of 8 are compared as a sanity check.

The smollm2 backbone needs the converted safetensors folder ``models/backbones/smollm2``
(``stlink backbone``); it is converted on first use (about 30 s).  Results: a markdown table
on stdout and the raw figures in ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM).

    Not ``getrusage().ru_maxrss``: Linux carries that across fork+exec, so a worker would report
    its parent's peak.
    """
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024.0  # KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------------------------------------
# the model (built identically in the parent and the torch worker)


def build(spec: dict):
    """The seeded forecaster of ``spec`` with LoRA merged, in eval mode."""
    import torch

    from stlink.config import ModelConfig
    from stlink.model import build_forecaster, merge_lora

    n, L = spec["n_sensors"], spec["input_len"]
    g = np.random.default_rng(spec["seed"])
    ring = np.eye(n, k=1) + np.eye(n, k=-1) + np.eye(n, k=n - 1) + np.eye(n, k=-(n - 1))
    adjacency = (np.eye(n) + ring).astype(np.float32)                      # (N, N) a ring road
    mcfg = ModelConfig(**spec["model"])
    keys = g.standard_normal((mcfg.memory_size, L)).astype(np.float32)      # (M, L)
    torch.manual_seed(spec["seed"])
    model = build_forecaster(mcfg, n_sensors=n, n_channels=1, input_len=L, output_len=spec["output_len"],
                             steps_per_day=spec["steps_per_day"], adjacency=adjacency, scaler_mean=[50.0],
                             scaler_std=[12.0], memory_keys=keys, cache_dir=ROOT / "models" / "backbones")
    return merge_lora(model).eval()


def make_inputs(spec: dict, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Speed-like windows with 5 % missing readings and consistent time features (numpy only)."""
    g = np.random.default_rng(seed)
    L, n, spd = spec["input_len"], spec["n_sensors"], spec["steps_per_day"]
    values = (50.0 + 12.0 * g.standard_normal((batch, L, n, 1))).astype(np.float32)  # (B, L, N, 1)
    mask = g.random((batch, L, n)) >= 0.05                                            # (B, L, N)
    slot = g.integers(0, 7 * spd, size=(batch, 1)) + np.arange(L)                     # (B, L)
    return {"values": values, "mask": mask, "tod": ((slot % spd) / spd).astype(np.float32),
            "dow": ((slot // spd) % 7).astype(np.int64)}


# ---------------------------------------------------------------------------------------------
# workers (one process per engine)


def timed(run, feed: dict, min_seconds: float, warmup: int, rounds: int) -> list[float]:
    """Seconds per call of ``run(feed)`` in each of ``rounds`` rounds of at least ``min_seconds / rounds``."""
    for _ in range(warmup):
        run(feed)
    per_call = []
    for _ in range(rounds):
        iters, t0 = 0, time.perf_counter()
        while True:
            run(feed)
            iters += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds / rounds and iters >= 2:
                break
        per_call.append(elapsed / iters)
    return per_call


def worker(engine: str, spec: dict, inputs: Path, onnx_path: Path, out: Path, args) -> None:
    base = current_rss_mb()
    data = np.load(inputs)
    t0 = time.perf_counter()
    if engine == "ort":
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])

        def run(feed):
            return session.run(["forecast"], feed)[0]

        threads = f"intra_op_num_threads = {args.threads or 'default (physical cores)'}"
    else:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        model = build(spec)
        model.load_state_dict(torch.load(onnx_path.with_suffix(".pt"), weights_only=True), strict=True)

        def run(feed):
            with torch.inference_mode():
                return model(*(torch.from_numpy(feed[k]) for k in ("values", "mask", "tod", "dow"))).numpy()

        threads = f"torch.get_num_threads() = {torch.get_num_threads()}"
    load_s = time.perf_counter() - t0
    loaded = current_rss_mb()
    rows = []
    for b in args.batch_sizes:
        feed = {k: data[f"{k}_{b}"] for k in ("values", "mask", "tod", "dow")}
        rows.append({"batch": b, "seconds_per_call": timed(run, feed, args.min_seconds, args.warmup, args.rounds),
                     "peak_rss_mb": peak_rss_mb()})
    check = run({k: data[f"{k}_check"] for k in ("values", "mask", "tod", "dow")})
    np.save(out.with_suffix(".npy"), check)
    out.write_text(json.dumps({"engine": engine, "rss_before_load_mb": base, "rss_after_load_mb": loaded,
                               "load_s": load_s, "threads": threads, "rows": rows,
                               "torch_imported": "torch" in sys.modules}))


# ---------------------------------------------------------------------------------------------
# parent


BACKBONES = {
    "tiny": {"backbone": "tiny", "n_layers": 2},
    "smollm2": {"backbone": "smollm2", "n_layers": 2},
}


def spec_for(backbone: str, args) -> dict:
    return {"model": BACKBONES[backbone], "n_sensors": args.n_sensors, "input_len": 12, "output_len": 12,
            "steps_per_day": 288, "seed": 0}


def bench_backbone(backbone: str, args, work: Path) -> dict:
    from stlink.export.onnx_export import export_onnx

    spec = spec_for(backbone, args)
    t0 = time.perf_counter()
    model = build(spec)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    onnx_path = work / f"{backbone}.onnx"
    t0 = time.perf_counter()
    export = export_onnx(model, onnx_path, n_sensors=spec["n_sensors"], input_len=12, n_channels=1,
                         meta={"steps_per_day": 288})
    export_s = time.perf_counter() - t0
    import torch

    torch.save(model.state_dict(), onnx_path.with_suffix(".pt"))  # the torch worker runs exactly these weights
    del model
    inputs = work / f"{backbone}_inputs.npz"
    arrays = {}
    for b in [*args.batch_sizes, "check"]:
        feed = make_inputs(spec, 8 if b == "check" else b, seed=999 if b == "check" else b)
        arrays.update({f"{k}_{b}": v for k, v in feed.items()})
    np.savez(inputs, **arrays)
    runs: dict[str, list[dict]] = {"ort": [], "torch": []}
    for _ in range(args.repeats):  # engines alternate, so a noisy spell on a shared machine hits both
        for engine in runs:
            out = work / f"{backbone}_{engine}.json"
            cmd = [sys.executable, __file__, "--worker", engine, "--spec", json.dumps(spec), "--inputs",
                   str(inputs), "--onnx", str(onnx_path), "--result", str(out), "--batch-sizes",
                   ",".join(map(str, args.batch_sizes)), "--min-seconds", str(args.min_seconds), "--warmup",
                   str(args.warmup), "--rounds", str(args.rounds), "--threads", str(args.threads)]
            subprocess.run(cmd, check=True, cwd=ROOT)
            runs[engine].append(json.loads(out.read_text()))
    results = {engine: summarise(r) for engine, r in runs.items()}
    diff = float(np.abs(np.load(work / f"{backbone}_ort.npy") - np.load(work / f"{backbone}_torch.npy")).max())
    return {"backbone": backbone, "spec": spec, "params": n_params, "build_s": build_s, "export_s": export_s,
            "onnx_mb": onnx_path.stat().st_size / 2**20, "exporter": export["exporter"],
            "parity": {k: export[k] for k in ("max_abs_diff", "tolerance", "passed")},
            "engines_max_abs_diff": diff, "results": results}


def summarise(runs: list[dict]) -> dict:
    """Pool the worker runs of one engine: best round (timeit-style) and median round per batch size."""
    rows = []
    for i, first in enumerate(runs[0]["rows"]):
        calls = [t for r in runs for t in r["rows"][i]["seconds_per_call"]]
        b = first["batch"]
        rows.append({"batch": b, "forecasts_per_s": b / min(calls), "median_forecasts_per_s": b / float(np.median(calls)),
                     "ms_per_batch": 1e3 * min(calls), "rounds": len(calls),
                     "peak_rss_mb": max(r["rows"][i]["peak_rss_mb"] for r in runs)})
    keep = ("threads", "torch_imported")
    return {**{k: runs[0][k] for k in keep}, "rss_after_load_mb": max(r["rss_after_load_mb"] for r in runs),
            "load_s": min(r["load_s"] for r in runs), "rows": rows}


def table(all_results: list[dict]) -> str:
    lines = ["| backbone | engine | batch | forecasts/s (best round) | forecasts/s (median round) | ms/batch (best) "
             "| peak RSS MB | RSS after load MB | torch imported |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in all_results:
        for engine in ("ort", "torch"):
            e = r["results"][engine]
            for row in e["rows"]:
                lines.append(f"| {r['backbone']} | {'onnxruntime' if engine == 'ort' else 'PyTorch eager'} | "
                             f"{row['batch']} | {row['forecasts_per_s']:.1f} | {row['median_forecasts_per_s']:.1f} | "
                             f"{row['ms_per_batch']:.2f} | "
                             f"{row['peak_rss_mb']:.0f} | {e['rss_after_load_mb']:.0f} | {e['torch_imported']} |")
    lines.append("")
    for r in all_results:
        speed = {b["batch"]: b["forecasts_per_s"] for b in r["results"]["ort"]["rows"]}
        ratio = ", ".join(f"batch {row['batch']}: {speed[row['batch']] / row['forecasts_per_s']:.2f}x"
                          for row in r["results"]["torch"]["rows"])
        lines.append(f"- {r['backbone']}: {r['params'] / 1e6:.2f} M parameters, N={r['spec']['n_sensors']} "
                     f"sensors, threads: {r['results']['ort']['threads']} / {r['results']['torch']['threads']}, "
                     f"export {r['export_s']:.1f} s ({r['exporter']}, {r['onnx_mb']:.1f} MB), parity max "
                     f"|diff| {r['parity']['max_abs_diff']:.2g} (passed: {r['parity']['passed']}), onnxruntime vs "
                     f"PyTorch on the check batch {r['engines_max_abs_diff']:.2g}; onnxruntime speed-up {ratio}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="tiny,smollm2", help="comma list of: " + ", ".join(BACKBONES))
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--n-sensors", type=int, default=36, help="36 = the default synthetic network")
    p.add_argument("--min-seconds", type=float, default=3.0, help="timed seconds per batch size, at least")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per batch size and worker run")
    p.add_argument("--repeats", type=int, default=3, help="worker runs per engine, alternating engines")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads of both engines; 0 = library default")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx.json"))
    p.add_argument("--worker", choices=["ort", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.worker:
        worker(args.worker, json.loads(args.spec), Path(args.inputs), Path(args.onnx), Path(args.result), args)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        for backbone in args.backbones.split(","):
            results.append(bench_backbone(backbone, args, Path(tmp)))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    text = table(results)
    print(f"machine: {machine}\n\n{text}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
