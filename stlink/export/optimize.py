"""Faster variants of the exported ONNX model, each behind its own gate, and the scorer's session options.

Written beside ``model.onnx`` by ``stlink export`` (``params.yaml: export``), each with its own card
(``<name>.json``, the fp32 card plus ``variant`` and its gate record):

    model.opt.onnx    fp32, onnxruntime's offline transformer optimiser          export.optimize: true
                      (RMSNorm -> SimplifiedLayerNormalization, SiLU -> QuickGelu,
                      residual + norm -> SkipLayerNormalization, constant folding).
                      Gate: parity with PyTorch, the same tolerance as model.onnx.
    model.int8.onnx   dynamic int8 quantisation of the MatMul weights (CPU),      export.quantize: int8
                      made from model.opt.onnx when it passed, else model.onnx.
                      Gate: masked test MAE within ``export.max_mae_change`` (relative) of model.onnx's.
    model.fp16.onnx   float16 weights and compute for the CUDA provider, fp32     export.fp16: true
                      inputs/outputs.  Same accuracy gate, measured on CUDA.

The attention and rotary fusions of the optimiser do not apply to this graph: SE-Attention rotates
q and k by per-(sensor, patch) angles built inside the graph and attends bidirectionally, which
is not the pattern (position ids into a cos/sin cache, causal GQA) they match.  Onnxruntime's own
session-level optimiser (``graph_optimization_level``, ALL by default) applies the same node
fusions again at load time, so on CPU model.opt.onnx mostly saves load time; int8 is what
changes throughput (``docs/benchmarks.md``).

A variant that fails its gate is refused: its file is not written, a previous copy is removed
(so nothing scores an outdated variant), one WARNING line says why, and the record (and the
fp32 card's ``variants``) keeps the figures.  The fp32 ``model.onnx`` is never touched here.

``session_options`` is what the scorer uses (no PyTorch import in this module's top level).
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from stlink.config import ConfigError, ExportConfig, ScoreConfig
from stlink.export.card import OUTPUT_NAME, ExportError, sidecar_path
from stlink.io import atomic_path, sha256_file, write_json

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
VARIANTS = ("opt", "int8", "fp16")
QUANTIZE = ("none", "int8")
GRAPH_LEVELS = ("disable", "basic", "extended", "all")
OPTIMIZER_MODEL_TYPE = "gpt2"  # the transformer optimiser's decoder-only family (ORT's Llama recipe uses it too)
# fp16: kept in float32 where half precision loses the sums of RevIN, the scaler and the memory read
FP16_KEEP_FP32 = ("ReduceMean", "ReduceSum", "ReduceL2", "Pow", "Sqrt", "Reciprocal", "Div", "Log", "TopK")


# ---------------------------------------------------------------------------------------------
# session options (the scorer's)


def session_options(intra_op_threads: int = 0, inter_op_threads: int = 0, *, graph_level: str = "all"):
    """``onnxruntime.SessionOptions`` with the given threads (0 = library default) and optimisation level.

    ``inter_op_threads`` > 1 switches to the parallel executor (the sequential one never uses
    inter-op threads); ``graph_level``: disable | basic | extended | all.
    """
    import onnxruntime as ort

    for name, value in (("intra_op_threads", intra_op_threads), ("inter_op_threads", inter_op_threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"score.{name}={value!r}: a whole number >= 0 (0 = onnxruntime's default)")
    if graph_level not in GRAPH_LEVELS:
        raise ConfigError(f"graph_level={graph_level!r}: one of {', '.join(GRAPH_LEVELS)}")
    levels = ort.GraphOptimizationLevel
    so = ort.SessionOptions()
    so.graph_optimization_level = {"disable": levels.ORT_DISABLE_ALL, "basic": levels.ORT_ENABLE_BASIC,
                                   "extended": levels.ORT_ENABLE_EXTENDED, "all": levels.ORT_ENABLE_ALL}[graph_level]
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = inter_op_threads
    if inter_op_threads > 1:
        so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    return so


def session_options_from_params(score: ScoreConfig):
    """``params.score.intra_op_threads`` / ``inter_op_threads`` -> ``SessionOptions`` (what ``stlink forecast`` uses)."""
    return session_options(score.intra_op_threads, score.inter_op_threads)


# ---------------------------------------------------------------------------------------------
# files


def variant_path(onnx_path: str | Path, variant: str) -> Path:
    """``models/x/model.onnx`` + ``int8`` -> ``models/x/model.int8.onnx`` (``fp32`` -> the file itself)."""
    onnx_path = Path(onnx_path)
    if variant == "fp32":
        return onnx_path
    if variant not in VARIANTS:
        raise ConfigError(f"variant={variant!r}: one of fp32, {', '.join(VARIANTS)}")
    return onnx_path.with_name(f"{onnx_path.stem}.{variant}.onnx")


SCORE_VARIANTS = ("fp32", *VARIANTS)
HOW_TO_EXPORT = {"opt": "export.optimize: true", "int8": "export.quantize: int8",
                 "fp16": "export.fp16: true (on a machine with a CUDA GPU)"}


class VariantError(ConfigError):
    """``score.variant`` names a file the model does not have (not exported, or refused by its gate)."""


def select_variant(onnx_path: str | Path, variant: str, model: str | None = None) -> Path:
    """The file ``score.variant`` scores: ``model.onnx`` (fp32) or ``model.<variant>.onnx`` beside it.

    ``model``: how the user named the model (a ``models:/`` URI or the path), quoted in errors.  A variant
    that was not exported, or was refused by its gate (the fp32 card's ``variants`` record says why), is a
    ``VariantError`` naming the variant, the model and the export setting that produces it."""
    if variant not in SCORE_VARIANTS:
        raise ConfigError(f"score.variant={variant!r}: one of {', '.join(SCORE_VARIANTS)}")
    onnx_path = Path(onnx_path)
    path = variant_path(onnx_path, variant)
    if path.is_file():
        return path
    import json

    name = model or str(onnx_path)
    try:
        rec = (json.loads(sidecar_path(onnx_path).read_text()).get("variants") or {}).get(variant) or {}
    except (OSError, ValueError):
        rec = {}
    why = (f"its gate refused it at export: {rec['refused']}" if rec.get("refused")
           else f"{path.name} was not exported with it")
    raise VariantError(f"score.variant={variant}: model {name} has no {variant} variant ({why}); produce it with "
                       f"`{HOW_TO_EXPORT[variant]}` in params.yaml, then `stlink export` (and `stlink promote` for "
                       f"the registry), or score with score.variant=fp32")


def _remove_variant(onnx_path: Path, variant: str) -> None:
    path = variant_path(onnx_path, variant)
    for p in (path, sidecar_path(path)):
        p.unlink(missing_ok=True)


def _write_variant(proto, onnx_path: Path, variant: str, base_card: Mapping[str, Any], extra: Mapping[str, Any]) -> Path:
    """Save ``proto`` as the ``variant`` file and its card (both atomically, the model first)."""
    import onnx

    path = variant_path(onnx_path, variant)
    with atomic_path(path, ".onnx") as tmp:
        onnx.save(proto, str(tmp))
        digest = sha256_file(tmp)
    card = {**base_card, "onnx_file": path.name, "sha256": digest, **extra}
    card.pop("variants", None)
    write_json(sidecar_path(path), card)
    return path


@contextlib.contextmanager
def _quiet_optimizer() -> Iterator[None]:
    """The transformer optimiser prints (stdout) and warns about shape inference and head counts it
    does not need for this graph; keep that out of the pipeline's log."""
    names = ("optimizer", "onnx_model", "onnx_model_bert", "onnx_model_gpt2", "fusion_base", "fusion_utils",
             "fusion_skiplayernorm", "fusion_attention", "fusion_gpt_attention", "shape_infer_helper",
             "symbolic_shape_infer", "onnxruntime.transformers", "")  # "": quantize_dynamic warns on the root logger
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _fused_ops(proto, original) -> dict[str, int]:
    """Counts of the operator types in ``proto`` that ``original`` does not have (the fusions)."""
    before = {node.op_type for node in original.graph.node}
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type not in before:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# the three transformations (pure: ONNX file in, ModelProto out)


def optimize_graph(onnx_path: str | Path, *, num_heads: int = 0, hidden_size: int = 0, opt_level: int = 2):
    """The transformer optimiser on ``onnx_path`` -> an optimised ``ModelProto`` (CPU graph).

    ``opt_level`` 2 = onnxruntime's EXTENDED level first (hardware-independent fusions), then the
    Python fusions of the ``gpt2`` family.  Level 99 would bake CPU-layout-specific kernels into the
    file; the session applies those at load time anyway.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet_optimizer():
        model = optimize_model(str(onnx_path), model_type=OPTIMIZER_MODEL_TYPE, num_heads=num_heads,
                               hidden_size=hidden_size, opt_level=opt_level, use_gpu=False)
        model.topological_sort()
    return model.model


def quantize_int8(onnx_path: str | Path):
    """Dynamic int8 quantisation of the MatMul weights of ``onnx_path`` -> ``ModelProto``.

    Weights: int8, per tensor; activations: uint8, scaled per call (dynamic), so no calibration
    data is needed.  Only MatMuls with a constant weight are quantised (``MatMulConstBOnly``): the
    attention score and value products stay float32.
    """
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="stlink-int8-") as tmp:
        out = Path(tmp) / "model.int8.onnx"
        with _quiet_optimizer():
            quantize_dynamic(str(onnx_path), str(out), op_types_to_quantize=["MatMul"], per_channel=False,
                             weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True})
        return onnx.load(str(out))


def convert_fp16(onnx_path: str | Path):
    """Float16 weights and compute for the CUDA provider, float32 inputs and outputs -> ``ModelProto``.

    The normalisation sums (RevIN, scaler, memory cosine) stay float32 (``FP16_KEEP_FP32``).
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = onnx.load(str(onnx_path))
    with _quiet_optimizer():
        half = convert_float_to_float16(proto, keep_io_types=True,
                                        op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_KEEP_FP32)))
        # the converter emits one identical Cast per consumer of a value that feeds two blocked nodes
        seen, keep = set(), []
        for node in half.graph.node:
            key = (node.op_type, tuple(node.input), tuple(node.output))
            if key not in seen:
                seen.add(key)
                keep.append(node)
        del half.graph.node[:]
        half.graph.node.extend(keep)
        model = OnnxModel(half)
        model.topological_sort()  # the input/output casts are appended at the end of the node list
    return model.model


