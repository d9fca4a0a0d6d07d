"""Never stale: every DVC stage declares exactly the params it reads and the code it runs.

Each stage's command (from dvc.yaml) runs on tiny data in a fresh process with a Params object
that records every field read (tests/stage_reads.py); the stlink modules loaded by that process
are its code.  A param read but not declared, or code loaded but not among the stage's deps,
would let DVC skip a stage whose result would change: the test names them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from stage_reads import ROOT, dvc_stages, leaf_reads, pipeline_reads

pytestmark = pytest.mark.slow  # runs every stage once on tiny data, each in a fresh process

# The shared plumbing of every stage: it parses params (whose values are declared per stage),
# dispatches to the step functions and writes files atomically; dvc.yaml does not list it.
PLUMBING = {"stlink/__init__.py", "stlink/cli.py", "stlink/config.py", "stlink/errors.py", "stlink/io.py",
            "stlink/progress.py"}
IMPLIED_PARAMS = {"data.dataset"}  # in every stage's ${data.dataset} paths: a change changes the stage


def covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def dep_covers(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    return pipeline_reads(tmp_path_factory.mktemp("stages"))


def test_every_stage_ran(reads):
    failed = {name: rc for name, (_, _, rc) in reads.items() if rc not in (0, 3)}  # 3: promote refused
    assert not failed, f"stages that failed on the tiny project: {failed}"


@pytest.mark.parametrize("stage", [s for s in dvc_stages() if s != "backbone"])
def test_stage_declares_exactly_the_params_it_reads(reads, stage):
    keys, _, _ = reads[stage]
    read = {k for k in leaf_reads(keys) if k not in IMPLIED_PARAMS}
    declared = [str(p) for p in dvc_stages()[stage].get("params", [])]
    undeclared = sorted(k for k in read if not covered(k, declared))
    unread = sorted(d for d in declared if d not in IMPLIED_PARAMS
                    and not any(covered(k, [d]) or d.startswith(k + ".") for k in keys))
    assert not undeclared, f"stage {stage!r} reads params dvc.yaml does not declare: {undeclared}"
    assert not unread, f"stage {stage!r} declares params it never reads: {unread}"


@pytest.mark.parametrize("stage", [s for s in dvc_stages() if s not in ("backbone", "source")])
def test_stage_depends_on_the_code_it_runs(reads, stage):
    _, files, _ = reads[stage]
    deps = [str(d) for d in dvc_stages()[stage].get("deps", [])]
    missing = sorted(f for f in files if f not in PLUMBING and not f.endswith("/__init__.py")
                     and not dep_covers(f, deps))
    assert not missing, f"stage {stage!r} runs code that is not among its deps: {missing}"
    for d in deps:
        if d.startswith("stlink"):
            assert (ROOT / d).exists(), f"stage {stage!r}: dep {d} does not exist"


def test_train_depends_on_the_model_and_training_folders():
    deps = dvc_stages()["train"]["deps"]
    assert {"stlink/model", "stlink/training", "stlink/data/windows.py"} <= set(deps)
    assert Path(ROOT / "stlink/training").is_dir()
