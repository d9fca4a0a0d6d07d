"""Accuracy and cost of ST-LINK, its ablations and the naive baselines on one dataset.

    python bench/bench_model.py --dataset synthetic
    python bench/bench_model.py --dataset los-loop          # needs ../shared/data/LOS-LOOP
    python bench/bench_model.py --dataset synthetic --variants stlink,spatial_off -S train.epochs=2

Each variant runs the project's own steps (ingest -> prepare -> train -> evaluate) in a separate
process (so peak memory is per variant) under ``bench/work/<dataset>/``; the summary table
(markdown) is printed and written with the raw figures to ``bench/results/<dataset>.{md,json}``.
Metrics: masked, test split, 12-step average and single steps 3/6/12, MAPE with the floor shown.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

DATASETS = {
    "synthetic": [],
    "los-loop": ["data.dataset=los-loop", "data.source=tgcn", f"data.path={SHARED / 'LOS-LOOP'}",
                 "data.start_time='2012-03-01 00:00:00'", "data.freq=5min"],
}
VARIANTS = {
    "stlink": [],
    "spatial_off": ["model.spatial_rope=off"],
    "mrffn_off": ["model.mrffn=off"],
    "random_backbone": ["model.pretrained=false"],
}
BASELINES = ("last_value", "historical_average", "seasonal_naive")


def run_one(dataset: str, variant: str, extra: list[str], work: Path, tag: str = "") -> dict:
    """Prepare (cached per dataset), train and evaluate one variant in this process."""
    from stlink.config import load_params
    from stlink.data.ingest import ingest
    from stlink.data.prepare import prepare
    from stlink.training.evaluate import evaluate
    from stlink.training.train import train

    params = load_params(ROOT / "params.yaml", DATASETS[dataset] + VARIANTS[variant] + extra)
    raw, proc = work / "raw", work / "processed"
    if not (proc / "meta.json").exists():
        ingest(params, out_dir=raw)
        prepare(params, raw_dir=raw, out_dir=proc, report_dir=work / "reports")
    cache = ROOT / "models" / "backbones"
    model_dir, rep = work / f"{variant}{tag}" / "model", work / f"{variant}{tag}" / "reports"
    t0 = time.perf_counter()
    summary = train(params, out_dir=model_dir, data_dir=proc, cache_dir=cache)
    metrics = evaluate(params, model_dir=model_dir, out_dir=rep, data_dir=proc, cache_dir=cache)
    return {"variant": variant, "train": {k: v for k, v in summary.items() if k != "history"},
            "wall_s": time.perf_counter() - t0, "test": metrics["test"], "val": metrics["val"]}


def fmt_row(name: str, m: dict) -> str:
    cells = [f"{m['mae']:.3f} / {m['rmse']:.3f} / {m['mape']:.2f}%"]
    cells += [f"{m[f'step_{s}']['mae']:.3f}" for s in (3, 6, 12)]
    return f"| {name} | " + " | ".join(cells)


def table(results: list[dict]) -> str:
    floor = results[0]["test"]["model"]["mape_floor"]
    lines = [f"Test split, masked; MAE / RMSE / MAPE averaged over the 12 steps (MAPE excludes |y| < {floor});"
             " steps 3/6/12 are single steps (MAE).",
             "",
             "| method | avg MAE / RMSE / MAPE | step 3 | step 6 | step 12 | abrupt-slice MAE | s/epoch | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["test"]
        abrupt = t.get("abrupt", {}).get("model", {}).get("mae")
        lines.append(fmt_row(f"ST-LINK ({r['variant']})", t["model"])
                     + f" | {abrupt:.3f} | {r['train']['seconds_per_epoch']:.1f} | {r['train']['peak_memory_mb']:.0f} |")
    t = results[0]["test"]
    for b in BASELINES:
        abrupt = t.get("abrupt", {}).get(b, {}).get("mae")
        lines.append(fmt_row(b, t[b]) + f" | {abrupt:.3f} | - | - |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("-S", "--set", action="append", default=[], help="extra param overrides")
    ap.add_argument("--tag", default="", help="suffix of the result files (bench/results/<dataset><tag>.md)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    args = ap.parse_args()
    work = ROOT / "bench" / "work" / args.dataset
    if args.one:
        print("RESULT " + json.dumps(run_one(args.dataset, args.one, args.set, work, args.tag)))
        return 0
    if args.dataset == "los-loop" and not (SHARED / "LOS-LOOP").exists():
        print(f"{SHARED / 'LOS-LOOP'} is missing: this benchmark needs the shared LOS-LOOP data", file=sys.stderr)
        return 2
    results = []
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--dataset", args.dataset, "--one", variant]
        cmd += [a for s in args.set for a in ("-S", s)] + ([f"--tag={args.tag}"] if args.tag else [])
        print(f"== {args.dataset} / {variant}", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        if proc.returncode:
            print(proc.stdout[-3000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.split("RESULT ", 1)[1]))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.dataset}{args.tag}.json").write_text(json.dumps(results, indent=2))
    md = table(results)
    (out / f"{args.dataset}{args.tag}.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
