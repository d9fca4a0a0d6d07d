"""The ST-LINK forecaster: patch tokens -> SE-Attention LLM layers (+ MRFFN) -> per-sensor head.

Forward contract (training, evaluation and export rely on it exactly):
  forward(x, x_mask, tod, dow) -> y_hat
    x      (B, L, N, C) float32, original units (entries where x_mask is False are ignored)
    x_mask (B, L, N)    bool, valid readings
    tod    (B, L)       float32, fraction of the day in [0, 1)
    dow    (B, L)       int64, day of week 0..6
    y_hat  (B, H, N)    float32, channel 0 in original units
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stlink.config import ModelConfig
from stlink.model.backbone import load_backbone
from stlink.model.graph import GraphAttentionBias, NeighbourFeatures
from stlink.model.lora import apply_lora, describe_trainable
from stlink.model.memory import MemoryRead, topk_cosine
from stlink.model.revin import RevIN, zscore
from stlink.model.rotary import SpatialPhases, laplacian_eigenvectors, se_rope_cos_sin, spatial_pairs


TIME_OF_DAY = {"fourier": "fourier", "embedding": "embedding", "off": "off", "on": "embedding"}
DAY_OF_WEEK = {"full": "full", "weekday_weekend": "weekday_weekend", "off": "off", "on": "full"}
NODE_EMBEDDING = ("free", "laplacian", "none")
GRAPH_FEATURES = ("diffusion", "off")
GRAPH_BIAS = ("hops", "off")
WINDOW_SKIP = ("linear", "sensor", "off")
FOURIER_HARMONICS = 6  # default model.tod_harmonics: sin/cos of 1..6 cycles per day


def fourier_time(tod: torch.Tensor, harmonics: int = FOURIER_HARMONICS) -> torch.Tensor:
    """tod (...,) fraction of the day -> (..., 2K) [sin(2 pi k tod), cos(2 pi k tod)], k = 1..K."""
    k = torch.arange(1, harmonics + 1, device=tod.device, dtype=torch.float32)  # (K,)
    angle = 2.0 * math.pi * tod.float()[..., None] * k                           # (..., K)
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


class CalendarEncoding(nn.Module):
    """Time of day (fourier -> linear | slot table | off) and day of week (7 rows | weekday/weekend | off),
    both read at each patch's LAST step (the most recent time the patch has seen)."""

    def __init__(self, hidden: int, steps_per_day: int, init_std: float, time_of_day: str, day_of_week: str,
                 harmonics: int = FOURIER_HARMONICS):
        super().__init__()
        if harmonics < 1:
            raise ValueError(f"model.tod_harmonics must be >= 1, got {harmonics}")
        self.tod_mode, self.dow_mode = TIME_OF_DAY[time_of_day], DAY_OF_WEEK[day_of_week]
        self.steps_per_day, self.harmonics = steps_per_day, harmonics
        self.tod = {"fourier": lambda: nn.Linear(2 * harmonics, hidden, bias=False),
                    "embedding": lambda: nn.Embedding(steps_per_day, hidden), "off": lambda: None}[self.tod_mode]()
        self.dow = {"full": lambda: nn.Embedding(7, hidden), "weekday_weekend": lambda: nn.Embedding(2, hidden),
                    "off": lambda: None}[self.dow_mode]()
        for table in (self.tod, self.dow):
            if table is not None:
                nn.init.normal_(table.weight, std=init_std)

    def forward(self, tod: torch.Tensor, dow: torch.Tensor) -> torch.Tensor | None:
        """tod, dow (B, P) at each patch's last step -> (B, P, D), or None when both are off."""
        out = None
        if self.tod_mode == "fourier":
            out = self.tod(fourier_time(tod, self.harmonics))                               # (B, P, D)
        elif self.tod_mode == "embedding":
            slot = torch.remainder(torch.round(tod * self.steps_per_day).long(), self.steps_per_day)
            out = self.tod(slot)                                                            # (B, P, D)
        if self.dow is not None:
            day = (dow >= 5).long() if self.dow_mode == "weekday_weekend" else dow         # (B, P)
            out = self.dow(day) if out is None else out + self.dow(day)
        return out


