"""fetch-gtsrb and prepare through `dvc repro` in a temporary git+DVC repo."""

import csv
import json

import pytest
import yaml

from tests import archives
from tests.conftest import TINY_SYNTHETIC, run, tree_digest, write_params


def cache_digest(repo):
    return tree_digest(repo / ".dvc" / "cache")


@pytest.fixture
def served_repo(dvc_repo, archive_server, params):
    """The pipeline repo pointed at hand-built archives on a local HTTP server."""
    md5s = archives.build(classes=(0, 1, 2, 3), tracks=3, frames=3, n_test=8).write(archive_server.folder)
    params["fetch"]["url"] = archive_server.url
    for archive in params["fetch"]["archives"].values():
        archive["md5"] = md5s[archive["name"]]
    params["prepare"]["workers"] = 2
    write_params(dvc_repo / "params.yaml", params)
    run(["git", "commit", "-qam", "local mirror"], dvc_repo)
    return dvc_repo


def test_repro_downloads_prepares_and_is_then_a_no_op(served_repo, archive_server):
    out = run(["dvc", "repro", "prepare"], served_repo).stdout
    assert "Running stage 'fetch-gtsrb'" in out and "Running stage 'prepare'" in out
    assert sorted(p.name for p in (served_repo / "data/raw").iterdir()) == sorted(archive_server.requests)
    for split in ("train", "val", "test"):
        assert (served_repo / f"data/prepared/{split}.npz").is_file()
    images = json.loads((served_repo / "reports/data/summary.json").read_text())["images"]
    assert images["test"] == 8 and images["train"] + images["val"] == 36
    lock = yaml.safe_load((served_repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"fetch-gtsrb", "prepare"}
    # reports are committed to git, data is ignored by git
    status = run(["git", "status", "--porcelain", "-uall"], served_repo).stdout
    assert "reports/data/classes.csv" in status and "data/raw" not in status and "data/prepared" not in status
    requests = len(archive_server.requests)
    again = run(["dvc", "repro", "prepare"], served_repo).stdout
    assert "Running stage" not in again and "didn't change, skipping" in again
    assert len(archive_server.requests) == requests


def test_failed_repro_keeps_cache_and_lock(served_repo, params):
    run(["dvc", "repro", "prepare"], served_repo)
    run(["git", "add", "-A"], served_repo)
    run(["git", "commit", "-qm", "run"], served_repo)  # the convention: lock and metrics in git
    cache, lock = cache_digest(served_repo), (served_repo / "dvc.lock").read_bytes()
    params["prepare"]["image_size"] = "big"
    write_params(served_repo / "params.yaml", params)
    proc = run(["dvc", "repro", "prepare"], served_repo, check=False)
    assert proc.returncode != 0
    assert "prepare.image_size: expected an integer, got 'big'" in proc.stderr + proc.stdout
    assert cache_digest(served_repo) == cache and (served_repo / "dvc.lock").read_bytes() == lock
    # DVC removed the stage's outputs before running it; git and the cache restore them intact.
    run(["git", "checkout", "--", "params.yaml", "reports"], served_repo)
    run(["dvc", "checkout", "prepare"], served_repo)
    assert "up to date" in run(["dvc", "status", "prepare"], served_repo).stdout


def test_offline_synthetic_experiment(dvc_repo):
    """The documented offline path: no network, synthetic GTSRB-format archives."""
    sets = [f"fetch.synthetic.{k}={v}" for k, v in TINY_SYNTHETIC.items()]
    cmd = ["dvc", "exp", "run", "prepare", "-S", "fetch.source=synthetic"]
    for s in sets:
        cmd += ["-S", s]
    run(cmd, dvc_repo)
    images = json.loads((dvc_repo / "reports/data/summary.json").read_text())["images"]
    assert images["test"] == 43 * TINY_SYNTHETIC["test_per_class"]
    n_train = 43 * TINY_SYNTHETIC["tracks_per_class"] * TINY_SYNTHETIC["frames_per_track"]
    assert images["train"] + images["val"] == n_train
    classes = list(csv.DictReader((dvc_repo / "reports/data/classes.csv").open()))
    assert len(classes) == 43 and all(int(c["val"]) > 0 for c in classes)
    show = run(["dvc", "exp", "show", "--md", "--only-changed"], dvc_repo).stdout
    assert "synthetic" in show
