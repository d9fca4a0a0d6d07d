"""Model registry: versions, the ``challenger`` / ``champion`` aliases, the promotion gate, rollback.

Every exported model is a new version of the registered model ``stlink-<dataset>`` (its source is
the ONNX model of the training run, see ``mlflow_log``) and gets the alias ``challenger``.  It
becomes ``champion`` only through :func:`promote`, when all four gates pass:

  a  its validation masked MAE is lower than the current champion's (read from the champion's
     version tag ``val_mae``; the champion must be of the same dataset) - or there is no champion;
  b  it is lower than the best naive baseline's validation MAE (same windows);
  c  the ONNX export's parity check passed;
  d  the output validation passed: a forecast of held-out TEST-split windows made with this
     version's ONNX file passed ``stlink.scoring``'s output checks (never the latest window: the
     gate judges the model, not today's input data).

Each gate is written as a version tag with its figures (``gate.a_vs_champion = "pass: 3.2100 <
3.4000 (champion v2)"``), plus ``gate.decision``, ``val_mae``, ``baseline_best_val_mae``.  A
failed gate leaves the champion where it was and the version keeps ``challenger``.  Promoted
versions are appended to the registered-model tag ``champion_history`` (``"1,3"``), which
:func:`rollback` walks back.  Aliases only, never the deprecated stages.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stlink.config import Params
from stlink.data.formats import DataError
from stlink.io import atomic_dir, sha256_file
from stlink.tracking.store import (BASELINES_TAG, CHALLENGER, CHAMPION, TrackingConfig,  # noqa: F401
                                   client_for, register_version, registered_model_name, tracking_config,
                                   version_by_alias)

HISTORY_TAG = "champion_history"
OUTPUT_VALIDATION = "output_validation"


class RegistryError(DataError):
    """A registry state that does not allow the request (no champion to roll back to, unknown
    alias, a version of another dataset); the message names the model, version and alias."""


def champion_history(client: MlflowClient, name: str) -> list[str]:
    """Versions that were champion, oldest first (the registered-model tag ``champion_history``)."""
    text = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    return [v for v in text.split(",") if v]


def record_check(client: MlflowClient, name: str, version: str | int, check: str, passed: bool,
                 detail: str = "") -> None:
    """Write ``<check>.passed`` (``true``/``false``) and ``<check>.detail`` on a version."""
    client.set_model_version_tag(name, str(version), f"{check}.passed", "true" if passed else "false")
    client.set_model_version_tag(name, str(version), f"{check}.detail", detail[:4000])


# --- the gate ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gate:
    key: str       # version tag suffix: gate.<key>
    passed: bool
    detail: str    # the figures

    @property
    def tag(self) -> str:
        return f"{'pass' if self.passed else 'fail'}: {self.detail}"


@dataclass(frozen=True)
class GateResult:
    name: str
    version: str
    promoted: bool
    champion_before: str | None
    champion_after: str | None
    gates: tuple[Gate, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        """Human-readable lines for the CLI."""
        head = (f"{self.name} v{self.version}: promoted to {CHAMPION}" if self.promoted and self.gates else
                f"{self.name} v{self.version}: already {CHAMPION}" if self.promoted else
                f"{self.name} v{self.version}: NOT promoted; {CHAMPION} stays "
                f"{'v' + self.champion_after if self.champion_after else 'unset'}")
        return "\n".join([head, *(f"  gate.{g.key}: {g.tag}" for g in self.gates)])


def _num(x: float | None) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.4f}"


def gate_vs_champion(val_mae: float, champion_mae: float | None, champion_version: str | None) -> Gate:
    """(a) strictly lower validation MAE than the champion's, or no champion."""
    if champion_version is None:
        return Gate("a_vs_champion", math.isfinite(val_mae), f"{_num(val_mae)}, no champion yet")
    if champion_mae is None:
        return Gate("a_vs_champion", False, f"champion v{champion_version} has no val_mae tag to compare with")
    ok = val_mae < champion_mae
    return Gate("a_vs_champion", ok, f"{_num(val_mae)} {'<' if ok else '>='} {_num(champion_mae)} "
                                     f"(champion v{champion_version})")


