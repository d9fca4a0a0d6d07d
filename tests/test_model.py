"""Model tests: closed forms of the rotary tables, memory retrieval, the LoRA contract, invariances
and an overfit run, all on the ``tiny`` random Llama backbone."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from stlink.config import ModelConfig
from stlink.data.formats import DataError, ProcessedData
from stlink.data.windows import WindowDataset
from stlink.model import build_forecaster, kmeans, memory_patterns, merge_lora, trainable_parameters
from stlink.model.backbone import BackboneError, load_backbone, tiny_config
from stlink.model.lora import lora_target_regex
from stlink.model.memory import MemoryRead, topk_cosine
from stlink.model.rotary import laplacian_eigenvectors, se_rope_cos_sin, spatial_pairs

N, L, H, C, SPD, M = 5, 12, 12, 2, 288, 8


def _adjacency(n: int = N, seed: int = 0) -> np.ndarray:
    """A random weighted directed graph with self loops (no repeated Laplacian eigenvalues)."""
    a = np.random.default_rng(seed).random((n, n)).astype(np.float32)
    a[a < 0.3] = 0.0
    np.fill_diagonal(a, 1.0)
    return a


def _keys(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((M, L)).astype(np.float32)


def _build(seed: int = 0, adjacency: np.ndarray | None = None, **overrides) -> torch.nn.Module:
    mcfg = ModelConfig(**{"backbone": "tiny", "memory_size": M, "n_layers": 2, "patch_len": 3, **overrides})
    torch.manual_seed(seed)
    model = build_forecaster(
        mcfg, n_sensors=N, n_channels=C, input_len=L, output_len=H, steps_per_day=SPD,
        adjacency=_adjacency() if adjacency is None else adjacency, scaler_mean=[50.0, 0.2],
        scaler_std=[10.0, 0.1], memory_keys=_keys() if mcfg.mrffn == "on" else None)
    return model.eval()


def _batch(b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, N, C, generator=g) * torch.tensor([10.0, 0.1]) + torch.tensor([50.0, 0.2])
    mask = torch.rand(b, L, N, generator=g) > 0.1
    x = torch.where(mask[..., None], x, torch.zeros_like(x))  # the null value 0 where missing
    tod = (torch.arange(L, dtype=torch.float32)[None] + torch.randint(0, 200, (b, 1), generator=g)) / SPD
    dow = torch.randint(0, 7, (b, 1), generator=g).repeat(1, L)
    return {"x": x, "x_mask": mask, "tod": tod, "dow": dow}


def _rotate(q, k, cos, sin):
    """transformers' own application step; q, k: (T, d), cos, sin: (T, d)."""
    qr, kr = apply_rotary_pos_emb(q[None, None], k[None, None], cos[None], sin[None])
    return qr[0, 0], kr[0, 0]


# --- rotary tables ---------------------------------------------------------------------------

HEAD_DIM, PAIRS = 16, 8
INV_FREQ = 1.0 / (10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))


def _tables(mode: str, time_shift: float = 0.0, phase_shift: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_sensors, n_patches = 3, 4
    time_pos = torch.arange(n_patches).repeat(n_sensors).float() + time_shift            # (T,)
    phases = torch.randn(n_sensors, spatial_pairs(PAIRS, mode), generator=g) + phase_shift
    return se_rope_cos_sin(time_pos, phases.repeat_interleave(n_patches, 0), INV_FREQ, mode)


@pytest.mark.parametrize("mode", ["split", "compose", "off"])
def test_rotation_preserves_norms(mode):
    q, k = torch.randn(12, HEAD_DIM), torch.randn(12, HEAD_DIM)
    qr, kr = _rotate(q, k, *_tables(mode))
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(kr.norm(dim=-1), k.norm(dim=-1))


def test_spatial_off_equals_transformers_rope():
    config = tiny_config(ModelConfig(backbone="tiny"))
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    ref_cos, ref_sin = rotary(torch.zeros(1, 8, config.hidden_size), positions[None])
    cos, sin = se_rope_cos_sin(positions, None, rotary.inv_freq, "off")
    torch.testing.assert_close(cos, ref_cos[0])
    torch.testing.assert_close(sin, ref_sin[0])
    head_dim = cos.shape[-1]
    q, k = torch.randn(1, 2, 8, head_dim), torch.randn(1, 2, 8, head_dim)
    ours = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    theirs = apply_rotary_pos_emb(q, k, ref_cos, ref_sin)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])


@pytest.mark.parametrize("mode", ["split", "compose"])
def test_scores_depend_only_on_phase_differences(mode):
    q, k = torch.randn(12, HEAD_DIM), torch.randn(12, HEAD_DIM)
    base = _rotate(q, k, *_tables(mode))
    shifted = _rotate(q, k, *_tables(mode, time_shift=7.0, phase_shift=1.3))
    torch.testing.assert_close(shifted[0] @ shifted[1].T, base[0] @ base[1].T, atol=1e-4, rtol=1e-4)
    other = _rotate(q, k, *_tables(mode, seed=1))  # different relative phases: scores must move
    assert (other[0] @ other[1].T - base[0] @ base[1].T).abs().max() > 1e-2


def test_split_and_compose_differ_and_split_sections():
    cos_split, _ = _tables("split")
    cos_compose, _ = _tables("compose")
    cos_off, _ = _tables("off")
    assert (cos_split - cos_compose).abs().max() > 1e-2
    temporal = PAIRS - spatial_pairs(PAIRS, "split")
    # split: the high-frequency section is plain RoPE, the rest depends on the sensor only
    torch.testing.assert_close(cos_split[:, :temporal], cos_off[:, :temporal])
    per_sensor = cos_split[:, temporal:PAIRS].reshape(3, 4, -1)  # (sensors, patches, S)
    torch.testing.assert_close(per_sensor, per_sensor[:, :1].expand_as(per_sensor))


def test_laplacian_eigenvectors_permute_with_sensors_and_check_input():
    a = _adjacency(7)
    perm = np.array([3, 0, 6, 1, 5, 2, 4])
    e = laplacian_eigenvectors(a, 4)
    e_perm = laplacian_eigenvectors(a[perm][:, perm], 4)
    np.testing.assert_allclose(e_perm, e[perm], atol=1e-5)
    assert e.shape == (7, 4) and laplacian_eigenvectors(a, 10)[:, 7:].max() == 0.0
    with pytest.raises(DataError, match="square"):
        laplacian_eigenvectors(np.ones((3, 4)), 2)
    with pytest.raises(DataError, match="non-negative"):
        laplacian_eigenvectors(-np.ones((3, 3)), 2)


# --- memory ----------------------------------------------------------------------------------

def test_topk_cosine_picks_the_right_keys():
    keys = torch.eye(6, 12) * torch.arange(1.0, 7.0)[:, None]   # key j points along axis j, any length
    query = torch.zeros(1, 2, 12)
    query[0, 0, 2], query[0, 0, 5], query[0, 0, 0] = 9.0, 4.0, 1.0   # closest: 2, then 5, then 0
    query[0, 1, 4], query[0, 1, 1] = -1.0, 0.5                      # anti-aligned with key 4: never picked
    sims, idx = topk_cosine(query, keys, 3)
    assert idx[0, 0].tolist() == [2, 5, 0]
    assert idx[0, 1, 0].item() == 1 and 4 not in idx[0, 1].tolist()
    expected = torch.tensor([9.0, 4.0, 1.0]) / np.sqrt(81 + 16 + 1)
    torch.testing.assert_close(sims[0, 0], expected)


def test_topk_ties_break_by_key_index():
    keys = torch.randn(8, 12, generator=torch.Generator().manual_seed(0))
    flat = torch.zeros(2, 3, 12)                         # a flat window normalises to 0: all sims tie
    _, idx = topk_cosine(flat, keys, 3)
    assert (idx == torch.tensor([0, 1, 2])).all()
    twins = torch.cat([keys[:1], keys[:1], keys[1:]])    # keys 0 and 1 identical
    _, idx = topk_cosine(keys[:1][None], twins, 2)
    assert idx[0, 0].tolist() == [0, 1]


def test_memory_read_is_softmax_weighted_values():
    read = MemoryRead(4, 3)
    with torch.no_grad():
        read.values.copy_(torch.arange(12.0).reshape(4, 3))
    sims, idx = torch.tensor([[[0.9, 0.1]]]), torch.tensor([[[3, 1]]])
    w = torch.softmax(sims * 10.0, dim=-1)[0, 0]
    expected = w[0] * read.values[3] + w[1] * read.values[1]
    torch.testing.assert_close(read(sims, idx)[0, 0], expected)


