"""Forecasts per second and peak memory: PyTorch eager vs the ONNX variants, same inputs, same batch sizes.

    # a trained model (its checkpoint folder) and its processed dataset: throughput + masked test MAE
    python bench/bench_onnx.py --model-dir models/los-loop --data data/processed/los-loop
    # no trained model: the params.yaml model, seeded, on a ring road of N sensors (throughput only)
    python bench/bench_onnx.py --n-sensors 207

Engines: ``torch`` (PyTorch eager, LoRA merged, ``inference_mode``), ``fp32`` (the exported
``model.onnx``, as ``stlink export`` writes it), ``opt`` (``model.opt.onnx``, the transformer
optimiser) and ``int8`` (``model.int8.onnx``, dynamic int8), all three made by
``stlink.export`` exactly as the export step makes them (parity of fp32 and opt checked).
onnxruntime runs with ``stlink.export.optimize.session_options(threads, inter_op)``, the
scorer's own options.

Each engine runs in its own process, so that peak memory (VmHWM) belongs to that engine alone:
the ONNX workers import only onnxruntime and numpy (the scorer's footprint, no torch), the torch
worker rebuilds the model and loads the exported weights.  A "forecast" is one input window ->
H steps for all N sensors.  Per batch size: warm-up calls, then ``--rounds`` timed rounds
(``--min-seconds`` in all); each (engine, threads) worker runs ``--repeats`` times, engines
taking turns.  The best round is the headline figure (as ``timeit``: on a shared machine noise
only slows a round down), the median round is shown beside it.  With ``--data`` the masked test
MAE of every ONNX variant is measured on the test split (``--mae-windows`` evenly spaced windows,
batches of 32, one thread) with ``stlink.export.optimize.masked_mae``, the export gate's function.

The smollm2 backbone needs the converted safetensors folder (``stlink backbone``, or it is
converted on first use into ``--cache-dir``).  Results: markdown tables on stdout, the raw
figures in ``--out`` (JSON).
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
ENGINES = ("torch", "fp32", "opt", "int8")
FEED = ("values", "mask", "tod", "dow")


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
    """The forecaster of ``spec`` with LoRA merged, in eval mode: a trained checkpoint folder
    (``model_dir``) or the seeded ``model`` config on a ring road of ``n_sensors``."""
    import torch

    from stlink.config import ModelConfig
    from stlink.export.onnx_export import merged_copy
    from stlink.model import build_forecaster

    if spec.get("model_dir"):
        from stlink.training.checkpoint import load_trained

        return merged_copy(load_trained(spec["model_dir"], cache_dir=Path(spec["cache_dir"]))[0])
    n, L = spec["n_sensors"], spec["input_len"]
    g = np.random.default_rng(spec["seed"])
    ring = np.eye(n, k=1) + np.eye(n, k=-1) + np.eye(n, k=n - 1) + np.eye(n, k=-(n - 1))
    adjacency = (np.eye(n) + ring).astype(np.float32)                      # (N, N) a ring road
    mcfg = ModelConfig(**spec["model"])
    keys = g.standard_normal((mcfg.memory_size, L)).astype(np.float32)      # (M, L)
    torch.manual_seed(spec["seed"])
    model = build_forecaster(mcfg, n_sensors=n, n_channels=1, input_len=L, output_len=spec["output_len"],
                             steps_per_day=spec["steps_per_day"], adjacency=adjacency, scaler_mean=[50.0],
                             scaler_std=[12.0], memory_keys=keys, cache_dir=Path(spec["cache_dir"]))
    return merged_copy(model)


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
# workers (one process per engine and thread setting)


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
    if engine != "torch":
        import onnxruntime as ort

        from stlink.export.optimize import session_options

        ort.set_default_logger_severity(3)
        session = ort.InferenceSession(str(onnx_path), session_options(args.threads, args.inter_op),
                                       providers=["CPUExecutionProvider"])

        def run(feed):
            return session.run(["forecast"], feed)[0]

        threads = f"intra_op {args.threads or 'default'}, inter_op {args.inter_op or 'default'}"
    else:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        model = build(spec)
        model.load_state_dict(torch.load(onnx_path.with_suffix(".pt"), weights_only=True), strict=True)

        def run(feed):
            with torch.inference_mode():
                return model(*(torch.from_numpy(feed[k]) for k in FEED)).numpy()

        threads = f"torch.get_num_threads() = {torch.get_num_threads()}"
    load_s = time.perf_counter() - t0
    loaded = current_rss_mb()
    rows = []
    for b in args.batch_sizes:
        feed = {k: data[f"{k}_{b}"] for k in FEED}
        rows.append({"batch": b, "seconds_per_call": timed(run, feed, args.min_seconds, args.warmup, args.rounds),
                     "peak_rss_mb": peak_rss_mb()})
    np.save(out.with_suffix(".npy"), run({k: data[f"{k}_check"] for k in FEED}))
    out.write_text(json.dumps({"engine": engine, "rss_before_load_mb": base, "rss_after_load_mb": loaded,
                               "load_s": load_s, "threads": threads, "rows": rows,
                               "torch_imported": "torch" in sys.modules,
                               "onnx_imported_torch": engine != "torch" and "torch" in sys.modules}))


# ---------------------------------------------------------------------------------------------
# parent


def spec_for(args) -> dict:
    from stlink.config import load_params

    cache = str(Path(args.cache_dir).resolve())
    if args.model_dir:
        meta = json.loads((Path(args.model_dir) / "data_meta.json").read_text())
        cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
        return {"model_dir": str(Path(args.model_dir).resolve()), "cache_dir": cache, "model": cfg["model"],
                "n_sensors": len(meta["sensor_ids"]), "input_len": cfg["prepare"]["input_len"],
                "output_len": cfg["prepare"]["output_len"], "steps_per_day": int(meta["steps_per_day"]), "seed": 0}
    params = load_params(args.params)
    model = {k: v for k, v in vars(params.model).items()}
    if args.backbone:
        model["backbone"] = args.backbone
    return {"model_dir": None, "cache_dir": cache, "model": model, "n_sensors": args.n_sensors,
            "input_len": params.prepare.input_len, "output_len": params.prepare.output_len,
            "steps_per_day": 288, "seed": 0}


def make_variants(model, spec: dict, work: Path) -> dict:
    """model.onnx, model.opt.onnx, model.int8.onnx in ``work`` (as ``stlink export`` makes them)."""
    import onnx

    from stlink.export.onnx_export import check_parity, export_onnx
    from stlink.export.optimize import _attention_shape, optimize_graph, quantize_int8, variant_path

    path = work / "model.onnx"
    t0 = time.perf_counter()
    meta = {"steps_per_day": spec["steps_per_day"]}
    if spec.get("model_dir"):
        meta = {**json.loads((Path(spec["model_dir"]) / "data_meta.json").read_text())}
    export = export_onnx(model, path, n_sensors=spec["n_sensors"], input_len=spec["input_len"], n_channels=1, meta=meta)
    out = {"export_s": time.perf_counter() - t0, "exporter": export["exporter"],
           "parity": {k: export[k] for k in ("max_abs_diff", "tolerance", "passed")}}
    t0 = time.perf_counter()
    heads, hidden = _attention_shape(model)
    onnx.save(optimize_graph(path, num_heads=heads, hidden_size=hidden), str(variant_path(path, "opt")))
    out["optimize_s"] = time.perf_counter() - t0
    par = check_parity(model, variant_path(path, "opt"), n_sensors=spec["n_sensors"], input_len=spec["input_len"],
                       n_channels=1, steps_per_day=spec["steps_per_day"])
    out["opt_parity"] = {k: par[k] for k in ("max_abs_diff", "passed")}
    t0 = time.perf_counter()
    onnx.save(quantize_int8(variant_path(path, "opt")), str(variant_path(path, "int8")))
    out["quantize_s"] = time.perf_counter() - t0
    out["mb"] = {e: (path if e == "fp32" else variant_path(path, e)).stat().st_size / 2**20 for e in ("fp32", "opt", "int8")}
    return out


def measure_mae(path: Path, spec: dict, args) -> dict:
    """Masked test MAE of each ONNX variant on ``args.data`` (the export gate's functions)."""
    from stlink.export.optimize import gate_windows, masked_mae, session_options, variant_path

    w = gate_windows(args.data, input_len=spec["input_len"], output_len=spec["output_len"],
                     max_windows=args.mae_windows, batch_size=32)
    maes = {e: masked_mae(path if e == "fp32" else variant_path(path, e), w, options=session_options(1, 0))
            for e in ("fp32", "opt", "int8")}
    return {"windows": w.n_windows, "mae": maes,
            "relative_change": {e: maes[e] / maes["fp32"] - 1 for e in maes}}


def bench(args, work: Path) -> dict:
    import torch

    spec = spec_for(args)
    t0 = time.perf_counter()
    model = build(spec)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    variants = make_variants(model, spec, work)
    path = work / "model.onnx"
    torch.save(model.state_dict(), path.with_suffix(".pt"))  # the torch worker runs exactly these weights
    del model
    mae = measure_mae(path, spec, args) if args.data else None
    inputs = work / "inputs.npz"
    arrays = {}
    for b in [*args.batch_sizes, "check"]:
        feed = make_inputs(spec, 8 if b == "check" else b, seed=999 if b == "check" else b)
        arrays.update({f"{k}_{b}": v for k, v in feed.items()})
    np.savez(inputs, **arrays)
    from stlink.export.optimize import variant_path

    runs: dict[tuple[str, int], list[dict]] = {(e, t): [] for t in args.threads for e in args.engines}
    for _ in range(args.repeats):  # engines alternate, so a noisy spell on a shared machine hits all of them
        for engine, threads in runs:
            out = work / f"{engine}_{threads}.json"
            onnx_path = path if engine in ("fp32", "torch") else variant_path(path, engine)
            cmd = [sys.executable, __file__, "--worker", engine, "--spec", json.dumps(spec), "--inputs", str(inputs),
                   "--onnx", str(onnx_path), "--result", str(out), "--batch-sizes",
                   ",".join(map(str, args.batch_sizes)), "--min-seconds", str(args.min_seconds), "--warmup",
                   str(args.warmup), "--rounds", str(args.rounds), "--threads", str(threads),
                   "--inter-op", str(args.inter_op)]
            subprocess.run(cmd, check=True, cwd=ROOT)
            runs[(engine, threads)].append(json.loads(out.read_text()))
    check = {e: np.load(work / f"{e}_{args.threads[0]}.npy") for e in args.engines}
    ref = check.get("torch", check[args.engines[0]])
    return {"spec": {k: v for k, v in spec.items() if k != "cache_dir"}, "params": n_params, "build_s": build_s,
            **variants, "mae": mae, "check_max_abs_diff_vs_torch": {e: float(np.abs(c - ref).max()) for e, c in check.items()},
            "results": [{"engine": e, "threads": t, **summarise(r)} for (e, t), r in runs.items()]}


def summarise(runs: list[dict]) -> dict:
    """Pool the worker runs of one engine: best round (timeit-style) and median round per batch size."""
    rows = []
    for i, first in enumerate(runs[0]["rows"]):
        calls = [t for r in runs for t in r["rows"][i]["seconds_per_call"]]
        b = first["batch"]
        rows.append({"batch": b, "forecasts_per_s": b / min(calls), "median_forecasts_per_s": b / float(np.median(calls)),
                     "ms_per_batch": 1e3 * min(calls), "rounds": len(calls),
                     "peak_rss_mb": max(r["rows"][i]["peak_rss_mb"] for r in runs)})
    return {"threads_used": runs[0]["threads"], "torch_imported": runs[0]["torch_imported"],
            "rss_after_load_mb": max(r["rss_after_load_mb"] for r in runs),
            "load_s": min(r["load_s"] for r in runs), "rows": rows}


NAMES = {"torch": "PyTorch eager", "fp32": "ONNX fp32 (model.onnx)", "opt": "ONNX optimised (model.opt.onnx)",
         "int8": "ONNX int8 (model.int8.onnx)"}


def table(r: dict) -> str:
    lines = ["| engine | threads | batch | forecasts/s (best) | forecasts/s (median) | x PyTorch (best) "
             "| ms/batch (best) | peak RSS MB |", "|---|---|---|---|---|---|---|---|"]
    torch_best = {(x["threads"], row["batch"]): row["forecasts_per_s"] for x in r["results"] if x["engine"] == "torch"
                  for row in x["rows"]}
    for x in sorted(r["results"], key=lambda x: (x["threads"], ENGINES.index(x["engine"]))):
        for row in x["rows"]:
            base = torch_best.get((x["threads"], row["batch"]))
            ratio = f"{row['forecasts_per_s'] / base:.2f}" if base else "-"
            lines.append(f"| {NAMES[x['engine']]} | {x['threads']} | {row['batch']} | {row['forecasts_per_s']:.1f} | "
                         f"{row['median_forecasts_per_s']:.1f} | {ratio} | {row['ms_per_batch']:.1f} | "
                         f"{row['peak_rss_mb']:.0f} |")
    s = r["spec"]
    lines += ["", f"- model: {s['model_dir'] or 'seeded, params.yaml'}: backbone {s['model']['backbone']}, n_layers "
              f"{s['model']['n_layers']}, patch_len {s['model']['patch_len']}, {r['params'] / 1e6:.2f} M parameters, "
              f"N = {s['n_sensors']} sensors, {s['input_len']} -> {s['output_len']} steps",
              f"- export {r['export_s']:.1f} s ({r['exporter']}), parity max |diff| {r['parity']['max_abs_diff']:.2g} "
              f"(passed: {r['parity']['passed']}); optimiser {r['optimize_s']:.1f} s, opt parity max |diff| "
              f"{r['opt_parity']['max_abs_diff']:.2g} (passed: {r['opt_parity']['passed']}); int8 quantisation "
              f"{r['quantize_s']:.1f} s; file sizes MB: " + ", ".join(f"{k} {v:.1f}" for k, v in r["mb"].items()),
              "- max |output - PyTorch| on the check batch of 8: " + ", ".join(
                  f"{k} {v:.3g}" for k, v in r["check_max_abs_diff_vs_torch"].items())]
    if r["mae"]:
        m = r["mae"]
        lines.append(f"- masked test MAE over {m['windows']} test windows: " + ", ".join(
            f"{k} {v:.4f} ({100 * m['relative_change'][k]:+.2f} %)" for k, v in m["mae"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="a trained checkpoint folder (best.pt, config.json, data_meta.json)")
    p.add_argument("--data", help="its processed dataset folder: masked test MAE of each ONNX variant")
    p.add_argument("--mae-windows", type=int, default=None, help="test windows for the MAE (evenly spaced); default all")
    p.add_argument("--params", default=str(ROOT / "params.yaml"), help="model section for the seeded model")
    p.add_argument("--backbone", default=None, help="override model.backbone of the seeded model")
    p.add_argument("--n-sensors", type=int, default=207, help="seeded model: 207 = LOS-LOOP's network")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--threads", default="1,2", help="comma list of intra-op threads (0 = library default)")
    p.add_argument("--inter-op", type=int, default=0, help="onnxruntime inter-op threads (0 = default)")
    p.add_argument("--min-seconds", type=float, default=2.0, help="timed seconds per batch size, at least")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per batch size and worker run")
    p.add_argument("--repeats", type=int, default=2, help="worker runs per engine, alternating engines")
    p.add_argument("--cache-dir", default=str(ROOT / "models" / "backbones"), help="converted backbones")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx.json"))
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.worker:
        args.threads = int(args.threads)
        worker(args.worker, json.loads(args.spec), Path(args.inputs), Path(args.onnx), Path(args.result), args)
        return 0
    args.threads = [int(t) for t in args.threads.split(",")]
    args.engines = [e for e in args.engines.split(",") if e]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        result = bench(args, Path(tmp))
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, Python "
               f"{platform.python_version()}, load average at the end {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "result": result}, indent=2))
    print(f"machine: {machine}\n\n{table(result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
