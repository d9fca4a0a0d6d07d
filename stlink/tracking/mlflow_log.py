"""MLflow tracking of the pipeline: one run per trained model, filled by train, evaluate and export.

Where things go
  Tracking URI: ``tracking.tracking_uri`` from params, else ``$MLFLOW_TRACKING_URI``, else the
  SQLite store ``sqlite:///<project>/mlruns/mlflow.db`` with artifacts in ``<project>/mlruns/artifacts``
  (``mlruns/`` is git-ignored).  Browse it with::

      mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db

What one run holds (experiment ``tracking.experiment``, default ``stlink``)
  train     every param (flattened: ``model.lora_rank``), per-epoch ``train_loss``, ``val_mae``,
            ``val_rmse``, ``lr``, ``epoch_seconds``, ``samples_per_s`` (step = epoch), the summary
            (``best_val_mae``, ``trainable_params``, ``peak_memory_mb``, ``wall_time_s``, ...), tags
            for the git commit, data checksums (processed data, source files, ``dvc.lock``),
            package versions and device; the model directory's JSON files as artifacts.
  model     the forecaster with LoRA merged, ``torch.export``-ed (``model.pt2``) inside a pyfunc
            model ``pytorch`` with a signature and an input example (``mlflow.pyfunc.load_model``
            -> ``predict({"x": ..., "x_mask": ..., "tod": ..., "dow": ...})``, batch axis dynamic).
  evaluate  ``<split>.<method>.<mae|rmse|mape>`` averaged over the horizon, per horizon step as
            ``<split>.<method>.<metric>_by_step`` (step = horizon step 1..H), horizon 3/6/12 alone as
            ``<split>.<method>.step_<k>.<metric>``, the abrupt-change slice as
            ``<split>.abrupt.<method>.<metric>`` (+ ``fraction``, ``count``, ``threshold``), for
            the model and each naive baseline; the metrics JSON and the plot PNGs as artifacts.
  export    the ONNX model ``onnx`` (``mlflow.onnx``) with its sidecar ``model.json`` beside
            ``model.onnx``, and the parity figures.

ONNX, PyTorch and registered versions
  The registered model version's source IS the ONNX model logged in the run (``log_onnx``), so
  ``models:/<name>@champion`` is directly the ONNX flavour: ``mlflow.onnx.load_model``,
  ``mlflow.pyfunc.load_model`` (onnxruntime) and ``stlink.tracking.resolve_model_uri`` (a local
  ``model.onnx`` with its sidecar, for the batch scorer) all work on it.  The PyTorch model is a
  logged model of the same run, named by the version tag ``torch_model_uri`` (``models:/m-...``).
  So a trained model becomes a registered version when it is exported (``stlink export``), with
  the ``challenger`` alias; ``stlink promote`` then decides on ``champion`` (``registry.py``).

Runs are found again across processes (``stlink evaluate`` / ``export`` run after ``train``) by
the run tag ``stlink.model_sha256``, the sha256 of ``models/<dataset>/best.pt``: no extra state file.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import mlflow.onnx
import mlflow.pyfunc
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from stlink.config import Params, TrackingConfig, flatten, to_dict
from stlink.io import sha256_file
from stlink.tracking.store import (BASELINES_TAG, DATASET_TAG, MODEL_SHA_TAG, TORCH_MODEL_TAG,  # noqa: F401
                                   CHALLENGER, CHAMPION, TrackingError, artifact_location, client_for, configure,
                                   register_version, registered_model_name, tracking_config, tracking_uri,
                                   version_by_alias)

TRACKED_PACKAGES = ("torch", "transformers", "peft", "mlflow", "onnx", "onnxruntime", "numpy", "stlink")
_DISTRIBUTIONS = {"onnxruntime": ("onnxruntime-gpu", "onnxruntime")}  # the GPU build owns the module name
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's log_batch limits


@contextlib.contextmanager
def start_run(cfg: TrackingConfig, *, run_id: str | None = None, run_name: str | None = None,
              tags: Mapping[str, str] | None = None, project_dir: str | Path | None = None
              ) -> Iterator[mlflow.ActiveRun]:
    """A new run in the configured experiment, or the run ``run_id`` resumed; ends it on exit
    (FAILED when the block raises)."""
    experiment_id = configure(cfg, project_dir)
    kwargs = {"run_id": run_id} if run_id else {"experiment_id": experiment_id, "run_name": run_name}
    with mlflow.start_run(tags=dict(tags or {}), **kwargs) as run:
        yield run


def _run_id(run: Any) -> str:
    """A run id from a string, an ``ActiveRun`` or a ``Run``."""
    return run if isinstance(run, str) else run.info.run_id


@contextlib.contextmanager
def _active(run: Any) -> Iterator[None]:
    """Make ``run`` the active run (the fluent ``log_model`` APIs log to it)."""
    run_id = _run_id(run)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    if active is not None:
        raise TrackingError(f"cannot log to run {run_id} while run {active.info.run_id} is active")
    with mlflow.start_run(run_id=run_id):
        yield


def _client() -> MlflowClient:
    return MlflowClient(mlflow.get_tracking_uri(), mlflow.get_registry_uri())


def _log_batch(run_id: str, metrics: list[Metric] = (), params: list[Param] = (), tags: list[RunTag] = ()) -> None:
    """``log_batch`` in chunks within MLflow's per-call limits."""
    client = _client()
    for key, items in (("metrics", list(metrics)), ("params", list(params)), ("tags", list(tags))):
        size = _BATCH[key]
        for i in range(0, len(items), size):
            client.log_batch(run_id, **{key: items[i:i + size]})


