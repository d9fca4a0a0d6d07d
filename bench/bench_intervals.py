"""Split-conformal intervals on a processed dataset: test coverage and width of the naive forecasters.

    python bench/bench_intervals.py data/processed/synthetic [--coverages 0.8 0.95]

Calibrates on the validation split and measures on the test split exactly as ``stlink evaluate``
does (``stlink.monitoring.intervals.IntervalEvaluation``), for the three naive baselines (the
model's own figures come from ``stlink evaluate``: ``reports/<dataset>/metrics/intervals.json``).
Prints a Markdown table: method, scope, nominal, coverage, gap, mean width, worst sensor coverage.
No model, no GPU; about a minute for LOS-LOOP on one core.
"""
from __future__ import annotations

import argparse

from torch.utils.data import DataLoader

from stlink.data.formats import load_processed
from stlink.data.windows import WindowDataset
from stlink.monitoring.intervals import IntervalEvaluation, key
from stlink.training.baselines import build_baselines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("processed")
    ap.add_argument("--coverages", type=float, nargs="+", default=[0.8, 0.95])
    ap.add_argument("--input-len", type=int, default=12)
    ap.add_argument("--output-len", type=int, default=12)
    args = ap.parse_args()
    data = load_processed(args.processed)
    baselines = build_baselines(data, args.output_len)
    hook = IntervalEvaluation(args.coverages, "pooled")
    for split in ("val", "test"):
        ds = WindowDataset(data, split, args.input_len, args.output_len)
        for batch in DataLoader(ds, batch_size=256, shuffle=False):
            y, m = batch["y"].numpy(), batch["y_mask"].numpy()
            for name, f in baselines.items():
                hook.update(split, name, y, f(batch), m)
    res = hook.result()
    print(f"{args.processed}: {data.values.shape[1]} sensors, freq {data.meta.get('freq')}, "
          f"calibrated on val, measured on test")
    print("| method | scope | nominal | test coverage | gap (pp) | mean width | worst sensor coverage |")
    print("|---|---|---|---|---|---|---|")
    for method in baselines:
        for scope in ("pooled", "sensor"):
            for cov in args.coverages:
                r = res[method][scope][key(cov)]
                print(f"| {method} | {scope} | {cov:.2f} | {r['coverage']:.3f} | {100 * (r['coverage'] - cov):+.1f} | "
                      f"{r['mean_width']:.2f} | {r['sensor_coverage_min']:.3f} |")


if __name__ == "__main__":
    main()
