"""onnxruntime: the session for a ``--device``, the provider that really runs, one batch per call.

No PyTorch here: the model is the ``.onnx`` file plus its sidecar (``stlink.export.card``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from stlink.errors import ConfigError, DataError
from stlink.export.card import INPUT_NAMES, OUTPUT_NAME, ModelCard, sidecar_path

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class DeviceError(ConfigError):
    """The requested ``--device`` cannot be what onnxruntime actually runs on."""


@contextlib.contextmanager
def native_stderr() -> Iterator[list[str]]:
    """Capture what native code writes to file descriptor 2 inside the block (lines, after it)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode(errors="replace").splitlines())


def cuda_failure(lines: list[str]) -> str:
    """The reason onnxruntime printed for not starting CUDA (ANSI colours and source locations cut)."""
    text = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in lines]
    errors = [ln.split(" : FAIL : ", 1)[-1] for ln in text if "FAIL" in ln or "CUDA" in ln or "cuda" in ln]
    if not errors:
        return "no usable GPU or CUDA libraries on this machine"
    return errors[0].replace(" with error: ", ": ")[:400]


CUDA_FAILURE_MARKERS = ("libonnxruntime_providers_cuda", "libcublas", "libcudnn", "libcudart", "CUDA_PATH",
                        "TryGetProviderInfo_CUDA", "CUDAExecutionProvider", "cuda_provider")


@contextlib.contextmanager
def quiet_cuda_errors(what: str = "onnxruntime") -> Iterator[None]:
    """Run a block that may start onnxruntime sessions (export parity, MLflow's input-example check) without
    the red CUDA-library errors native code prints on machines without a GPU: they are captured and
    replaced by one warning line saying why CUDA is off; every other line is passed on unchanged."""
    printed: list[str] = []
    try:
        with native_stderr() as printed:
            yield
    finally:  # also when the block raises: what it printed is passed on
        failures = [ln for ln in printed if any(m in ln for m in CUDA_FAILURE_MARKERS)]
        rest = [ln for ln in printed if ln not in failures and re.sub(r"\x1b\[[0-9;]*m|\[m", "", ln).strip()]
        if rest:
            sys.stderr.write("".join(f"{line}\n" for line in rest))
            sys.stderr.flush()
        if failures:
            log.warning("%s: CUDA provider unavailable (%s); ran on CPU", what, cuda_failure(failures))


def _open(onnx_path: str | Path, providers: list[str], options=None):
    """``InferenceSession``; a file onnxruntime cannot load is a one-line ``DataError``."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime's pybind errors (InvalidProtobuf, Fail, ...) share no base class
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"{onnx_path}: onnxruntime cannot load this model ({first[:300]}); re-export it with "
                        f"`stlink export`") from None


def make_session(onnx_path: str | Path, device: str, options=None):
    """An onnxruntime session for ``device`` and the provider that actually runs it.

    ``cpu``: CPU only.  ``auto``: CUDA when the build and the machine allow it, else CPU (one
    warning line saying why; onnxruntime's own red error lines are captured, not printed).
    ``cuda``: ``DeviceError`` unless CUDA is what ``session.get_providers()`` reports active.
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise DeviceError(f"device={device!r}: one of {', '.join(DEVICES)}")
    ort.set_default_logger_severity(3)  # warnings off; errors (a failed CUDA start) are captured below
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise DeviceError(f"device=cuda: this onnxruntime build has no CUDA provider (available: {available}); "
                          "install onnxruntime-gpu or use --device cpu")
    if device == "cpu" or CUDA not in available:
        session = _open(onnx_path, [CPU], options)
        return session, session.get_providers()[0]
    with native_stderr() as printed:  # a failed CUDA start prints its reason there, not in an exception
        session = _open(onnx_path, [CUDA, CPU], options)
    active = session.get_providers()
    if CUDA in active:
        sys.stderr.write("".join(f"{line}\n" for line in printed))  # nothing failed: pass it on
    else:
        reason = cuda_failure(printed)
        if device == "cuda":
            raise DeviceError(f"device=cuda: onnxruntime could not start its CUDA provider ({reason}); it would "
                              f"run on {active}; use --device auto or cpu")
        log.warning("device=auto: CUDA provider unavailable (%s); running on %s", reason, active[0])
    return session, active[0]


def check_graph(session, card: ModelCard, onnx_path: str | Path) -> None:
    """The graph's inputs match the card: names, and the sensor / step / channel axes where fixed."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if list(inputs) != list(INPUT_NAMES):
        raise DataError(f"{onnx_path}: the graph's inputs are {list(inputs)}, the card and the scorer expect "
                        f"{list(INPUT_NAMES)}; re-export the model")
    shape = inputs[INPUT_NAMES[0]]                                              # (B, L, N, C)
    for axis, name, want in ((1, "input steps", card.input_len), (2, "sensors", len(card.sensor_ids)),
                             (3, "channels", len(card.channels))):
        have = shape[axis] if len(shape) > axis else None
        if isinstance(have, int) and have != want:
            raise DataError(f"{onnx_path}: the graph reads {have} {name}, its card {sidecar_path(onnx_path).name} "
                            f"lists {want}; the card does not belong to this model (re-export it)")


class OrtRunner:
    """Runs one batch; with ``io_binding`` (CUDA only) inputs are copied once and the output is bound on the GPU."""

    def __init__(self, session, provider: str, io_binding: bool):
        self.session = session
        self.io_binding = io_binding and provider == CUDA

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        if not self.io_binding:
            return self.session.run([OUTPUT_NAME], feed)[0]
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(OUTPUT_NAME, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
