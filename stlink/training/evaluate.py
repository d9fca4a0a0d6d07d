"""Pipeline step ``evaluate``: masked metrics of the model and the naive baselines, and plots.

For the validation and the test split, the best checkpoint and the three baselines
(``baselines.py``: last value, historical average by sensor x time of day, seasonal naive one day
back) forecast every window; MAE / RMSE / MAPE are accumulated over the whole split
(``metrics.py``) for each horizon step and pooled over all steps.

The learned reference (``reference.model``, STID by default) is evaluated beside the baselines
when ``<model_dir>/reference`` holds one (method name = its arch, e.g. ``stid``).

Abrupt-change slice.  A (window, sensor) pair is *abrupt* when its relative jump -- the largest
jump between two consecutive valid readings over the last input step and the ``H`` target steps,
``max_t |y[t+1] - y[t]|``, divided by the sensor's mean valid training reading -- exceeds a
threshold.  The threshold is the ``evaluate.abrupt_quantile`` (0.9: the top decile) of the same
quantity over the TRAINING windows, so the slice stays a slice on noisy networks (a fixed 0.2
selected 88 % of the pairs on one real network); ``evaluate.abrupt_threshold`` fixes it instead.
Including the last input step catches a change that starts right at the issue time.  The slice's
metrics use only the targets of abrupt pairs; ``fraction`` is the share of valid targets that fall
in it.  The rule reads targets only to *select* windows, never to forecast.

Outputs under ``out_dir``::

    metrics/val.json, metrics/test.json   (``dvc metrics show``)
        {"model": {"mae", "rmse", "mape", "mape_floor", "count",
                   "step_3": {"mae", "rmse", "mape"}, "step_6": ..., "step_12": ...,
                   "per_step": [{"step": 1, "mae", "rmse", "mape", "count"}, ...]},
         "last_value": {...}, "historical_average": {...}, "seasonal_naive": {...},
         "abrupt": {"threshold", "fraction", "count", "model": {...without per_step, count}, ...},
         "n_windows", "horizon_steps"}
    plots/horizon_<split>.csv             step, <method>_mae, <method>_rmse, <method>_mape (``dvc plots``)
    plots/horizon_<split>.png             error by horizon step, model vs baselines
    plots/forecast_test.png               actual vs model (step 1 and step H) over the first test day
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from stlink.progress import progress

from stlink.config import ConfigError, Params
from stlink.data.formats import DataError, ProcessedData, load_processed
from stlink.data.windows import WindowDataset
from stlink.io import write_json
from stlink.monitoring.intervals import IntervalEvaluation, finish_evaluation
from stlink.training.baselines import build_baselines, sensor_training_mean
from stlink.training.checkpoint import DEFAULT_CACHE_DIR, CheckpointError, data_checksum, load_trained
from stlink.training.metrics import MetricAccumulator
from stlink.training.plots import horizon_rows, plot_forecasts, plot_horizon, write_csv

log = logging.getLogger(__name__)
SPLITS = ("val", "test")


def abrupt_pairs(x_last: np.ndarray, x_last_valid: np.ndarray, y: np.ndarray, y_mask: np.ndarray,
                 scale: np.ndarray, threshold: float) -> np.ndarray:
    """(B, N) bool: the largest consecutive valid jump over [last input, targets] > threshold x scale.

    x_last, x_last_valid: (B, N) last input step (channel 0); y, y_mask: (B, H, N); scale: (N,).
    """
    seq = np.concatenate([x_last[:, None], y], axis=1).astype(np.float64)   # (B, H+1, N)
    ok = np.concatenate([x_last_valid[:, None], y_mask], axis=1)            # (B, H+1, N)
    jump = np.abs(np.diff(np.where(ok, seq, 0.0), axis=1))                  # (B, H, N)
    jump = np.where(ok[:, 1:] & ok[:, :-1], jump, 0.0)
    return jump.max(axis=1) > threshold * np.abs(scale)[None, :]


def training_jump_threshold(data: ProcessedData, input_len: int, output_len: int, quantile: float) -> float:
    """The ``quantile`` of the relative jump (see ``abrupt_pairs``) over all training (window, sensor) pairs."""
    if not 0.0 < quantile < 1.0:
        raise ConfigError(f"evaluate.abrupt_quantile must be in (0, 1), got {quantile}")
    a, b = data.meta["splits"]["train"]
    v = np.asarray(data.values[a:b, :, 0], dtype=np.float64)                # (Tt, N)
    m = np.asarray(data.mask[a:b], dtype=bool)                               # (Tt, N)
    d = np.where(m[1:] & m[:-1], np.abs(np.diff(v, axis=0)), 0.0)            # (Tt-1, N) jump t -> t+1
    n_win = len(v) - input_len - output_len + 1
    if n_win <= 0:
        raise DataError("the training split holds no window: cannot set the abrupt-change threshold")
    win = np.lib.stride_tricks.sliding_window_view(d, output_len, axis=0)    # (Tt-H, N, H)
    jumps = win[input_len - 1: input_len - 1 + n_win].max(axis=-1)          # (W, N) last input .. last target
    rel = jumps / np.maximum(np.abs(sensor_training_mean(data)), 1e-6)[None, :]
    return float(np.quantile(rel, quantile))


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device")
    return torch.device("cuda" if name != "cpu" and torch.cuda.is_available() else "cpu")


def _model_forecast(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> np.ndarray:
    """(B, H, N) float32 numpy forecast; bf16 autocast on CUDA."""
    args = [batch[k].to(device) for k in ("x", "x_mask", "tod", "dow")]
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return model(*args).float().cpu().numpy()


def evaluate_split(model: torch.nn.Module, data: ProcessedData, split: str, params: Params, input_len: int,
                   output_len: int, device: torch.device, keep_windows: int = 0,
                   references: dict[str, torch.nn.Module] | None = None,
                   abrupt_threshold: float | None = None,
                   on_batch: Callable[[str, np.ndarray, np.ndarray, np.ndarray], None] | None = None,
                   ) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of the model, the learned ``references`` (name -> model) and the baselines on one
    split, and the model's forecasts of the first ``keep_windows`` windows ((W, H, N), for plots)."""
    ecfg = params.evaluate
    ds = WindowDataset(data, split, input_len, output_len)
    if len(ds) == 0:
        raise DataError(f"the {split} split {ds.range} holds no {input_len}+{output_len}-step window")
    loader = DataLoader(ds, batch_size=ecfg.batch_size, shuffle=False, num_workers=params.train.num_workers)
    baselines = build_baselines(data, output_len)
    references = references or {}
    scale = sensor_training_mean(data)  # (N,)
    threshold = (abrupt_threshold if abrupt_threshold is not None else
                 ecfg.abrupt_threshold if ecfg.abrupt_threshold is not None else
                 training_jump_threshold(data, input_len, output_len, ecfg.abrupt_quantile))
    names = ["model", *references, *baselines]
    overall = {n: MetricAccumulator(output_len, ecfg.mape_floor) for n in names}
    abrupt = {n: MetricAccumulator(output_len, ecfg.mape_floor) for n in names}
    kept: list[np.ndarray] = []
    n_kept = 0
    for batch in progress(loader, desc=f"evaluate {split}", leave=False):
        y, m = batch["y"].numpy(), batch["y_mask"].numpy()            # (B, H, N)
        sel = abrupt_pairs(batch["x"][:, -1, :, 0].numpy(), batch["x_mask"][:, -1].numpy(), y, m,
                           scale, threshold)                          # (B, N)
        forecasts = {"model": _model_forecast(model, batch, device)}
        forecasts.update({n: _model_forecast(r, batch, device) for n, r in references.items()})
        forecasts.update({n: f(batch) for n, f in baselines.items()})
        for n, f in forecasts.items():
            overall[n].update(y, f, m)
            abrupt[n].update(y, f, m & sel[:, None, :])
            if on_batch is not None:                                  # (method, y, forecast, mask): intervals
                on_batch(n, y, f, m)
        if n_kept < keep_windows:
            kept.append(forecasts["model"][: keep_windows - n_kept])
            n_kept += len(kept[-1])
    out: dict[str, Any] = {n: acc.result() for n, acc in overall.items()}
    n_abrupt = abrupt["model"].count
    out["abrupt"] = {"threshold": float(threshold), "quantile": None if ecfg.abrupt_threshold is not None
                     else float(ecfg.abrupt_quantile), "count": n_abrupt,
                     "fraction": n_abrupt / max(1, overall["model"].count)}
    for n, acc in abrupt.items():
        out["abrupt"][n] = {k: v for k, v in acc.result().items() if k not in ("per_step", "count")}
    out["n_windows"] = len(ds)
    out["horizon_steps"] = output_len
    forecasts_kept = np.concatenate(kept) if kept else np.zeros((0, output_len, data.values.shape[1]), np.float32)
    return out, forecasts_kept