def _metric(key: str, value: Any, step: int = 0, timestamp: int | None = None) -> Metric | None:
    """A finite numeric metric, or None (MAPE is None when no target passes the floor)."""
    if value is None or isinstance(value, str):
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return Metric(key, value, timestamp or int(time.time() * 1000), step)


def _metrics(items: list[tuple[str, Any, int]]) -> list[Metric]:
    now = int(time.time() * 1000)
    return [m for m in (_metric(k, v, s, now) for k, v, s in items) if m is not None]


# --- provenance ------------------------------------------------------------------------------------

def git_state(project_dir: str | Path) -> dict[str, str]:
    """``{"mlflow.source.git.commit": sha, "git.dirty": "true"|"false"}``, or {} outside a git repo."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(project_dir), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"mlflow.source.git.commit": commit, "git.dirty": "true" if dirty else "false"}


def _distribution(pkg: str) -> tuple[str, str] | None:
    """(distribution name, version) that provides ``pkg``, or None."""
    for dist in _DISTRIBUTIONS.get(pkg, (pkg,)):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return dist, importlib.metadata.version(dist)
    return None


def package_versions() -> dict[str, str]:
    """Installed versions of the packages the model depends on ("not installed" when absent)."""
    return {pkg: found[1] if (found := _distribution(pkg)) else "not installed" for pkg in TRACKED_PACKAGES}


def _tag_key(text: str) -> str:
    """MLflow keys allow letters, digits, ``_ - . /`` and spaces."""
    return re.sub(r"[^\w\-. /]", "_", text)


def data_checksums(model_dir: Path, project_dir: Path, summary: Mapping[str, Any]) -> dict[str, str]:
    """Processed-data sha256 (training summary), each source file's sha256 (the processed
    ``meta.json`` copy in ``data_meta.json``) and the sha256 of ``dvc.lock`` when present."""
    out = {}
    if summary.get("data_sha256"):
        out["data.processed_sha256"] = str(summary["data_sha256"])
    meta_path = model_dir / "data_meta.json"
    if meta_path.exists():
        for name, digest in (json.loads(meta_path.read_text()).get("source_files") or {}).items():
            out[_tag_key(f"data.source_sha256.{name}")] = str(digest)
    lock = project_dir / "dvc.lock"
    if lock.exists():
        out["data.dvc_lock_sha256"] = sha256_file(lock)
    return out


def device_tags(summary: Mapping[str, Any]) -> dict[str, str]:
    """Device of the training run (``cpu``, ``cuda:0``), its name, process count and precision."""
    import torch

    device = str(summary.get("device", "unknown"))
    if device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
    return {"device": device, "device.name": name, "device.num_processes": str(summary.get("num_processes", 1)),
            "device.mixed_precision": str(summary.get("mixed_precision", "no"))}


# --- train -----------------------------------------------------------------------------------------

def epoch_metrics(history: list[Mapping[str, Any]]) -> list[tuple[str, Any, int]]:
    """Per-epoch (key, value, step=epoch) from ``train_metrics.json``'s history."""
    names = {"train_loss": "train_loss", "val_mae": "val_mae", "val_rmse": "val_rmse", "lr": "lr",
             "seconds": "epoch_seconds", "samples_per_s": "samples_per_s"}
    return [(key, rec.get(field), int(rec["epoch"])) for rec in history for field, key in names.items()]