def test_kmeans_is_deterministic_and_finds_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0] * 4, [10.0] * 4, [0, 10.0, 0, 10.0]])
    pts = np.concatenate([c + 0.1 * rng.standard_normal((50, 4)) for c in centres])
    keys = kmeans(pts, 3, seed=5)
    np.testing.assert_array_equal(keys, kmeans(pts, 3, seed=5))
    found = keys[np.argsort(keys.sum(1) + keys[:, 0])]  # order: zeros, alternating, tens
    np.testing.assert_allclose(found, centres[[0, 2, 1]], atol=0.1)
    with pytest.raises(ValueError, match="at least 3 patterns"):
        kmeans(pts[:2], 3, seed=0)


def _split_shape_dataset() -> ProcessedData:
    """Rising curves in the training range, falling lines in validation and test."""
    t_total, n = 400, 3
    t = np.arange(t_total, dtype=np.float64)
    rising = 20 + t + 3 * np.sin(2 * np.pi * t / 50)               # derivative 1 +- 0.38 > 0
    falling = 900 - 2 * t
    values = np.where(t < 240, rising, falling)[:, None, None] + np.arange(n)[None, :, None]
    stamps = np.datetime64("2024-01-01T00:00") + np.arange(t_total) * np.timedelta64(5, "m")
    return ProcessedData(
        values=values.astype(np.float32), mask=np.ones((t_total, n), bool), timestamps=stamps,
        adjacency=np.eye(n, dtype=np.float32), sensor_ids=[f"s{i}" for i in range(n)],
        meta={"splits": {"train": [0, 240], "val": [240, 320], "test": [320, 400]},
              "scaler": {"mean": [150.0], "std": [70.0]}, "steps_per_day": SPD})


def test_memory_keys_come_from_training_windows_only():
    data = _split_shape_dataset()
    train = WindowDataset(data, "train", L, H)
    patterns = memory_patterns(train, n_max=500)
    assert patterns.shape[1] == L and len(patterns) <= 500
    keys = kmeans(patterns, 6, seed=0)
    assert (np.diff(keys, axis=1) > 0).all(), "a key is not a rising pattern: it came from val/test windows"
    with pytest.raises(ValueError, match="training split"):
        memory_patterns(WindowDataset(data, "val", L, H))
    # the check can see leakage: the same k-means over the test windows gives falling keys
    test = WindowDataset(data, "test", L, H)
    test.split = "train"
    assert (np.diff(kmeans(memory_patterns(test), 6, seed=0), axis=1) < 0).all()


# --- the forecaster --------------------------------------------------------------------------

def test_lora_trainable_set_is_exact():
    model = _build()
    trainable = trainable_parameters(model)
    lora = {f"backbone.base_model.model.layers.{i}.self_attn.{p}.lora_{ab}.default.weight"
            for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj") for ab in "AB"}
    new = {"revin.weight", "revin.bias", "embed.value.weight", "embed.value.bias", "embed.calendar.tod.weight",
           "embed.calendar.dow.weight", "identity.table", "level.weight", "level.bias",
           "phases.proj.weight", "memory.0.values", "memory.0.log_temperature",
           "norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert set(trainable) == lora | new
    # hidden 64, 4 heads x 16, 2 kv heads: per layer r*(64+64) for q and o, r*(64+32) for k and v
    assert sum(trainable[n] for n in lora) == 2 * 8 * (128 + 96 + 96 + 128)
    # fourier tod 12x64 + weekday/weekend 2x64 + identity 5x64 + level (2C -> 64) + the rest as before
    assert sum(trainable.values()) == 13105
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".base_layer." in n or ".mlp." in n or "layernorm" in n for n in frozen)


def test_lora_targets_name_kept_layer_projections_only():
    assert re.fullmatch(lora_target_regex(["q_proj", "v_proj"]), "layers.3.self_attn.v_proj")
    assert not re.fullmatch(lora_target_regex(["q_proj"]), "layers.0.mlp.q_proj")
    assert not re.fullmatch(lora_target_regex(["q_proj"]), "layers.0.mlp.gate_proj")
    both = lora_target_regex(["q_proj", "gate_proj", "down_proj"])
    assert re.fullmatch(both, "layers.0.mlp.gate_proj") and re.fullmatch(both, "layers.1.self_attn.q_proj")
    assert not re.fullmatch(both, "layers.0.self_attn.gate_proj") and not re.fullmatch(both, "layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="embed_tokens"):
        lora_target_regex(["q_proj", "embed_tokens"])


def test_output_shape_and_original_units_for_constant_input():
    model = _build()
    batch = _batch()
    level = torch.tensor([30.0, 45.0, 60.0, 55.0, 70.0])  # one constant per sensor
    x = batch["x"].clone()
    x[..., 0] = level
    x = torch.where(batch["x_mask"][..., None], x, torch.zeros_like(x))  # missing readings hold 0
    with torch.no_grad():
        y = model(x, batch["x_mask"], batch["tod"], batch["dow"])
    assert y.shape == (3, H, N) and y.dtype == torch.float32
    # RevIN: a flat window has std sqrt(eps), so any forecast in RevIN space maps back to the level
    torch.testing.assert_close(y, level.expand_as(y), atol=0.1, rtol=0.0)


def test_masked_entries_do_not_matter():
    model = _build()
    batch = _batch()
    garbage = torch.where(batch["x_mask"][..., None], batch["x"], torch.full_like(batch["x"], 1e4))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), model(garbage, batch["x_mask"], batch["tod"], batch["dow"]))


