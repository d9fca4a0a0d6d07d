"""The real DVC pipeline in a temporary git repository: repro, up to date, selective re-runs."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(cmd, cwd, env, check=True):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return res


def dvc_project(d: Path, edit) -> tuple[Path, dict]:
    """The project's dvc.yaml, params.yaml (changed by ``edit(params)``), code and suites copied into
    ``d``, which becomes a git + DVC repo; returns (d, the env to run dvc with)."""
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, d / name)
    shutil.copytree(ROOT / "stlink", d / "stlink", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "validation", d / "validation")
    params = yaml.safe_load((d / "params.yaml").read_text())
    edit(params)
    (d / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, DVC_NO_ANALYTICS="1",
               PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    run(["git", "init", "-q"], d, env)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init"], d, env)
    run(["dvc", "init", "-q"], d, env)
    return d, env


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return dvc_project(tmp_path_factory.mktemp("dvcrepo"), lambda p: p["data"]["synthetic"].update(
        n_corridors=2, sensors_per_corridor=3, days=4))


def stages_run(d, env, *cmd):
    """Names of the stages a dvc command ran, in order."""
    out = run(["dvc", *cmd], d, env).stdout
    return [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]


def set_param(d, section, key, value):
    p = yaml.safe_load((d / "params.yaml").read_text())
    p[section][key] = value
    (d / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def test_repro_then_up_to_date_then_selective(repo):
    d, env = repo
    assert stages_run(d, env, "repro", "prepare") == ["source", "ingest", "validate", "prepare"]
    assert (d / "data/processed/synthetic/values.npy").exists()
    assert (d / "reports/synthetic/validation/raw.json").exists()
    assert (d / "dvc.lock").exists()
    assert "up to date" in run(["dvc", "status", "prepare"], d, env).stdout.lower()  # `source` is not reported
    assert stages_run(d, env, "repro", "prepare") == ["source"]
    # a prepare-only param re-runs prepare only
    set_param(d, "prepare", "input_len", 24)  # a multiple of model.patch_len (12)
    assert stages_run(d, env, "repro", "prepare") == ["source", "prepare"]
    # a validation param re-runs validate (and prepare, which reads it too), never ingest
    set_param(d, "validation", "max_missing_fraction", 0.45)
    assert stages_run(d, env, "repro", "prepare")[:2] == ["source", "validate"]


def test_exp_run_set_param_switches_without_code_change(repo):
    d, env = repo
    run(["git", "add", "-A"], d, env)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", "pipeline"], d, env)
    ran = stages_run(d, env, "exp", "run", "prepare", "-S", "data.synthetic.seed=7")
    assert ran[:2] == ["source", "ingest"]
    assert yaml.safe_load((d / "params.yaml").read_text())["data"]["synthetic"]["seed"] == 7


# --- a replaced source file re-runs ingest (never stale) -----------------------------------------

def byo_readings(seed: int) -> pd.DataFrame:
    ts = pd.date_range("2024-05-06", periods=4 * 24 * 12, freq="5min")            # 4 days
    long = pd.MultiIndex.from_product([ts, ["A1", "B7", "C3"]], names=["timestamp", "sensor_id"]).to_frame(index=False)
    long["speed"] = np.random.default_rng(seed).uniform(30, 70, len(long)).round(2)
    return long


@pytest.fixture(scope="module")
def byo_repo(tmp_path_factory):
    def edit(params):
        params["data"].update(dataset="city", source="byo", path="city_src")
        params["validation"]["data_docs"] = False

    d = tmp_path_factory.mktemp("dvcbyo")
    (d / "city_src").mkdir()
    byo_readings(0).to_csv(d / "city_src" / "readings.csv", index=False)
    pd.DataFrame({"sensor_id": ["A1", "B7", "C3"]}).to_csv(d / "city_src" / "sensors.csv", index=False)
    return dvc_project(d, edit)


def test_a_replaced_source_file_re_runs_ingest_and_only_then(byo_repo):
    """The probe: readings.csv replaced in data.path, `dvc exp run` said "Stage 'ingest' didn't
    change, skipping" and validated the old data."""
    d, env = byo_repo
    assert stages_run(d, env, "repro", "validate") == ["source", "ingest", "validate"]
    first = pd.read_parquet(d / "data/raw/city/readings.parquet")
    assert stages_run(d, env, "repro", "validate") == ["source"]        # hashed again, nothing changed
    os.utime(d / "city_src" / "readings.csv")                              # touched, same content
    assert stages_run(d, env, "repro", "validate") == ["source"]
    byo_readings(1).to_csv(d / "city_src" / "readings.csv", index=False)   # replaced: new content
    assert stages_run(d, env, "repro", "validate") == ["source", "ingest", "validate"]
    second = pd.read_parquet(d / "data/raw/city/readings.parquet")
    assert not np.allclose(first["speed"], second["speed"])
    np.testing.assert_allclose(second["speed"], byo_readings(1)["speed"])
    assert stages_run(d, env, "repro", "validate") == ["source"]