def day_of_forecasts(data: ProcessedData, first_t0: int, preds: np.ndarray, sensors: list[int],
                     steps: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Align window forecasts to target times over ``len(preds)`` steps from ``first_t0``.

    preds: (W, H, N) forecasts of consecutive windows (window i issued for t0 = first_t0 + i).
    Returns times (W,), actual (W, S) (NaN where missing) and, per step k, the step-k forecast
    of each time (W, S) (from window i - (k - 1); NaN before the first window reaches it).
    """
    W = len(preds)
    t = first_t0 + np.arange(W)                                             # (W,)
    actual = np.where(data.mask[t][:, sensors], data.values[t][:, sensors, 0], np.nan)
    out = {}
    for k in steps:
        f = np.full((W, len(sensors)), np.nan)
        src = np.arange(W) - (k - 1)                                        # window issuing time t at step k
        ok = src >= 0
        f[ok] = preds[src[ok], k - 1][:, sensors]
        out[f"model step {k}"] = f
    return data.timestamps[t], actual, out


def load_references(params: Params, model_dir: Path, checksum: str, cache_dir: Path,
                    device: torch.device) -> dict[str, torch.nn.Module]:
    """The learned reference trained beside the model (``<model_dir>/reference``), as {arch: model}."""
    from stlink.training.reference import reference_dir

    folder = reference_dir(model_dir)
    if params.reference.model == "none" or not (folder / "best.pt").exists():
        if params.reference.model != "none":
            log.warning("no reference model in %s: evaluating without it (run `stlink train`)", folder)
        return {}
    ref, rparams, rmeta = load_trained(folder, cache_dir)
    if rmeta.get("data_sha256") != checksum:
        raise CheckpointError(f"{folder}: the reference was trained on other data; retrain (`stlink train`)")
    return {rparams.model.arch: ref.to(device)}


def evaluate(params: Params, model_dir: Path, out_dir: Path, *, data_dir: Path | None = None,
             cache_dir: Path = DEFAULT_CACHE_DIR) -> dict[str, Any]:
    """Evaluate ``model_dir/best.pt`` and the baselines on val and test; write metrics and plots.

    ``params`` supplies the evaluate.* settings, the device and the data location (``data_dir``,
    default ``params.processed_dir``); window lengths come from the model's own config.json.
    Returns ``{"val": metrics, "test": metrics}`` as written to ``out_dir/metrics/<split>.json``.
    """
    out_dir, data_dir = Path(out_dir), Path(data_dir or params.processed_dir)
    model, mparams, meta = load_trained(model_dir, cache_dir)
    data = load_processed(data_dir)
    checksum = data_checksum(data_dir)
    if meta.get("data_sha256") != checksum:
        raise CheckpointError(f"{model_dir}: trained on processed data {str(meta.get('data_sha256'))[:12]}, "
                              f"but {data_dir} is {checksum[:12]}; retrain (`stlink train`) before evaluating")
    L, H = mparams.prepare.input_len, mparams.prepare.output_len
    device = _device(params.train.device)
    model.to(device)
    references = load_references(params, model_dir, checksum, cache_dir, device)
    spd = data.steps_per_day
    ecfg = params.evaluate
    threshold = (ecfg.abrupt_threshold if ecfg.abrupt_threshold is not None else  # one training pass for both splits
                 training_jump_threshold(data, L, H, ecfg.abrupt_quantile))
    results = {}
    intervals = IntervalEvaluation(params.intervals.coverages, params.intervals.scope)
    for split in SPLITS:
        keep = spd if split == "test" else 0
        res, preds = evaluate_split(model, data, split, params, L, H, device, keep_windows=keep, references=references,
                                    abrupt_threshold=threshold, on_batch=functools.partial(intervals.update, split))
        results[split] = res
        write_json(out_dir / "metrics" / f"{split}.json", res)
        methods = ["model", *references, "last_value", "historical_average", "seasonal_naive"]
        rows = horizon_rows({m: res[m] for m in methods})
        write_csv(rows, out_dir / "plots" / f"horizon_{split}.csv")
        plot_horizon(rows, methods, out_dir / "plots" / f"horizon_{split}.png",
                     f"{data.meta.get('dataset', '')} {split}: error by horizon step "
                     f"({data.meta.get('freq', '')} per step)", params.evaluate.mape_floor)
        if split == "test":
            n = data.values.shape[1]
            sensors = sorted({int(i) for i in np.linspace(0, n - 1, min(n, max(1, params.evaluate.plot_sensors))).round()})
            first_t0 = data.meta["splits"]["test"][0] + L
            times, actual, fc = day_of_forecasts(data, first_t0, preds, sensors, (1, H))
            plot_forecasts(times, actual, fc, [str(data.sensor_ids[i]) for i in sensors],
                           out_dir / "plots" / "forecast_test.png",
                           f"forecast vs actual, first test day ({data.meta.get('freq', '')} steps)")
        m = res["model"]
        for name in references:
            log.info("%s: reference %s MAE %.4f (model %.4f)", split, name, res[name]["mae"], m["mae"])
        log.info("%s: model MAE %.4f RMSE %.4f MAPE %.2f%% (|y| >= %g); last value MAE %.4f, "
                 "historical average MAE %.4f, seasonal naive MAE %.4f", split, m["mae"], m["rmse"],
                 m["mape"] or float("nan"), m["mape_floor"], res["last_value"]["mae"],
                 res["historical_average"]["mae"], res["seasonal_naive"]["mae"])
    results["test"]["intervals"] = finish_evaluation(intervals, out_dir, model_dir, data.sensor_ids)
    return results