class SensorIdentity(nn.Module):
    """A vector per sensor added to every token of that sensor (STID's node embedding).

    ``free``: a learned (N, D) table, or with ``dim`` > 0 a learned (N, dim) table and a learned map to D
    (fewer numbers per sensor, as STID's 32).  ``laplacian``: a learned linear map of the first k Laplacian
    eigenvectors, so relabelling the sensors (with the graph) permutes the vectors and nothing else.
    """

    def __init__(self, mode: str, n_sensors: int, hidden: int, adjacency: np.ndarray, n_eigvecs: int, init_std: float,
                 dim: int = 0):
        super().__init__()
        self.mode = mode
        if dim < 0:
            raise ValueError(f"model.node_dim must be >= 0, got {dim}")
        self.proj = None
        if mode == "free":
            self.table = nn.Parameter(torch.randn(n_sensors, dim or hidden) * (dim ** -0.5 if dim else init_std))  # (N, k|D)
            if dim:
                self.proj = nn.Linear(dim, hidden, bias=False)
                nn.init.normal_(self.proj.weight, std=init_std)
        else:
            self.register_buffer("eigvecs", torch.as_tensor(laplacian_eigenvectors(adjacency, n_eigvecs)))  # (N, k)
            self.proj = nn.Linear(n_eigvecs, hidden, bias=False)
            nn.init.normal_(self.proj.weight, std=init_std)

    def forward(self) -> torch.Tensor:
        """(N, D)."""
        if self.mode == "free":
            return self.table if self.proj is None else self.proj(self.table)
        return self.proj(self.eigvecs)


class PatchEmbedding(nn.Module):
    """Token = linear(patch values and validity flags) + calendar at the patch's last step
    (+ sensor identity and window level, added by the forecaster)."""

    def __init__(self, patch_len: int, n_channels: int, hidden: int, steps_per_day: int, init_std: float,
                 time_of_day: str = "fourier", day_of_week: str = "weekday_weekend", harmonics: int = FOURIER_HARMONICS):
        super().__init__()
        self.patch_len = patch_len
        self.steps_per_day = steps_per_day
        self.value = nn.Linear(patch_len * (n_channels + 1), hidden)
        nn.init.normal_(self.value.weight, std=init_std)
        nn.init.zeros_(self.value.bias)
        self.calendar = CalendarEncoding(hidden, steps_per_day, init_std, time_of_day, day_of_week, harmonics)

    def forward(self, xn: torch.Tensor, mask: torch.Tensor, tod: torch.Tensor, dow: torch.Tensor) -> torch.Tensor:
        """xn (B, L, N, C), mask (B, L, N), tod (B, L), dow (B, L) -> tokens (B, N, P, D)."""
        b, l, n, c = xn.shape
        p = l // self.patch_len
        feats = torch.cat([xn, mask[..., None].to(xn.dtype)], dim=-1)           # (B, L, N, C+1)
        feats = feats.permute(0, 2, 1, 3).reshape(b, n, p, self.patch_len * (c + 1))  # (B, N, P, pl*(C+1))
        tokens = self.value(feats)                                               # (B, N, P, D)
        last = slice(self.patch_len - 1, None, self.patch_len)                   # each patch's last step
        cal = self.calendar(tod[:, last], dow[:, last])                          # (B, P, D) or None
        return tokens if cal is None else tokens + cal[:, None]                  # (B, N, P, D)