def test_attention_is_bidirectional():
    model = _build()
    batch = _batch()
    changed = batch["x"].clone()
    changed[:, :, -1, 0] += torch.linspace(-20, 20, L)  # the last sensor only
    with torch.no_grad():
        before = model(**batch)
        after = model(changed, batch["x_mask"], batch["tod"], batch["dow"])
    assert (after[:, :, 0] - before[:, :, 0]).abs().max() > 1e-3, "the first sensor cannot see the last one"


@pytest.mark.parametrize("node_embedding, node_dim, skip", [("laplacian", 0, "off"), ("free", 0, "off"),
                                                             ("free", 3, "sensor"), ("none", 0, "linear")])
def test_permuting_sensors_and_graph_permutes_the_forecast(node_embedding, node_dim, skip):
    """Equivariance: relabelling sensors (and the graph) relabels the forecast.  ``laplacian`` identities
    follow the graph by construction; a ``free`` table (full width, or node_dim numbers per sensor and a
    shared map) and per-sensor skip maps have to be relabelled with the sensors."""
    perm = torch.tensor([2, 4, 0, 1, 3])
    adjacency = _adjacency()
    options = {"node_embedding": node_embedding, "node_dim": node_dim, "window_skip": skip}
    model = _build(seed=3, adjacency=adjacency, **options)
    model_perm = _build(seed=3, adjacency=adjacency[perm][:, perm], **options)
    if skip == "sensor":
        with torch.no_grad():
            model.skip.weight.normal_()                                # every sensor its own map
            model.skip.bias.normal_()
            model_perm.skip.weight.copy_(model.skip.weight[perm])
            model_perm.skip.bias.copy_(model.skip.bias[perm])
    if node_embedding == "free":
        assert model.identity.table.shape == (N, node_dim or model.norm.normalized_shape[0])
        with torch.no_grad():
            model_perm.identity.table.copy_(model.identity.table[perm])
    batch = _batch()
    with torch.no_grad():
        y = model(**batch)
        y_perm = model_perm(batch["x"][:, :, perm], batch["x_mask"][:, :, perm], batch["tod"], batch["dow"])
    torch.testing.assert_close(y_perm, y[:, :, perm], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("mode", ["split", "off"])
def test_graph_enters_only_through_spatial_rope(mode):
    batch = _batch()
    with torch.no_grad():
        y = _build(spatial_rope=mode)(**batch)
        y_other = _build(spatial_rope=mode, adjacency=_adjacency(seed=9))(**batch)
    moved = (y - y_other).abs().max().item()
    assert moved > 1e-4 if mode == "split" else moved == 0.0


def test_state_dict_round_trip_and_lora_merge():
    model = _build(seed=0).train()
    batch = _batch()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # move LoRA B and the memory values away from their zero init
        opt.zero_grad()
        model(**batch).mean().backward()
        opt.step()
    model.eval()
    clone = _build(seed=1)
    clone.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        y = model(**batch)
        torch.testing.assert_close(clone(**batch), y)
        assert (y - _build(seed=0)(**batch)).abs().max() > 1e-3  # training did change the model
        merged = merge_lora(clone)
        assert not any("lora" in n for n in merged.state_dict())
        torch.testing.assert_close(merged(**batch), y, atol=1e-4, rtol=1e-5)


def test_ablation_switches_build_and_run():
    batch = _batch()
    model = _build(spatial_rope="off", mrffn="off")
    names = set(trainable_parameters(model))
    assert not any(n.startswith(("phases.", "memory.")) for n in names)
    with torch.no_grad():
        assert model(**batch).shape == (3, H, N)
        assert _build(spatial_rope="compose")(**batch).isfinite().all()


def test_time_feature_switches():
    batch = _batch()
    other_day = dict(batch, dow=(batch["dow"] + 2) % 7)
    other_time = dict(batch, tod=(batch["tod"] + 0.25) % 1.0)
    both, no_dow, no_tod = _build(day_of_week="full"), _build(day_of_week="off"), _build(time_of_day="off")
    for name, model in (("both", both), ("no_dow", no_dow), ("no_tod", no_tod)):
        for module in model.embed.modules():   # untrained tables are tiny: make them matter
            if isinstance(module, (torch.nn.Embedding, torch.nn.Linear)) and module is not model.embed.value:
                torch.nn.init.normal_(module.weight, std=1.0)
    with torch.no_grad():
        assert not torch.allclose(both(**batch), both(**other_day))
        torch.testing.assert_close(no_dow(**batch), no_dow(**other_day))
        assert not torch.allclose(no_dow(**batch), no_dow(**other_time))
        torch.testing.assert_close(no_tod(**batch), no_tod(**other_time))
    assert not any(n.startswith("embed.calendar.dow") for n in trainable_parameters(no_dow))


def test_calendar_is_read_at_the_patch_last_step_and_weekdays_share_a_row():
    """tod/dow of a patch come from its last step; Tue and Wed share the trained weekday row."""
    batch = _batch()
    model = _build(time_of_day="embedding", day_of_week="weekday_weekend")
    for table in (model.embed.calendar.tod, model.embed.calendar.dow):
        torch.nn.init.normal_(table.weight, std=1.0)
    first_steps = dict(batch, tod=batch["tod"].clone())
    first_steps["tod"][:, 0::3] += 0.3               # every patch's FIRST step changes: no effect
    last_steps = dict(batch, tod=batch["tod"].clone())
    last_steps["tod"][:, 2::3] += 0.3                # every patch's LAST step changes
    tuesday, wednesday, sunday = (dict(batch, dow=torch.full_like(batch["dow"], d)) for d in (1, 2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch), model(**first_steps))
        assert not torch.allclose(model(**batch), model(**last_steps))
        torch.testing.assert_close(model(**tuesday), model(**wednesday))
        assert not torch.allclose(model(**tuesday), model(**sunday))


def test_fourier_time_of_day_is_smooth_and_periodic():
    from stlink.model.forecaster import fourier_time

    tod = torch.tensor([0.0, 0.5, 1.0 - 1e-7, 1.0 / 288])
    f = fourier_time(tod)                                            # (4, 12)
    assert f.shape == (4, 12)
    torch.testing.assert_close(f[0], f[2], atol=1e-5, rtol=0)      # midnight wraps around
    assert (f[3] - f[0]).abs().max() < 0.15                          # 5 minutes later: a small move


def test_tod_harmonics_sets_the_fourier_resolution():
    """model.tod_harmonics=K: sin/cos of 1..K cycles per day into the time-of-day map; K < 1 is refused."""
    fine = _build(tod_harmonics=16)
    assert fine.embed.calendar.tod.weight.shape[1] == 32
    assert _build().embed.calendar.tod.weight.shape[1] == 12     # the default, 6 harmonics
    with torch.no_grad():
        assert torch.isfinite(fine(**_batch())).all()
    with pytest.raises(ValueError, match="model.tod_harmonics must be >= 1"):
        _build(tod_harmonics=0)


def test_level_features_and_revin_switch_give_the_level_back():
    """With RevIN on and no level features, a window shifted by a constant is forecast shifted by the
    same constant (the model cannot see the level); level features or revin=false break that."""
    batch = _batch()
    shifted = dict(batch, x=torch.where(batch["x_mask"][..., None], batch["x"] + torch.tensor([15.0, 0.0]), batch["x"]))
    blind = _build(level_features=False, node_embedding="none")
    with torch.no_grad():
        torch.testing.assert_close(blind(**shifted), blind(**batch) + 15.0, atol=1e-3, rtol=1e-4)
        for model in (_build(level_features=True), _build(revin=False, level_features=False)):
            for p in model.parameters():  # make the level path matter at initialisation
                if p.requires_grad and p.ndim == 2:
                    torch.nn.init.normal_(p, std=0.5)
            assert (model(**shifted) - model(**batch) - 15.0).abs().max() > 1e-2


def test_local_qwen2_folder_backbone_keeps_its_weights_and_sees_all_sensors(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=3, vocab_size=20))
    lm.save_pretrained(tmp_path / "qwen2")
    model = _build(backbone=str(tmp_path / "qwen2"), n_layers=2)
    kept = model.backbone.base_model.model.layers
    assert len(kept) == 2
    torch.testing.assert_close(kept[1].self_attn.q_proj.base_layer.weight, lm.model.layers[1].self_attn.q_proj.weight)
    batch = _batch()
    changed = batch["x"].clone()
    changed[:, :, -1, 0] += 15.0 * torch.linspace(-1, 1, L)
    with torch.no_grad():
        moved = model(changed, batch["x_mask"], batch["tod"], batch["dow"]) - model(**batch)
    assert moved[:, :, 0].abs().max() > 1e-4


