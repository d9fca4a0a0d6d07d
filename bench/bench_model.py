"""Accuracy and cost of ST-LINK, its ablations and the naive baselines on one dataset.

    python bench/bench_model.py --dataset synthetic
    python bench/bench_model.py --dataset los-loop          # needs ../shared/data/LOS-LOOP
    python bench/bench_model.py --dataset los-metr          # the same speeds, METR-LA's directed graph
    python bench/bench_model.py --dataset synthetic-large   # another simulated city: 120 sensors, seed 7
    python bench/bench_model.py --dataset synthetic-long    # 120 days instead of 28 (other seed)
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
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

DATASETS = {
    "synthetic": [],
    "los-loop": ["data.dataset=los-loop", "data.source=tgcn", f"data.path={SHARED / 'LOS-LOOP'}",
                 "data.start_time='2012-03-01 00:00:00'", "data.freq=5min"],
}
# a network the defaults were not tuned on: 6 corridors of 10 stations, both directions, other seed
DATASETS["synthetic-large"] = ["data.dataset=synthetic-large", "data.synthetic.n_corridors=6",
                               "data.synthetic.sensors_per_corridor=10", "data.synthetic.seed=7"]
# a long record (120 days: the default budget then sees each training window about once, as on PEMS-BAY or METR-LA)
DATASETS["synthetic-long"] = ["data.dataset=synthetic-long", "data.synthetic.days=120", "data.synthetic.seed=3"]
LOS_METR = ROOT / "bench" / "work" / "los-metr" / "source"
DATASETS["los-metr"] = ["data.dataset=los-metr", "data.source=tgcn", f"data.path={LOS_METR}",
                        "data.start_time='2012-03-01 00:00:00'", "data.freq=5min"]


def los_metr_source(folder: Path = LOS_METR) -> None:
    """LOS-LOOP's speeds with METR-LA's directed Gaussian-kernel graph instead of the symmetric
    ``los_adj.csv`` (the same 207 sensors, ../shared/data/README.md): a T-GCN folder whose adjacency
    CSV has a header of sensor ids, so the loader matches it by id.  Built once, outside git."""
    from stlink.data.sources.metrla import read_dcrnn_pickle

    if (folder / "los_adj.csv").exists():
        return
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHARED / "LOS-LOOP" / "los_speed.csv", folder / "los_speed.csv")
    ids, matrix = read_dcrnn_pickle(SHARED / "METR-LA" / "adj_mx.pkl")   # refuses anything but arrays
    pd.DataFrame(matrix, columns=ids).to_csv(folder / "los_adj.csv", index=False)


VARIANTS = {
    "stlink": [],
    "spatial_off": ["model.spatial_rope=off", "model.graph_features=off", "model.graph_bias=off"],  # no road graph
    "rope_off": ["model.spatial_rope=off"],  # the graph only through the neighbour features
    "graph_off": ["model.graph_features=off"],  # the graph only through the rotation (the default before)
    "mrffn_off": ["model.mrffn=off"],
    "mrffn_on": ["model.mrffn=on"],  # the default before MRFFN was demoted (docs/method.md)
    "node_off": ["model.node_embedding=none"],
    "level_off": ["model.level_features=false"],
    "revin_off": ["model.revin=false"],  # tokens and head in global z units, as STID (the default since -g2)
    "revin_on": ["model.revin=true"],  # RevIN per window (the default before -g2)
    "random_backbone": ["model.pretrained=false"],
    "graph": ["model.graph_features=diffusion"],  # neighbours' readings on each token (probe)
    "graph_bias": ["model.graph_bias=hops"],  # learned attention bias per head and hop distance (probe)
    "graph_both": ["model.graph_features=diffusion", "model.graph_bias=hops"],
    "mask10": ["train.input_mask_rate=0.1"],  # augmentation: hide 10 % of the input readings (probe)
    "lr_high": ["train.lr=0.005", "train.lora_lr=0.002"],
    "lr_low": ["train.lr=0.002", "train.lora_lr=0.0005"],
    "skip": ["model.window_skip=linear"],  # the sensor's own window, linearly, straight to the forecast
    "skip_off": ["model.window_skip=off"],  # the default before -g3
    "sensor_skip": ["model.window_skip=sensor"],  # one such linear map per sensor
    "ema": ["train.ema_decay=0.999"],  # validate and keep the moving average of the weights
    "node32": ["model.node_dim=32"],  # 32 learned numbers per sensor, mapped to the width (STID's size)
    "dow_off": ["model.day_of_week=off"],  # no day-of-week input (LOS-LOOP's test weekdays are unseen in training)
    "tod_off": ["model.time_of_day=off"],
    "global_head": ["model.global_head=true"],  # a head that RevIN's window std does not scale (probe)
    "graph_rope_off": ["model.graph_features=diffusion", "model.spatial_rope=off"],
    "patch6": ["model.patch_len=6"],
    "patch6_spatial_off": ["model.patch_len=6", "model.spatial_rope=off", "model.graph_features=off"],
    "stid": [],  # the learned reference, trained with the `reference` section like `stlink train` does
    # configuration probes (docs/benchmarks.md, "What else was tried"); a variant's settings win over -S
    "lora_mlp": ["model.lora_targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"],
    "compose": ["model.spatial_rope=compose"],
    "compose32": ["model.spatial_rope=compose", "model.spatial_dim=32"],
    "dropout": ["model.dropout=0.1"],
    "epochs11": ["train.epochs=11"],
    "layers2": ["model.n_layers=2", "train.epochs=5"],  # same CPU budget as 1 layer x 8 epochs
    "tod16": ["model.tod_harmonics=16"],  # sharper time of day (rush-hour edges)
    "tod_slots": ["model.time_of_day=embedding"],  # one learned vector per time-of-day slot, as STID
    "wd01": ["train.weight_decay=0.01"],  # 100x the weight decay (regularising the five training days)
    "bs8": ["train.batch_size=8"],  # twice the optimizer steps per epoch
    "rank16": ["model.lora_rank=16", "model.lora_alpha=32"],  # twice the LoRA rank, same scale
    "laplacian_id": ["model.node_embedding=laplacian"],  # sensor identity from 32 Laplacian eigenvectors
    "layers2_full": ["model.n_layers=2"],  # 2 layers for as many epochs as -S gives (about 1.8x the CPU)
    "lora_mlp_mrffn_off": ["model.lora_targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
                           "model.mrffn=off"],
}
BASELINES = ("last_value", "historical_average", "seasonal_naive")


def warm_start(model, source: Path) -> None:
    """Copy a finished run's trained parameters into ``model`` where name and shape agree, except the
    per-sensor ones (first dimension = the sensor count): buffers (scaler, graph tables) stay this
    dataset's.  ``--init-from``: does a model trained on another (e.g. simulated) city help here?"""
    import torch

    from stlink.training.checkpoint import load_checkpoint

    state = load_checkpoint(Path(source) / "best.pt")["model"]
    own = {k: p for k, p in model.named_parameters() if p.requires_grad}
    loaded = [k for k, v in state.items() if k in own and own[k].shape == v.shape
              and not (v.ndim and v.shape[0] == model.n_sensors)]
    if not loaded:
        raise SystemExit(f"--init-from {source}: no parameter fits this model")
    with torch.no_grad():
        for k in loaded:
            own[k].copy_(state[k])
    print(f"warm start from {source}: {len(loaded)} of {len(own)} trainable tensors loaded; "
          f"kept fresh: {sorted(set(own) - set(loaded))}", flush=True)


