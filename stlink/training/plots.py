"""Evaluation plots: error by horizon step (PNG + CSV for ``dvc plots``) and forecast vs actual.

Matplotlib runs with the Agg backend (no display needed).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from stlink.io import atomic_path  # noqa: E402

METRICS = ("mae", "rmse", "mape")


def horizon_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per horizon step: ``step`` and ``<method>_<metric>`` for every method's per_step."""
    methods = list(results)
    n_steps = len(results[methods[0]]["per_step"])
    rows = []
    for i in range(n_steps):
        row: dict[str, Any] = {"step": i + 1}
        for m in methods:
            entry = results[m]["per_step"][i]
            row.update({f"{m}_{k}": entry[k] for k in METRICS})
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with atomic_path(path, ".csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _save(fig, path: Path) -> None:
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_horizon(rows: list[dict[str, Any]], methods: list[str], path: Path, title: str, mape_floor: float) -> None:
    """MAE, RMSE and MAPE by horizon step, one line per method."""
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, metric in zip(axes, METRICS):
        for m in methods:
            vals = [np.nan if r[f"{m}_{metric}"] is None else r[f"{m}_{metric}"] for r in rows]
            ax.plot(steps, vals, marker="o", ms=3, lw=2.2 if m == "model" else 1.2, label=m)
        label = f"MAPE % (|y| >= {mape_floor:g})" if metric == "mape" else metric.upper()
        ax.set(xlabel="horizon step (single step, not cumulative)", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    _save(fig, path)


def plot_forecasts(times: np.ndarray, actual: np.ndarray, forecasts: dict[str, np.ndarray],
                   sensor_names: list[str], path: Path, title: str) -> None:
    """Actual vs forecasts over a stretch of time for a few sensors.

    times: (T,) datetime64; actual: (T, S) with NaN where missing; forecasts: label -> (T, S).
    """
    n = len(sensor_names)
    fig, axes = plt.subplots(n, 1, figsize=(12, 2.6 * n), sharex=True, squeeze=False)
    for j, ax in enumerate(axes[:, 0]):
        ax.plot(times, actual[:, j], color="black", lw=1.6, label="actual")
        for label, f in forecasts.items():
            ax.plot(times, f[:, j], lw=1.1, label=label)
        ax.set_ylabel(sensor_names[j])
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize="small")
    axes[0, 0].set_title(title)
    fig.autofmt_xdate()
    _save(fig, path)
