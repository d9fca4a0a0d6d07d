"""What the flows share: the retry policy of I/O tasks, running a DVC stage, validation artifacts,
and the one-training-at-a-time slot.

Nothing here implements a pipeline step: the steps are the ``stlink`` functions (or the DVC stages
that call them through the ``stlink`` CLI).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import yaml
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.tasks import exponential_backoff

from stlink.config import ConfigError
from stlink.data.download import DownloadError
from stlink.errors import DataError, StlinkError

T = TypeVar("T")

TRAINING_LIMIT = "stlink-training"  # global concurrency limit: one training pipeline at a time
IO_RETRIES = 3
IO_BACKOFF_S = 10.0                 # first retry after 10 s, then 20 s, 40 s
STAGE_LOG_TAIL = 10                 # last non-INFO lines of a failed `dvc repro` quoted in the error


class StageFailed(StlinkError, RuntimeError):
    """``dvc repro <stage>`` exited non-zero; the message quotes the end of its output."""


# --- retries: I/O only ----------------------------------------------------------------------------

def is_transient(exc: BaseException) -> bool:
    """Worth retrying: network and file-system errors, a failed download or DVC stage, a tracking
    store that did not answer.  Bad data and bad config (``DataError``, ``ConfigError``) fail at once."""
    if isinstance(exc, DownloadError):
        return True
    return not isinstance(exc, (DataError, ConfigError))


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failure ``is_transient``."""
    return is_transient(state.result(raise_on_failure=False))


def io_retries(retries: int = IO_RETRIES, backoff_s: float = IO_BACKOFF_S) -> dict[str, Any]:
    """``@task`` options of an I/O task (download, tracking store, registry): exponential back-off."""
    return {"retries": retries, "retry_delay_seconds": exponential_backoff(backoff_factor=backoff_s),
            "retry_jitter_factor": 0.2, "retry_condition_fn": retry_if_transient}


# --- DVC -----------------------------------------------------------------------------------------

def dvc_stages(dvc_yaml: Path = Path("dvc.yaml")) -> set[str]:
    """Stage names of the DVC pipeline in the working directory (empty without ``dvc.yaml``)."""
    if not dvc_yaml.is_file():
        return set()
    return set((yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {}))


def check_dvc_project(params_path: str | Path, overrides: list[str] | None, resume: bool) -> None:
    """``use_dvc=True`` runs the stages of ``./dvc.yaml``, which read ``./params.yaml`` and train with
    ``--resume``: anything else would make ``dvc.lock`` record something that did not run."""
    problems = []
    if not Path(".dvc").is_dir() or not Path("dvc.yaml").is_file():
        problems.append(f"{Path.cwd()} is not a DVC project (no .dvc/ or dvc.yaml)")
    if Path(params_path).resolve() != Path("params.yaml").resolve():
        problems.append(f"params_path={params_path}: DVC stages read ./params.yaml")
    if overrides:
        problems.append(f"overrides {overrides}: use `dvc exp run -S ...` for DVC-recorded variations")
    if not resume:
        problems.append("resume=False: the DVC train stage always resumes (`stlink train --resume`)")
    if problems:
        raise ConfigError("use_dvc=True: " + "; ".join(problems) + ". Run with use_dvc=False to call the "
                          "stlink steps directly.")


def run_dvc_stage(stage: str) -> None:
    """``dvc repro <stage>`` in the working directory (upstream stages are brought up to date, unchanged
    ones skipped); its output goes to the run log.  ``stlink`` is found beside this interpreter."""
    logger = get_run_logger()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("DVC_NO_ANALYTICS", "1")
    logger.info("dvc repro %s", stage)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", stage], env=env, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).splitlines()
    for line in lines:
        logger.info("[dvc] %s", line)
    if proc.returncode != 0:
        tail = "\n".join([line for line in lines if " INFO " not in line[:40]][-STAGE_LOG_TAIL:])
        raise StageFailed(f"`dvc repro {stage}` failed (exit {proc.returncode}):\n{tail}")


def run_step(stage: str, use_dvc: bool, direct: Callable[[], T]) -> T | None:
    """Run ``stage`` through DVC when asked and ``dvc.yaml`` has it (returns None), else ``direct()``."""
    if use_dvc:
        if stage in dvc_stages():
            run_dvc_stage(stage)
            return None
        get_run_logger().warning("dvc.yaml has no stage %r: calling the stlink step directly "
                                 "(its outputs are not recorded in dvc.lock)", stage)
    return direct()


def read_json(path: Path) -> Any:
    """A JSON file a step wrote (after a DVC stage, the flow reads its results from disk)."""
    if not path.is_file():
        raise DataError(f"{path}: expected this output of the stage, but it is not there")
    return json.loads(path.read_text())


# --- artifacts -----------------------------------------------------------------------------------

def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from ``parts``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def publish_validation_failure(report: dict[str, Any], dataset: str) -> None:
    """The failed expectations of a validation ``report`` as a markdown artifact of the run."""
    from stlink.validation import failures_markdown

    create_markdown_artifact(markdown=failures_markdown(report),
                             key=artifact_key("validation", dataset, report["name"]),
                             description=f"failed expectations: {report['name']} data of {dataset}")


@contextlib.contextmanager
def validation_artifacts(report_dir: Path, name: str, dataset: str) -> Iterator[None]:
    """Publish the failed expectations when the block fails its validation, then re-raise.

    Direct calls raise ``ValidationFailed`` with the report; a DVC stage leaves it in
    ``<report_dir>/<name>.failed.json`` (taken only when written by this block).
    """
    from stlink.validation import ValidationFailed

    started = time.time()
    try:
        yield
    except ValidationFailed as exc:
        publish_validation_failure(exc.report, dataset)
        raise
    except StageFailed:
        failed = Path(report_dir) / f"{name}.failed.json"
        if failed.is_file() and failed.stat().st_mtime >= started - 1:
            publish_validation_failure(json.loads(failed.read_text()), dataset)
        raise


# --- one training at a time ------------------------------------------------------------------------

def ensure_limit(name: str = TRAINING_LIMIT, limit: int = 1) -> int:
    """Create the global concurrency limit ``name`` when the Prefect server lacks it; its limit.

    An existing limit is left as the operator set it (``prefect gcl update``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # another run created it meanwhile
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))
        return client.read_global_concurrency_limit_by_name(name).limit


@contextlib.contextmanager
def training_slot(timeout_seconds: float | None = None) -> Iterator[None]:
    """Hold the one slot of ``stlink-training`` for the block: a second training waits (or raises
    ``TimeoutError`` after ``timeout_seconds``).  A crashed holder's lease expires after 5 minutes."""
    ensure_limit()
    with concurrency(TRAINING_LIMIT, occupy=1, timeout_seconds=timeout_seconds, strict=True):
        yield
