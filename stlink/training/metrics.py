"""Masked forecasting metrics with the DCRNN / Graph-WaveNet definitions.

All metrics are computed in original units on valid targets only, from sums and counts
accumulated over the whole evaluation set (never an average of per-batch values):

    MAE  = sum(|y - yhat| * m) / sum(m)
    RMSE = sqrt(sum((y - yhat)^2 * m) / sum(m))
    MAPE = 100 * sum(|y - yhat| / |y| * m') / sum(m'),   m' = m & (|y| >= mape_floor)

MAPE leaves out targets with |y| below ``mape_floor`` (near-zero readings that are not the null
value make it explode); the floor is reported beside every MAPE.  ``step_k`` is horizon step k
alone (k * freq ahead), never the average up to it; the top-level ("average") values pool the
sums of all steps (equal to the mean of the per-step values when every step has the same
number of valid targets).
"""
from __future__ import annotations

from typing import Any

import numpy as np

REPORT_STEPS = (3, 6, 12)  # the field's "horizon 3 / 6 / 12" (15, 30, 60 min at 5-minute steps)


def _to_numpy(a: Any) -> np.ndarray:
    """A numpy array from a numpy array or a (possibly bf16, possibly CUDA) torch tensor."""
    if hasattr(a, "detach"):
        a = a.detach()
        if a.dtype.is_floating_point:
            a = a.float()
        a = a.cpu().numpy()
    return np.asarray(a)


def masked_sums(y: np.ndarray, yhat: np.ndarray, mask: np.ndarray, mape_floor: float) -> dict[str, np.ndarray]:
    """Per-step error sums over batch and sensors.

    y, yhat: (B, H, N) original units; mask: (B, H, N) valid targets.  Entries outside the mask
    never enter a sum, whatever they hold (null value, NaN).  Returns five (H,) float64 arrays.
    """
    y = y.astype(np.float64)
    m = mask.astype(bool) & np.isfinite(y)                         # (B, H, N)
    err = np.where(m, yhat.astype(np.float64) - np.where(m, y, 0.0), 0.0)  # (B, H, N)
    m_ape = m & (np.abs(np.where(m, y, 0.0)) >= mape_floor)        # (B, H, N)
    ape = np.where(m_ape, np.abs(err) / np.where(m_ape, np.abs(y), 1.0), 0.0)
    return {
        "abs": np.abs(err).sum(axis=(0, 2)),
        "sq": (err ** 2).sum(axis=(0, 2)),
        "count": m.sum(axis=(0, 2)).astype(np.float64),
        "ape": ape.sum(axis=(0, 2)),
        "ape_count": m_ape.sum(axis=(0, 2)).astype(np.float64),
    }


def metrics_from_sums(s: dict[str, np.ndarray | float], mape_floor: float) -> dict[str, float | None]:
    """MAE / RMSE / MAPE (%) from summed errors; a metric with no valid target is ``None``."""
    count, ape_count = float(s["count"]), float(s["ape_count"])
    return {
        "mae": float(s["abs"]) / count if count else None,
        "rmse": float(np.sqrt(float(s["sq"]) / count)) if count else None,
        "mape": 100.0 * float(s["ape"]) / ape_count if ape_count else None,
        "mape_floor": float(mape_floor),
        "count": int(count),
    }


class MetricAccumulator:
    """Accumulates masked error sums batch by batch; ``result()`` gives the whole-set metrics.

    ``update(y, yhat, mask)`` takes (B, H, N) or a single (H, N) window, as numpy arrays or
    torch tensors.  ``result()``::

        {"mae", "rmse", "mape", "mape_floor", "count",      # pooled over all H steps
         "step_3": {"mae", "rmse", "mape"}, "step_6": ..., "step_12": ...,  # single steps (those <= H)
         "per_step": [{"step": 1, "mae", "rmse", "mape", "count"}, ...]}

    One ``mape_floor`` per result: it applies to every MAPE in it (kept out of the step entries so
    that ``dvc metrics show`` stays narrow).
    """

    def __init__(self, horizon: int, mape_floor: float = 1.0, report_steps: tuple[int, ...] = REPORT_STEPS):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon = horizon
        self.mape_floor = float(mape_floor)
        self.report_steps = tuple(k for k in report_steps if 1 <= k <= horizon)
        self.sums = {k: np.zeros(horizon, dtype=np.float64) for k in ("abs", "sq", "count", "ape", "ape_count")}

    def update(self, y: Any, yhat: Any, mask: Any) -> None:
        y, yhat, mask = _to_numpy(y), _to_numpy(yhat), _to_numpy(mask)
        if y.ndim == 2:
            y, yhat, mask = y[None], yhat[None], mask[None]
        if not (y.shape == yhat.shape == mask.shape) or y.ndim != 3 or y.shape[1] != self.horizon:
            raise ValueError(f"expected y, yhat, mask of one shape (B, {self.horizon}, N); "
                             f"got {y.shape}, {yhat.shape}, {mask.shape}")
        for k, v in masked_sums(y, yhat, mask, self.mape_floor).items():
            self.sums[k] += v

    @property
    def count(self) -> int:
        return int(self.sums["count"].sum())

    def step(self, k: int) -> dict[str, float | None]:
        """Metrics of horizon step ``k`` (1-based) alone."""
        return metrics_from_sums({n: v[k - 1] for n, v in self.sums.items()}, self.mape_floor)

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = metrics_from_sums({n: v.sum() for n, v in self.sums.items()}, self.mape_floor)
        for k in self.report_steps:
            out[f"step_{k}"] = {n: v for n, v in self.step(k).items() if n in ("mae", "rmse", "mape")}
        out["per_step"] = [{"step": k, **{n: v for n, v in self.step(k).items() if n != "mape_floor"}}
                           for k in range(1, self.horizon + 1)]
        return out
