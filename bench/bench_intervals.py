"""Split-conformal intervals on a processed dataset: test coverage and width of the naive forecasters.

    python bench/bench_intervals.py data/processed/synthetic [--coverages 0.8 0.95]
    python bench/bench_intervals.py data/processed/synthetic --model models/synthetic   # + the model

Calibrates on the validation split and measures on the test split exactly as ``stlink evaluate``
does (``stlink.monitoring.intervals.IntervalEvaluation``), for the three naive baselines (the
model's own figures come from ``stlink evaluate``: ``reports/<dataset>/metrics/intervals.json``).
Prints a Markdown table: method, scope, nominal, coverage, gap, mean width, worst sensor coverage.
No model, no GPU; about a minute for LOS-LOOP on one core.  With ``--model DIR`` (a trained
``models/<dataset>`` folder, trained on this processed data) it runs ``stlink evaluate``'s own
function into a temp folder instead, so the table also has the model (and the STID reference when
the folder has one).
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
    ap.add_argument("--model", default=None, help="a trained model folder: evaluate it too (slow on CPU)")
    args = ap.parse_args()
    data = load_processed(args.processed)
    if args.model:
        res = evaluate_model(args)
        print_table(res, [m for m in res if isinstance(res[m], dict)], args.coverages, args.processed, data)
        return
    baselines = build_baselines(data, args.output_len)
    hook = IntervalEvaluation(args.coverages, "pooled")
    for split in ("val", "test"):
        ds = WindowDataset(data, split, args.input_len, args.output_len)
        for batch in DataLoader(ds, batch_size=256, shuffle=False):
            y, m = batch["y"].numpy(), batch["y_mask"].numpy()
            for name, f in baselines.items():
                hook.update(split, name, y, f(batch), m)
    print_table(hook.result(), list(baselines), args.coverages, args.processed, data)


def evaluate_model(args) -> dict:
    import tempfile

    from stlink.config import load_params
    from stlink.training.evaluate import evaluate

    params = load_params(None, [f"intervals.coverages={list(args.coverages)}", "train.device=cpu"])
    with tempfile.TemporaryDirectory(prefix="bench-intervals-") as tmp:
        return evaluate(params, args.model, tmp, data_dir=args.processed)["test"]["intervals"]


def print_table(res: dict, methods: list[str], coverages: list[float], processed: str, data) -> None:
    print(f"{processed}: {data.values.shape[1]} sensors, freq {data.meta.get('freq')}, "
          f"calibrated on val, measured on test")
    print("| method | scope | nominal | test coverage | gap (pp) | mean width | worst sensor coverage |")
    print("|---|---|---|---|---|---|---|")
    for method in methods:
        for scope in ("pooled", "sensor"):
            for cov in coverages:
                r = res[method][scope][key(cov)]
                print(f"| {method} | {scope} | {cov:.2f} | {r['coverage']:.3f} | {100 * (r['coverage'] - cov):+.1f} | "
                      f"{r['mean_width']:.2f} | {r['sensor_coverage_min']:.3f} |")


if __name__ == "__main__":
    main()