def test_pretrained_false_keeps_architecture_but_not_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=20))
    lm.save_pretrained(tmp_path / "llama")
    layers, _, _ = load_backbone(ModelConfig(backbone=str(tmp_path / "llama"), n_layers=2, pretrained=False))
    ref = lm.model.layers
    for mine, theirs in zip(layers, ref):
        assert mine.self_attn.q_proj.weight.shape == theirs.self_attn.q_proj.weight.shape
        assert not torch.allclose(mine.self_attn.q_proj.weight, theirs.self_attn.q_proj.weight)
        assert not torch.allclose(mine.mlp.up_proj.weight, theirs.mlp.up_proj.weight)
    same, _, _ = load_backbone(ModelConfig(backbone=str(tmp_path / "llama"), n_layers=2))
    torch.testing.assert_close(same[0].mlp.up_proj.weight, ref[0].mlp.up_proj.weight)


def test_non_llama_backbone_is_rejected(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=20)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(BackboneError, match="not a Llama-family"):
        load_backbone(ModelConfig(backbone=str(tmp_path / "gpt2"), n_layers=1))
    with pytest.raises(BackboneError, match="no such folder"):
        load_backbone(ModelConfig(backbone=str(tmp_path / "absent"), n_layers=1))


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="patch_len"):
        _build(patch_len=5)
    with pytest.raises(ValueError, match="memory_keys"):
        build_forecaster(ModelConfig(backbone="tiny"), n_sensors=N, n_channels=C, input_len=L, output_len=H,
                         steps_per_day=SPD, adjacency=_adjacency(), scaler_mean=[0, 0], scaler_std=[1, 1],
                         memory_keys=None)
    with pytest.raises(ValueError, match="adjacency"):
        _build(adjacency=np.eye(N + 1, dtype=np.float32))
    with pytest.raises(ValueError, match="spatial_rope"):
        _build(spatial_rope="diagonal")


