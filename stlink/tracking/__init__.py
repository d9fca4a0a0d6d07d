"""MLflow tracking (``mlflow_log``) and the model registry with its promotion gate (``registry``)."""
from stlink.tracking.mlflow_log import (TrackingConfig, TrackingError, configure, find_run, log_evaluation,
                                        log_model, log_onnx, log_training, register_export_step, start_run,
                                        track_evaluate_step, track_train_step, tracking_config, tracking_uri)
from stlink.tracking.registry import (CHALLENGER, CHAMPION, Gate, GateResult, RegistryError, ResolvedModel,
                                      champion_history, promote, promote_step, record_check, register_version,
                                      registered_model_name, resolve_model, resolve_model_uri, rollback,
                                      rollback_step)

__all__ = ["CHALLENGER", "CHAMPION", "Gate", "GateResult", "RegistryError", "ResolvedModel", "TrackingConfig",
           "TrackingError", "champion_history", "configure", "find_run", "log_evaluation", "log_model", "log_onnx",
           "log_training", "promote", "promote_step", "record_check", "register_export_step", "register_version",
           "registered_model_name", "resolve_model", "resolve_model_uri", "rollback", "rollback_step", "start_run",
           "track_evaluate_step", "track_train_step", "tracking_config", "tracking_uri"]
