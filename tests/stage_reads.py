"""What each pipeline step really reads: params keys (attribute access on the Params object) and
the ``stlink`` source files whose code runs, recorded while the real step runs on tiny data.

Used by tests/test_dvc_stages.py to compare with dvc.yaml; run it alone to print the table:
``python tests/stage_reads.py``.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stlink"

_current: set[str] | None = None          # params keys read by the running step
_classes: dict[tuple[type, str], type] = {}


def _recording_class(cls: type, prefix: str) -> type:
    """A subclass of the config dataclass ``cls`` that records reads of its fields as ``prefix + name``."""
    key = (cls, prefix)
    if key not in _classes:
        fields = {f.name for f in dataclasses.fields(cls)}

        def __getattribute__(self: Any, name: str) -> Any:
            if name in fields and _current is not None \
                    and sys._getframe(1).f_globals.get("__name__") != "dataclasses":  # asdict/replace copy all
                _current.add(prefix + name)
            return object.__getattribute__(self, name)

        _classes[key] = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__,
                                                    "__module__": cls.__module__})
    return _classes[key]


def recording(obj: Any, prefix: str = "") -> Any:
    """A copy of the params dataclass tree whose every field read is recorded."""
    new = object.__new__(_recording_class(type(obj), prefix))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = recording(value, f"{prefix}{f.name}.")
        object.__setattr__(new, f.name, value)
    return new


def stlink_files() -> set[str]:
    """The ``stlink`` source files of the modules loaded in this process, relative to the repo."""
    out = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if path.startswith(str(PACKAGE) + "/"):
            out.add(str(Path(path).relative_to(ROOT)))
    return out


def record(step: Callable[[], Any]) -> set[str]:
    """Run ``step`` in this process; the params keys read through recording Params meanwhile."""
    global _current
    keys: set[str] = set()
    _current = keys
    try:
        step()
    finally:
        _current = None
    return keys


def leaf_reads(keys: set[str]) -> set[str]:
    """The keys read that no other read key refines (``data`` dropped when ``data.null_value`` is there)."""
    return {k for k in keys if not any(o.startswith(k + ".") for o in keys)}


TINY = {
    "data": {"dataset": "tiny", "synthetic": {"n_corridors": 1, "sensors_per_corridor": 3, "days": 8,
                                              "freq_minutes": 30, "outage_rate_per_sensor": 0.0}},
    "validation": {"data_docs": False},
    "model": {"backbone": "tiny", "n_layers": 1, "tiny_hidden": 32, "tiny_heads": 2, "patch_len": 3,
              "spatial_dim": 2, "lora_rank": 4},
    "train": {"epochs": 1, "batch_size": 16, "warmup_steps": 2, "max_train_batches": 3, "max_val_batches": 2,
              "device": "cpu"},
    "reference": {"epochs": 1, "max_train_batches": 3},
    "evaluate": {"batch_size": 64, "plot_sensors": 1},
}
SKIP = {"backbone"}  # converts the packaged GGUF (reads no params); the tiny backbone does not need it


def dvc_stages(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, dict]:
    import yaml

    return yaml.safe_load(dvc_yaml.read_text())["stages"]


def pipeline_reads(root: Path, params: dict | None = None,
                   verbose: bool = False) -> dict[str, tuple[set[str], set[str], int]]:
    """Run every DVC stage's command (``stlink ...``) in ``root``, each in a fresh process (as DVC
    does) with a recording Params; returns {stage: (params keys read, stlink files loaded, exit code)}."""
    import json
    import os
    import subprocess

    import yaml

    root.mkdir(parents=True, exist_ok=True)
    params = dict(params or TINY, tracking={"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db"})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    out: dict[str, tuple[set[str], set[str], int]] = {}
    for name in dvc_stages():
        if name in SKIP:
            continue
        res = subprocess.run([sys.executable, "-m", "stage_reads", name], cwd=root, env=env,
                             capture_output=True, text=True)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("STAGE_READS ")]
        if not lines:
            raise AssertionError(f"stage {name}: no record ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        rec = json.loads(lines[-1][len("STAGE_READS "):])
        out[name] = (set(rec["keys"]), set(rec["files"]), rec["rc"])
        if verbose:  # as each stage finishes: the table is useful before the last stage ends
            print(f"== {name} (exit {rec['rc']})\n  params: {sorted(leaf_reads(set(rec['keys'])))}\n"
                  f"  code: {sorted(rec['files'])}", flush=True)
    return out


def run_stage(name: str) -> None:
    """In a fresh process in the project folder: run stage ``name``'s command, print what it read."""
    import json
    import shlex

    from stlink import cli
    from stlink.config import load_params

    global _current
    argv = shlex.split(dvc_stages()[name]["cmd"])
    assert argv[0] == "stlink", argv
    if name == "score":
        _champion_for_scoring(load_params("params.yaml"))
    keys: set[str] = set()
    cli.load_params = lambda path=None, overrides=None: recording(load_params(path, overrides))
    _current = keys
    try:
        rc = cli.main(argv[1:])
    finally:
        _current = None
    print("STAGE_READS " + json.dumps({"keys": sorted(keys), "files": sorted(stlink_files()), "rc": rc}))


def _champion_for_scoring(params: Any) -> None:
    """A tiny model may fail the gate: give the challenger the champion alias so `score` can run."""
    from stlink.tracking.store import client_for, registered_model_name, tracking_config

    cfg = tracking_config(params)
    name = registered_model_name(cfg, params.data.dataset)
    client = client_for(cfg)
    try:
        client.get_model_version_by_alias(name, "champion")
    except Exception:
        version = client.get_model_version_by_alias(name, "challenger").version
        client.set_registered_model_alias(name, "champion", version)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run_stage(sys.argv[1])
    else:
        import tempfile
        import time

        t0 = time.perf_counter()
        pipeline_reads(Path(tempfile.mkdtemp(prefix="stage-reads-")), verbose=True)
        print(f"{time.perf_counter() - t0:.1f} s")
