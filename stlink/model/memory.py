"""MRFFN: a pattern memory read added to the feed-forward output of the last layers.

Keys are M representative input patterns (RevIN-normalised channel-0 windows of one sensor,
length L) found by k-means over the TRAINING split only.  The query is the sensor's own
RevIN-normalised window, so it lives in the same space as the keys from the first step (the
PM-MemNet choice); the top-k keys by cosine similarity are read with softmax weights
(learned temperature) over learned values of the hidden size, and the read is added to the
FFN output of every token of that sensor (a parallel residual).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from stlink.model.revin import revin_normalise, zscore


def memory_patterns(train_dataset, n_max: int = 20000, seed: int = 0, query: str = "revin") -> np.ndarray:
    """Channel-0 input windows (W, L) of fully observed sensors, train split only, in the space the
    model queries with (``model.mrffn_query``): ``revin`` (RevIN-normalised: shape only) or
    ``zscore`` (the global training z-score: shape and level).

    ``train_dataset`` is a ``stlink.data.windows.WindowDataset``; windows are taken at evenly
    spaced starts so that at most ``n_max`` (window, sensor) patterns are returned.
    """
    if getattr(train_dataset, "split", None) != "train":
        raise ValueError(
            f"memory patterns must come from the training split only, got split "
            f"{getattr(train_dataset, 'split', None)!r}")
    if len(train_dataset) == 0:
        raise ValueError("the training split has no window: cannot build the pattern memory")
    scaler = train_dataset.data.meta["scaler"]
    mean = torch.tensor(scaler["mean"], dtype=torch.float32)
    std = torch.tensor(scaler["std"], dtype=torch.float32)
    n_sensors = train_dataset.data.values.shape[1]
    n_windows = min(len(train_dataset), max(1, math.ceil(n_max / n_sensors)))
    picks = np.unique(np.linspace(0, len(train_dataset) - 1, n_windows).round().astype(np.int64))
    out = []
    for i in picks:
        item = train_dataset[int(i)]
        x = torch.from_numpy(item["x"])[None]            # (1, L, N, C)
        m = torch.from_numpy(item["x_mask"])[None]       # (1, L, N)
        z = zscore(x, m, mean, std)                      # (1, L, N, C)
        window = revin_normalise(z, m)[0] if query == "revin" else z
        full = m[0].all(dim=0)                           # (N,)
        out.append(window[0, :, :, 0].T[full].numpy())   # (n_full, L)
    patterns = np.concatenate(out, axis=0).astype(np.float32)
    if len(patterns) > n_max:
        keep = np.sort(np.random.default_rng(seed).choice(len(patterns), n_max, replace=False))
        patterns = patterns[keep]
    return patterns


def kmeans(patterns: np.ndarray, m: int, seed: int, n_iter: int = 100) -> np.ndarray:
    """Deterministic k-means (k-means++ start, Lloyd steps) -> (m, L) centroids, float32."""
    x = np.asarray(patterns, dtype=np.float64)
    if x.ndim != 2 or len(x) < m:
        raise ValueError(f"k-means needs at least {m} patterns of shape (W, L), got {x.shape}")
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, m):
        d2 = ((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1).min(axis=1)  # (W,)
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1.0 / len(x))
        centres.append(x[rng.choice(len(x), p=probs)])
    c = np.asarray(centres)  # (m, L)
    for _ in range(n_iter):
        d2 = (x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None, :]  # (W, m)
        assign = d2.argmin(axis=1)
        new = c.copy()
        for j in range(m):
            members = x[assign == j]
            if len(members):
                new[j] = members.mean(axis=0)
            else:  # empty cluster: restart it at the point worst served now
                new[j] = x[d2.min(axis=1).argmax()]
        if np.allclose(new, c):
            break
        c = new
    return c.astype(np.float32)


TIE_BREAK = 1e-5  # key j loses j * TIE_BREAK / M of similarity: equal scores pick the lowest index


def topk_cosine(query: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k keys by cosine similarity.  query: (B, N, L), keys: (M, L) -> sims, idx: (B, N, k).

    Ties (e.g. a flat window, whose normalised query is 0 and equally similar to every key) are
    broken by key index, explicitly: top-k's own order among equal values is not specified and
    differs between PyTorch and onnxruntime.
    """
    q = query / query.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    kn = keys / keys.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    m = keys.shape[0]
    order = torch.arange(m, device=keys.device, dtype=q.dtype) * (TIE_BREAK / m)  # (M,)
    sims = q @ kn.T - order  # (B, N, M)
    return torch.topk(sims, k, dim=-1)


class MemoryRead(nn.Module):
    """Learned values (M, D) of one layer, read with softmax(temperature * cosine) weights.

    Values start at zero, so at initialisation the layer is exactly the pretrained one.
    """

    def __init__(self, memory_size: int, hidden: int, temperature: float = 10.0):
        super().__init__()
        self.values = nn.Parameter(torch.zeros(memory_size, hidden))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def forward(self, sims: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """sims, idx: (B, N, k) -> read (B, N, D)."""
        w = torch.softmax(sims * self.log_temperature.exp(), dim=-1)  # (B, N, k)
        return (w[..., None] * self.values[idx]).sum(dim=-2)  # (B, N, D)
