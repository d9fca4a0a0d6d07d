from pathlib import Path

import pytest

from stlink.config import ConfigError, Params, flatten, load_params, to_dict

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_load_and_match_defaults_types():
    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert p.prepare.input_len == 12 and p.prepare.output_len == 12
    assert p.data.adjacency.threshold == 0.1
    assert p.validation.bounds["speed"] == [0.0, 120.0]


def test_overrides_are_yaml_parsed(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    p = load_params(tmp_path / "empty.yaml", ["data.source=tgcn", "prepare.split=[0.6, 0.2, 0.2]",
                                                 "train.max_train_batches=null"])
    assert p.data.source == "tgcn"
    assert p.prepare.split == [0.6, 0.2, 0.2]
    assert p.train.max_train_batches is None


def test_unknown_key_names_the_key(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("data:\n  sourec: pems\n")
    with pytest.raises(ConfigError, match=r"params\.data: unknown key\(s\) \['sourec'\]"):
        load_params(f)


def test_wrong_type_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"params\.prepare\.input_len: expected int"):
        load_params(None, ["prepare.input_len=twelve"])


def test_flatten_for_mlflow():
    flat = flatten(to_dict(Params()))
    assert flat["data.adjacency.method"] == "auto"
    assert flat["model.spatial_rope"] == "split"


def test_bare_on_off_reads_as_the_string(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("model:\n  mrffn: off\n")   # YAML 1.1: a bool; DVC writes it unquoted
    assert load_params(f).model.mrffn == "off"


def test_atomic_outputs_get_normal_permissions(tmp_path):
    import os
    import stat

    from stlink.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


def test_bare_timestamp_reads_as_a_string(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    p = load_params(tmp_path / "empty.yaml", ["data.start_time=2012-03-01 00:00:00"])
    assert p.data.start_time == "2012-03-01 00:00:00"


def test_a_named_params_file_that_does_not_exist_is_an_error(tmp_path, monkeypatch, capsys):
    from stlink.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="param.yaml: no such params file"):
        load_params("param.yaml")
    assert main(["--params", "param.yaml", "ingest"]) == 2          # the probe's mistyped --params
    assert "param.yaml: no such params file" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()                        # nothing ran on the code defaults
    assert load_params(None).data.source == "synthetic"            # no --params, no params.yaml: defaults
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_params("bad.yaml")
