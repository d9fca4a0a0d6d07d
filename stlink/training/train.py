"""Pipeline step ``train``: LoRA fine-tuning of the forecaster with early stopping.

One implementation for one CPU, one GPU or several data-parallel processes (Hugging Face
``accelerate``)::

    stlink train                  # one process (the GPU if there is one, else the CPU)
    stlink train --resume         # continue a killed run from last.pt (same data and params)
    accelerate launch --multi_gpu --num_processes 2 -m stlink.cli train                       # 2 GPUs
    accelerate launch --multi_gpu --num_processes 2 -m stlink.cli -S train.device=cpu train   # 2 CPU processes
    torchrun --nproc_per_node 2 -m stlink.cli -S train.device=cpu train                       # the same

Several processes are data parallel (DDP; gloo on CPU, NCCL on GPU): each takes its shard of
every batch, so one optimizer step sees ``num_processes x train.batch_size`` windows; only the main
process writes files.  Beware: ``accelerate launch --cpu --num_processes 2`` starts ONE process
(accelerate runs several CPU processes only through mpirun); use ``--multi_gpu`` (i.e. torchrun)
with ``train.device=cpu`` as above.

- Loss: masked MAE in original units over the valid targets (``y_mask`` from the raw readings).
- AdamW on the trainable parameters only (weight decay on matrices, none on biases, norms and
  other 1-D parameters); linear warm-up over ``train.warmup_steps`` optimizer steps, then cosine
  decay to 0 at the last step; gradient norm clipped to ``train.grad_clip``.
- Early stopping on validation MAE (the metric of ``metrics.py``): stop after ``train.patience``
  epochs without a strictly lower value (``patience <= 0`` disables it).  ``best.pt`` is the
  best epoch.
- ``train.precision``: ``auto`` = bf16 autocast on CUDA, and on CPUs with AMX-BF16; fp32 on other
  CPUs (bf16 measured slower than fp32 on an AVX512-BF16 CPU without AMX); ``bf16`` / ``fp32`` force it.
- Separate learning rates: ``train.lr`` for the new modules, ``train.lora_lr`` for the LoRA matrices.
- ``train.max_steps``: an optimizer-step budget; the schedule anneals to 0 at that step, so a short
  run still ends with a small learning rate.
- ``train.ema_decay`` > 0: an exponential moving average of the trainable weights (``WeightAverage``)
  is what validation scores and ``run_best.pt`` / ``best.pt`` hold; ``last.pt`` keeps the raw weights
  and the average, so a resumed run ends like an uninterrupted one.
- ``max_train_batches`` caps the batches of an epoch (a different random subset each epoch);
  ``max_val_batches`` caps validation to that many batches of evenly spaced windows of the
  validation split (the same ones every epoch).
- Reproducible: python, numpy and torch seeds are fixed, and the shuffle order of epoch ``e``
  depends only on ``(train.seed, e)``.  ``last.pt`` (written atomically after every epoch) holds the
  RNG states, so an interrupted run resumed with ``resume=True`` ends with the same weights and
  metrics as an uninterrupted one.

Files: see ``stlink.training.checkpoint``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, Subset

from stlink.config import ConfigError, Params, to_dict
from stlink.data.formats import DataError, load_processed
from stlink.data.windows import WindowDataset
from stlink.io import write_json
from stlink.model.lora import trainable_parameters
from stlink.progress import progress
from stlink.progress import write as progress_write
from stlink.training.checkpoint import (DEFAULT_CACHE_DIR, build_inputs, build_model,
                                        data_checksum, frozen_fingerprint, load_checkpoint,
                                        load_trainable_state, model_payload, rng_state, save_checkpoint,
                                        set_rng_state)
from stlink.training.metrics import MetricAccumulator

log = logging.getLogger(__name__)


class EpochShuffleSampler(Sampler[int]):
    """A random permutation (cut to ``num_samples``) that depends only on ``(seed, epoch)``.

    It owns no persistent generator, so accelerate leaves it alone and every process draws the
    same order; a resumed run sees the same order as an uninterrupted one.
    """

    def __init__(self, n: int, seed: int, num_samples: int | None = None):
        self.n = n
        self.seed = seed
        self.num_samples = n if num_samples is None else min(n, num_samples)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.n, generator=g)[: self.num_samples].tolist()

    def __len__(self) -> int:
        return self.num_samples


class WeightAverage:
    """An exponential moving average of the trainable parameters (``train.ema_decay``; Polyak averaging).

    ``update`` after every optimizer step: shadow <- d * shadow + (1 - d) * weight, with
    d = min(decay, (1 + t) / (10 + t)) so the first steps are not dominated by the initial weights.
    ``swapped(model)`` puts the averages into the model (validation, checkpoints) and the raw
    weights back afterwards; training always continues from the raw weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.steps = decay, 0
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].mul_(d).add_(p.detach(), alpha=1.0 - d)

    @contextlib.contextmanager
    def swapped(self, model: torch.nn.Module) -> Iterator[None]:
        params = dict(model.named_parameters())
        raw = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, v in self.shadow.items():
                params[n].copy_(v)
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in raw.items():
                    params[n].copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor: linear 0 -> 1 over ``warmup_steps``, then cosine 1 -> 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def masked_mae_loss(yhat: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean |yhat - y| over valid targets.  All (B, H, N); 0 (with a graph) when none is valid."""
    m = mask.to(yhat.dtype)
    err = torch.where(mask, (yhat - y).abs(), torch.zeros_like(yhat))  # (B, H, N); no NaN leaks from y
    return (err * m).sum() / m.sum().clamp(min=1.0)


def hide_readings(batch: dict[str, torch.Tensor], rate: float) -> dict[str, torch.Tensor]:
    """Augmentation: mark a random ``rate`` share of the input readings missing (x_mask (B, L, N));
    the model ignores what the mask hides, so this is what a flaky sensor looks like.  Targets stay."""
    if rate <= 0.0:
        return batch
    keep = torch.rand(batch["x_mask"].shape, device=batch["x_mask"].device) >= rate   # (B, L, N)
    return {**batch, "x_mask": batch["x_mask"] & keep}


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float,
                   lora_lr: float | None = None) -> torch.optim.AdamW:
    """AdamW over trainable parameters; decay on matrices only; LoRA matrices at ``lora_lr`` (None: lr)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("the model has no trainable parameter")
    groups = []
    for is_lora, group_lr in ((False, lr), (True, lr if lora_lr is None else lora_lr)):
        part = [(n, p) for n, p in named if (".lora_" in n) == is_lora]
        decay = [p for _, p in part if p.ndim >= 2]
        no_decay = [p for _, p in part if p.ndim < 2]
        groups += [{"params": ps, "weight_decay": wd, "lr": group_lr}
                   for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    return torch.optim.AdamW(groups, lr=lr)


def cpu_bf16_flags() -> set[str]:
    """The bf16 features this CPU reports in /proc/cpuinfo (avx512_bf16, amx_bf16)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()
    return flags & {"avx512_bf16", "amx_bf16"}


def cpu_bf16_is_faster(flags: set[str]) -> bool:
    """bf16 autocast pays on CPUs with AMX tiles.  Measured on an AVX512-BF16 Xeon without AMX
    (docs/benchmarks.md): one ST-LINK training step took 0.69 s in bf16 against 0.47 s in fp32,
    so ``auto`` keeps fp32 there; ``train.precision=bf16`` forces it."""
    return "amx_bf16" in flags


def mixed_precision(precision: str, use_cuda: bool) -> str:
    """accelerate's mixed_precision for train.precision (auto | bf16 | fp32) on this device."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"train.precision: expected auto | bf16 | fp32, got {precision!r}")
    if precision == "fp32":
        return "no"
    if use_cuda:
        return "bf16" if precision == "bf16" or torch.cuda.is_bf16_supported() else "no"
    flags = cpu_bf16_flags()
    if precision == "bf16":
        if not flags:
            log.warning("train.precision=bf16 on a CPU without native bf16: it will be emulated (slow)")
        return "bf16"
    return "bf16" if cpu_bf16_is_faster(flags) else "no"


def make_accelerator(device: str, precision: str = "auto"):
    """An ``Accelerator`` for train.device (auto | cpu | cuda) and train.precision (``mixed_precision``)."""
    from accelerate import Accelerator

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device: expected auto | cpu | cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no CUDA device")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    return Accelerator(cpu=not use_cuda, mixed_precision=mixed_precision(precision, use_cuda))


def memory_keys_for(params: Params, train_ds: WindowDataset) -> np.ndarray | None:
    """k-means pattern keys from training windows only (``model.mrffn == "on"``), else None."""
    if params.model.mrffn != "on" or params.model.arch != "stlink":
        return None
    from stlink.model.memory import kmeans, memory_patterns

    patterns = memory_patterns(train_ds, seed=params.train.seed, query=params.model.mrffn_query)
    return kmeans(patterns, params.model.memory_size, seed=params.train.seed)


def evenly_spaced(ds: WindowDataset, n: int | None) -> WindowDataset | Subset:
    """At most ``n`` windows of ``ds`` at evenly spaced positions (all when n is None)."""
    if n is None or n >= len(ds):
        return ds
    return Subset(ds, np.linspace(0, len(ds) - 1, n).round().astype(np.int64).tolist())


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocations on GPU, max RSS on CPU."""
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, H, N) forecast in original units, float32."""
    return model(batch["x"], batch["x_mask"], batch["tod"], batch["dow"]).float()


def validate(model, loader, accelerator, horizon: int, mape_floor: float) -> dict[str, Any]:
    """Masked metrics over the whole validation loader, gathered from every process."""
    model.eval()
    acc = MetricAccumulator(horizon, mape_floor)
    with torch.no_grad():
        for batch in loader:
            with accelerator.autocast():
                yhat = forward(model, batch)
            yhat, y, m = accelerator.gather_for_metrics((yhat, batch["y"], batch["y_mask"]))
            acc.update(y, yhat, m)
    return acc.result()


def _resume_mismatch(ckpt: dict[str, Any], params: Params, checksum: str) -> str | None:
    """Why ``ckpt`` cannot be continued under ``params`` and this data (None when it can).

    A run is continued only with the same data and the same model, prepare and train params
    (``train.num_workers`` aside), so that the result equals an uninterrupted run of that config.
    """
    if ckpt["data_sha256"] != checksum:
        return f"the processed data changed (sha256 {ckpt['data_sha256'][:12]} -> {checksum[:12]})"
    now = to_dict(params)
    for section in ("model", "prepare", "train"):
        old, new = dict(ckpt["params"][section]), dict(now[section])
        if section == "train":
            old.pop("num_workers", None)
            new.pop("num_workers", None)
        changed = sorted(k for k in new if old.get(k) != new[k])
        if changed:
            return f"params changed: {', '.join(f'{section}.{k}' for k in changed)}"
    return None


def _summary(history: list[dict], state: dict, extra: dict) -> dict[str, Any]:
    return {
        "best_val_mae": state["best"],
        "best_epoch": state["best_epoch"],
        "epochs_run": len(history),
        "stopped_early": state["stopped"],
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])) if history else None,
        "cpu_seconds_per_epoch": float(np.mean([h.get("cpu_seconds", 0.0) for h in history])) if history else None,
        "train_seconds": float(sum(h["seconds"] for h in history)),
        "train_cpu_seconds": float(sum(h.get("cpu_seconds", 0.0) for h in history)),
        "windows_seen": int(sum(h.get("windows", 0) for h in history)),
        "samples_per_s": float(np.mean([h["samples_per_s"] or 0.0 for h in history])) if history else None,
        **extra,
        "peak_memory_mb": peak_memory_mb(),
        "history": history,
    }


def _loaders(train_ds: WindowDataset, val_ds: WindowDataset, tc, n_procs: int):
    """-> (train loader, its generator, val loader), before ``accelerator.prepare``."""
    per_step = tc.batch_size * n_procs
    cap = None if tc.max_train_batches is None else tc.max_train_batches * per_step
    generator = torch.Generator()  # reseeded every epoch; seeds workers only (the data is not random)
    sampler = EpochShuffleSampler(len(train_ds), tc.seed, cap)
    train_loader = DataLoader(train_ds, batch_size=tc.batch_size, sampler=sampler, num_workers=tc.num_workers,
                              generator=generator)
    val_cap = None if tc.max_val_batches is None else tc.max_val_batches * per_step
    val_loader = DataLoader(evenly_spaced(val_ds, val_cap), batch_size=tc.batch_size, shuffle=False,
                            num_workers=tc.num_workers)
    return train_loader, generator, val_loader


def _update_state(state: dict[str, Any], epoch: int, val_mae: float | None, patience: int) -> bool:
    """Early-stopping bookkeeping after ``epoch`` (0-based); returns whether it improved."""
    improved = val_mae is not None and math.isfinite(val_mae) and (state["best"] is None or val_mae < state["best"])
    state["epoch"] = epoch + 1
    if improved:
        state.update(best=val_mae, best_epoch=epoch + 1, bad_epochs=0)
    else:
        state["bad_epochs"] += 1
    state["stopped"] = patience > 0 and state["bad_epochs"] >= patience
    return improved


