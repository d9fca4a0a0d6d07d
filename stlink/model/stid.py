"""STID, the learned reference (Shao et al., CIKM 2022: "Spatial-Temporal Identity: A Simple yet
Effective Baseline for Multivariate Time Series Forecasting").

A 0.1 M-parameter MLP: the z-scored input window of each sensor (values and validity flags) is
embedded by one linear map; a learned sensor identity, a time-of-day slot and a day-of-week vector
(both at the window's last step) are concatenated to it; ``stid_layers`` residual MLP blocks and a
linear regression head give the H future steps.  Same forward contract as ST-LINK's ``Forecaster``
(``forward(x, x_mask, tod, dow) -> (B, H, N)`` in original units), so training, evaluation, export
and scoring treat it like any model (``model.arch=stid``).

Day of week follows ``model.day_of_week`` (full | weekday_weekend | off) like ST-LINK's tokens, so
both models see the same calendar information; time of day is STID's slot table.
"""
from __future__ import annotations

import torch
from torch import nn

from stlink.config import ModelConfig
from stlink.model.revin import zscore


class ResidualMLP(nn.Module):
    """x + fc2(dropout(relu(fc1(x)))), on (..., D)."""

    def __init__(self, dim: int, dropout: float = 0.15):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(self.drop(torch.relu(self.fc1(h))))


class STID(nn.Module):
    def __init__(self, mcfg: ModelConfig, *, n_sensors: int, n_channels: int, input_len: int, output_len: int,
                 steps_per_day: int, scaler_mean, scaler_std):
        super().__init__()
        d = mcfg.stid_dim
        self.input_len, self.output_len, self.n_sensors = input_len, output_len, n_sensors
        self.steps_per_day = steps_per_day
        self.dow_mode = {"on": "full"}.get(mcfg.day_of_week, mcfg.day_of_week)
        self.register_buffer("scaler_mean", torch.as_tensor(scaler_mean, dtype=torch.float32).reshape(n_channels))
        self.register_buffer("scaler_std", torch.as_tensor(scaler_std, dtype=torch.float32).reshape(n_channels))
        self.series = nn.Linear(input_len * (n_channels + 1), d)
        self.node = nn.Parameter(torch.empty(n_sensors, d))
        self.tod = nn.Parameter(torch.empty(steps_per_day, d))
        n_days = {"full": 7, "weekday_weekend": 2}.get(self.dow_mode, 0)
        self.dow = nn.Parameter(torch.empty(n_days, d)) if n_days else None
        for table in (self.node, self.tod, self.dow):
            if table is not None:
                nn.init.xavier_uniform_(table)
        hidden = d * (3 + (self.dow is not None))
        self.encoder = nn.Sequential(*[ResidualMLP(hidden) for _ in range(mcfg.stid_layers)])
        self.head = nn.Linear(hidden, output_len)

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, tod: torch.Tensor, dow: torch.Tensor) -> torch.Tensor:
        b, l, n, c = x.shape
        assert l == self.input_len and n == self.n_sensors, (
            f"expected x of shape (B, {self.input_len}, {self.n_sensors}, C), got {tuple(x.shape)}")
        z = zscore(x, x_mask, self.scaler_mean, self.scaler_std)                      # (B, L, N, C)
        feats = torch.cat([z, x_mask[..., None].to(z.dtype)], dim=-1)                 # (B, L, N, C+1)
        feats = feats.permute(0, 2, 1, 3).reshape(b, n, l * (c + 1))                  # (B, N, L*(C+1))
        slot = torch.remainder(torch.round(tod[:, -1] * self.steps_per_day).long(), self.steps_per_day)  # (B,)
        parts = [self.series(feats), self.node[None].expand(b, -1, -1), self.tod[slot][:, None].expand(-1, n, -1)]
        if self.dow is not None:
            day = (dow[:, -1] >= 5).long() if self.dow_mode == "weekday_weekend" else dow[:, -1]  # (B,)
            parts.append(self.dow[day][:, None].expand(-1, n, -1))
        h = self.encoder(torch.cat(parts, dim=-1))                                    # (B, N, hidden)
        y = self.head(h).transpose(1, 2)                                              # (B, H, N)
        return y * self.scaler_std[0] + self.scaler_mean[0]