# ---------------------------------------------------------------------------------------------
# the accuracy gate


@dataclass(frozen=True)
class GateWindows:
    """Test-split windows of a processed dataset, as ONNX feeds (values with NaN -> the null value)."""

    feeds: list[dict[str, np.ndarray]]   # each: values (B, L, N, C), mask (B, L, N), tod (B, L), dow (B, L)
    targets: list[tuple[np.ndarray, np.ndarray]]   # each: y (B, H, N), valid (B, H, N)
    n_windows: int


def gate_windows(data_dir: str | Path, *, input_len: int, output_len: int, max_windows: int | None = None,
                 batch_size: int = 32, null_value: float = 0.0) -> GateWindows:
    """The test windows of ``data_dir`` (every one, or ``max_windows`` evenly spaced) in batches."""
    from stlink.data.formats import load_processed
    from stlink.data.windows import WindowDataset

    ds = WindowDataset(load_processed(data_dir), "test", input_len, output_len)
    if len(ds) == 0:
        raise ExportError(f"{data_dir}: the test split has no window of {input_len} + {output_len} steps; "
                          "the accuracy gate cannot be measured")
    idx = np.arange(len(ds))
    if max_windows is not None and max_windows < len(ds):
        idx = np.unique(np.linspace(0, len(ds) - 1, max(1, max_windows)).round().astype(int))
    feeds, targets = [], []
    for a in range(0, len(idx), batch_size):
        items = [ds[int(i)] for i in idx[a:a + batch_size]]
        x = np.stack([it["x"] for it in items])                                       # (B, L, N, C)
        feeds.append({"values": np.where(np.isfinite(x), x, np.float32(null_value)).astype(np.float32),
                      "mask": np.stack([it["x_mask"] for it in items]),               # (B, L, N)
                      "tod": np.stack([it["tod"] for it in items]).astype(np.float32),  # (B, L)
                      "dow": np.stack([it["dow"] for it in items]).astype(np.int64)})   # (B, L)
        y = np.stack([it["y"] for it in items])                                        # (B, H, N)
        targets.append((y, np.stack([it["y_mask"] for it in items]) & np.isfinite(y)))
    return GateWindows(feeds, targets, len(idx))