def summary_metrics(summary: Mapping[str, Any], wall_time_s: float | None) -> list[tuple[str, Any, int]]:
    """The run summary; ``wall_time_s`` defaults to the sum of the epochs' seconds."""
    history = summary.get("history") or []
    wall = wall_time_s if wall_time_s is not None else sum(float(h.get("seconds") or 0.0) for h in history)
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    items = {
        "best_val_mae": summary.get("best_val_mae"), "best_epoch": summary.get("best_epoch"),
        "epochs_run": summary.get("epochs_run"), "stopped_early": int(bool(summary.get("stopped_early"))),
        "seconds_per_epoch": summary.get("seconds_per_epoch"), "trainable_params": trainable,
        "total_params": total, "trainable_fraction": trainable / total if trainable and total else None,
        "peak_memory_mb": summary.get("peak_memory_mb"), "wall_time_s": wall,
    }
    return [(k, v, 0) for k, v in items.items()]


def log_training(run: Any, params: Params, train_summary: Mapping[str, Any], model_dir: str | Path, *,
                 wall_time_s: float | None = None, project_dir: str | Path | None = None) -> None:
    """Params, provenance tags, per-epoch and summary metrics and the model folder's JSON files.

    ``train_summary`` is ``train()``'s return value (= ``model_dir/train_metrics.json``).
    """
    run_id, model_dir = _run_id(run), Path(model_dir)
    project_dir = Path(project_dir or Path.cwd())
    best = model_dir / "best.pt"
    if not best.exists():
        raise TrackingError(f"{best}: no trained model to log; run `stlink train` first")
    flat = flatten(to_dict(params))
    tags = {MODEL_SHA_TAG: sha256_file(best), DATASET_TAG: params.data.dataset,
            **git_state(project_dir), **data_checksums(model_dir, project_dir, train_summary),
            **{f"version.{k}": v for k, v in package_versions().items()}, **device_tags(train_summary)}
    _log_batch(run_id,
               metrics=_metrics(epoch_metrics(train_summary.get("history") or [])
                                + summary_metrics(train_summary, wall_time_s)),
               params=[Param(k, str(v)) for k, v in flat.items()],
               tags=[RunTag(k, str(v)) for k, v in tags.items()])
    client = _client()
    for name in ("config.json", "train_metrics.json", "data_meta.json"):
        if (model_dir / name).exists():
            client.log_artifact(run_id, str(model_dir / name), "training")
    if (project_dir / "dvc.lock").exists():
        client.log_artifact(run_id, str(project_dir / "dvc.lock"), "data")


# --- evaluate --------------------------------------------------------------------------------------

def _methods(split_metrics: Mapping[str, Any]) -> list[str]:
    """The forecasters of one split's metrics: the entries with a per-step table."""
    return [k for k, v in split_metrics.items() if isinstance(v, Mapping) and "per_step" in v]


def evaluation_metrics(metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, Any, int]]:
    """(key, value, step) for ``evaluate()``'s ``{"val": ..., "test": ...}`` (see module doc)."""
    items: list[tuple[str, Any, int]] = []
    for split, res in metrics.items():
        for method in _methods(res):
            m = res[method]
            for name in ("mae", "rmse", "mape", "count"):
                items.append((f"{split}.{method}.{name}", m.get(name), 0))
            for row in m["per_step"]:
                items += [(f"{split}.{method}.{name}_by_step", row.get(name), int(row["step"]))
                          for name in ("mae", "rmse", "mape")]
            for key, sub in m.items():
                if key.startswith("step_") and isinstance(sub, Mapping):
                    items += [(f"{split}.{method}.{key}.{name}", sub.get(name), 0) for name in ("mae", "rmse", "mape")]
        items.append((f"{split}.mape_floor", res[_methods(res)[0]].get("mape_floor"), 0))
        items.append((f"{split}.n_windows", res.get("n_windows"), 0))
        abrupt = res.get("abrupt") or {}
        for key in ("fraction", "count", "threshold"):
            items.append((f"{split}.abrupt.{key}", abrupt.get(key), 0))
        for method, m in abrupt.items():
            if isinstance(m, Mapping):
                items += [(f"{split}.abrupt.{method}.{name}", m.get(name), 0) for name in ("mae", "rmse", "mape")]
    return items


