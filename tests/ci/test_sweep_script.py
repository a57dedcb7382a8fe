"""The sweep workflow's script, .ci/gha/sweep.sh, run locally the way .github/workflows/sweep.yml
runs it.

Everything is real but GitHub itself: git with a bare repository as `origin`, DVC, a moto S3
server as the DVC remote, the pipeline on the tiny synthetic set. The matrix JSON is what the
workflow hands to `strategy.matrix`; each cell is one `sweep.sh run` in its own shallow clone, as
a runner's checkout is; a laptop then pulls the experiments from `origin`. The token's way to
GitHub is checked against a local HTTP server that records the request's headers.
"""

import base64
import json
import os
import shutil
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

from gtsrb.fsutil import md5sum
from tests.conftest import ROOT, LocalHTTPServer, run, use_remote, write_params
from tests.pipeline.test_remote import tiny
from tests.pipeline.test_sweep import cached_stages

SCRIPT = ROOT / ".ci" / "gha" / "sweep.sh"
WORKFLOW = ROOT / ".github" / "workflows" / "sweep.yml"


def matrix(overrides: str, check: bool = True):
    env = {**os.environ, "OVERRIDES": overrides, "SWEEP_ID": "42"}
    return run(["bash", str(SCRIPT), "matrix"], ROOT, check=check, env=env)


def test_matrix_expands_each_set_to_its_cross_product():
    out = matrix("train.lr=0.003,0.01 train.arch=fast_sign_net,micronnet\n train.epochs=10 ; train.lr=0.003")
    assert json.loads(out.stdout) == {
        "include": [
            {"name": "sweep-42-1", "overrides": "train.lr=0.003 train.arch=fast_sign_net"},
            {"name": "sweep-42-2", "overrides": "train.lr=0.003 train.arch=micronnet"},
            {"name": "sweep-42-3", "overrides": "train.lr=0.01 train.arch=fast_sign_net"},
            {"name": "sweep-42-4", "overrides": "train.lr=0.01 train.arch=micronnet"},
            {"name": "sweep-42-5", "overrides": "train.epochs=10"},
            {"name": "sweep-42-6", "overrides": "train.lr=0.003"},
        ]
    }
    assert len(out.stdout.strip().splitlines()) == 1  # one line, as $GITHUB_OUTPUT takes it
    lists = json.loads(matrix("evaluate.batch_sizes=[1,64],[8]").stdout)["include"]
    assert [cell["overrides"] for cell in lists] == [
        "evaluate.batch_sizes=[1,64]",
        "evaluate.batch_sizes=[8]",
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("", "sweep: no overrides given"),
        (" ; \n", "sweep: no overrides given"),
        ("train.lr=0.1 lr0.1", "sweep: set 1: 'lr0.1' is not PARAM=VALUE[,VALUE...]"),
        ("train.lr=0.1; train.lr=", "sweep: 'train.lr=': empty value"),
        ("train.lr=0.1,,0.2", "sweep: 'train.lr=0.1,,0.2': empty value"),
        ("evaluate.batch_sizes=[1,64", "sweep: 'evaluate.batch_sizes=[1,64': unbalanced brackets"),
        ("train.lr=1 train.lr=2", "sweep: set 1: train.lr is given twice"),
        ("params.yaml:train.lr=1", "sweep: set 1: 'params.yaml:train.lr' is not a params.yaml key"),
        (
            "train.lr=" + ",".join(map(str, range(1, 18))) + " train.seed=" + ",".join(map(str, range(16))),
            "sweep: 272 experiments: GitHub runs at most 256 jobs per matrix",
        ),
    ],
)
def test_matrix_rejects_what_it_cannot_parse(overrides, message):
    out = matrix(overrides, check=False)
    assert out.returncode != 0 and out.stdout == "", out.stdout
    assert message in out.stderr, out.stderr


def test_the_workflow_runs_one_job_per_cell_with_values_through_env():
    spec = yaml.safe_load(WORKFLOW.read_text())
    inputs = spec[True]["workflow_dispatch"]["inputs"]  # YAML 1.1 reads the key `on` as True
    assert inputs["overrides"]["required"] is True
    job = spec["jobs"]["experiment"]
    assert job["strategy"] == {"fail-fast": False, "matrix": "${{ fromJSON(needs.matrix.outputs.matrix) }}"}
    assert job["runs-on"] == "${{ vars.ARM_RUNNER || 'ubuntu-24.04-arm' }}"
    assert "openblas" in job["container"]["image"]
    step = job["steps"][-1]
    assert step["run"] == "bash .ci/gha/sweep.sh run"
    assert (
        step["env"]["OVERRIDES"] == "${{ matrix.overrides }}" and step["env"]["NAME"] == "${{ matrix.name }}"
    )
    matrix_step = spec["jobs"]["matrix"]["steps"][-1]
    assert matrix_step["env"]["OVERRIDES"] == "${{ inputs.overrides }}"
    assert "bash .ci/gha/sweep.sh matrix" in matrix_step["run"]


class HeaderRecorder:
    """A local HTTP server standing in for GitHub's git endpoint: it records each request's
    Authorization header and answers 404, so the push fails after showing what it sent."""

    def __init__(self):
        self.seen: list[str | None] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                recorder.seen.append(self.headers.get("Authorization"))
                self.send_error(404)

            do_POST = do_GET

        self.server = LocalHTTPServer(Handler)
        self.url = self.server.url

    def close(self):
        self.server.close()