def masked_mae(onnx_path: str | Path, windows: GateWindows, *, provider: str = CPU, options=None) -> float:
    """Masked MAE of ``onnx_path`` over ``windows``: sum |y - yhat| over valid targets / their count.

    ``ExportError`` when onnxruntime does not actually run on ``provider``.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    session = ort.InferenceSession(str(onnx_path), options, providers=[provider] if provider == CPU else [provider, CPU])
    active = session.get_providers()[0]
    if active != provider:
        raise ExportError(f"{onnx_path}: onnxruntime runs it on {active}, not {provider}; the accuracy gate "
                          "must be measured where the model will run")
    total, count = 0.0, 0
    for feed, (y, valid) in zip(windows.feeds, windows.targets):
        yhat = session.run([OUTPUT_NAME], feed)[0].astype(np.float64)                  # (B, H, N)
        total += float(np.abs(y - yhat)[valid].sum())
        count += int(valid.sum())
    if count == 0:
        raise ExportError(f"{onnx_path}: no valid target reading in {windows.n_windows} test window(s)")
    return total / count


def accuracy_gate(mae: float, mae_fp32: float, max_change: float) -> dict[str, Any]:
    """``passed`` when ``|mae / mae_fp32 - 1| <= max_change`` (a large change either way means the
    variant's numbers are no longer the model's)."""
    if not np.isfinite(mae):
        change = float("inf")
    elif mae_fp32 > 0:
        change = mae / mae_fp32 - 1.0
    else:
        change = 0.0 if mae == 0 else float("inf")
    return {"metric": "masked test MAE", "mae": float(mae), "mae_fp32": float(mae_fp32),
            "relative_change": float(change), "max_relative_change": float(max_change),
            "passed": bool(abs(change) <= max_change)}


def _gate_message(variant: str, path: Path, gate: Mapping[str, Any], windows: int) -> str:
    return (f"{path.name}: refused: {variant} masked test MAE {gate['mae']:.4f} vs fp32 {gate['mae_fp32']:.4f} "
            f"({100 * gate['relative_change']:+.2f} %) over {windows} test windows is outside "
            f"export.max_mae_change = {100 * gate['max_relative_change']:.2f} %")


# ---------------------------------------------------------------------------------------------
# the step


def _attention_shape(model) -> tuple[int, int]:
    """(heads, hidden size) of the backbone's attention, or (0, 0) (the optimiser then guesses)."""
    for module in model.modules():
        config = getattr(getattr(module, "self_attn", None), "config", None)
        if config is not None:
            return int(getattr(config, "num_attention_heads", 0)), int(getattr(config, "hidden_size", 0))
    return 0, 0