def log_evaluation(run: Any, metrics: Mapping[str, Mapping[str, Any]], plots_dir: str | Path | None) -> None:
    """Average, per-step, horizon 3/6/12 and abrupt-slice metrics of the model and each baseline,
    the metrics JSON per split, and every PNG under ``plots_dir`` (artifact folder ``plots``)."""
    run_id = _run_id(run)
    if not metrics:
        raise TrackingError("no evaluation metrics to log")
    first = next(iter(metrics.values()))
    from stlink.training.baselines import BASELINES

    # the naive baselines gate promotion; the learned reference (e.g. stid) is logged beside them
    # (val.stid.mae, ...) and tagged, but does not gate (docs/method.md)
    baselines = [m for m in _methods(first) if m in BASELINES]
    references = [m for m in _methods(first) if m != "model" and m not in BASELINES]
    _log_batch(run_id, metrics=_metrics(evaluation_metrics(metrics)),
               tags=[RunTag(BASELINES_TAG, ",".join(baselines)), RunTag("stlink.references", ",".join(references))])
    client = _client()
    for split, res in metrics.items():
        client.log_dict(run_id, dict(res), f"metrics/{split}.json")
    for png in sorted(Path(plots_dir).glob("*.png")) if plots_dir else []:
        client.log_artifact(run_id, str(png), "plots")


# --- models ----------------------------------------------------------------------------------------

def _spec(name: str, array: np.ndarray) -> TensorSpec:
    """Tensor spec with a dynamic batch axis."""
    return TensorSpec(array.dtype, (-1, *array.shape[1:]), name)


def _requirements(*packages: str) -> list[str]:
    """Pinned pip requirements of a logged model (local version labels such as ``+cpu`` dropped)."""
    return [f"{dist}=={version.split('+')[0]}" for dist, version in filter(None, map(_distribution, packages))]


def _merged(model):
    """An eval-mode copy of ``model`` with LoRA folded in (a plain module is only copied)."""
    from stlink.model.lora import merge_lora

    merged = copy.deepcopy(model).eval()
    if hasattr(getattr(merged, "backbone", None), "merge_and_unload"):
        merged = merge_lora(merged)
    return merged


def log_model(run: Any, model, input_example: Mapping[str, np.ndarray], *, name: str = "pytorch"
              ) -> mlflow.models.model.ModelInfo:
    """Log ``model`` (LoRA merged on a copy) as a pyfunc model around its ``torch.export`` program
    (code: ``pyfunc_forecaster.py``, copied into the model; loading needs torch and mlflow only).

    ``input_example`` maps the forward arguments, in order, to arrays with a batch of at least 2
    (a batch of 1 would freeze the batch axis of the exported program).  Signature: the example's
    inputs and the output ``y_hat`` with a dynamic batch axis.  The run gets the tag
    ``stlink.torch_model_uri``; returns the ``ModelInfo``.
    """
    import torch

    names = list(input_example)
    arrays = [np.asarray(input_example[n]) for n in names]
    if min(a.shape[0] for a in arrays) < 2:
        raise TrackingError(f"input_example needs a batch of at least 2, got shapes {[a.shape for a in arrays]}")
    merged = _merged(model)
    args = tuple(torch.from_numpy(a) for a in arrays)
    with torch.no_grad():
        output = merged(*args).numpy()
    signature = ModelSignature(inputs=Schema([_spec(n, a) for n, a in zip(names, arrays)]),
                               outputs=Schema([_spec("y_hat", output)]))
    with tempfile.TemporaryDirectory(prefix="stlink-pt2-") as tmp:
        program = torch.export.export(merged, args, dynamic_shapes=[{0: torch.export.Dim.AUTO}] * len(args))
        torch.export.save(program, Path(tmp) / "model.pt2")
        (Path(tmp) / "input_names.json").write_text(json.dumps(names))
        with _active(run):
            info = mlflow.pyfunc.log_model(
                name=name, python_model=str(Path(__file__).with_name("pyfunc_forecaster.py")),
                artifacts={"program": str(Path(tmp) / "model.pt2"), "input_names": str(Path(tmp) / "input_names.json")},
                signature=signature, input_example=dict(zip(names, arrays)),
                pip_requirements=_requirements("torch", "mlflow", "numpy"))
    _client().set_tag(_run_id(run), TORCH_MODEL_TAG, info.model_uri)
    return info


