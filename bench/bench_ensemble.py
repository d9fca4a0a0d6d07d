"""How far can averaging go?  Test MAE of finished runs of ``bench_model.py`` and of their mean forecast.

    python bench/bench_ensemble.py --dataset synthetic-large --runs stlink-u-s0,stlink-u-s1,stlink-u-s2
    python bench/bench_ensemble.py --dataset los-loop --runs graph-g1-s0,stid-probe2-s0

Each run folder (``bench/work/<dataset>/<run>/model``) is loaded as trained and scores every test
window of the dataset's processed split; the masked MAE of each run and of the average of their
forecasts is printed and written to ``bench/results/<dataset>-ensemble.json`` (appended, one record
per call).  An ensemble of seeds bounds what lower variance alone could give one model; a mix of
ST-LINK and STID shows whether their errors differ.  Not a project feature: averaging multiplies
the training and scoring cost.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# checkpoints written before the neighbour module was renamed (before commit 656ea92, issue 8) name it "graph."
LEGACY_PREFIXES = {"graph.": "neighbours."}


def _load(model_dir: Path):
    import stlink.training.checkpoint as ckpt

    original = ckpt.load_trainable_state

    def renamed(model, state, where):
        for old, new in LEGACY_PREFIXES.items():
            state = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in state.items()}
        return original(model, state, where)

    ckpt.load_trainable_state = renamed
    try:
        return ckpt.load_trained(model_dir, cache_dir=ROOT / "models" / "backbones")
    finally:
        ckpt.load_trainable_state = original


def forecasts(model_dir: Path, data, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(W, H, N) forecast, target and mask of every window of ``split``."""
    from stlink.data.windows import WindowDataset
    from stlink.training.evaluate import _model_forecast

    model, params, _ = _load(model_dir)
    ds = WindowDataset(data, split, params.prepare.input_len, params.prepare.output_len)
    out, ys, ms = [], [], []
    for b in DataLoader(ds, batch_size=64):
        out.append(_model_forecast(model, b, torch.device("cpu")))   # (B, H, N), as `stlink evaluate` scores
        ys.append(b["y"].numpy())
        ms.append(b["y_mask"].numpy())
    return np.concatenate(out), np.concatenate(ys), np.concatenate(ms)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--runs", required=True, help="comma-separated run folders under bench/work/<dataset>")
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    from stlink.data.formats import load_processed
    from stlink.training.metrics import MetricAccumulator

    work = ROOT / "bench" / "work" / args.dataset
    data = load_processed(work / "processed")
    runs = args.runs.split(",")
    preds, y, mask = {}, None, None
    for run in runs:
        preds[run], y, mask = forecasts(work / run / "model", data, args.split)

    def mae(yhat: np.ndarray) -> float:
        acc = MetricAccumulator(y.shape[1], 1.0)
        acc.update(y, yhat, mask)
        return float(acc.result()["mae"])

    record = {"dataset": args.dataset, "split": args.split, "runs": {r: mae(p) for r, p in preds.items()},
              "mean_of_runs": mae(np.mean(list(preds.values()), axis=0))}
    for run, value in record["runs"].items():
        print(f"{run:30s} {value:.4f}")
    print(f"{'average of the forecasts':30s} {record['mean_of_runs']:.4f}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{args.dataset}-ensemble.json").open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
