"""Never stale: every DVC stage declares exactly the params it reads and the code it runs.

Each stage's command (from dvc.yaml) runs on tiny data in a fresh process with a Params object
that records every field read (tests/stage_reads.py); the stlink modules loaded by that process
are its code.  A param read but not declared, or code loaded but not among the stage's deps,
would let DVC skip a stage whose result would change: the test names them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from stage_reads import ROOT, dvc_stages, leaf_reads, pipeline_reads, record, recording

pytestmark = pytest.mark.slow  # runs every stage once on tiny data, each in a fresh process

# The shared plumbing of every stage: it parses params (whose values are declared per stage),
# dispatches to the step functions and writes files atomically; dvc.yaml does not list it.
PLUMBING = {"stlink/__init__.py", "stlink/cli.py", "stlink/config.py", "stlink/errors.py", "stlink/io.py",
            "stlink/progress.py",
            "stlink/data/sources/registry.py"}  # config.py checks data.source against this table of loaders
IMPLIED_PARAMS = {"data.dataset"}  # in every stage's ${data.dataset} paths: a change changes the stage


def covered(key: str, declared: list[str]) -> bool:
    return any(key == d or key.startswith(d + ".") for d in declared)


def dep_covers(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    """Every stage on the tiny synthetic project; ``source`` and ``ingest`` also on each file format
    (what they read depends on data.source: PEMS needs data.start_time, a download data.url, ...)."""
    out = pipeline_reads(tmp_path_factory.mktemp("stages"))
    extra = file_source_reads(tmp_path_factory.mktemp("sources"))
    for stage in ("source", "ingest"):
        keys, files, rc = out[stage]
        out[stage] = (keys | extra, files, rc)
    return out


def file_source_reads(tmp: Path) -> set[str]:
    """Params read by ``stlink fingerprint`` + ``stlink ingest`` (in-process) on tiny files of every format."""
    import hashlib

    import numpy as np
    import pandas as pd
    from fixtures_gen import byo_long, cube, serve_folder, write_adj_pkl, write_byo, write_metrla_h5, write_pems, write_tgcn

    from stlink.config import params_from_dict
    from stlink.data.ingest import ingest, write_fingerprint

    ids = ["a", "b", "c"]
    write_pems(tmp / "pems", cube(6, 3, 1), [(0, 1, 1.0)])
    (tmp / "metrla").mkdir()
    write_metrla_h5(tmp / "metrla" / "m.h5", np.ones((6, 3)), ids)
    write_adj_pkl(tmp / "metrla" / "adj_mx.pkl", ids, np.eye(3))
    write_tgcn(tmp / "tgcn", np.ones((6, 3)), ids, np.eye(3))
    write_byo(tmp / "byo", byo_long(pd.date_range("2024-01-01", periods=6, freq="5min"), ids),
              pd.DataFrame({"sensor_id": ids}), pd.DataFrame({"from": ["a"], "to": ["b"], "distance": [1.0]}))
    digest = hashlib.sha256((tmp / "byo" / "readings.csv").read_bytes()).hexdigest()
    cases = [{"source": "pems", "path": str(tmp / "pems"), "start_time": "2024-01-01", "freq": "5min"},
             {"source": "metrla", "path": str(tmp / "metrla")},
             {"source": "tgcn", "path": str(tmp / "tgcn"), "start_time": "2024-01-01", "freq": "5min"},
             {"source": "byo", "path": str(tmp / "byo"), "files": {"readings": "readings.csv"}}]
    keys: set[str] = set()
    with serve_folder(tmp / "byo") as url:
        cases.append({"source": "byo", "path": str(tmp / "down"), "url": url, "sha256": {"readings.csv": digest}})
        for i, data in enumerate(cases):
            params = recording(params_from_dict({"data": {"dataset": f"d{i}", **data}}))
            keys |= record(lambda: (write_fingerprint(params, tmp / f"fp{i}.json"), ingest(params, tmp / f"raw{i}")))
    return keys


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