def test_overfits_one_batch():
    model = _build(seed=0, mrffn_layers=2).train()
    batch = _batch(b=8, seed=4)
    steps = torch.arange(L + H, dtype=torch.float32)
    phase = torch.arange(N, dtype=torch.float32)[None, :]
    offset = torch.arange(8, dtype=torch.float32)[:, None, None]
    series = 50 + 10 * torch.sin(steps[None, :, None] / 4 + phase + offset)   # (B, L+H, N)
    x = batch["x"].clone()
    x[..., 0] = series[:, :L]
    y = series[:, L:]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 300)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = (model(x, batch["x_mask"], batch["tod"], batch["dow"]) - y).abs().mean()
        loss.backward()
        opt.step()
        decay.step()
        losses.append(loss.item())
    assert losses[0] > 5.0 and losses[-1] < 0.15, f"MAE {losses[0]:.2f} -> {losses[-1]:.3f} (amplitude 10)"


def test_dropout_acts_in_training_only_and_adds_no_parameters():
    plain, dropped = _build(seed=3, lora_dropout=0.0), _build(seed=3, dropout=0.3, lora_dropout=0.0)
    assert plain.state_dict().keys() == dropped.state_dict().keys()  # old checkpoints load at any rate
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(dropped(**batch), plain(**batch))  # eval: dropout is the identity
        plain.train(), dropped.train()
        torch.testing.assert_close(plain(**batch), plain(**batch))  # no other randomness in training
        assert not torch.allclose(dropped(**batch), dropped(**batch))
    with pytest.raises(ValueError, match="model.dropout"):
        _build(dropout=1.0)


