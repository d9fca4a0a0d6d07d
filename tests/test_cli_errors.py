"""The CLI turns every error of the package into one line and a documented exit code (issue 9 defects 8, 10)."""
import errno

import pytest

from stlink import cli, pipeline
from stlink.errors import ConfigError, DataError, ResourceError, StlinkError


def run_cli(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln and " WARNING " not in ln]


BAD_PARAMS = {
    "model.patch_len=5": r"model.patch_len=5 must divide prepare.input_len=12",
    "train.batch_size=0": r"train.batch_size=0: must be at least 1",
    "train.lr=-1": r"train.lr=-1.0: must be >= 0",
    "prepare.input_len=0": r"prepare.input_len=0: must be at least 1",
    "model.spatial_rope=diagonal": r"model.spatial_rope='diagonal': one of split, compose, off",
    "score.format=xlsx": r"score.format='xlsx': one of parquet, csv",
    "model.graph_features=gcn": r"model.graph_features='gcn': one of diffusion, off",
    "model.graph_hops=0": r"model.graph_hops=0: must be at least 1",
    "train.input_mask_rate=1.0": r"train.input_mask_rate=1.0: must be in \[0, 1\)",
}


@pytest.mark.parametrize("override", list(BAD_PARAMS))
def test_bad_params_are_one_line_errors_when_read(override, tmp_path, monkeypatch, capsys):
    import re

    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(["-S", override, "prepare"], capsys)
    assert code == cli.EXIT_ERROR
    assert len(lines) == 1 and lines[0].startswith("stlink prepare: error: "), lines
    assert re.search(BAD_PARAMS[override], lines[0]), lines[0]


def test_forecast_errors_before_any_scoring_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    code, lines = run_cli(["forecast", "--output", "out"], capsys)  # a folder, no model anywhere: output first
    assert code == cli.EXIT_ERROR and len(lines) == 1
    assert lines[0].startswith("stlink forecast: error: --output out: is a folder; name the file")
    code, lines = run_cli(["forecast", "--model", "nowhere.onnx", "--output", "f.parquet"], capsys)
    assert code == cli.EXIT_ERROR and lines == ["stlink forecast: error: nowhere.onnx: no such model file"]


def test_start_yesterday_ish_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(["forecast", "--start", "yesterday-ish", "--model", "m.onnx"], capsys)
    assert code == cli.EXIT_ERROR and len(lines) == 1
    assert lines[0].startswith("stlink forecast: error: start='yesterday-ish': not a timestamp")


def test_disk_full_and_other_os_errors_are_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC (any step that writes) ends as one line naming the file, not a traceback."""
    monkeypatch.chdir(tmp_path)

    def full(params):
        with open("/dev/full", "wb") as fh:  # a real ENOSPC from the kernel
            fh.write(b"x" * 65536)
            fh.flush()

    monkeypatch.setattr(pipeline, "ingest_step", full)
    code, lines = run_cli(["ingest"], capsys)
    assert code == cli.EXIT_ERROR and len(lines) == 1
    assert lines[0] == ("stlink ingest: error: No space left on device (free some space and run it again; earlier "
                        "outputs were kept)")


def test_error_classes_share_one_root():
    from stlink.data.download import ChecksumError, DownloadError
    from stlink.export.card import ExportError
    from stlink.model.backbone import BackboneError
    from stlink.scoring import DeviceError, OutputValidationError
    from stlink.tracking import RegistryError, TrackingError
    from stlink.training.checkpoint import CheckpointError
    from stlink.validation import ValidationFailed

    for cls in (ConfigError, DataError, ResourceError, ChecksumError, DownloadError, ExportError, BackboneError,
                DeviceError, OutputValidationError, RegistryError, TrackingError, CheckpointError, ValidationFailed):
        assert issubclass(cls, StlinkError), cls
    assert str(ResourceError(errno.EBUSY, "busy folder")) == "busy folder"


def test_a_refused_promotion_exits_3(tmp_path, monkeypatch, capsys):
    """Defect 10: a scheduler can tell a refusal (3) from a promotion (0) and from an error (2)."""
    from stlink.tracking.registry import Gate, GateResult

    monkeypatch.chdir(tmp_path)
    refused = GateResult("stlink-x", "2", False, "1", "1", (Gate("b_vs_baseline", False, "5.0 >= 4.0"),))
    promoted = GateResult("stlink-x", "2", True, "1", "2", (Gate("b_vs_baseline", True, "3.0 < 4.0"),))
    monkeypatch.setattr(pipeline, "promote_step", lambda params, version=None: refused)
    code, lines = run_cli(["promote"], capsys)
    assert code == cli.EXIT_REFUSED == 3
    assert lines == ["stlink promote: refused: the gate refused stlink-x v2; the champion stays v1"]
    monkeypatch.setattr(pipeline, "promote_step", lambda params, version=None: promoted)
    assert cli.main(["promote"]) == 0


QUIET_EXPORT = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
import onnx, onnxruntime as ort
from onnx import TensorProto, helper
from stlink.scoring.session import quiet_cuda_errors
g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 9
onnx.save(m, sys.argv[1])
with quiet_cuda_errors("export"):
    s = ort.InferenceSession(sys.argv[1], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("providers", *s.get_providers())
"""


def test_onnxruntime_cuda_library_errors_become_one_warning_line(tmp_path):
    """Defect 10: on a machine without a usable GPU the red onnxruntime CUDA-library error is not printed."""
    import subprocess
    import sys
    from pathlib import Path

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider: nothing to silence")
    proc = subprocess.run([sys.executable, "-c", QUIET_EXPORT, str(tmp_path / "id.onnx")], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    if "CUDAExecutionProvider" in proc.stdout:
        pytest.skip("CUDA works on this machine: onnxruntime printed no error")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert "[E:onnxruntime" not in proc.stderr and "\x1b[" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("WARNING export: CUDA provider unavailable ("), lines