RUN_BEST = "run_best.pt"  # the best epoch of the current run, until the run completes (defect 6 of issue 9)


def _keep_or_replace_best(out_dir: Path, checksum: str, force: bool) -> dict[str, Any]:
    """At the end of a complete run: copy ``run_best.pt`` over ``best.pt`` when there is no best.pt, it was
    trained on other data, this run is at least as good (val MAE), or ``force``; else keep best.pt.

    Returns ``best_replaced`` and ``previous_best_val_mae`` for the summary."""
    import shutil

    from stlink.io import atomic_path

    best, candidate = out_dir / "best.pt", out_dir / RUN_BEST
    if not candidate.exists() and best.exists():  # a run finished before run_best.pt existed: its best is best.pt
        return {"best_replaced": True, "previous_best_val_mae": None}
    new = load_checkpoint(candidate)
    old = load_checkpoint(best) if best.exists() else None
    old_val = None if old is None or old.get("data_sha256") != checksum else old.get("val_mae")
    replace = (force or old_val is None or not math.isfinite(old_val)
               or (new.get("val_mae") is not None and new["val_mae"] <= old_val))
    if replace:
        with atomic_path(best, ".pt") as tmp:
            shutil.copyfile(candidate, tmp)
    else:
        log.warning("kept %s (val MAE %.4f): this run's best val MAE %.4f is worse; its model stays in %s "
                    "(`stlink train --replace-best` to use it anyway)", best, old_val, new["val_mae"], candidate)
    return {"best_replaced": bool(replace), "previous_best_val_mae": old_val}


