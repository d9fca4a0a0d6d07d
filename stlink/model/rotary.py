"""SE-Attention rotary tables: temporal RoPE plus a spatial rotation from the road graph.

The attention layers of the backbone stay unchanged: they receive ``position_embeddings=(cos,
sin)`` and apply transformers' own ``apply_rotary_pos_emb``.  Only the tables differ from plain
RoPE.  A head of dimension ``d`` has ``F = d / 2`` rotary pairs; pair ``j`` rotates features
``j`` and ``j + F`` (the ``rotate_half`` layout) by an angle ``theta_j``:

* ``off``:     ``theta_j = t * inv_freq_j``                          (plain RoPE)
* ``compose``: ``theta_j = t * inv_freq_j + phi_{n,j}``              (S = F spatial angles)
* ``split``:   ``theta_j = t * inv_freq_j`` for ``j < F - S`` and
               ``theta_j = phi_{n, j - (F - S)}`` for the last ``S = F // 2`` pairs

``t`` is the token's patch index and ``phi_n`` the phase vector of its sensor.  As in
Qwen2-VL's multimodal RoPE the split is into contiguous frequency sections: the temporal half
keeps the high-frequency pairs, which are the ones that resolve the few patch positions of an
input window.  The score q_i . k_j depends only on ``t_i - t_j`` and ``phi_n - phi_m``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stlink.data.formats import DataError

MODES = ("split", "compose", "off")


def spatial_pairs(n_pairs: int, mode: str) -> int:
    """Number S of rotary pairs that carry a spatial angle under ``mode``."""
    if mode not in MODES:
        raise ValueError(f"model.spatial_rope must be one of {MODES}, got {mode!r}")
    return {"split": n_pairs // 2, "compose": n_pairs, "off": 0}[mode]


def se_rope_cos_sin(
    time_pos: torch.Tensor,
    sensor_phase: torch.Tensor | None,
    inv_freq: torch.Tensor,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables of every token, in float32.

    time_pos: (T,) temporal position of each token; sensor_phase: (T, S) spatial angles of each
    token's sensor (None or S = 0 for ``off``); inv_freq: (F,) the backbone's rotary frequencies.
    Returns cos, sin: (T, 2F), laid out like transformers' ``LlamaRotaryEmbedding`` output.
    """
    n_pairs = inv_freq.shape[0]
    n_spatial = spatial_pairs(n_pairs, mode)
    temporal = time_pos.float()[:, None] * inv_freq.float()[None, :]  # (T, F)
    if n_spatial == 0:
        angle = temporal
    else:
        assert sensor_phase is not None and sensor_phase.shape[-1] == n_spatial, (
            f"spatial_rope={mode} needs {n_spatial} phases per token, got "
            f"{None if sensor_phase is None else tuple(sensor_phase.shape)}")
        phase = sensor_phase.float()  # (T, S)
        if mode == "compose":
            angle = temporal + phase
        else:
            angle = torch.cat([temporal[:, : n_pairs - n_spatial], phase], dim=-1)  # (T, F)
    emb = torch.cat([angle, angle], dim=-1)  # (T, 2F)
    return emb.cos(), emb.sin()


def laplacian_eigenvectors(adjacency: np.ndarray, k: int) -> np.ndarray:
    """First ``k`` eigenvectors of the normalised Laplacian of the symmetrised graph, (N, k).

    L = I - D^-1/2 A_s D^-1/2 with A_s = (A + A^T) / 2.  Eigenvectors are sorted by eigenvalue
    (smoothest first), scaled by sqrt(N) so entries are O(1) whatever the graph size, and
    sign-fixed (largest-magnitude entry positive) so that relabelling the sensors permutes the
    rows and nothing else.  Columns beyond N are zero.
    """
    a = np.asarray(adjacency, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise DataError(f"adjacency: expected a square [N, N] matrix, got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise DataError("adjacency: entries must be finite and non-negative")
    n = a.shape[0]
    sym = (a + a.T) / 2.0
    deg = sym.sum(axis=1)
    inv_sqrt = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-12)), 0.0)
    lap = np.eye(n) - inv_sqrt[:, None] * sym * inv_sqrt[None, :]
    _, vecs = np.linalg.eigh(lap)  # ascending eigenvalues, (N, N)
    vecs = vecs[:, : min(k, n)]
    peak = np.take_along_axis(vecs, np.abs(vecs).argmax(axis=0)[None, :], axis=0)  # (1, k')
    vecs = vecs * np.where(peak < 0, -1.0, 1.0) * np.sqrt(n)
    out = np.zeros((n, k), dtype=np.float32)
    out[:, : vecs.shape[1]] = vecs
    return out


class SpatialPhases(nn.Module):
    """Per-sensor phase vectors phi = E W from fixed Laplacian eigenvectors E and a learned W.

    No bias: a phase common to all sensors cancels in every attention score.
    """

    def __init__(self, eigvecs: np.ndarray, n_spatial: int):
        super().__init__()
        self.register_buffer("eigvecs", torch.as_tensor(eigvecs, dtype=torch.float32))  # (N, k)
        self.proj = nn.Linear(self.eigvecs.shape[1], n_spatial, bias=False)

    def forward(self) -> torch.Tensor:
        """Phases (N, S)."""
        return self.proj(self.eigvecs)