# --- road-graph options: neighbour features (model.graph_features) and hop bias (model.graph_bias) ---

def _chain(n: int = N) -> np.ndarray:
    """0 -> 1 -> ... -> n-1 with self loops (traffic flows towards higher indices)."""
    a = np.eye(n, dtype=np.float32)
    a[np.arange(n - 1), np.arange(1, n)] = 2.0
    return a


def test_transition_matrices_average_neighbours_by_direction_and_hop():
    from stlink.model.graph import transition_matrices

    t = transition_matrices(_chain(4), hops=2)                      # (4, 4, 4): down^1, down^2, up^1, up^2
    assert t.shape == (4, 4, 4)
    np.testing.assert_allclose(t[0], np.eye(4, k=1))                  # one step downstream, self-loop dropped
    np.testing.assert_allclose(t[1], np.eye(4, k=2))                  # two steps downstream
    np.testing.assert_allclose(t[2], np.eye(4, k=-1))                 # one step upstream
    assert not t[0][3].any() and not t[2][0].any()                    # the last sensor has nothing downstream
    branch = np.zeros((3, 3), np.float32)
    branch[0, 1], branch[0, 2] = 1.0, 3.0                             # weights are normalised per row
    np.testing.assert_allclose(transition_matrices(branch, 1)[0][0], [0.0, 0.25, 0.75])


def test_neighbour_features_are_the_masked_mean_of_the_neighbours():
    from stlink.model.graph import NeighbourFeatures

    feats = NeighbourFeatures(_chain(), hops=1, patch_len=L, n_channels=1, hidden=L * 2, init_std=0.02)
    with torch.no_grad():
        feats.proj.weight.copy_(torch.eye(L * 2))                    # read the raw averages back
    z = torch.randn(2, L, N, 1)
    mask = torch.rand(2, L, N) > 0.3
    mask[:, 0, 2] = False                                             # sensor 1's only downstream neighbour at t=0
    out = feats(z, mask)[:, :, 0]                                     # (B, N, L*K*C) = (2, N, L*2)
    down, up = out[..., 0::2], out[..., 1::2]                         # (B, N, L) each: per step, K then C
    expect_down = torch.where(mask[:, :, 2], z[:, :, 2, 0], torch.zeros(()))  # sensor 1 reads sensor 2
    torch.testing.assert_close(down[:, 1], expect_down)
    torch.testing.assert_close(up[:, 3], torch.where(mask[:, :, 2], z[:, :, 2, 0], torch.zeros(())))
    assert down[:, 1, 0].abs().max() == 0.0                           # a hidden neighbour gives nothing
    assert out[:, N - 1, :][..., 0::2].abs().max() == 0.0             # nothing downstream of the last sensor


def test_hop_buckets_name_direction_and_distance():
    from stlink.model.graph import hop_buckets

    b = hop_buckets(_chain(5), hops=2)
    assert b[0].tolist() == [0, 1, 2, 5, 5]                           # self, 1 and 2 down, then far
    assert b[4].tolist() == [5, 5, 4, 3, 0]                           # 2 up = bucket 4, 1 up = bucket 3
    two_way = _chain(3) + _chain(3).T
    assert hop_buckets(two_way, 1)[1].tolist() == [1, 0, 1]           # a two-way edge counts as downstream


@pytest.mark.parametrize("options", [{"graph_features": "diffusion"}, {"graph_bias": "hops"},
                                     {"graph_features": "diffusion", "graph_bias": "hops", "spatial_rope": "off"}])
