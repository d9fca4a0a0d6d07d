"""Split-conformal prediction intervals, per horizon step, calibrated on the validation split.

Score: the masked absolute error ``|y - yhat|`` of each valid target.  For coverage ``1 - a`` the
half-width of step ``h`` is the ``k``-th smallest of the ``n`` validation scores of that step, with
the finite-sample correction ``k = ceil((n + 1)(1 - a))`` (Vovk et al.; Lei et al. 2018): for
exchangeable scores, ``P(|y - yhat| <= q) >= 1 - a``.  When ``k > n`` no finite quantile exists.

Two scopes (``intervals.scope``):

* ``pooled``: one half-width per (coverage, step), from all sensors' scores of that step;
* ``sensor``: one per (coverage, step, sensor), from that sensor's scores only; a (step, sensor)
  with too few valid scores (``k > n``) falls back to the pooled half-width.

The evaluate step measures both on the test split (empirical coverage and mean width, per step
and averaged, overall and the spread across sensors) and writes the chosen scope's half-widths
(``calibration.json``), which ``export`` copies into the model card, so that the scorer can
write ``lower_<cov>`` / ``upper_<cov>`` beside ``value``.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from stlink.io import sha256_file, write_json
from stlink.monitoring import MonitoringError

log = logging.getLogger(__name__)
CALIBRATION_FORMAT = "stlink-intervals/1"
SCOPES = ("pooled", "sensor")


# --- the conformal quantile ------------------------------------------------------------------------

def conformal_rank(n: np.ndarray | int, coverage: float) -> np.ndarray:
    """``ceil((n + 1) * coverage)``: the rank (1-based) of the conformal quantile among n scores."""
    return np.ceil((np.asarray(n, dtype=np.float64) + 1.0) * coverage - 1e-9).astype(np.int64)


def conformal_quantiles(scores: np.ndarray, valid: np.ndarray, coverage: float) -> np.ndarray:
    """The conformal half-width of each column.

    scores, valid: (W, ...) scores and their validity along axis 0.  Returns (...) float64, +inf
    where fewer than ``1/(1-coverage) - 1`` valid scores make the finite-sample rank exceed n.
    """
    if not 0.0 < coverage < 1.0:
        raise MonitoringError(f"intervals.coverages: {coverage} is not in (0, 1)")
    s = np.sort(np.where(valid, scores, np.inf), axis=0)                  # (W, ...) valid first
    n = valid.sum(axis=0)                                                  # (...)
    k = conformal_rank(n, coverage)                                        # (...)
    idx = np.clip(k - 1, 0, max(0, s.shape[0] - 1))
    q = np.take_along_axis(s, idx[None], axis=0)[0].astype(np.float64)     # (...)
    return np.where((k <= n) & (n > 0), q, np.inf)


def calibrate(errors: np.ndarray, coverages: Sequence[float]) -> dict[str, np.ndarray]:
    """Half-widths of both scopes from validation errors.

    errors: (W, H, N) |y - yhat|, NaN where the target is missing.
    Returns {"pooled": (C, H, N), "sensor": (C, H, N)} (pooled broadcast over sensors).
    """
    valid = np.isfinite(errors)
    W, H, N = errors.shape
    pooled_s = errors.transpose(0, 2, 1).reshape(W * N, H)                 # (W*N, H)
    pooled_v = valid.transpose(0, 2, 1).reshape(W * N, H)
    pooled, sensor = [], []
    for cov in coverages:
        p = conformal_quantiles(pooled_s, pooled_v, cov)                   # (H,)
        bad = np.flatnonzero(~np.isfinite(p))
        if len(bad):
            raise MonitoringError(f"calibration: step {int(bad[0]) + 1} has {int(pooled_v[:, bad[0]].sum())} valid "
                                  f"validation errors, too few for coverage {cov}")
        s = conformal_quantiles(errors, valid, cov)                        # (H, N)
        pooled.append(np.broadcast_to(p[:, None], (H, N)))
        sensor.append(np.where(np.isfinite(s), s, p[:, None]))            # too few: pooled fallback
    return {"pooled": np.stack(pooled), "sensor": np.stack(sensor)}


# --- evaluation: the evaluate step's hook ----------------------------------------------------------

class CoverageAccumulator:
    """Covered / valid counts and summed widths per (coverage, step, sensor) on a test split."""

    def __init__(self, half_width: np.ndarray, coverages: Sequence[float]):
        self.q = np.asarray(half_width, dtype=np.float64)                  # (C, H, N)
        self.coverages = list(coverages)
        self.covered = np.zeros(self.q.shape, np.int64)                    # (C, H, N)
        self.count = np.zeros(self.q.shape[1:], np.int64)                  # (H, N)

    def update(self, y: np.ndarray, yhat: np.ndarray, mask: np.ndarray) -> None:
        """y, yhat, mask: (B, H, N)."""
        err = np.abs(y.astype(np.float64) - yhat)                          # (B, H, N)
        m = mask.astype(bool)
        self.count += m.sum(axis=0)
        self.covered += ((err[None] <= self.q[:, None]) & m[None]).sum(axis=1)

    def result(self) -> dict[str, Any]:
        """Per coverage: empirical coverage and mean width, averaged and per step, and the spread
        of the per-sensor coverage (how conditional the guarantee is)."""
        out: dict[str, Any] = {}
        n_h = self.count.sum(axis=1)                                       # (H,)
        for c, cov in enumerate(self.coverages):
            width = 2.0 * self.q[c]                                        # (H, N)
            per_sensor = self.covered[c].sum(0) / np.maximum(1, self.count.sum(0))   # (N,)
            has = self.count.sum(0) > 0
            out[key(cov)] = {
                "nominal": cov,
                "coverage": float(self.covered[c].sum() / max(1, self.count.sum())),
                "mean_width": float((width * self.count).sum() / max(1, self.count.sum())),
                "count": int(self.count.sum()),
                "sensor_coverage_min": float(per_sensor[has].min()) if has.any() else None,
                "sensor_coverage_mean_abs_gap": float(np.abs(per_sensor[has] - cov).mean()) if has.any() else None,
                "by_step": [{"step": h + 1, "coverage": float(self.covered[c, h].sum() / max(1, n_h[h])),
                             "mean_width": float((width[h] * self.count[h]).sum() / max(1, n_h[h])),
                             "count": int(n_h[h])} for h in range(self.q.shape[1])],
            }
        return out


def key(coverage: float) -> str:
    """0.8 -> "80", 0.975 -> "97.5": the suffix of the forecast's lower_/upper_ columns."""
    return f"{coverage * 100:g}"