def run_one(dataset: str, variant: str, extra: list[str], work: Path, tag: str = "",
            init_from: Path | None = None) -> dict:
    """Prepare (cached per dataset), train and evaluate one variant in this process."""
    from stlink.config import load_params
    from stlink.data.ingest import ingest
    from stlink.data.prepare import prepare
    from stlink.training.evaluate import evaluate
    from stlink.training.reference import reference_params
    from stlink.training.train import train

    params = load_params(ROOT / "params.yaml", DATASETS[dataset] + extra + VARIANTS[variant])
    if variant == "stid":
        params = reference_params(params)
    params.reference.model = "none"  # each variant alone; the reference is its own variant
    raw, proc = work / "raw", work / "processed"
    if not (proc / "meta.json").exists():
        ingest(params, out_dir=raw)
        from stlink.data.formats import load_raw
        from stlink.validation import validate_raw

        validate_raw(load_raw(raw), params.validation, report_dir=work / "reports")  # prepare reads validated data only
        prepare(params, raw_dir=raw, out_dir=proc, report_dir=work / "reports")
    cache = ROOT / "models" / "backbones"
    model_dir, rep = work / f"{variant}{tag}" / "model", work / f"{variant}{tag}" / "reports"
    t0 = time.perf_counter()
    summary = train(params, out_dir=model_dir, data_dir=proc, cache_dir=cache,
                    init=None if init_from is None else lambda m: warm_start(m, init_from))
    metrics = evaluate(params, model_dir=model_dir, out_dir=rep, data_dir=proc, cache_dir=cache)
    return {"variant": variant, "seed": params.train.seed, "train": summary,
            "wall_s": time.perf_counter() - t0, "test": metrics["test"], "val": metrics["val"]}