def gate_vs_baseline(val_mae: float, baseline_mae: float, baseline_name: str = "best baseline") -> Gate:
    """(b) strictly lower validation MAE than the best naive baseline."""
    ok = val_mae < baseline_mae
    return Gate("b_vs_baseline", ok, f"{_num(val_mae)} {'<' if ok else '>='} {_num(baseline_mae)} ({baseline_name})")


def promote(client: MlflowClient, name: str, version: str | int, *, val_mae: float,
            baseline_best_val_mae: float, parity_passed: bool, output_validation_passed: bool, dataset: str,
            baseline_name: str = "best baseline", parity_detail: str = "",
            output_validation_detail: str = "") -> GateResult:
    """Run gates a-d for ``version``; move ``champion`` to it only when all pass (see module doc).

    Writes the gate tags on the version either way.  A version that already is the champion is
    left as it is.  ``RegistryError`` when the champion belongs to another dataset.
    """
    version = str(version)
    champion = version_by_alias(client, name, CHAMPION)
    current = None if champion is None else str(champion.version)
    if current == version:
        return GateResult(name, version, True, version, version)
    champion_mae = None
    if champion is not None:
        if champion.tags.get("dataset", dataset) != dataset:
            raise RegistryError(f"{name}: champion v{current} is for dataset "
                                f"{champion.tags['dataset']!r}, v{version} for {dataset!r}; use one registered "
                                f"model per dataset (tracking.registered_model)")
        champion_mae = float(champion.tags["val_mae"]) if "val_mae" in champion.tags else None
    gates = (gate_vs_champion(val_mae, champion_mae, current),
             gate_vs_baseline(val_mae, baseline_best_val_mae, baseline_name),
             Gate("c_onnx_parity", bool(parity_passed), parity_detail or ("passed" if parity_passed else "failed")),
             Gate("d_output_validation", bool(output_validation_passed),
                  output_validation_detail or ("passed" if output_validation_passed else "failed")))
    promoted = all(g.passed for g in gates)
    failed = [g.key.split("_")[0] for g in gates if not g.passed]
    tags = {"dataset": dataset, "val_mae": repr(float(val_mae)),
            "baseline_best_val_mae": repr(float(baseline_best_val_mae)),
            **{f"gate.{g.key}": g.tag for g in gates},
            "gate.decision": f"promoted to {CHAMPION}" if promoted else f"refused: gate {', '.join(failed)} failed",
            "gate.checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if promoted:
        history = champion_history(client, name) or ([current] if current else [])
        client.set_registered_model_alias(name, CHAMPION, version)
        client.set_registered_model_tag(name, HISTORY_TAG, ",".join([*history, version]))
        challenger = version_by_alias(client, name, CHALLENGER)
        if challenger is not None and str(challenger.version) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
    return GateResult(name, version, promoted, current, version if promoted else current, gates)


def rollback(client: MlflowClient, name: str) -> str:
    """Move ``champion`` back to the previous champion; returns its version.

    ``RegistryError`` when there is no previous champion, or when the alias was moved outside
    :func:`promote` (it no longer matches the last entry of ``champion_history``).
    """
    champion = version_by_alias(client, name, CHAMPION)
    if champion is None:
        raise RegistryError(f"{name}: no {CHAMPION} to roll back")
    current, history = str(champion.version), champion_history(client, name)
    if not history or history[-1] != current:
        raise RegistryError(f"{name}: {CHAMPION} is v{current} but {HISTORY_TAG} is "
                            f"{','.join(history) or 'empty'}; set the alias by hand")
    if len(history) < 2:
        raise RegistryError(f"{name}: no previous {CHAMPION} to roll back to ({HISTORY_TAG}: {','.join(history)})")
    previous = history[-2]
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
    client.set_model_version_tag(name, current, "rolled_back",
                                 f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {CHAMPION} back to v{previous}")
    return previous


def promotion_record(client: MlflowClient, name: str, version: str) -> dict[str, Any]:
    """The gate tags of ``version`` and where ``champion`` is now (for flows, reports and schedulers)."""
    tags = client.get_model_version(name, version).tags
    champion = version_by_alias(client, name, CHAMPION)
    current = None if champion is None else str(champion.version)
    return {"model": name, "version": version, "promoted": current == version, "champion": current,
            "decision": tags.get("gate.decision", ""), "checked_at": tags.get("gate.checked_at", ""),
            "gates": {k[len("gate."):]: v for k, v in sorted(tags.items())
                      if k.startswith("gate.") and k not in ("gate.decision", "gate.checked_at")}}


def version_of_file(client: MlflowClient, name: str, onnx_path: Path) -> str:
    """The version of ``name`` whose ``onnx_sha256`` tag is the sha256 of ``onnx_path``."""
    if not onnx_path.is_file():
        raise RegistryError(f"{onnx_path}: no such ONNX file; run `stlink export`")
    digest = sha256_file(onnx_path)
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get("onnx_sha256") == digest:
            return str(mv.version)
    raise RegistryError(f"{onnx_path} (sha256 {digest[:12]}) is not a registered version of {name}; "
                        f"run `stlink export`")


# --- resolving models:/ URIs to local ONNX files --------------------------------------------------------

@dataclass(frozen=True)
class ResolvedModel:
    path: Path              # the local model.onnx (its sidecar model.json beside it when logged)
    uri: str                # what was asked for
    name: str | None = None
    version: str | None = None

    @property
    def label(self) -> str:
        """``stlink-synthetic/3`` for registry models; the file name for a path."""
        return f"{self.name}/{self.version}" if self.name else self.path.name


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, None, alias); ``models:/name/3`` -> (name, "3", None)."""
    body = uri[len("models:/"):]
    if "@" in body:
        name, alias = body.rsplit("@", 1)
        return name, None, alias
    name, _, version = body.rpartition("/")
    if not name or not version.isdigit():
        raise RegistryError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, version, None


def resolve_model(uri: str | Path, *, client: MlflowClient | None = None, cache_dir: str | Path | None = None,
                  cfg: TrackingConfig | None = None) -> ResolvedModel:
    """A local ONNX file for ``uri``: a path is returned as is; ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>`` is downloaded once into ``cache_dir`` (default
    ``mlruns/registry-cache``) under ``<name>/v<version>-<model id>`` and checked against the
    version's ``onnx_sha256`` tag."""
    text = str(uri)
    if not text.startswith("models:/"):
        path = Path(text)
        if not path.is_file():
            raise RegistryError(f"{path}: no such model file")
        return ResolvedModel(path, text)
    client = client or client_for(cfg or TrackingConfig())
    name, version, alias = parse_models_uri(text)
    if alias is not None:
        mv = version_by_alias(client, name, alias)
        if mv is None:
            raise RegistryError(f"{text}: no version of {name} has the alias {alias!r} "
                                f"(run `stlink export`, then `stlink promote`)")
    else:
        try:
            mv = client.get_model_version(name, version)
        except MlflowException as exc:
            raise RegistryError(f"{text}: no such registered model version ({exc.message})") from None
    version = str(mv.version)
    folder = Path(cache_dir or Path("mlruns") / "registry-cache") / name / f"v{version}-{mv.model_id or mv.run_id}"
    if not (folder / "MLmodel").exists():
        with atomic_dir(folder) as tmp:
            got = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=client.get_model_version_download_uri(name, version), dst_path=str(tmp / ".download"),
                tracking_uri=client.tracking_uri))
            for item in got.iterdir():       # the model folder lands below dst_path, under its own name
                shutil.move(str(item), str(tmp / item.name))
            shutil.rmtree(tmp / ".download")
    flavors = yaml.safe_load((folder / "MLmodel").read_text()).get("flavors", {})
    if "onnx" not in flavors:
        raise RegistryError(f"{text}: version {version} is not an ONNX model (flavors: {sorted(flavors)})")
    path = folder / flavors["onnx"]["data"]
    expected = mv.tags.get("onnx_sha256")
    if expected and sha256_file(path) != expected:
        shutil.rmtree(folder, ignore_errors=True)
        raise RegistryError(f"{text}: downloaded {path.name} does not match the version's onnx_sha256 "
                            f"{expected[:12]}; the cached copy was removed, try again")
    return ResolvedModel(path, text, name, version)