class IntervalEvaluation:
    """Hook of the evaluate step: ``update(split, method, y, yhat, mask)`` per batch and method.

    Validation batches are kept as errors (W, H, N); at the first test batch of a method its
    half-widths are calibrated, and every test batch then counts coverage for both scopes.
    Splits must come val first, then test.
    """

    def __init__(self, coverages: Sequence[float], scope: str = "pooled"):
        if scope not in SCOPES:
            raise MonitoringError(f"intervals.scope={scope!r}: expected one of {SCOPES}")
        self.coverages, self.scope = [float(c) for c in coverages], scope
        self.val_errors: dict[str, list[np.ndarray]] = {}
        self.half_width: dict[str, dict[str, np.ndarray]] = {}
        self.test: dict[str, dict[str, CoverageAccumulator]] = {}

    def update(self, split: str, method: str, y: np.ndarray, yhat: np.ndarray, mask: np.ndarray) -> None:
        if split == "val":
            err = np.abs(y.astype(np.float32) - yhat.astype(np.float32))
            self.val_errors.setdefault(method, []).append(np.where(mask, err, np.nan))  # (B, H, N)
        elif split == "test" and self.coverages:
            if method not in self.test:
                if method not in self.val_errors:
                    return                                   # no validation errors: nothing to calibrate
                self.half_width[method] = calibrate(np.concatenate(self.val_errors.pop(method)), self.coverages)
                self.test[method] = {s: CoverageAccumulator(q, self.coverages)
                                     for s, q in self.half_width[method].items()}
            for acc in self.test[method].values():
                acc.update(y, yhat, mask)

    def result(self) -> dict[str, Any]:
        """``{"scope": chosen, "coverages": [...], <method>: {"pooled": {...}, "sensor": {...}}}``."""
        out: dict[str, Any] = {"scope": self.scope, "coverages": self.coverages, "calibrated_on": "val",
                               "evaluated_on": "test"}
        for method, accs in self.test.items():
            out[method] = {s: acc.result() for s, acc in accs.items()}
        return out

    def calibration(self, method: str = "model") -> np.ndarray:
        """(C, H, N) half-widths of ``method`` in the configured scope."""
        if method not in self.half_width:
            raise MonitoringError(f"no validation errors of {method!r} were collected to calibrate intervals")
        return self.half_width[method][self.scope]


