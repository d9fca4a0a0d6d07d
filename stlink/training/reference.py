"""The learned reference trained beside ST-LINK: STID on the same windows, by the same loop.

Every run then answers the question users of LLM forecasters ask: how much does the LLM add over
a strong cheap model?  The reference is an ordinary model directory (``model.arch=stid``) under
``<model_dir>/reference``, trained by ``stlink.training.train.train`` with the ``reference``
section's epochs / batch size / learning rate instead of ``train``'s, and evaluated by
``stlink evaluate`` beside the naive baselines (method name = the reference's arch, e.g. ``stid``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from stlink.config import ConfigError, Params

REFERENCE_DIR = "reference"
REFERENCE_MODELS = ("stid", "none")


def reference_params(params: Params) -> Params | None:
    """``params`` with model.arch = the reference and train.* from ``reference``; None when off."""
    ref = params.reference
    if ref.model not in REFERENCE_MODELS:
        raise ConfigError(f"reference.model: expected one of {' | '.join(REFERENCE_MODELS)}, got {ref.model!r}")
    if ref.model == "none":
        return None
    out = copy.deepcopy(params)
    out.model.arch = ref.model
    out.model.mrffn = "off"
    for name in ("epochs", "batch_size", "lr", "weight_decay", "warmup_steps", "patience",
                 "max_train_batches", "max_steps"):
        setattr(out.train, name, getattr(ref, name))
    out.train.lora_lr = None
    out.train.max_val_batches = None  # the reference is cheap: validate on the whole split
    return out


def reference_dir(model_dir: Path) -> Path:
    return Path(model_dir) / REFERENCE_DIR


def train_reference(params: Params, model_dir: Path, resume: bool = False, **kwargs: Any) -> dict[str, Any] | None:
    """Train the reference into ``<model_dir>/reference``; None when ``reference.model == none``."""
    from stlink.training.train import train

    ref = reference_params(params)
    if ref is None:
        return None
    print(f"training the reference model ({ref.model.arch}) into {reference_dir(model_dir)}")
    return train(ref, out_dir=reference_dir(model_dir), resume=resume, **kwargs)
