"""LoRA on the kept layers' attention (and optionally MLP) projections (peft).

Only the decoder stack is handed to ``get_peft_model``; peft then freezes every backbone weight
except the LoRA matrices.  The new ST-LINK modules (input embedding, spatial phases, memory,
head, RevIN affine) live beside the peft-wrapped stack as ordinary modules and are trained in
full.  Nothing toggles ``requires_grad`` by hand, before or after peft.
"""
from __future__ import annotations

import re

from torch import nn

from stlink.config import ModelConfig
from stlink.model.backbone import ATTENTION_PROJECTIONS, MLP_PROJECTIONS


def lora_target_regex(targets: list[str]) -> str:
    """A peft ``target_modules`` regex matching only the named projections of the kept layers:
    attention (``q_proj k_proj v_proj o_proj``) and/or MLP (``gate_proj up_proj down_proj``)."""
    known = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
    bad = sorted(set(targets) - set(known))
    if not targets or bad:
        raise ValueError(
            f"model.lora_targets must be a non-empty subset of {list(known)}, got {targets}"
            + (f" ({bad} are not projections of a kept layer)" if bad else ""))
    attn = "|".join(re.escape(t) for t in sorted(set(targets) & set(ATTENTION_PROJECTIONS)))
    mlp = "|".join(re.escape(t) for t in sorted(set(targets) & set(MLP_PROJECTIONS)))
    parts = ([rf"self_attn\.({attn})"] if attn else []) + ([rf"mlp\.({mlp})"] if mlp else [])
    return rf"^layers\.\d+\.({'|'.join(parts)})$"


def apply_lora(stack: nn.Module, mcfg: ModelConfig) -> nn.Module:
    """Wrap the decoder stack (a module with ``.layers``) in a peft LoRA model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=mcfg.lora_rank, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout,
        target_modules=lora_target_regex(mcfg.lora_targets), bias="none")
    return get_peft_model(stack, config)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the LoRA matrices into the attention weights (for export); ``model.backbone`` is replaced."""
    model.backbone = model.backbone.merge_and_unload()
    return model


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Names and sizes of the parameters the optimiser will update."""
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def describe_trainable(model: nn.Module) -> str:
    """One line: trainable / total parameters."""
    trainable = sum(trainable_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"
