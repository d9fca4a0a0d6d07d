"""Pipeline step ``export``: the trained forecaster -> one ONNX file, checked against PyTorch.

What is exported is the WHOLE forecaster with LoRA merged: the training scaler, RevIN and its
inverse are inside the graph, so the ONNX model maps raw readings to forecasts in original
units with nothing around it::

    inputs   values (batch, L, N, C) float32   readings in original units (ignored where mask is False)
             mask   (batch, L, N)    bool      valid readings
             tod    (batch, L)       float32   time of day, fraction of the day
             dow    (batch, L)       int64     day of week, 0 = Monday
    output   forecast (batch, H, N)  float32   channel 0 in original units

The batch axis is dynamic.  ``torch.onnx.export(dynamo=True)`` (torch's default exporter) is
tried first; if it fails, the TorchScript exporter (``dynamo=False``) is used with the eager
attention kernel (it cannot translate grouped-query SDPA), and the returned record says which
one produced the file.  ``onnx.checker`` must pass, then the file is run in onnxruntime on fresh
random inputs (several batch sizes, masks with missing readings and a fully missing sensor) and
compared with PyTorch: it passes when ``|ort - torch| <= atol + rtol * |torch|`` everywhere.

Beside ``<name>.onnx`` a sidecar ``<name>.json`` records what the batch scorer needs to run
without PyTorch: input/output names and shapes, sensor ids, input/output length, frequency,
steps per day, null value, channels, units, physical bounds, the file's sha256 and the parity
result.  Both files are written atomically.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from stlink.config import Params
from stlink.export.card import INPUT_NAMES, OUTPUT_NAME, SIDECAR_FORMAT, ExportError, sidecar_path
from stlink.io import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
DEFAULT_ATOL = 1e-4  # original units (e.g. mph); the float32 graphs agree to ~1e-5 on values ~50
DEFAULT_RTOL = 1e-4
PARITY_BATCH_SIZES = (1, 3, 8)
EXPORTERS = ("auto", "dynamo", "torchscript")


def merged_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with the LoRA matrices folded into the attention weights.

    The caller's model keeps its adapters (it may still be trained or logged with them).
    """
    from stlink.model.lora import merge_lora

    out = copy.deepcopy(model).eval()
    if hasattr(getattr(out, "backbone", None), "merge_and_unload"):
        out = merge_lora(out)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def random_inputs(batch: int, input_len: int, n_sensors: int, n_channels: int, *, mean: np.ndarray,
                  std: np.ndarray, steps_per_day: int, seed: int,
                  missing: float = 0.15) -> tuple[torch.Tensor, ...]:
    """Plausible random inputs in original units: ``mean + std * noise``, consistent time features.

    A ``missing`` fraction of readings is masked, and in every sample after the first one sensor
    is missing for the whole window (RevIN's no-valid-step branch).
    """
    g = np.random.default_rng(seed)
    x = mean + std * g.standard_normal((batch, input_len, n_sensors, n_channels))   # (B, L, N, C)
    mask = g.random((batch, input_len, n_sensors)) >= missing                        # (B, L, N)
    for b in range(1, batch):
        mask[b, :, g.integers(n_sensors)] = False
    x = np.where(mask[..., None], x, g.standard_normal(x.shape) * 1e3)  # masked entries hold junk
    slot = g.integers(0, 7 * steps_per_day, size=(batch, 1)) + np.arange(input_len)  # (B, L) steps since Monday
    tod = (slot % steps_per_day) / steps_per_day                                     # (B, L)
    dow = (slot // steps_per_day) % 7                                                # (B, L)
    return (torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(mask),
            torch.as_tensor(tod, dtype=torch.float32), torch.as_tensor(dow, dtype=torch.int64))


def _scaler(model: nn.Module, n_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's training scaler (mean, std) per channel, or (0, 1) when it has none."""
    mean = getattr(model, "scaler_mean", None)
    std = getattr(model, "scaler_std", None)
    if mean is None or std is None:
        return np.zeros(n_channels), np.ones(n_channels)
    return mean.detach().cpu().numpy().astype(np.float64), std.detach().cpu().numpy().astype(np.float64)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise the given loggers to WARNING inside the block (the dynamo exporter's graph passes log
    one INFO line per rewritten initializer)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export_dynamo(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    with _quiet("onnx_ir", "onnxscript"):
        torch.onnx.export(model, args, str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          dynamo=True, dynamic_shapes=tuple({0: batch} for _ in INPUT_NAMES),
                          opset_version=opset, external_data=False, verbose=False)


def _eager_attention(model: nn.Module) -> None:
    """Switch the decoder layers to the plain matmul/softmax attention kernel (in place)."""
    for module in model.modules():
        config = getattr(getattr(module, "self_attn", None), "config", None)
        if config is not None:
            config._attn_implementation = "eager"


def _export_torchscript(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int) -> None:
    _eager_attention(model)
    axes = {name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    torch.onnx.export(model, args, str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                      dynamo=False, dynamic_axes=axes, opset_version=opset)


def _export_graph(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int,
                  exporter: str) -> dict[str, Any]:
    """Write the ONNX graph to ``path``; ``auto``: dynamo first, TorchScript as the fallback."""
    if exporter not in EXPORTERS:
        raise ExportError(f"exporter={exporter!r}: one of {', '.join(EXPORTERS)}")
    reason = "not tried (exporter=torchscript)"
    if exporter != "torchscript":
        try:
            _export_dynamo(model, args, path, opset)
            return {"exporter": "dynamo"}
        except Exception as exc:  # the dynamo exporter raises many kinds (export, translation, onnxscript)
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
            if exporter == "dynamo":
                raise ExportError(f"{path.name}: dynamo ONNX export failed: {reason}") from exc
            log.warning("dynamo ONNX export failed (%s); falling back to dynamo=False", reason)
    try:
        _export_torchscript(copy.deepcopy(model), args, path, opset)
    except Exception as exc:
        raise ExportError(f"{path.name}: both ONNX exporters failed; dynamo: {reason}; "
                          f"torchscript: {type(exc).__name__}: {exc}") from exc
    return {"exporter": "torchscript", "dynamo_error": reason}


def check_graph(path: Path) -> dict[str, list]:
    """``onnx.checker`` (with shape inference) and the I/O contract; returns names and shapes."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path}: onnx.checker failed: {exc}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph

    def shapes(values) -> list[dict[str, Any]]:
        out = []
        for v in values:
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            out.append({"name": v.name, "shape": dims,
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name})
        return out

    inputs, outputs = shapes(graph.input), shapes(graph.output)
    names = ([i["name"] for i in inputs], [o["name"] for o in outputs])
    if names != (list(INPUT_NAMES), [OUTPUT_NAME]):
        raise ExportError(f"{path}: graph inputs/outputs are {names}, expected {list(INPUT_NAMES)} -> {OUTPUT_NAME}")
    static = [v["name"] for v in inputs + outputs if not isinstance(v["shape"][0], str)]
    if static:
        raise ExportError(f"{path}: the batch axis of {static} is not dynamic")
    return {"inputs": inputs, "outputs": outputs}


def check_parity(model: nn.Module, onnx_path: str | Path, *, n_sensors: int, input_len: int, n_channels: int,
                 steps_per_day: int, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                 batch_sizes: Sequence[int] = PARITY_BATCH_SIZES, seed: int = 12345) -> dict[str, Any]:
    """Run ``onnx_path`` in onnxruntime (CPU) and ``model`` in PyTorch on fresh random inputs.

    Returns ``{"max_abs_diff", "max_rel_diff", "tolerance": {"atol", "rtol"}, "passed",
    "batch_sizes", "seed"}``; passed means ``|ort - torch| <= atol + rtol * |torch|`` everywhere.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model = model.eval()
    mean, std = _scaler(model, n_channels)
    max_abs, max_rel, excess = 0.0, 0.0, -np.inf
    for i, batch in enumerate(batch_sizes):
        args = random_inputs(batch, input_len, n_sensors, n_channels, mean=mean, std=std,
                             steps_per_day=steps_per_day, seed=seed + i)
        with torch.no_grad():
            ref = model(*args).numpy()                                                   # (B, H, N)
        got = session.run([OUTPUT_NAME], {k: v.numpy() for k, v in zip(INPUT_NAMES, args)})[0]
        if got.shape != ref.shape:
            raise ExportError(f"{onnx_path}: ONNX output shape {got.shape} != PyTorch {ref.shape} at batch {batch}")
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        max_abs = max(max_abs, float(np.nan_to_num(diff, nan=np.inf).max()))
        max_rel = max(max_rel, float(np.nan_to_num(diff / np.maximum(np.abs(ref), 1e-12), nan=np.inf).max()))
        excess = max(excess, float(np.nan_to_num(diff - (atol + rtol * np.abs(ref)), nan=np.inf).max()))
    return {"max_abs_diff": max_abs, "max_rel_diff": max_rel, "tolerance": {"atol": atol, "rtol": rtol},
            "passed": bool(excess <= 0.0), "batch_sizes": list(batch_sizes), "seed": seed}


def _card_meta(meta: Mapping[str, Any] | None, model: nn.Module, n_sensors: int, n_channels: int) -> dict[str, Any]:
    """The data description written to the sidecar; defaults come from the model itself."""
    meta = dict(meta or {})
    embed = getattr(model, "embed", None)
    steps_per_day = int(meta.get("steps_per_day") or getattr(embed, "steps_per_day", None)
                        or getattr(model, "steps_per_day", 288))  # ST-LINK: embed.steps_per_day; STID: its own
    if 86400 % steps_per_day:
        raise ExportError(f"steps_per_day={steps_per_day} does not divide a day into whole seconds")
    freq_seconds = int(meta.get("freq_seconds") or 86400 // steps_per_day)
    sensor_ids = [str(s) for s in meta.get("sensor_ids") or range(n_sensors)]
    channels = list(meta.get("channels") or [f"ch{i}" for i in range(n_channels)])
    if len(sensor_ids) != n_sensors or len(channels) != n_channels:
        raise ExportError(f"meta names {len(sensor_ids)} sensors and {len(channels)} channels; the model "
                          f"has {n_sensors} sensors and {n_channels} channels")
    return {
        "sensor_ids": sensor_ids,
        "channels": channels,
        "units": list(meta.get("units") or ["unknown"] * n_channels),
        "steps_per_day": steps_per_day,
        "freq_seconds": freq_seconds,
        "freq": meta.get("freq") or f"{freq_seconds}s",
        "null_value": float(meta.get("null_value", 0.0)),
        "bounds": {str(k): [float(v[0]), float(v[1])] for k, v in (meta.get("bounds") or {}).items()},
        "dataset": meta.get("dataset"),
        "data_sha256": meta.get("data_sha256"),
    }


def export_onnx(model: nn.Module, out_path: str | Path, *, n_sensors: int, input_len: int, n_channels: int,
                meta: Mapping[str, Any] | None = None, opset: int = DEFAULT_OPSET, atol: float = DEFAULT_ATOL,
                rtol: float = DEFAULT_RTOL, batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
                seed: int = 0, exporter: str = "auto") -> dict[str, Any]:
    """Export ``model`` (LoRA merged on a copy) to ``out_path`` and check it; writes the sidecar too.

    ``meta`` describes the data (processed ``meta.json`` keys: sensor_ids, freq, freq_seconds,
    steps_per_day, null_value, channels, units; plus ``bounds`` {channel: [lo, hi]}); missing keys
    default to what the model knows (sensors ``0..N-1``, steps per day of its time embedding).
    ``exporter``: ``auto`` (dynamo, falling back to TorchScript), ``dynamo`` or ``torchscript``.
    The files are written even when parity fails (the record says so, and the scorer refuses
    such a model); an export or checker failure writes nothing and raises ``ExportError``.

    Returns ``{"max_abs_diff", "max_rel_diff", "tolerance", "passed", "exporter", "opset", "path",
    "sidecar", "sha256", ...}``.
    """
    import onnx

    out_path = Path(out_path)
    merged = merged_copy(model)
    card = _card_meta(meta, merged, n_sensors, n_channels)
    mean, std = _scaler(merged, n_channels)
    example = random_inputs(2, input_len, n_sensors, n_channels, mean=mean, std=std,
                            steps_per_day=card["steps_per_day"], seed=seed)
    with torch.no_grad():
        output_len = int(merged(*example).shape[1])
    with atomic_path(out_path, ".onnx") as tmp:
        record = _export_graph(merged, example, tmp, opset, exporter)
        io = check_graph(tmp)
        parity = check_parity(merged, tmp, n_sensors=n_sensors, input_len=input_len, n_channels=n_channels,
                              steps_per_day=card["steps_per_day"], atol=atol, rtol=rtol,
                              batch_sizes=batch_sizes, seed=seed + 1000)
        record.update(parity, opset=opset)
        digest = sha256_file(tmp)
    sidecar = {
        "format": SIDECAR_FORMAT, "onnx_file": out_path.name, "sha256": digest, **io,
        "input_len": input_len, "output_len": output_len, "n_sensors": n_sensors, "n_channels": n_channels,
        **card, "parity": record,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__},
    }
    write_json(sidecar_path(out_path), sidecar)
    record.update(path=str(out_path), sidecar=str(sidecar_path(out_path)), sha256=digest)
    log.info("exported %s with the %s exporter (opset %d): parity max |diff| %.3g, %s", out_path,
             record["exporter"], opset, record["max_abs_diff"], "passed" if record["passed"] else "FAILED")
    return record


def export_step(params: Params, model_dir: str | Path, out_dir: str | Path,
                data_dir: str | Path | None = None) -> dict[str, Any]:
    """``stlink export``: rebuild the trained model of ``model_dir`` and export ``out_dir/model.onnx``,
    then the variants of ``params.export`` beside it (``stlink.export.optimize``: model.opt.onnx,
    model.int8.onnx, model.fp16.onnx; the accuracy gate reads the test split of ``data_dir``,
    default ``params.processed_dir``).

    Raises ``ExportError`` (after writing both files, so the registry gate can read the failed
    parity) when the ONNX model does not match PyTorch within the tolerance.
    """
    from stlink.monitoring.intervals import attach_calibration, calibration_for
    from stlink.training.checkpoint import load_trained

    model, trained, data_meta = load_trained(model_dir)
    n_sensors = len(data_meta["sensor_ids"])
    n_channels = len(data_meta["channels"])
    bounds = {c: params.validation.bounds[c] for c in data_meta["channels"] if c in params.validation.bounds}
    out = Path(out_dir) / "model.onnx"
    intervals = calibration_for(params.report_dir / "calibration.json", model_dir)  # checked before exporting
    record = export_onnx(model, out, n_sensors=n_sensors, input_len=trained.prepare.input_len,
                         n_channels=n_channels, meta={**data_meta, "bounds": bounds})
    record["intervals"] = attach_calibration(sidecar_path(out), intervals)  # conformal half-widths in the card
    if not record["passed"]:
        raise ExportError(f"{out}: ONNX parity failed: max |ort - torch| = {record['max_abs_diff']:.3g} "
                          f"exceeds atol {record['tolerance']['atol']} + rtol {record['tolerance']['rtol']} "
                          f"x |torch|; see {sidecar_path(out)}")
    from stlink.export.optimize import export_variants

    record["variants"] = export_variants(model, out, params.export,
                                         data_dir=params.processed_dir if data_dir is None else data_dir)
    return record