def test_graph_options_are_equivariant_and_use_the_graph(options):
    perm = torch.tensor([2, 4, 0, 1, 3])
    adjacency = _adjacency()
    model, model_perm = (_build(seed=3, adjacency=a, node_embedding="laplacian", **options)
                         for a in (adjacency, adjacency[perm][:, perm]))         # same seed: same weights
    free, other = (_build(seed=3, adjacency=a, node_embedding="free", **options)  # the graph only in the
                   for a in (adjacency, _adjacency(seed=9)))                     # options (and the rotation)
    table = torch.randn(6, 4)                                          # move the hop bias off its zero init
    for m in (model, model_perm, free, other):
        if m.attn_bias is not None:
            with torch.no_grad():
                m.attn_bias.table.copy_(table)
    batch = _batch()
    garbage = torch.where(batch["x_mask"][..., None], batch["x"], torch.full_like(batch["x"], 1e4))
    with torch.no_grad():
        y = model(**batch)
        y_perm = model_perm(batch["x"][:, :, perm], batch["x_mask"][:, :, perm], batch["tod"], batch["dow"])
        torch.testing.assert_close(y_perm, y[:, :, perm], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(model(garbage, batch["x_mask"], batch["tod"], batch["dow"]), y)
        if options.get("spatial_rope") == "off":                      # no rotation, a free identity: the
            assert (other(**batch) - free(**batch)).abs().max() > 1e-4  # graph options alone move the forecast


@pytest.mark.parametrize("revin", [False, True])
@pytest.mark.parametrize("skip", ["linear", "sensor"])
def test_window_skip_starts_as_the_last_reading_and_learns_the_change(skip, revin):
    """window_skip adds Linear(L -> H) of the sensor's own z-scored window (one shared map, or one per
    sensor), initialised to repeat its last reading: with the network's head silenced the forecast is
    the last valid reading (the scaler mean where it is missing); without the skip it is not."""
    model, plain = _build(seed=3, window_skip=skip, revin=revin), _build(seed=3, revin=revin)
    batch = _batch()
    last, valid = batch["x"][:, -1, :, 0], batch["x_mask"][:, -1]              # (B, N)
    expected = torch.where(valid, last, torch.full_like(last, 50.0))[:, None].expand(-1, H, -1)  # (B, H, N)
    with torch.no_grad():
        for m in (model, plain):
            m.head.weight.zero_()                                             # the network's own forecast: 0
            m.head.bias.fill_(m.revin.bias[0].item() if revin else 0.0)     # (RevIN: its affine bias undone)
        y = model(**batch)
    if revin:  # RevIN's own path adds the window mean, the skip adds the last reading (both z units)
        mean = torch.stack([(batch["x"][w, :, :, 0] * batch["x_mask"][w]).sum(0) / batch["x_mask"][w].sum(0)
                            for w in range(batch["x"].shape[0])])              # (B, N)
        expected = expected + (torch.where(batch["x_mask"].sum(1) > 0, mean, torch.full_like(mean, 50.0))[:, None]
                               - 50.0)
    torch.testing.assert_close(y, expected, atol=1e-3, rtol=0.0)
    assert model.skip.weight.requires_grad and model.skip.bias.requires_grad     # trained with the new modules
    with torch.no_grad():
        assert (plain(**batch) - expected).abs().max() > 1.0                   # without the skip: no last value


def test_global_head_starts_silent_and_lets_a_flat_window_move():
    with_global, plain = _build(seed=2, global_head=True, revin_affine=False), _build(seed=2, revin_affine=False)
    batch = _batch()
    x = batch["x"].clone()
    x[..., 0] = 60.0                                                   # a flat window on every sensor
    with torch.no_grad():
        torch.testing.assert_close(with_global(x, batch["x_mask"], batch["tod"], batch["dow"]),
                                   plain(x, batch["x_mask"], batch["tod"], batch["dow"]))  # zero init
        pinned = plain(x, batch["x_mask"], batch["tod"], batch["dow"])
        torch.testing.assert_close(pinned, torch.full_like(pinned, 60.0), atol=0.1, rtol=0.0)  # RevIN pins it
        with_global.global_head.bias.fill_(-1.0)                       # one global std down at every step
        moved = with_global(x, batch["x_mask"], batch["tod"], batch["dow"])
    torch.testing.assert_close(moved, torch.full_like(moved, 50.0), atol=0.1, rtol=0.0)


def test_window_skip_loads_checkpoints_of_the_former_linear_layout():
    """Before commit f4a1d31 the shared skip was an ``nn.Linear`` (weight (H, L), bias (H,)): such a
    checkpoint loads into the one-module skip and forecasts the same; a per-sensor skip refuses it."""
    from stlink.model.forecaster import WindowSkip

    old = torch.nn.Linear(L, H)
    torch.nn.init.normal_(old.weight)
    skip = WindowSkip(n_sensors=4, input_len=L, output_len=H, per_sensor=False)
    skip.load_state_dict(old.state_dict())
    z0 = torch.randn(2, L, 4)                                              # (B, L, N)
    torch.testing.assert_close(skip(z0), old(z0.transpose(1, 2)).transpose(1, 2))
    with pytest.raises(RuntimeError, match="size mismatch"):
        WindowSkip(n_sensors=4, input_len=L, output_len=H, per_sensor=True).load_state_dict(old.state_dict())