class WindowSkip(nn.Module):
    """Linear(L -> H) over each sensor's own window, starting as "repeat the last reading".

    ``per_sensor=False`` (``model.window_skip: linear``): one map shared by all sensors, so the exact
    values reach the forecast without passing through the tokens' width and the network only has to
    learn the change.  ``per_sensor=True`` (``sensor``): one map per sensor (a noisy sensor could learn
    to smooth, a clean one to copy); relabelling the sensors means relabelling the rows of ``weight``
    and ``bias``, like a free sensor identity.
    """

    def __init__(self, n_sensors: int, input_len: int, output_len: int, per_sensor: bool):
        super().__init__()
        n_maps = n_sensors if per_sensor else 1
        weight = torch.zeros(n_maps, output_len, input_len)
        weight[:, :, -1] = 1.0
        self.weight = nn.Parameter(weight)                                   # (N or 1, H, L)
        self.bias = nn.Parameter(torch.zeros(n_maps, output_len))            # (N or 1, H)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the two maps became one module (commit f4a1d31) hold the shared map as
        an ``nn.Linear``: weight (H, L), bias (H,).  They load as the one map they are."""
        for name, ndim in (("weight", 2), ("bias", 1)):
            value = state_dict.get(prefix + name)
            if value is not None and value.ndim == ndim and self.weight.shape[0] == 1:
                state_dict[prefix + name] = value[None]                      # (1, H, L) / (1, H)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, z0: torch.Tensor) -> torch.Tensor:
        """z0 (B, L, N) -> (B, H, N)."""
        n = z0.shape[-1]
        weight = self.weight.expand(n, -1, -1)                               # (N, H, L)
        return torch.einsum("bln,nhl->bhn", z0, weight) + self.bias.expand(n, -1).T


def level_features(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RevIN statistics (B, 1, N, C) in z-score units -> (B, N, 2C): window mean and log std."""
    return torch.cat([mean[:, 0], std[:, 0].clamp(min=1e-3).log()], dim=-1)


class DecoderStack(nn.Module):
    """The kept decoder layers run bidirectionally with precomputed (cos, sin).

    ``reads`` holds one memory read (B, T, D) per MRFFN layer, for the last ``len(reads)`` layers.
    ``place="output"`` adds it to the layer output (= to the FFN output: a parallel residual, read by
    later layers only); ``place="input"`` adds it to the layer input, so that layer's attention and
    FFN already use it (with one kept layer, the only placement a layer can use).
    """

    def __init__(self, layers: nn.ModuleList, place: str = "output"):
        super().__init__()
        if place not in ("input", "output"):
            raise ValueError(f"model.mrffn_place must be 'input' or 'output', got {place!r}")
        self.layers = layers
        self.place = place
        for layer in layers:
            layer.self_attn.is_causal = False  # sdpa/flash fall back to this flag when no mask is given

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, reads: list[torch.Tensor],
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """bias: an additive attention bias (1, H, T, T) or None."""
        first_read = len(self.layers) - len(reads)
        for i, layer in enumerate(self.layers):
            if i >= first_read and self.place == "input":
                h = h + reads[i - first_read]
            h = layer(h, attention_mask=bias, position_embeddings=(cos, sin), is_causal=False)  # (B, T, D)
            if i >= first_read and self.place == "output":
                h = h + reads[i - first_read]
        return h


