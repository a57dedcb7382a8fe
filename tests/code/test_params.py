"""params.yaml is validated: errors name the key at fault."""

import pytest

from gtsrb import params as P
from gtsrb.cli import main
from gtsrb.errors import ParamsError
from tests.conftest import ROOT, set_key, write_params


def test_project_params_load():
    for section in P.SECTIONS:
        P.load(section, ROOT / "params.yaml")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("prepare.image_size", "big", "prepare.image_size: expected an integer, got 'big'"),
        ("prepare.image_size", 4, "prepare.image_size: must be >= 8, got 4"),
        ("prepare.val_fraction", True, "prepare.val_fraction: expected a number"),
        ("fetch.source", "ftp", "fetch.source: must be one of official, synthetic; got 'ftp'"),
        ("fetch.timeout", 0, "fetch.timeout: must be > 0"),
        ("fetch.archives.train.md5", 123, "fetch.archives.train.md5: expected a non-empty string"),
    ],
)
def test_wrong_type_or_range_names_the_key(tmp_path, params, key, value, message):
    path = write_params(tmp_path / "params.yaml", set_key(params, key, value))
    section = key.split(".")[0]
    with pytest.raises(ParamsError, match=f"^{tmp_path / 'params.yaml'}: {message}"):
        P.load(section, path)


def test_unknown_and_missing_keys_are_named(tmp_path, params):
    params["prepare"]["imagesize"] = 32
    path = write_params(tmp_path / "params.yaml", params)
    with pytest.raises(
        ParamsError, match=r"prepare\.imagesize: unknown key \(known keys of prepare: image_size"
    ):
        P.load("prepare", path)
    del params["prepare"]["imagesize"], params["prepare"]["seed"]
    write_params(path, params)
    with pytest.raises(ParamsError, match=r"prepare\.seed: missing key"):
        P.load("prepare", path)
    params["trian"] = {}
    write_params(path, params)
    with pytest.raises(ParamsError, match="trian: unknown section"):
        P.load("prepare", path)


def test_cli_exits_2_with_the_key_on_stderr(tmp_path, params, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", set_key(params, "fetch.retries", -1))
    assert main(["fetch"]) == 2
    err = capsys.readouterr().err
    assert "gtsrb fetch: error:" in err and "fetch.retries: must be >= 0, got -1" in err
    assert not (tmp_path / "data").exists()