def _cuda_available() -> tuple[bool, str]:
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider"
    try:
        from stlink.scoring.session import cuda_failure, native_stderr
    except ImportError:  # pragma: no cover - the scoring package is part of the project
        return True, ""
    import onnx

    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    with native_stderr() as printed:
        session = ort.InferenceSession(onnx.helper.make_model(
            graph, ir_version=10, opset_imports=[onnx.helper.make_opsetid("", 18)]).SerializeToString(), providers=[CUDA, CPU])
    if session.get_providers()[0] == CUDA:
        return True, ""
    return False, cuda_failure(printed)


def export_variants(model, onnx_path: str | Path, cfg: ExportConfig, *, data_dir: str | Path | None,
                    atol: float | None = None, rtol: float | None = None) -> dict[str, Any]:
    """Write the variants ``cfg`` asks for beside ``onnx_path`` (which passed its own parity gate).

    ``model``: the PyTorch forecaster (LoRA merged on a copy here) for the parity of model.opt.onnx;
    ``data_dir``: the processed dataset whose test split measures the accuracy gate (int8, fp16).
    Shapes, steps per day and tolerances default to the fp32 card.
    Returns ``{variant: record}``; each record has ``file`` (None when refused), ``passed``, the gate
    figures and, when refused, ``refused`` (the message).  Also written into the fp32 card as
    ``variants``.
    """
    from stlink.export.onnx_export import DEFAULT_ATOL, DEFAULT_RTOL, check_parity, merged_copy

    import json

    import onnx

    if cfg.quantize not in QUANTIZE:
        raise ConfigError(f"export.quantize={cfg.quantize!r}: one of {', '.join(QUANTIZE)}")
    if cfg.max_mae_change < 0:
        raise ConfigError(f"export.max_mae_change={cfg.max_mae_change}: must be >= 0")
    onnx_path = Path(onnx_path)
    base_card = json.loads(sidecar_path(onnx_path).read_text())
    input_len, n_sensors, n_channels = (int(base_card[k]) for k in ("input_len", "n_sensors", "n_channels"))
    steps_per_day = int(base_card["steps_per_day"])
    wanted = [v for v, on in (("opt", cfg.optimize), ("int8", cfg.quantize == "int8"), ("fp16", cfg.fp16)) if on]
    for v in VARIANTS:
        if v not in wanted:
            _remove_variant(onnx_path, v)  # a variant of an earlier model must not outlive it
    records: dict[str, Any] = {}
    source = {"source": onnx_path.name, "source_sha256": base_card["sha256"]}

    if "opt" in wanted:
        heads, hidden = _attention_shape(model)
        tol = (base_card.get("parity") or {}).get("tolerance") or {}  # the tolerance model.onnx passed
        proto = optimize_graph(onnx_path, num_heads=heads, hidden_size=hidden)
        original = onnx.load(str(onnx_path), load_external_data=False)
        import tempfile

        with tempfile.TemporaryDirectory(prefix="stlink-opt-") as tmp:
            candidate = Path(tmp) / "model.opt.onnx"
            onnx.save(proto, str(candidate))
            parity = check_parity(merged_copy(model), candidate, n_sensors=n_sensors, input_len=input_len,
                                  n_channels=n_channels, steps_per_day=steps_per_day,
                                  atol=tol.get("atol", DEFAULT_ATOL) if atol is None else atol,
                                  rtol=tol.get("rtol", DEFAULT_RTOL) if rtol is None else rtol)
        info = {"kind": "opt", **source, "method": f"onnxruntime.transformers.optimizer ({OPTIMIZER_MODEL_TYPE}, "
                f"opt_level 2)", "fused_ops": _fused_ops(proto, original), "nodes": len(proto.graph.node),
                "nodes_fp32": len(original.graph.node)}
        parity = {**base_card.get("parity", {}), **parity}
        if parity["passed"]:
            path = _write_variant(proto, onnx_path, "opt", base_card, {"variant": info, "parity": parity})
            records["opt"] = {"file": path.name, "passed": True, **info, "parity": parity}
            log.info("optimised graph %s: %d -> %d nodes, fused %s; parity max |diff| %.3g", path.name,
                     info["nodes_fp32"], info["nodes"], info["fused_ops"] or "none", parity["max_abs_diff"])
        else:
            _remove_variant(onnx_path, "opt")
            msg = (f"{variant_path(onnx_path, 'opt').name}: refused: parity with PyTorch failed after graph "
                   f"optimisation (max |diff| {parity['max_abs_diff']:.3g} > atol {parity['tolerance']['atol']} + "
                   f"rtol {parity['tolerance']['rtol']} x |torch|)")
            log.warning(msg)
            records["opt"] = {"file": None, "passed": False, "refused": msg, **info, "parity": parity}

    gated = [v for v in ("int8", "fp16") if v in wanted]
    if gated:
        if data_dir is None:
            raise ExportError("the int8/fp16 accuracy gate needs the processed dataset (data_dir)")
        windows = gate_windows(data_dir, input_len=input_len, output_len=int(base_card["output_len"]),
                               max_windows=cfg.accuracy_windows, null_value=float(base_card.get("null_value", 0.0)))
        mae_fp32 = masked_mae(onnx_path, windows)
        log.info("accuracy gate: fp32 masked test MAE %.4f over %d windows", mae_fp32, windows.n_windows)
    for v in gated:
        path = variant_path(onnx_path, v)
        if v == "int8":
            src = variant_path(onnx_path, "opt") if records.get("opt", {}).get("passed") else onnx_path
            proto, provider = quantize_int8(src), CPU
            info = {"kind": "int8", **source, "quantized_from": src.name,
                    "method": "onnxruntime.quantization.quantize_dynamic (MatMul weights int8 per tensor, "
                              "activations uint8 dynamic, constant-B MatMuls only)", "provider": CPU}
        else:
            ok, reason = _cuda_available()
            if not ok:
                _remove_variant(onnx_path, v)
                msg = f"{path.name}: refused: export.fp16 needs the CUDA provider to measure its accuracy gate ({reason})"
                log.warning(msg)
                records[v] = {"file": None, "passed": False, "refused": msg, "kind": "fp16", **source}
                continue
            proto, provider = convert_fp16(onnx_path), CUDA
            info = {"kind": "fp16", **source, "method": "onnxruntime.transformers.float16 (keep_io_types, "
                    f"float32 kept for {', '.join(FP16_KEEP_FP32)})", "provider": CUDA}
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"stlink-{v}-") as tmp:
            candidate = Path(tmp) / path.name
            onnx.save(proto, str(candidate))
            mae = masked_mae(candidate, windows, provider=provider)
        gate = {**accuracy_gate(mae, mae_fp32, cfg.max_mae_change), "windows": windows.n_windows,
                "provider": provider}
        if gate["passed"]:
            parity_note = {"passed": None, "gate": "accuracy", "note": f"{v} changes the numbers; its gate is "
                                                                       "the test MAE (see accuracy), not parity"}
            _write_variant(proto, onnx_path, v, base_card, {"variant": info, "accuracy": gate, "parity": parity_note})
            records[v] = {"file": path.name, "passed": True, **info, "accuracy": gate}
            log.info("%s: masked test MAE %.4f vs fp32 %.4f (%+.2f %%), within %.2f %%", path.name, mae, mae_fp32,
                     100 * gate["relative_change"], 100 * cfg.max_mae_change)
        else:
            _remove_variant(onnx_path, v)
            msg = _gate_message(v, path, gate, windows.n_windows)
            log.warning(msg)
            records[v] = {"file": None, "passed": False, "refused": msg, **info, "accuracy": gate}

    write_json(sidecar_path(onnx_path), {**base_card, "variants": records})
    return records