def onnx_signature(model) -> ModelSignature:
    """Inputs and outputs of an ``onnx.ModelProto`` as tensor specs (symbolic dims -> -1)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    def specs(values) -> Schema:
        return Schema([TensorSpec(tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type),
                                  tuple(d.dim_value if d.HasField("dim_value") else -1
                                        for d in v.type.tensor_type.shape.dim), v.name) for v in values])

    return ModelSignature(inputs=specs(model.graph.input), outputs=specs(model.graph.output))


def log_onnx(run: Any, onnx_path: str | Path, *, registered_model: str, parity: Mapping[str, Any],
             input_example: Mapping[str, np.ndarray] | None = None, sidecar: str | Path | None = None,
             dataset: str | None = None):
    """Log the ONNX model in ``run`` and register it as a new version of ``registered_model``.

    The logged ``model.onnx`` is byte-identical to ``onnx_path`` (checked); ``sidecar`` (default
    ``<onnx_path stem>.json`` when it exists) is stored beside it as ``model.json``.  The version
    gets the tags ``dataset``, ``onnx_sha256``, ``model_sha256``, ``torch_model_uri``,
    ``parity.passed`` / ``parity.max_abs_diff`` / ``parity.tolerance`` and the alias
    ``challenger``.  ``parity`` is the export's record (``passed``, ``max_abs_diff``,
    ``tolerance``).  Returns the ``ModelVersion``.
    """
    import onnx
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # MLflow's example check tries CUDA; its own warning says what ran

    onnx_path, run_id = Path(onnx_path), _run_id(run)
    if not onnx_path.is_file():
        raise TrackingError(f"{onnx_path}: no such ONNX model; run `stlink export` first")
    proto = onnx.load(str(onnx_path))
    digest = sha256_file(onnx_path)
    if hashlib.sha256(proto.SerializeToString()).hexdigest() != digest:
        raise TrackingError(f"{onnx_path}: re-serialising the model changes its bytes (external data?); "
                            f"the logged copy would not match the file and its sidecar")
    sidecar = Path(sidecar) if sidecar else onnx_path.with_suffix(".json")
    with _active(run):
        info = mlflow.onnx.log_model(proto, name="onnx", signature=onnx_signature(proto),
                                     input_example=dict(input_example) if input_example is not None else None,
                                     pip_requirements=_requirements("onnx", "onnxruntime", "mlflow", "numpy"),
                                     save_as_external_data=False)
    client = _client()
    if sidecar.is_file():
        with tempfile.TemporaryDirectory(prefix="stlink-card-") as tmp:
            card = Path(tmp) / "model.json"
            card.write_bytes(sidecar.read_bytes())
            client.log_model_artifact(info.model_id, str(card))
    run_tags = client.get_run(run_id).data.tags
    passed = bool(parity.get("passed"))
    _log_batch(run_id, metrics=_metrics([("onnx.parity_max_abs_diff", parity.get("max_abs_diff"), 0),
                                         ("onnx.parity_passed", int(passed), 0)]),
               tags=[RunTag("stlink.onnx_sha256", digest)])
    tags = {"dataset": dataset or run_tags.get(DATASET_TAG, ""), "onnx_sha256": digest,
            "model_sha256": run_tags.get(MODEL_SHA_TAG, ""), "torch_model_uri": run_tags.get(TORCH_MODEL_TAG, ""),
            "parity.passed": "true" if passed else "false", "parity.max_abs_diff": str(parity.get("max_abs_diff")),
            "parity.tolerance": _tolerance_text(parity.get("tolerance"))}
    return register_version(client, registered_model, info.model_uri, run_id, tags)


def _tolerance_text(tol: Any) -> str:
    """``{"atol": 1e-4, "rtol": 1e-4}`` -> ``atol=0.0001 rtol=0.0001``; a number as is."""
    if isinstance(tol, Mapping):
        return " ".join(f"{k}={v}" for k, v in tol.items())
    return str(tol)


# --- finding the run of a model directory ------------------------------------------------------------

def find_run(client: MlflowClient, experiment_id: str, model_dir: str | Path) -> str:
    """Id of the latest run that logged ``model_dir/best.pt`` (by its sha256)."""
    best = Path(model_dir) / "best.pt"
    if not best.exists():
        raise TrackingError(f"{best}: no trained model; run `stlink train` first")
    digest = sha256_file(best)
    runs = client.search_runs([experiment_id], f"tags.`{MODEL_SHA_TAG}` = '{digest}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise TrackingError(f"{best} (sha256 {digest[:12]}) was never logged to MLflow experiment "
                            f"{experiment_id} at {client.tracking_uri}; run `stlink train` with tracking")
    return runs[0].info.run_id


# --- pipeline steps (CLI / DVC / Prefect) ------------------------------------------------------------

def example_inputs(params: Params, data_dir: Path, input_len: int, output_len: int, n: int = 2
                   ) -> dict[str, np.ndarray]:
    """The first ``n`` validation windows as ``{x, x_mask, tod, dow}`` (the forward contract)."""
    from stlink.data.formats import load_processed
    from stlink.data.windows import WindowDataset

    ds = WindowDataset(load_processed(data_dir), "val", input_len, output_len)
    if len(ds) < n:
        raise TrackingError(f"{data_dir}: the val split has {len(ds)} windows; the input example needs {n}")
    items = [ds[i] for i in range(n)]
    return {k: np.stack([np.asarray(it[k]) for it in items]) for k in ("x", "x_mask", "tod", "dow")}


def track_train_step(params: Params, summary: Mapping[str, Any], *, model_dir: Path | None = None,
                     data_dir: Path | None = None, wall_time_s: float | None = None,
                     project_dir: Path | None = None, cache_dir: Path | None = None) -> str:
    """After ``train()``: a new run with ``log_training`` and the merged model (``log_model``); run id."""
    from stlink.training.checkpoint import DEFAULT_CACHE_DIR, load_trained

    model_dir, data_dir = Path(model_dir or params.model_dir), Path(data_dir or params.processed_dir)
    model, trained, _ = load_trained(model_dir, cache_dir or DEFAULT_CACHE_DIR)
    example = example_inputs(params, data_dir, trained.prepare.input_len, trained.prepare.output_len)
    with start_run(tracking_config(params), run_name=params.data.dataset, project_dir=project_dir) as run:
        log_training(run, params, summary, model_dir, wall_time_s=wall_time_s, project_dir=project_dir)
        log_model(run, model, example)
        return run.info.run_id


def track_evaluate_step(params: Params, metrics: Mapping[str, Any], *, model_dir: Path | None = None,
                        report_dir: Path | None = None, project_dir: Path | None = None) -> str:
    """After ``evaluate()``: log its metrics and plots on the run of ``model_dir``; run id."""
    cfg = tracking_config(params)
    experiment_id = configure(cfg, project_dir)
    run_id = find_run(_client(), experiment_id, model_dir or params.model_dir)
    log_evaluation(run_id, metrics, Path(report_dir or params.report_dir) / "plots")
    return run_id


def register_export_step(params: Params, onnx_path: str | Path, *, model_dir: Path | None = None,
                         data_dir: Path | None = None, project_dir: Path | None = None):
    """After ``export``: log ``onnx_path`` (parity and input names read from its sidecar, input
    example = the first validation windows of ``data_dir``) on the run of ``model_dir`` and
    register it as the new ``challenger``; returns the ``ModelVersion`` (its ``aliases`` say which it holds).

    Call it also when the export's parity failed (the files are written): the gate then
    refuses that version with the figures.  Registering the same file of the same run again
    returns the existing version (a re-run stage creates no duplicate) and gives it the
    ``challenger`` alias again, unless it is the champion.
    """
    onnx_path = Path(onnx_path)
    sidecar = onnx_path.with_suffix(".json")
    for path in (onnx_path, sidecar):
        if not path.is_file():
            raise TrackingError(f"{path}: missing; export the model with `stlink export` first")
    cfg = tracking_config(params)
    experiment_id = configure(cfg, project_dir)
    client = _client()
    run_id = find_run(client, experiment_id, model_dir or params.model_dir)
    name = registered_model_name(cfg, params.data.dataset)
    digest = sha256_file(onnx_path)
    for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        if mv.tags.get("onnx_sha256") == digest:   # the same file of the same run: already a version
            champion = version_by_alias(client, name, CHAMPION)
            if champion is None or str(champion.version) != str(mv.version):
                client.set_registered_model_alias(name, CHALLENGER, mv.version)  # a re-export is the challenger again
            return client.get_model_version(name, mv.version)
    card = json.loads(sidecar.read_text())
    names = [i["name"] for i in card.get("inputs", [])]
    example = example_inputs(params, Path(data_dir or params.processed_dir), int(card["input_len"]),
                             int(card["output_len"]))
    return log_onnx(run_id, onnx_path, registered_model=name,
                    parity=card.get("parity") or {}, input_example=dict(zip(names, example.values())),
                    sidecar=sidecar, dataset=params.data.dataset)
