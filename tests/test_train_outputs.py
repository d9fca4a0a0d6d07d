"""Training outputs survive a worse or an unfinished run, and one training per folder (issue 9 defects 6, 7)."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_processed, tiny_params
from stlink.errors import DataError, ResourceError
from stlink.io import sha256_file
from stlink.locks import folder_lock
from stlink.training.checkpoint import load_checkpoint
from stlink.training.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-epoch run (best.pt, last.pt) on a small dataset."""
    root = tmp_path_factory.mktemp("outputs")
    data_dir = make_processed(root / "data", days=6, seed=2)
    out = root / "model"
    train(tiny_params(epochs=2), out, data_dir=data_dir, cache_dir=root / "bb")
    return {"root": root, "data": data_dir, "out": out}


def _pretend_better(best: Path, val_mae: float) -> None:
    """Make the best.pt already there look better than any run can be (same data, lower val MAE)."""
    ckpt = load_checkpoint(best)
    ckpt["val_mae"] = val_mae
    torch.save(ckpt, best)


def test_a_worse_fresh_run_keeps_best_pt(trained, tmp_path):
    out, data = trained["out"], trained["data"]
    _pretend_better(out / "best.pt", 1e-6)
    before = sha256_file(out / "best.pt")
    summary = train(tiny_params(epochs=1), out, data_dir=data, cache_dir=trained["root"] / "bb")
    assert sha256_file(out / "best.pt") == before  # the better model stays
    assert summary["best_replaced"] is False and summary["previous_best_val_mae"] == pytest.approx(1e-6)
    assert load_checkpoint(out / "run_best.pt")["val_mae"] == pytest.approx(summary["best_val_mae"])
    forced = train(tiny_params(epochs=1), out, data_dir=data, cache_dir=trained["root"] / "bb", replace_best=True)
    assert forced["best_replaced"] is True and sha256_file(out / "best.pt") == sha256_file(out / "run_best.pt")


def test_a_run_that_ends_before_its_first_epoch_keeps_last_pt_and_best_pt(trained):
    out, data = trained["out"], trained["data"]
    kept = {name: sha256_file(out / name) for name in ("last.pt", "best.pt")}
    with pytest.raises(DataError, match="never produced a finite validation MAE"):
        train(tiny_params(epochs=0), out, data_dir=data, cache_dir=trained["root"] / "bb")
    assert {name: sha256_file(out / name) for name in kept} == kept  # the resumable state is still there


HOLD = """
import sys, time
from stlink.locks import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_training_of_the_same_folder_is_refused(tmp_path):
    folder = tmp_path / "models" / "x"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ResourceError, match=rf"{folder}: another training is writing this folder \(pid "
                                                rf"{proc.pid}\)"):
            with folder_lock(folder):
                pass
    finally:
        proc.kill()
        proc.wait(timeout=30)
    deadline = time.time() + 10
    while True:  # the kernel drops the lock with the killed holder: no stale lock
        try:
            with folder_lock(folder):
                break
        except ResourceError:
            assert time.time() < deadline
            time.sleep(0.1)


def test_train_step_takes_the_folder_lock(tmp_path, monkeypatch):
    """``stlink train`` (pipeline.train_step) refuses while another process trains into models/<dataset>."""
    from stlink import pipeline

    monkeypatch.chdir(tmp_path)
    params = tiny_params(dataset="busy")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / params.model_dir)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parent.parent)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(ResourceError, match="another training is writing this folder"):
            pipeline.train_step(params)
    finally:
        proc.kill()
        proc.wait(timeout=30)
