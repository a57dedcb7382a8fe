"""fetch-gtsrb against a real HTTP server on 127.0.0.1 serving GTSRB-format archives."""

from pathlib import Path

import pytest

from gtsrb import params as P
from gtsrb.errors import GtsrbError
from gtsrb.fetch import fetch
from tests import archives
from tests.conftest import tree_digest, write_params


def serve_archives(server, params: dict) -> dict:
    """Put a hand-built archive set on the server; point params at it with the right md5s."""
    md5s = archives.build().write(server.folder)
    params["fetch"]["url"] = server.url
    params["fetch"]["retries"] = 0
    for archive in params["fetch"]["archives"].values():
        archive["md5"] = md5s[archive["name"]]
    return params


def load(tmp_path: Path, params: dict) -> P.FetchParams:
    return P.load("fetch", write_params(tmp_path / "params.yaml", params))


def test_downloads_and_verifies_all_three(tmp_path, archive_server, params):
    out = tmp_path / "raw"
    paths = fetch(load(tmp_path, serve_archives(archive_server, params)), out)
    assert sorted(p.name for p in out.iterdir()) == sorted(a.name for a in paths)
    for p in paths:
        assert p.read_bytes() == (archive_server.folder / p.name).read_bytes()


def test_transient_errors_are_retried(tmp_path, archive_server, params):
    params = serve_archives(archive_server, params)
    params["fetch"]["retries"] = 2
    archive_server.faults[archives.TRAIN] = [503, "truncate"]
    fetch(load(tmp_path, params), tmp_path / "raw", backoff=0.01)
    assert archive_server.requests.count(archives.TRAIN) == 3
    assert (tmp_path / "raw" / archives.TRAIN).read_bytes() == (
        archive_server.folder / archives.TRAIN
    ).read_bytes()


@pytest.fixture
def previous(tmp_path, archive_server, params):
    """A successful fetch whose output must survive every failure below."""
    params = serve_archives(archive_server, params)
    fetch(load(tmp_path, params), tmp_path / "raw")
    return params, tree_digest(tmp_path / "raw")


def fails(tmp_path, params, match):
    with pytest.raises(GtsrbError, match=match):
        fetch(load(tmp_path, params), tmp_path / "raw", backoff=0.01)


def test_unreachable_url_names_it_and_suggests_a_way_out(tmp_path, previous):
    params, before = previous
    params["fetch"]["url"] = "http://127.0.0.1:9/mirror/"  # discard port: connection refused
    fails(
        tmp_path,
        params,
        r"could not download http://127\.0\.0\.1:9/mirror/GTSRB-Training_fixed\.zip "
        r"after 1 attempt.*fetch\.url=.*fetch\.source=synthetic",
    )
    assert tree_digest(tmp_path / "raw") == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_http_404_names_the_url(tmp_path, previous):
    params, before = previous
    params["fetch"]["archives"]["test_gt"]["name"] = "GT-missing.zip"
    fails(tmp_path, params, r"HTTP 404 .* for http://127\.0\.0\.1:\d+/gtsrb/GT-missing\.zip")
    assert tree_digest(tmp_path / "raw") == before


def test_md5_mismatch_names_archive_expected_and_actual(tmp_path, previous, archive_server):
    params, before = previous
    actual = params["fetch"]["archives"]["test_images"]["md5"]
    params["fetch"]["archives"]["test_images"]["md5"] = "0" * 32
    fails(
        tmp_path,
        params,
        f"md5 mismatch for {archives.TEST_IMAGES} .*expected {'0' * 32}, got {actual}",
    )
    assert tree_digest(tmp_path / "raw") == before


def test_truncated_download_without_retries_fails_cleanly(tmp_path, previous, archive_server):
    params, before = previous
    archive_server.faults[archives.TRAIN] = ["truncate"]
    fails(tmp_path, params, r"after 1 attempt\(s\): connection closed after \d+ of \d+ bytes")
    assert tree_digest(tmp_path / "raw") == before


def test_a_local_folder_is_a_mirror_too(tmp_path, params):
    """fetch.url=file:///folder/ (how bench/real_gtsrb.sh runs the pipeline on a copy of the
    archives): the same checks, and a missing file fails at once, naming it."""
    folder = tmp_path / "mirror"
    md5s = archives.build().write(folder)
    params["fetch"]["url"] = folder.as_uri() + "/"
    for archive in params["fetch"]["archives"].values():
        archive["md5"] = md5s[archive["name"]]
    paths = fetch(load(tmp_path, params), tmp_path / "raw")
    assert all(p.read_bytes() == (folder / p.name).read_bytes() for p in paths)
    (folder / archives.TEST_GT).unlink()
    params["fetch"]["retries"] = 4  # not retried: the first attempt says it all
    with pytest.raises(
        GtsrbError, match=rf"file://.*/mirror/{archives.TEST_GT}: no such file; check fetch.url"
    ):
        fetch(load(tmp_path, params), tmp_path / "raw2", backoff=60)