class Forecaster(nn.Module):
    """ST-LINK.  Build it with :func:`build_forecaster`."""

    def __init__(self, mcfg: ModelConfig, stack: nn.Module, rotary: nn.Module, config, *, n_sensors: int,
                 n_channels: int, input_len: int, output_len: int, steps_per_day: int, adjacency: np.ndarray,
                 scaler_mean, scaler_std, memory_keys: np.ndarray | None):
        super().__init__()
        hidden = config.hidden_size
        n_pairs = rotary.inv_freq.shape[0]
        self.mode = mcfg.spatial_rope
        self.n_patches = input_len // mcfg.patch_len
        self.input_len, self.output_len, self.n_sensors = input_len, output_len, n_sensors
        self.rope_scale = float(rotary.attention_scaling)
        self.register_buffer("scaler_mean", torch.as_tensor(scaler_mean, dtype=torch.float32).reshape(n_channels))
        self.register_buffer("scaler_std", torch.as_tensor(scaler_std, dtype=torch.float32).reshape(n_channels))
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)  # (F,)
        init_std = getattr(config, "initializer_range", 0.02)
        self.use_revin = mcfg.revin
        self.revin = RevIN(n_channels, mcfg.revin_affine and mcfg.revin)
        self.embed = PatchEmbedding(mcfg.patch_len, n_channels, hidden, steps_per_day, init_std,
                                    mcfg.time_of_day, mcfg.day_of_week, mcfg.tod_harmonics)
        self.identity = (SensorIdentity(mcfg.node_embedding, n_sensors, hidden, adjacency, mcfg.node_eigvecs, init_std,
                                        mcfg.node_dim)
                         if mcfg.node_embedding != "none" else None)
        # not "graph": torch.export's GraphModule owns that attribute name (the dynamo exporter fails on it)
        self.neighbours = (NeighbourFeatures(adjacency, mcfg.graph_hops, mcfg.patch_len, n_channels, hidden, init_std)
                           if mcfg.graph_features == "diffusion" else None)
        self.attn_bias = (GraphAttentionBias(adjacency, mcfg.graph_hops, config.num_attention_heads)
                          if mcfg.graph_bias == "hops" else None)
        self.level = nn.Linear(2 * n_channels, hidden) if mcfg.level_features else None
        if self.level is not None:
            nn.init.normal_(self.level.weight, std=init_std)
            nn.init.zeros_(self.level.bias)
        self.mrffn_query = mcfg.mrffn_query
        n_spatial = spatial_pairs(n_pairs, self.mode)
        self.phases = (SpatialPhases(laplacian_eigenvectors(adjacency, mcfg.spatial_dim), n_spatial)
                       if n_spatial else None)
        self.topk = mcfg.memory_topk
        if mcfg.mrffn == "on":
            self.register_buffer("memory_keys", torch.as_tensor(memory_keys, dtype=torch.float32))  # (M, L)
            self.memory = nn.ModuleList(MemoryRead(mcfg.memory_size, hidden) for _ in range(mcfg.mrffn_layers))
        else:
            self.memory = nn.ModuleList()
        self.backbone = apply_lora(stack, mcfg)
        self.norm = nn.LayerNorm(hidden)
        if not 0.0 <= mcfg.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {mcfg.dropout}")
        self.drop = nn.Dropout(mcfg.dropout)  # no parameters: checkpoints stay loadable whatever the rate
        if mcfg.head not in ("linear", "mlp"):
            raise ValueError(f"model.head must be 'linear' or 'mlp', got {mcfg.head!r}")
        self.head = (nn.Linear(self.n_patches * hidden, output_len) if mcfg.head == "linear" else
                     nn.Sequential(nn.Linear(self.n_patches * hidden, hidden), nn.GELU(), nn.Linear(hidden, output_len)))

        # RevIN scales the head's output by the window's std: a flat window (std ~ 0) cannot forecast a
        # drop.  This second, zero-initialised linear head adds its forecast in global z units instead.
        self.global_head = nn.Linear(self.n_patches * hidden, output_len) if mcfg.global_head else None
        if self.global_head is not None:
            nn.init.zeros_(self.global_head.weight)
            nn.init.zeros_(self.global_head.bias)
        self.skip = (WindowSkip(n_sensors, input_len, output_len, per_sensor=mcfg.window_skip == "sensor")
                     if mcfg.window_skip != "off" else None)

    def rope_tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of the N*P tokens in sensor-major order, (1, N*P, head_dim)."""
        time_pos = torch.arange(self.n_patches, device=self.inv_freq.device).repeat(n)  # (N*P,)
        phase = None
        if self.phases is not None:
            phase = self.phases().repeat_interleave(self.n_patches, dim=0)  # (N*P, S)
        cos, sin = se_rope_cos_sin(time_pos, phase, self.inv_freq, self.mode)
        return cos[None] * self.rope_scale, sin[None] * self.rope_scale

    def memory_reads(self, window: torch.Tensor) -> list[torch.Tensor]:
        """window: channel 0 in the keys' space (``model.mrffn_query``), (B, L, N) -> one read (B, N*P, D) per MRFFN layer."""
        if len(self.memory) == 0:
            return []
        sims, idx = topk_cosine(window.transpose(1, 2), self.memory_keys, self.topk)  # (B, N, k)
        return [read(sims, idx).repeat_interleave(self.n_patches, dim=1) for read in self.memory]

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor, tod: torch.Tensor, dow: torch.Tensor) -> torch.Tensor:
        b, l, n, _ = x.shape
        assert l == self.input_len and n == self.n_sensors, (
            f"expected x of shape (B, {self.input_len}, {self.n_sensors}, C), got {tuple(x.shape)}")
        z = zscore(x, x_mask, self.scaler_mean, self.scaler_std)          # (B, L, N, C)
        xn, plain, mean, std = self.revin.normalise(z, x_mask)            # (B, L, N, C), stats (B, 1, N, C)
        tokens = self.embed(xn if self.use_revin else z, x_mask, tod, dow)  # (B, N, P, D)
        if self.identity is not None:
            tokens = tokens + self.identity()[None, :, None]              # (B, N, P, D)
        if self.level is not None:
            tokens = tokens + self.level(level_features(mean, std))[:, :, None]  # (B, N, P, D)
        if self.neighbours is not None:
            tokens = tokens + self.neighbours(z, x_mask)                   # (B, N, P, D)
        h = tokens.reshape(b, n * self.n_patches, -1)                      # (B, N*P, D)
        cos, sin = self.rope_tables(n)                                     # (1, N*P, head_dim), float32
        query = plain[..., 0] if self.mrffn_query == "revin" else z[..., 0]  # (B, L, N)
        reads = [r.to(h.dtype) for r in self.memory_reads(query)]
        bias = None if self.attn_bias is None else self.attn_bias(self.n_patches).to(h.dtype)  # (1, H, T, T)
        h = self.backbone(self.drop(h), cos.to(h.dtype), sin.to(h.dtype), reads, bias)  # (B, N*P, D)
        h = self.drop(self.norm(h)).reshape(b, n, -1)                      # (B, N, P*D)
        y = self.head(h).transpose(1, 2)                                   # (B, H, N)
        if self.use_revin:
            y = self.revin.denormalise(y, mean, std)
        if self.global_head is not None:
            y = y + self.global_head(h).transpose(1, 2)                    # (B, H, N), global z units
        if self.skip is not None:
            y = y + self.skip(z[..., 0])                                   # (B, L, N) -> (B, H, N), global z units
        return y * self.scaler_std[0] + self.scaler_mean[0]