def variant_tags(records: Mapping[str, Any]) -> dict[str, str]:
    """MLflow tags of the variants: ``<v>.passed``, ``<v>.file`` and the gate figures."""
    tags: dict[str, str] = {}
    for v, rec in records.items():
        tags[f"{v}.passed"] = "true" if rec.get("passed") else "false"
        tags[f"{v}.file"] = rec.get("file") or ""
        if "accuracy" in rec:
            a = rec["accuracy"]
            tags.update({f"{v}.test_mae": f"{a['mae']:.6g}", f"{v}.test_mae_fp32": f"{a['mae_fp32']:.6g}",
                         f"{v}.mae_change": f"{a['relative_change']:.6g}",
                         f"{v}.max_mae_change": str(a["max_relative_change"])})
        if "parity" in rec and rec["parity"].get("max_abs_diff") is not None:
            tags[f"{v}.parity_max_abs_diff"] = f"{rec['parity']['max_abs_diff']:.3g}"
        if rec.get("refused"):
            tags[f"{v}.refused"] = rec["refused"][:500]
    return tags


def log_variants(model_version, onnx_path: str | Path, records: Mapping[str, Any], client=None) -> dict[str, str]:
    """Record the variants on the registered version of ``onnx_path`` (call after ``register_export_step``).

    Tags ``variant_tags(records)`` on the model version (``int8.passed``, ``int8.test_mae``,
    ``int8.mae_change``, ...), and every written variant file with its card stored beside
    ``model.onnx`` in the version's logged model, so ``models:/...`` downloads carry them.
    Returns the tags.
    """
    import mlflow

    client = client or mlflow.MlflowClient(mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    tags = variant_tags(records)
    for key, value in tags.items():
        client.set_model_version_tag(model_version.name, str(model_version.version), key, value)
    source = str(getattr(model_version, "source", "") or "")
    model_id = getattr(model_version, "model_id", None) or (   # the logged ONNX model behind the version
        source.split("/", 1)[1] if source.startswith("models:/m-") else None)
    for v, rec in records.items():
        if rec.get("file") and model_id:
            path = variant_path(onnx_path, v)
            for item in (path, sidecar_path(path)):
                client.log_model_artifact(model_id, str(item))
    return tags