def collect_one(folder: Path, variant: str, seed: int) -> dict | None:
    """The result record of a finished run folder (train_metrics.json + metrics), or None."""
    try:
        summary = json.loads((folder / "model" / "train_metrics.json").read_text())
        test = json.loads((folder / "reports" / "metrics" / "test.json").read_text())
        val = json.loads((folder / "reports" / "metrics" / "val.json").read_text())
    except FileNotFoundError:
        return None
    return {"variant": variant, "seed": seed, "train": summary, "test": test, "val": val}


def _stat(values: list[float], fmt: str = "{:.3f}") -> str:
    """mean ± std (sample std over seeds) or the single value."""
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return fmt.format(v[0])
    return f"{fmt.format(statistics.mean(v))} ± {fmt.format(statistics.stdev(v))}"


def _method_rows(results: list[dict]) -> list[tuple[str, list[dict], list[dict]]]:
    """(label, test metric dicts over seeds, train summaries over seeds) per variant, then baselines."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == variant]
        label = "STID reference" if variant == "stid" else f"ST-LINK ({variant})"
        rows.append((label, [r["test"]["model"] | {"abrupt": r["test"]["abrupt"]["model"]} for r in runs],
                     [r["train"] for r in runs]))
    first = [r for r in results if r["variant"] == results[0]["variant"]]
    for b in BASELINES:
        rows.append((b, [r["test"][b] | {"abrupt": r["test"]["abrupt"][b]} for r in first], []))
    return rows


def table(results: list[dict]) -> str:
    t0 = results[0]["test"]
    floor = t0["model"]["mape_floor"]
    seeds = sorted({r.get("seed") for r in results})
    ab = t0["abrupt"]
    lines = [f"Test split, masked; mean ± std over seeds {seeds}; MAE / RMSE / MAPE averaged over the 12 steps "
             f"(MAPE excludes |y| < {floor}); steps 3/6/12 are single steps (MAE). Abrupt slice: relative jump "
             f"above {ab['threshold']:.3f} (training quantile {ab.get('quantile')}), {100 * ab['fraction']:.1f} % "
             "of the test targets. s/epoch is wall time, CPU s/epoch is process CPU time (all threads).",
             "",
             "| method | avg MAE | avg RMSE | avg MAPE | step 3 | step 6 | step 12 | abrupt-slice MAE | epochs | s/epoch | CPU s/epoch | train min | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, ms, trains in _method_rows(results):
        cells = [_stat([m["mae"] for m in ms]), _stat([m["rmse"] for m in ms]),
                 _stat([m["mape"] for m in ms], "{:.2f}") + "%"]
        cells += [_stat([m[f"step_{k}"]["mae"] for m in ms]) for k in (3, 6, 12)]
        cells.append(_stat([m["abrupt"]["mae"] for m in ms]))
        if trains:
            cells += [_stat([t["epochs_run"] for t in trains], "{:.0f}"),
                      _stat([t["seconds_per_epoch"] for t in trains], "{:.1f}"),
                      _stat([t.get("cpu_seconds_per_epoch") for t in trains], "{:.1f}"),
                      _stat([t.get("train_seconds", 0) / 60 for t in trains], "{:.1f}"),
                      _stat([t["peak_memory_mb"] for t in trains], "{:.0f}")]
        else:
            cells += ["-"] * 5
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def learning_curve(results: list[dict], path: Path) -> None:
    """Validation MAE against training windows seen, ST-LINK vs STID (every seed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {"stlink": "tab:blue", "stid": "tab:orange"}
    for r in results:
        if r["variant"] not in colours:
            continue
        hist = r["train"]["history"]
        seen = np.cumsum([h.get("windows", 0) for h in hist])
        ax.plot(seen, [h["val_mae"] for h in hist], marker=".", color=colours[r["variant"]], alpha=0.8,
                label=f"{'ST-LINK' if r['variant'] == 'stlink' else 'STID'} seed {r['seed']}")
    ax.set_xlabel("training windows seen")
    ax.set_ylabel("validation MAE (masked)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="synthetic")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0", help="comma-separated train.seed values (3 for a claim)")
    ap.add_argument("-S", "--set", action="append", default=[], help="extra param overrides")
    ap.add_argument("--tag", default="", help="suffix of the result files (bench/results/<dataset><tag>.md)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    ap.add_argument("--init-from", help="warm start every run from a finished run's model folder; {seed} is "
                                        "replaced by the seed, e.g. bench/work/synthetic-large/stid-u-s{seed}/model")
    ap.add_argument("--collect", action="store_true",
                    help="do not train: build the tables from finished runs under bench/work (resumable benchmarks)")
    args = ap.parse_args()
    work = ROOT / "bench" / "work" / args.dataset
    if args.dataset.startswith("los-") and not (SHARED / "LOS-LOOP").exists():
        print(f"{SHARED / 'LOS-LOOP'} is missing: this benchmark needs the shared LOS-LOOP data", file=sys.stderr)
        return 2
    if args.dataset == "los-metr":
        los_metr_source()
    if args.one:
        init_from = None if args.init_from is None else Path(args.init_from)
        print("RESULT " + json.dumps(run_one(args.dataset, args.one, args.set, work, args.tag, init_from)))
        return 0
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"{args.dataset}{args.tag}.jsonl"  # one line per finished run: a killed benchmark keeps them
    results = []
    if args.collect:
        results = [r for seed in args.seeds.split(",") for variant in args.variants.split(",")
                   if (r := collect_one(work / f"{variant}{args.tag}-s{seed}", variant, int(seed))) is not None]
        if not results:
            print(f"no finished run under {work} for tag {args.tag!r}", file=sys.stderr)
            return 1
    for seed in [] if args.collect else args.seeds.split(","):
        for variant in args.variants.split(","):
            tag = f"{args.tag}-s{seed}"
            cmd = [sys.executable, __file__, "--dataset", args.dataset, "--one", variant, f"--tag={tag}"]
            cmd += [a for s in args.set for a in ("-S", s)] + ["-S", f"train.seed={seed}"]
            if args.init_from:
                cmd.append(f"--init-from={args.init_from.format(seed=seed)}")
            print(f"== {args.dataset} / {variant} / seed {seed}  ({time.strftime('%H:%M:%S')})", flush=True)
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if proc.returncode:
                print(proc.stdout[-3000:], file=sys.stderr)
                return proc.returncode
            res = json.loads(proc.stdout.split("RESULT ", 1)[1])
            results.append(res)
            with partial.open("a") as fh:
                fh.write(json.dumps(res) + "\n")
            print(f"   test MAE {res['test']['model']['mae']:.4f}, {res['train']['epochs_run']} epochs, "
                  f"{res['train']['train_seconds'] / 60:.1f} min", flush=True)
    (out / f"{args.dataset}{args.tag}.json").write_text(json.dumps(results, indent=2))
    md = table(results)
    (out / f"{args.dataset}{args.tag}.md").write_text(md + "\n")
    learning_curve(results, ROOT / "docs" / "img" / f"learning_curve_{args.dataset}{args.tag}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