def _check(mcfg: ModelConfig, n_sensors: int, input_len: int, adjacency: np.ndarray,
           memory_keys: np.ndarray | None) -> None:
    if mcfg.patch_len < 1 or input_len % mcfg.patch_len:
        raise ValueError(f"input_len={input_len} must be divisible by model.patch_len={mcfg.patch_len}")
    if np.shape(adjacency) != (n_sensors, n_sensors):
        raise ValueError(f"adjacency has shape {np.shape(adjacency)}, expected ({n_sensors}, {n_sensors})")
    if mcfg.spatial_rope != "off" and mcfg.spatial_dim < 1:
        raise ValueError(f"model.spatial_dim must be >= 1 with spatial_rope={mcfg.spatial_rope}, got {mcfg.spatial_dim}")
    if mcfg.time_of_day not in TIME_OF_DAY:
        raise ValueError(f"model.time_of_day must be one of fourier | embedding | off, got {mcfg.time_of_day!r}")
    if mcfg.day_of_week not in DAY_OF_WEEK:
        raise ValueError(f"model.day_of_week must be one of full | weekday_weekend | off, got {mcfg.day_of_week!r}")
    if mcfg.node_embedding not in NODE_EMBEDDING:
        raise ValueError(f"model.node_embedding must be one of {' | '.join(NODE_EMBEDDING)}, got {mcfg.node_embedding!r}")
    if mcfg.graph_features not in GRAPH_FEATURES:
        raise ValueError(f"model.graph_features must be one of {' | '.join(GRAPH_FEATURES)}, got {mcfg.graph_features!r}")
    if mcfg.window_skip not in WINDOW_SKIP:
        raise ValueError(f"model.window_skip must be one of {' | '.join(WINDOW_SKIP)}, got {mcfg.window_skip!r}")
    if mcfg.graph_bias not in GRAPH_BIAS:
        raise ValueError(f"model.graph_bias must be one of {' | '.join(GRAPH_BIAS)}, got {mcfg.graph_bias!r}")
    if (mcfg.graph_features != "off" or mcfg.graph_bias != "off") and mcfg.graph_hops < 1:
        raise ValueError(f"model.graph_hops must be >= 1, got {mcfg.graph_hops}")
    if mcfg.mrffn_query not in ("zscore", "revin"):
        raise ValueError(f"model.mrffn_query must be 'zscore' or 'revin', got {mcfg.mrffn_query!r}")
    if mcfg.mrffn not in ("on", "off"):
        raise ValueError(f"model.mrffn must be 'on' or 'off', got {mcfg.mrffn!r}")
    if mcfg.mrffn == "on":
        if not 1 <= mcfg.mrffn_layers <= mcfg.n_layers:
            raise ValueError(f"model.mrffn_layers={mcfg.mrffn_layers} must be in 1..n_layers={mcfg.n_layers}")
        if not 1 <= mcfg.memory_topk <= mcfg.memory_size:
            raise ValueError(f"model.memory_topk={mcfg.memory_topk} must be in 1..memory_size={mcfg.memory_size}")
        expected = (mcfg.memory_size, input_len)
        if memory_keys is None or np.shape(memory_keys) != expected:
            raise ValueError(
                f"model.mrffn=on needs memory_keys of shape {expected} (memory_patterns + kmeans on the "
                f"training split), got {None if memory_keys is None else np.shape(memory_keys)}")