@pytest.fixture
def origin(dvc_repo, s3, params, tmp_path):
    """A bare `origin` holding the pipeline (tiny synthetic set, cached outputs made and pushed to
    the S3 remote, dvc.lock committed) and the CI scripts, as the repository a sweep starts from."""
    params = tiny(params)
    params["fetch"]["synthetic"].update(frames_per_track=2, test_per_class=1)
    params["prepare"]["image_size"] = 16
    write_params(dvc_repo / "params.yaml", params)
    use_remote(dvc_repo, s3)
    shutil.copytree(ROOT / ".ci", dvc_repo / ".ci", dirs_exist_ok=True)
    run(["dvc", "repro", *cached_stages(dvc_repo)], dvc_repo)
    run(["dvc", "push"], dvc_repo)
    run(["git", "add", "-A"], dvc_repo)
    run(["git", "commit", "-qm", "tiny synthetic run; CI scripts"], dvc_repo)
    bare = tmp_path / "origin.git"
    run(["git", "clone", "-q", "--bare", str(dvc_repo), str(bare)], tmp_path)
    return bare


def runner_checkout(origin: Path, folder: Path) -> Path:
    """What actions/checkout leaves: a depth-1 clone with `origin` pointing at the repository."""
    run(["git", "clone", "-q", "--depth", "1", f"file://{origin}", str(folder)], folder.parent)
    return folder


def sweep(job: Path, command: str, check: bool = True, **env: str):
    return run(["bash", ".ci/gha/sweep.sh", command], job, check=check, env={**os.environ, **env})


def test_cells_run_apart_and_a_laptop_compares_them(origin, tmp_path, s3):
    cells = json.loads(matrix("train.lr=0.003 train.arch=micronnet; train.lrr=1").stdout)["include"]
    assert [c["overrides"] for c in cells] == ["train.lr=0.003 train.arch=micronnet", "train.lrr=1"]
    results = {}
    for cell in cells:  # on GitHub, one runner each, at the same time
        job = runner_checkout(origin, tmp_path / cell["name"])
        results[cell["name"]] = sweep(
            job, "run", check=False, OVERRIDES=cell["overrides"], NAME=cell["name"], TARGET="train"
        )
    good, bad = results["sweep-42-1"], results["sweep-42-2"]

    assert good.returncode == 0, good.stdout + good.stderr
    assert "Running stage 'train'" in good.stdout and "Running stage 'prepare'" not in good.stdout, (
        good.stdout
    )
    assert bad.returncode != 0 and "Running stage" not in bad.stdout
    assert "sweep: train.lrr: unknown param (keys of train: arch, " in bad.stderr, bad.stderr
    pushed = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], origin).stdout.split()
    assert [ref.rsplit("/", 1)[1] for ref in pushed] == ["sweep-42-1"], pushed  # the bad cell pushed nothing

    # The other ways a cell is malformed fail the same way, before anything is pulled or run.
    job = tmp_path / "sweep-42-1"
    for overrides, message in [
        ("train.lr=fast", "sweep: params.yaml: train.lr: expected a number, got 'fast'"),
        ("lr0.1", "sweep: 'lr0.1' is not PARAM=VALUE"),
        ("train.arch=resnet", "sweep: params.yaml: train.arch: must be one of fast_sign_net, micronnet"),
    ]:
        out = sweep(job, "run", check=False, OVERRIDES=overrides, NAME="bad", TARGET="train")
        assert out.returncode != 0 and message in out.stderr and "Running stage" not in out.stdout, out.stderr

    # The token goes to the push as a header, from a config file that is gone afterwards.
    github = HeaderRecorder()
    try:
        run(["git", "remote", "add", "github", f"{github.url}/o/r.git"], job)
        out = sweep(
            job,
            "push",
            check=False,
            NAME="sweep-42-1",
            GIT_REMOTE="github",
            GITHUB_TOKEN="test-token",
            GITHUB_SERVER_URL=github.url,
        )
    finally:
        github.close()
    assert out.returncode != 0  # the stand-in answers 404
    assert f"basic {base64.b64encode(b'x-access-token:test-token').decode()}" in github.seen, github.seen
    leftovers = [p for p in job.rglob("*") if p.is_file() and b"test-token" in p.read_bytes()]
    assert not leftovers and "test-token" not in (out.stdout + out.stderr)

    # A laptop: a fresh clone, the experiments from origin, their outputs from the S3 remote.
    laptop = tmp_path / "laptop"
    run(["git", "clone", "-q", str(origin), str(laptop)], tmp_path)
    run(["dvc", "exp", "pull", "origin"], laptop)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], laptop).stdout)
    (baseline,) = [row for row in shown if row["rev"] != "workspace"]
    exps = {exp["name"]: exp["revs"][0]["data"] for exp in baseline["experiments"]}
    assert list(exps) == ["sweep-42-1"], exps
    params = exps["sweep-42-1"]["params"]["params.yaml"]["data"]["train"]
    assert (params["lr"], params["arch"]) == (0.003, "micronnet")
    (metrics_file, *_) = [m for m in exps["sweep-42-1"]["metrics"] if "train" in m]
    assert exps["sweep-42-1"]["metrics"][metrics_file]["data"], exps["sweep-42-1"]["metrics"]
    table = run(["dvc", "exp", "show", "--md", "--only-changed"], laptop).stdout
    assert "[sweep-42-1]" in table and "micronnet" in table, table

    run(["dvc", "exp", "apply", "sweep-42-1"], laptop)
    shutil.rmtree(laptop / ".dvc" / "cache")  # whatever `exp pull` brought: the model comes from S3
    (laptop / "models" / "model.pt").unlink()
    run(["dvc", "pull", "models/model.pt"], laptop)
    lock = yaml.safe_load((laptop / "dvc.lock").read_text())
    (out_entry,) = [o for o in lock["stages"]["train"]["outs"] if o["path"] == "models/model.pt"]
    assert md5sum(laptop / "models" / "model.pt") == out_entry["md5"]
    assert any(out_entry["md5"][2:] in key for key in s3.objects()), "the model is not on the S3 remote"
