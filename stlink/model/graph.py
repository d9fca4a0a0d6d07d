"""Two more ways the road graph enters ST-LINK besides the spatial rotation (docs/method.md,
"Other ways the road graph enters"):

* ``model.graph_features=diffusion``: the neighbours' readings, 1..hops edges downstream and
  upstream, on every token (:class:`NeighbourFeatures`);
* ``model.graph_bias=hops``: a learned attention bias per head and hop bucket
  (:class:`GraphAttentionBias`).

Both are graph constants (buffers built from the adjacency) plus a few weights, so relabelling
the sensors with the graph relabels the forecast, and both export to ONNX.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def transition_matrices(adjacency: np.ndarray, hops: int) -> np.ndarray:
    """Row-normalised road-graph transitions, (2 * hops, N, N): downstream^1..hops, then upstream^1..hops.

    Self-loops are dropped, so row n averages sensor n's neighbours only (DCRNN's D_O^-1 A and
    D_I^-1 A^T, kept apart because a queue travels against the traffic).  A sensor without
    neighbours in a direction gets a zero row.
    """
    a = np.asarray(adjacency, dtype=np.float64).copy()
    np.fill_diagonal(a, 0.0)
    out = []
    for m in (a, a.T):
        deg = m.sum(axis=1, keepdims=True)
        step = np.divide(m, deg, out=np.zeros_like(m), where=deg > 0)   # (N, N), rows sum to 1 or 0
        power = np.eye(len(a))
        for _ in range(hops):
            power = power @ step
            out.append(power)
    return np.stack(out).astype(np.float32)


class NeighbourFeatures(nn.Module):
    """What the road graph says around each sensor: the masked average of its neighbours' z-scored
    readings, 1..hops steps downstream and upstream, per input step, projected onto its tokens."""

    def __init__(self, adjacency: np.ndarray, hops: int, patch_len: int, n_channels: int, hidden: int, init_std: float):
        super().__init__()
        self.register_buffer("trans", torch.as_tensor(transition_matrices(adjacency, hops)))  # (K, N, N)
        self.patch_len = patch_len
        self.proj = nn.Linear(patch_len * self.trans.shape[0] * n_channels, hidden, bias=False)
        nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z (B, L, N, C) z-scored, mask (B, L, N) -> (B, N, P, D)."""
        b, l, n, c = z.shape
        m = mask.to(z.dtype)                                                    # (B, L, N)
        vals = (z * m[..., None]).permute(0, 2, 1, 3).reshape(b, 1, n, l * c)   # (B, 1, N, L*C)
        trans = self.trans.to(z.dtype)
        num = (trans @ vals).reshape(b, -1, n, l, c)                            # (B, K, N, L, C)
        den = (trans @ m.transpose(1, 2)[:, None])[..., None]                   # (B, K, N, L, 1)
        avg = torch.where(den > 1e-6, num / den.clamp(min=1e-6), torch.zeros_like(num))  # (B, K, N, L, C)
        p = l // self.patch_len
        feats = avg.permute(0, 2, 3, 1, 4).reshape(b, n, p, -1)                 # (B, N, P, pl*K*C)
        return self.proj(feats)                                                 # (B, N, P, D)


def hop_buckets(adjacency: np.ndarray, hops: int) -> np.ndarray:
    """(N, N) int64 bucket of each (query sensor, key sensor) pair: 0 itself, 1..hops the key is that many
    edges downstream, hops+1..2*hops that many upstream, 2*hops+1 farther (or unreachable)."""
    a = (np.asarray(adjacency) > 0).astype(np.int64)                      # (N, N) edges, a copy
    n = len(a)
    np.fill_diagonal(a, 0)
    down = np.full((n, n), np.iinfo(np.int64).max)
    reach = np.eye(n, dtype=bool)
    for k in range(1, hops + 1):
        reach = (reach.astype(np.int64) @ a) > 0                           # (N, N) walks of exactly k edges
        down = np.where(reach & (down > k), k, down)
    out = np.full((n, n), 2 * hops + 1, dtype=np.int64)
    up = down.T
    out = np.where(up <= hops, hops + up, out)
    out = np.where(down <= hops, down, out)                               # downstream wins on a two-way edge
    np.fill_diagonal(out, 0)
    return out


class GraphAttentionBias(nn.Module):
    """A learned additive attention bias per head and road-graph hop bucket (zero at init)."""

    def __init__(self, adjacency: np.ndarray, hops: int, n_heads: int):
        super().__init__()
        self.register_buffer("bucket", torch.as_tensor(hop_buckets(adjacency, hops)))     # (N, N)
        self.table = nn.Parameter(torch.zeros(2 * hops + 2, n_heads))                     # (buckets, H)

    def forward(self, n_patches: int) -> torch.Tensor:
        """(1, H, N*P, N*P) in sensor-major token order."""
        bias = self.table[self.bucket].permute(2, 0, 1)                                   # (H, N, N)
        bias = bias.repeat_interleave(n_patches, dim=1).repeat_interleave(n_patches, dim=2)
        return bias[None]
