"""Where the MLflow store is, the tags that link runs and versions, and the registry primitives
(register a version, find a version by alias).  Both ``mlflow_log`` (logging, registering an
export) and ``registry`` (the gate, rollback, resolving ``models:/`` URIs) build on this module;
neither imports the other.
"""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stlink.config import Params, TrackingConfig
from stlink.errors import DataError

MODEL_SHA_TAG = "stlink.model_sha256"   # sha256 of best.pt: finds the run of a model directory
DATASET_TAG = "stlink.dataset"
BASELINES_TAG = "stlink.baselines"      # comma-separated baseline names logged by log_evaluation
TORCH_MODEL_TAG = "stlink.torch_model_uri"
CHAMPION = "champion"
CHALLENGER = "challenger"


class TrackingError(DataError):
    """A tracking store, run or logged file that cannot be used; the message says which."""


def tracking_config(params: Params) -> TrackingConfig:
    """The ``tracking`` section of params."""
    return params.tracking


# --- where the store is ----------------------------------------------------------------------------

def tracking_uri(cfg: TrackingConfig, project_dir: str | Path | None = None) -> str:
    """Params, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<abs project>/mlruns/mlflow.db``."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(project_dir or Path.cwd()).resolve() / "mlruns" / "mlflow.db"
    return f"sqlite:///{db}"


def artifact_location(cfg: TrackingConfig, uri: str) -> str | None:
    """Artifact root of a new experiment: params, else ``<db folder>/artifacts`` for a SQLite store,
    else None (a tracking server picks its own)."""
    if cfg.artifact_location:
        return cfg.artifact_location
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").resolve().as_uri()
    return None


def configure(cfg: TrackingConfig, project_dir: str | Path | None = None) -> str:
    """Point MLflow (tracking and registry) at the store and make sure the experiment exists;
    returns the experiment id.  Creates the SQLite file's folder when needed."""
    uri = tracking_uri(cfg, project_dir)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(uri, uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(cfg.experiment, artifact_location=artifact_location(cfg, uri))


def client_for(cfg: TrackingConfig, project_dir: str | Path | None = None) -> MlflowClient:
    """A client on the configured store (configuring it first)."""
    configure(cfg, project_dir)
    uri = tracking_uri(cfg, project_dir)
    return MlflowClient(uri, uri)


def registered_model_name(cfg: TrackingConfig, dataset: str) -> str:
    """``tracking.registered_model``, default ``stlink-<dataset>``."""
    return cfg.registered_model or f"stlink-{dataset}"


# --- versions and aliases ----------------------------------------------------------------------------

def register_version(client: MlflowClient, name: str, model_uri: str, run_id: str,
                     tags: dict[str, str]) -> ModelVersion:
    """New version of ``name`` (created when missing) from ``model_uri``, tagged, alias ``challenger``."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="ST-LINK forecaster (ONNX); aliases champion/challenger")
    model_id = model_uri.split("/", 1)[1] if model_uri.startswith("models:/m-") else None
    mv = client.create_model_version(name, model_uri, run_id=run_id, tags=tags, model_id=model_id)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return client.get_model_version(name, mv.version)


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding ``alias``, or None when no version (or no such model) has it."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise
