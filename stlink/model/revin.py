"""Input scaling: the training z-score scaler, then RevIN per sensor and channel.

RevIN (reversible instance normalisation, Kim et al. ICLR 2022) normalises each sensor's input
window by its own mean and standard deviation over the *valid* input steps, and maps the
forecast back with the same statistics.  Missing readings never enter the statistics and are
0 (the window mean) after normalisation.
"""
from __future__ import annotations

import torch
from torch import nn

EPS = 1e-5


def zscore(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Scale with the training scaler; missing entries become 0.  x: (B, L, N, C), mask: (B, L, N)."""
    z = (x - mean) / std  # (B, L, N, C)
    return torch.where(mask[..., None], z, torch.zeros_like(z))


def revin_normalise(
    z: torch.Tensor, mask: torch.Tensor, eps: float = EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-window statistics over the valid steps and the normalised window.

    z: (B, L, N, C), mask: (B, L, N).  Returns (normalised (B, L, N, C), mean (B, 1, N, C),
    std (B, 1, N, C)).  A sensor with no valid step gets mean 0 and std 1.
    """
    m = mask[..., None].to(z.dtype)  # (B, L, N, 1)
    count = m.sum(dim=1, keepdim=True)  # (B, 1, N, 1)
    safe = count.clamp(min=1.0)
    mean = (z * m).sum(dim=1, keepdim=True) / safe  # (B, 1, N, C)
    var = (((z - mean) * m) ** 2).sum(dim=1, keepdim=True) / safe
    std = torch.sqrt(var + eps)
    std = torch.where(count > 0, std, torch.ones_like(std))
    normalised = torch.where(m > 0, (z - mean) / std, torch.zeros_like(z))
    return normalised, mean, std


class RevIN(nn.Module):
    """RevIN with an optional learnable per-channel affine map (``model.revin_affine``)."""

    def __init__(self, n_channels: int, affine: bool, eps: float = EPS):
        super().__init__()
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(n_channels))
            self.bias = nn.Parameter(torch.zeros(n_channels))

    def normalise(
        self, z: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (model input (B, L, N, C), plain normalised window (B, L, N, C), mean, std)."""
        plain, mean, std = revin_normalise(z, mask, self.eps)
        if not self.affine:
            return plain, plain, mean, std
        out = torch.where(mask[..., None], plain * self.weight + self.bias, torch.zeros_like(plain))
        return out, plain, mean, std

    def denormalise(self, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Map a channel-0 forecast back.  y: (B, H, N); mean, std: (B, 1, N, C)."""
        if self.affine:
            y = (y - self.bias[0]) / (self.weight[0] + self.eps * self.eps)
        return y * std[..., 0] + mean[..., 0]