def finish_evaluation(hook: IntervalEvaluation, out_dir: Path, model_dir: Path, sensor_ids: Sequence[str],
                      method: str = "model") -> dict[str, Any]:
    """After the test split: write ``metrics/intervals.json`` (coverage, widths) and
    ``calibration.json`` (the chosen scope's half-widths of ``method`` and the identity of the
    checkpoint they belong to); returns the metrics."""
    res = hook.result()
    if not hook.coverages:
        return res
    q = hook.calibration(method)                                             # (C, H, N)
    ckpt = Path(model_dir) / "best.pt"
    write_json(Path(out_dir) / "calibration.json", {
        "format": CALIBRATION_FORMAT, "method": "split-conformal, masked absolute error, per horizon step",
        "scope": hook.scope, "coverages": hook.coverages, "calibrated_on": "val",
        "sensor_ids": [str(s) for s in sensor_ids], "half_width": {key(c): q[i].tolist() for i, c in enumerate(hook.coverages)},
        "checkpoint_sha256": sha256_file(ckpt) if ckpt.exists() else None,
    })
    write_json(Path(out_dir) / "metrics" / "intervals.json", res)
    for cov in hook.coverages:
        r = res.get(method, {}).get(hook.scope, {}).get(key(cov))
        if r:
            log.info("intervals %s (%s): test coverage %.3f (nominal %.2f), mean width %.3f", key(cov), hook.scope,
                     r["coverage"], cov, r["mean_width"])
    return res