def train(params: Params, out_dir: Path = Path("models/stlink"), resume: bool = False, *,
          data_dir: Path | None = None, cache_dir: Path = DEFAULT_CACHE_DIR,
          on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
          replace_best: bool = False,
          init: Callable[[torch.nn.Module], None] | None = None) -> dict[str, Any]:
    """Train on ``data_dir`` (default ``params.processed_dir``) into ``out_dir``; returns the summary.

    ``resume=True`` continues from ``out_dir/last.pt`` when it holds a run of the same data and
    params (a finished run then returns at once); otherwise, or without ``resume``, training
    starts fresh.  The previous ``last.pt`` is replaced only by this run's first complete epoch; this
    run's best epoch goes to ``run_best.pt`` and replaces ``best.pt`` at the end only when it is at
    least as good on the same data, or ``replace_best`` (summary: ``best_replaced``).  ``on_epoch_end(epoch, record)`` is
    called after each epoch's files are written (epoch 1-based).  ``init(model)`` is called once on the
    freshly built model of a run that does not resume, before training (a warm start; the benchmark's
    ``--init-from`` uses it).
    The summary (also ``out_dir/train_metrics.json``): best_val_mae, best_epoch, epochs_run,
    stopped_early, seconds_per_epoch, samples_per_s, trainable_params, total_params,
    peak_memory_mb, device, num_processes, mixed_precision, data_sha256, history (per epoch:
    epoch, train_loss, val_mae, val_rmse, lr, batches (per process), seconds, samples_per_s).
    """
    from accelerate.utils import set_seed

    tc = params.train
    out_dir, data_dir = Path(out_dir), Path(data_dir or params.processed_dir)
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    accelerator = make_accelerator(tc.device, tc.precision)
    main = accelerator.is_main_process
    data = load_processed(data_dir)
    checksum = data_checksum(data_dir)
    L, H = params.prepare.input_len, params.prepare.output_len
    train_ds, val_ds = (WindowDataset(data, s, L, H) for s in ("train", "val"))
    for ds in (train_ds, val_ds):
        if len(ds) == 0:
            raise DataError(f"{data_dir}: the {ds.split} split {ds.range} holds no {L}+{H}-step window")

    set_seed(tc.seed)
    inputs = build_inputs(params, data, memory_keys_for(params, train_ds))
    model = build_model(params, inputs, cache_dir)  # prints the trainable parameter count
    last_path = out_dir / "last.pt"
    ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
    mismatch = None if ckpt is None else _resume_mismatch(ckpt, params, checksum)
    resuming = ckpt is not None and mismatch is None
    if init is not None and not resuming:
        init(model)  # a warm start, before the optimizer and the weight average take the weights
    fingerprint = frozen_fingerprint(model)
    extra = {"trainable_params": sum(trainable_parameters(model).values()),
             "total_params": sum(p.numel() for p in model.parameters()), "device": str(accelerator.device),
             "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
             "data_sha256": checksum}
    raw_opt = make_optimizer(model, tc.lr, tc.weight_decay, tc.lora_lr)
    train_loader, loader_gen, val_loader = _loaders(train_ds, val_ds, tc, accelerator.num_processes)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, raw_opt, train_loader, val_loader)
    steps_per_epoch = len(train_loader)
    total_steps = tc.epochs * steps_per_epoch if tc.max_steps is None else min(tc.max_steps, tc.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(raw_opt, warmup_cosine(tc.warmup_steps, total_steps))
    ema = WeightAverage(accelerator.unwrap_model(model), tc.ema_decay) if tc.ema_decay > 0 else None
    averaged = (lambda: ema.swapped(accelerator.unwrap_model(model))) if ema is not None else contextlib.nullcontext

    def current_payload() -> dict[str, Any]:
        """The model's trainable state (as it is now: averaged inside ``averaged()``) and what it was trained on."""
        payload = model_payload(accelerator.unwrap_model(model), inputs, fingerprint)
        payload.update(data_sha256=checksum, params=to_dict(params))
        return payload

    state = {"epoch": 0, "best": None, "best_epoch": None, "bad_epochs": 0, "stopped": False}
    history: list[dict[str, Any]] = []
    if resuming:
        load_trainable_state(accelerator.unwrap_model(model), ckpt["model"], last_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        state, history = ckpt["state"], ckpt["history"]
        set_rng_state(ckpt["rng"])
        accelerator.print(f"resuming from {last_path} after epoch {state['epoch']}")
    else:
        if resume:
            log.warning("not resuming %s: %s; training from scratch", last_path, mismatch or "no checkpoint")
        # a fresh run: the previous best.pt and last.pt stay until this run has complete replacements
        # (last.pt after its first epoch; best.pt at its end, see _keep_or_replace_best)

    for epoch in range(state["epoch"], tc.epochs):
        if state["stopped"] or scheduler.last_epoch >= total_steps:
            break
        train_loader.set_epoch(epoch)  # -> sampler.set_epoch; accelerate re-applies it at every __iter__
        loader_gen.manual_seed(tc.seed + epoch)
        record = _train_epoch(model, optimizer, scheduler, train_loader, accelerator, tc, epoch,
                              min(steps_per_epoch, total_steps - scheduler.last_epoch),
                              history[-1]["val_mae"] if history else None,
                              None if ema is None else lambda: ema.update(accelerator.unwrap_model(model)))
        with averaged():  # with train.ema_decay: the averaged weights are validated and kept as the best
            val = validate(model, val_loader, accelerator, H, params.evaluate.mape_floor)
            record.update(val_mae=val["mae"], val_rmse=val["rmse"])
            improved = _update_state(state, epoch, val["mae"], tc.patience)
            history.append(record)
            kept = current_payload() if main and (improved or ema is None) else None
            if main and improved:  # this run's best so far; it becomes best.pt only when the run completes
                save_checkpoint({**kept, "epoch": epoch + 1, "val_mae": val["mae"]}, out_dir / RUN_BEST)
        if main:
            payload = kept if ema is None else {**current_payload(), "ema": ema.state_dict()}  # the raw weights
            save_checkpoint({**payload, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "state": dict(state), "history": history, "rng": rng_state()}, last_path)
            write_json(out_dir / "train_metrics.json", _summary(history, state, extra))
            progress_write(f"epoch {epoch + 1}/{tc.epochs}: loss {record['train_loss']:.4f}, val MAE "
                       f"{val['mae'] if val['mae'] is None else round(val['mae'], 4)}"
                       f"{' (best)' if improved else ''}, {record['samples_per_s'] or 0:.0f} samples/s")
        accelerator.wait_for_everyone()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
        if state["stopped"]:
            accelerator.print(f"early stopping: no val MAE improvement for {tc.patience} epochs")

    if state["best"] is None:
        raise DataError("training never produced a finite validation MAE (diverged or no valid target)")
    if main:
        extra.update(_keep_or_replace_best(out_dir, checksum, replace_best))
        if extra["best_replaced"]:
            write_json(out_dir / "config.json", to_dict(params))
            write_json(out_dir / "data_meta.json", {**data.meta, "sensor_ids": list(data.sensor_ids),
                                                    "data_sha256": checksum})
    summary = _summary(history, state, extra)
    if main:
        write_json(out_dir / "train_metrics.json", summary)
    accelerator.wait_for_everyone()
    return summary


def _train_epoch(model, optimizer, scheduler, loader, accelerator, tc, epoch: int, n_batches: int,
                 last_val: float | None, after_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """One pass over ``loader``; returns the epoch record (loss averaged over batches and processes).

    The progress bar shows the batch loss, the previous epoch's val MAE and samples/s.
    """
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    loss_sum = torch.zeros((), device=accelerator.device)
    n_seen = 0
    bar = progress(loader, total=n_batches, desc=f"epoch {epoch + 1}/{tc.epochs}", leave=False, lines=False,
                   disable=not accelerator.is_local_main_process)  # off a terminal: only the epoch line below
    for i, batch in enumerate(bar):
        if i >= n_batches:  # the step budget (train.max_steps) ends inside this epoch
            break
        with accelerator.autocast():
            yhat = forward(model, hide_readings(batch, tc.input_mask_rate))
        loss = masked_mae_loss(yhat, batch["y"], batch["y_mask"])
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if tc.grad_clip and tc.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.detach()
        n_seen += batch["y"].shape[0] * accelerator.num_processes
        bar.set_postfix(loss=f"{loss.item():.3f}", val_mae="-" if last_val is None else f"{last_val:.3f}",
                        samples_s=f"{n_seen / (time.perf_counter() - start):.0f}")
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    mean_loss = accelerator.reduce(loss_sum / max(1, n_batches), reduction="mean")
    return {"epoch": epoch + 1, "train_loss": float(mean_loss), "lr": scheduler.get_last_lr()[0], "batches": n_batches,
            "seconds": seconds, "cpu_seconds": cpu_seconds, "windows": n_seen, "samples_per_s": n_seen / seconds if seconds > 0 else None}