def resolve_model_uri(uri: str | Path, **kwargs: Any) -> Path:
    """Local path of the ONNX file behind ``uri`` (see :func:`resolve_model`)."""
    return resolve_model(uri, **kwargs).path


# --- pipeline steps ----------------------------------------------------------------------------------

def _forecast_check(params: Params, max_windows: int = 288) -> Callable[[Path, str], tuple[bool, str]]:
    """Output validation of a candidate: forecast the first ``max_windows`` held-out TEST-split windows of
    the processed data (``stlink.scoring.output_check_on_test_windows``), never the latest window, so
    the verdict is about the model, not about today's input."""
    def check(onnx_path: Path, label: str) -> tuple[bool, str]:
        import tempfile

        from stlink.scoring import output_check_on_test_windows

        with tempfile.TemporaryDirectory(prefix="stlink-gate-") as tmp:
            return output_check_on_test_windows(onnx_path, params.processed_dir, label, data_cfg=params.data,
                                                validation=params.validation, max_windows=max_windows, scratch=tmp)
    return check


def promote_step(params: Params, *, version: str | int | None = None, client: MlflowClient | None = None,
                 output_check: Callable[[Path, str], tuple[bool, str]] | None = None,
                 cache_dir: Path | None = None) -> GateResult:
    """``stlink promote``: gate the ``challenger`` (or ``version``) of ``stlink-<dataset>``.

    Figures: val MAE of the model and the baselines from the version's run (``log_evaluation``'s
    ``val.<method>.mae``), parity from the version tags (``log_onnx``), output validation from
    ``output_check(onnx_path, label) -> (passed, detail)`` (default: a forecast of the first test-split
    windows of ``data/processed/<dataset>`` validated by ``stlink.scoring``), recorded as
    ``output_validation.*`` tags.
    """
    cfg = tracking_config(params)
    client = client or client_for(cfg)
    name = registered_model_name(cfg, params.data.dataset)
    if version is None:
        mv = version_by_alias(client, name, CHALLENGER)
        if mv is None:
            champion = version_by_alias(client, name, CHAMPION)
            if champion is not None:
                v = str(champion.version)
                return GateResult(name, v, True, v, v)
            raise RegistryError(f"{name}: no {CHALLENGER} version to promote; run `stlink export` first")
    else:
        try:
            mv = client.get_model_version(name, str(version))
        except MlflowException as exc:
            raise RegistryError(f"{name} v{version}: no such registered version ({exc.message})") from None
    version = str(mv.version)
    run = client.get_run(mv.run_id)
    metrics, run_tags = run.data.metrics, run.data.tags
    if "val.model.mae" not in metrics:
        raise RegistryError(f"{name} v{version}: run {mv.run_id} has no validation metrics (val.model.mae); "
                            f"run `stlink evaluate` with tracking first")
    baselines = {b: metrics[f"val.{b}.mae"] for b in run_tags.get(BASELINES_TAG, "").split(",")
                 if f"val.{b}.mae" in metrics}
    if not baselines:
        raise RegistryError(f"{name} v{version}: run {mv.run_id} has no baseline validation metrics")
    best = min(baselines, key=baselines.get)
    resolved = resolve_model(f"models:/{name}/{version}", client=client, cache_dir=cache_dir)
    passed, detail = (output_check or _forecast_check(params))(resolved.path, resolved.label)
    record_check(client, name, version, OUTPUT_VALIDATION, passed, detail)
    parity_passed = mv.tags.get("parity.passed") == "true"
    parity_detail = (f"max |ort - torch| {mv.tags.get('parity.max_abs_diff', '?')}, tolerance "
                     f"{mv.tags.get('parity.tolerance', '?')}" if "parity.passed" in mv.tags else "no parity recorded")
    return promote(client, name, version, val_mae=metrics["val.model.mae"], baseline_best_val_mae=baselines[best],
                   parity_passed=parity_passed, output_validation_passed=passed,
                   dataset=mv.tags.get("dataset") or params.data.dataset, baseline_name=best,
                   parity_detail=parity_detail, output_validation_detail=detail)


def rollback_step(params: Params, *, client: MlflowClient | None = None) -> str:
    """``stlink promote --rollback``: ``champion`` back to the previous champion; its version."""
    cfg = tracking_config(params)
    client = client or client_for(cfg)
    return rollback(client, registered_model_name(cfg, params.data.dataset))