def interval_metrics(res: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(key, value, step) for MLflow: ``test.intervals.<method>.<scope>.cov<k>.{coverage,mean_width}``."""
    items: list[tuple[str, float, int]] = []
    for method, scopes in res.items():
        if not isinstance(scopes, Mapping):
            continue
        for scope, covs in scopes.items():
            for k, r in covs.items():
                base = f"test.intervals.{method}.{scope}.cov{k}"
                items += [(f"{base}.coverage", r["coverage"], 0), (f"{base}.mean_width", r["mean_width"], 0)]
                items += [(f"{base}.coverage_by_step", s["coverage"], s["step"]) for s in r["by_step"]]
                items += [(f"{base}.mean_width_by_step", s["mean_width"], s["step"]) for s in r["by_step"]]
                if r.get("sensor_coverage_min") is not None:
                    items.append((f"{base}.sensor_coverage_min", r["sensor_coverage_min"], 0))
    return items


def log_interval_metrics(run_id: str, res: Mapping[str, Any]) -> None:
    """Log ``interval_metrics(res)`` on the MLflow run ``run_id`` (the store MLflow is pointed at)."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, int(s)) for k, v, s in interval_metrics(res) if v is not None and math.isfinite(v)]
    client = MlflowClient()
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


# --- the model card --------------------------------------------------------------------------------

def read_calibration(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MonitoringError(f"{path}: no interval calibration; run `stlink evaluate` first")
    raw = json.loads(path.read_text())
    if raw.get("format") != CALIBRATION_FORMAT:
        raise MonitoringError(f"{path}: format {raw.get('format')!r}, expected {CALIBRATION_FORMAT!r}")
    return raw


def calibration_for(calibration: str | Path, model_dir: str | Path) -> dict[str, Any] | None:
    """The calibration of ``model_dir/best.pt`` to put into its model card (None, with a warning,
    when there is none).  A calibration of another checkpoint is an error naming both: its widths
    would be attached to a model they do not describe."""
    calibration = Path(calibration)
    if not calibration.is_file():
        log.warning("%s: no interval calibration (run `stlink evaluate` before `stlink export`); "
                    "the exported model carries no intervals", calibration)
        return None
    cal = read_calibration(calibration)
    ckpt = Path(model_dir) / "best.pt"
    if ckpt.exists() and cal.get("checkpoint_sha256") not in (None, sha256_file(ckpt)):
        raise MonitoringError(f"{calibration}: calibrated for another checkpoint than {ckpt}; "
                              f"run `stlink evaluate` again before `stlink export`")
    return cal


def attach_calibration(sidecar: str | Path, cal: Mapping[str, Any] | None) -> bool:
    """Copy the half-widths of ``cal`` (``calibration_for``) into the model card ``sidecar``
    (key ``intervals``); False when ``cal`` is None."""
    if cal is None:
        return False
    sidecar = Path(sidecar)
    card = json.loads(sidecar.read_text())
    if [str(s) for s in card.get("sensor_ids", [])] != list(cal["sensor_ids"]):
        raise MonitoringError(f"interval calibration: its sensors differ from the model card {sidecar}")
    card["intervals"] = {k: cal[k] for k in ("format", "method", "scope", "coverages", "calibrated_on", "half_width")}
    write_json(sidecar, card)
    return True


def card_intervals(onnx_path: str | Path) -> dict[str, Any] | None:
    """The ``intervals`` of the card beside ``onnx_path`` (None when it carries none)."""
    sidecar = Path(onnx_path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    return json.loads(sidecar.read_text()).get("intervals")


def interval_bands(onnx_path: str | Path, coverages: Sequence[float], mode: str = "auto"
                   ) -> dict[str, np.ndarray] | None:
    """Half-widths {"80": (H, N), ...} the scorer adds, or None when not wanted/available.

    ``mode``: ``off`` -> None; ``auto`` -> None (with a warning) when the card has no calibration;
    ``required`` -> ``MonitoringError`` naming the card when it has none, or lacks a coverage.
    """
    if mode == "off" or not coverages:
        return None
    if mode not in ("auto", "required"):
        raise MonitoringError(f"intervals.forecast={mode!r}: expected auto | required | off")
    cal = card_intervals(onnx_path)
    sidecar = Path(onnx_path).with_suffix(".json")
    if cal is None:
        if mode == "required":
            raise MonitoringError(f"{sidecar}: the model carries no interval calibration; run `stlink evaluate` "
                                  f"then `stlink export`, or set intervals.forecast=auto")
        log.warning("%s: no interval calibration in the model card; the forecast has no lower_/upper_ columns", sidecar)
        return None
    missing = [key(c) for c in coverages if key(c) not in cal["half_width"]]
    if missing:
        if mode == "required":
            raise MonitoringError(f"{sidecar}: no calibration for coverage(s) {missing}; calibrated: "
                                  f"{sorted(cal['half_width'])}")
        log.warning("%s: no calibration for coverage(s) %s; left out", sidecar, missing)
    return {key(c): np.asarray(cal["half_width"][key(c)], np.float64) for c in coverages if key(c) not in missing}


def add_interval_columns(table, bands: Mapping[str, np.ndarray] | None, sensor_ids: Sequence[str],
                         bounds: Sequence[float] | None = None):
    """A forecast table (pyarrow or pandas, with sensor_id, horizon_step, value) with
    ``lower_<k>`` / ``upper_<k>`` = value -/+ half-width[step, sensor], clipped to ``bounds``."""
    if not bands:
        return table
    import pyarrow as pa

    is_arrow = isinstance(table, pa.Table)
    cols = {c: (table.column(c).to_numpy() if is_arrow else table[c].to_numpy())
            for c in ("sensor_id", "horizon_step", "value")}
    s_idx = np.asarray(pd_index(sensor_ids).get_indexer(cols["sensor_id"].astype(str)))      # (R,)
    if (s_idx < 0).any():
        raise MonitoringError(f"forecast rows name sensor {cols['sensor_id'][s_idx < 0][0]!r}, unknown to the calibration")
    h_idx = cols["horizon_step"].astype(np.int64) - 1                                         # (R,)
    value = cols["value"].astype(np.float64)
    lo, hi = (bounds if bounds is not None else (-np.inf, np.inf))
    for k, q in bands.items():
        w = q[h_idx, s_idx]                                                                   # (R,)
        lower = np.clip(value - w, lo, hi).astype(np.float32)
        upper = np.clip(value + w, lo, hi).astype(np.float32)
        if is_arrow:
            table = table.append_column(f"lower_{k}", pa.array(lower, pa.float32()))
            table = table.append_column(f"upper_{k}", pa.array(upper, pa.float32()))
        else:
            table = table.assign(**{f"lower_{k}": lower, f"upper_{k}": upper})
    return table


def pd_index(values: Iterable[str]):
    import pandas as pd

    return pd.Index([str(v) for v in values])