def build_forecaster(mcfg: ModelConfig, *, n_sensors: int, n_channels: int, input_len: int, output_len: int,
                     steps_per_day: int, adjacency: np.ndarray, scaler_mean, scaler_std,
                     memory_keys: np.ndarray | None, cache_dir: Path = Path("models/backbones")) -> Forecaster:
    """Load the backbone, add the ST-LINK modules and LoRA; prints the trainable parameter count."""
    if mcfg.arch == "stid":
        from stlink.model.stid import STID

        model = STID(mcfg, n_sensors=n_sensors, n_channels=n_channels, input_len=input_len, output_len=output_len,
                     steps_per_day=steps_per_day, scaler_mean=scaler_mean, scaler_std=scaler_std)
        print(describe_trainable(model))
        return model
    if mcfg.arch != "stlink":
        raise ValueError(f"model.arch must be 'stlink' or 'stid', got {mcfg.arch!r}")
    _check(mcfg, n_sensors, input_len, adjacency, memory_keys)
    layers, rotary, config = load_backbone(mcfg, cache_dir)
    model = Forecaster(
        mcfg, DecoderStack(layers, mcfg.mrffn_place), rotary, config, n_sensors=n_sensors, n_channels=n_channels,
        input_len=input_len, output_len=output_len, steps_per_day=steps_per_day, adjacency=adjacency,
        scaler_mean=scaler_mean, scaler_std=scaler_std, memory_keys=memory_keys)
    print(describe_trainable(model))
    return model
