"""The scripts the workflows call, run locally in temp git repos.

The only fake here is a small local stand-in for GitHub's issue-comments REST endpoint
(GitHub itself cannot be reached from tests); everything else is real: git, DVC, a moto S3
server, the pipeline.
"""

import json
import os
import re
import shutil
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest
import yaml

from gtsrb import ci, error_report
from tests.conftest import ROOT, LocalHTTPServer, run, use_remote, write_params
from tests.pipeline.test_full_pipeline import STAGES
from tests.pipeline.test_remote import tiny

GOLDEN = ROOT / "tests" / "golden"
# the PR keeps params.yaml's learning rate: a first PR then shows no parameter change
PR_LR = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]["lr"]


class FakeGitHubComments:
    """GET/POST /repos/O/R/issues/N/comments and PATCH /repos/O/R/issues/comments/ID, paginated."""

    def __init__(self, per_page: int = 2):
        self.comments: list[dict] = []
        self.calls: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status, body, headers=()):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

            def do_GET(self):
                fake.calls.append(f"GET {self.path}")
                assert self.headers["Authorization"] == "Bearer test-token"
                page = int(self.path.split("page=")[-1]) if "&page=" in self.path else 1
                chunk = fake.comments[(page - 1) * per_page : page * per_page]
                headers = []
                if page * per_page < len(fake.comments):
                    base = self.path.split("&page=")[0]
                    headers.append(
                        ("Link", f'<http://{self.headers["Host"]}{base}&page={page + 1}>; rel="next"')
                    )
                self._json(200, chunk, headers)

            def do_POST(self):
                fake.calls.append(f"POST {self.path}")
                comment = {"id": 100 + len(fake.comments), "body": self._body()["body"]}
                fake.comments.append(comment)
                self._json(201, comment)

            def do_PATCH(self):
                fake.calls.append(f"PATCH {self.path}")
                cid = int(self.path.rsplit("/", 1)[1])
                comment = next(c for c in fake.comments if c["id"] == cid)
                comment["body"] = self._body()["body"]
                self._json(200, comment)

        self.server = LocalHTTPServer(Handler)
        self.url = self.server.url

    def close(self):
        self.server.close()


@pytest.fixture
def github():
    fake = FakeGitHubComments()
    yield fake
    fake.close()


def test_the_comment_is_updated_in_place_never_duplicated(github):
    github.comments += [{"id": 1, "body": "LGTM"}, {"id": 2, "body": "nit"}, {"id": 3, "body": "another"}]
    first = ci.post_comment(f"{ci.MARKER}\nrun 1", "o/r", 7, "test-token", github.url)
    second = ci.post_comment(f"{ci.MARKER}\nrun 2", "o/r", 7, "test-token", github.url)
    assert first == "created comment 103" and second == "updated comment 103"
    assert [c["body"] for c in github.comments] == ["LGTM", "nit", "another", f"{ci.MARKER}\nrun 2"]
    assert any("&page=2" in call for call in github.calls)  # found on the second page


def write_metrics(repo: Path, accuracy: float, lr: float, curves: list[float] | None, latency: float):
    m = repo / "metrics"
    (m / "test-openblas").mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = lr
    write_params(repo / "params.yaml", params)
    for backend in ("openblas", "acl"):
        (m / f"test-{backend}.json").write_text(
            json.dumps(
                {
                    "accuracy": {"roi": accuracy, "whole": accuracy - 0.02},
                    "macro_f1": accuracy - 0.01,
                    "latency": {"batch_64": {"median_ms": latency, "p99_ms": latency * 1.2}},
                    "images_per_s": round(64 / latency * 1000, 1),
                }
            )
        )
    (m / "compare.json").write_text(json.dumps({"speedup": {"acl": {"batch_64": 1.8}}}))
    if curves:
        for name, values in (
            ("val/accuracy/whole", curves),
            ("train/loss", [round(1 - v, 4) for v in curves]),
        ):
            tsv = m / "train" / "plots" / "metrics" / f"{name}.tsv"
            tsv.parent.mkdir(parents=True, exist_ok=True)
            rows = "".join(f"{i}\t{v}\n" for i, v in enumerate(values))
            tsv.write_text(f"step\t{name.rsplit('/', 1)[1]}\n{rows}")
        (m / "train.json").write_text(json.dumps({"val": {"accuracy": {"whole": curves[-1]}}}))
    (repo / "reports").mkdir(exist_ok=True)
    (repo / "reports" / "compare.md").write_text(
        "# OpenBLAS vs oneDNN + ACL\n\n| batch | speed-up |\n|---:|---:|\n| 64 | 1.80x |\n"
    )
    # the baseline test stage's errors page, as error_report writes it: 2 of 4 wrong whole
    labels = np.array([14, 13, 1, 2])
    test = {
        "labels": labels,
        "whole": np.zeros((4, 8, 8, 3), np.uint8),
        "boxes": np.tile(np.array([0.1, 0.1, 0.9, 0.9], np.float32), (4, 1)),
    }
    predicted = {"roi": np.array([14, 13, 1, 5]), "whole": np.array([13, 13, 2, 5])}
    folder = repo / "reports" / "test-openblas"
    folder.mkdir(parents=True, exist_ok=True)
    error_report.write(folder, "test-openblas", test, predicted, {"roi": 0.75, "whole": 0.25})


def commit(repo, message):
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", message], repo)


@pytest.mark.parametrize("case", ["second_pr", "first_pr"])
def test_report_from_two_revisions_matches_the_golden_file(dvc_repo, case, github):
    if case == "second_pr":
        write_metrics(dvc_repo, 0.91, 0.001, [0.5, 0.8, 0.9], 12.5)
        commit(dvc_repo, "base")
    run(["git", "branch", "base"], dvc_repo)  # the first PR's base has no metrics at all
    write_metrics(dvc_repo, 0.97, PR_LR, [0.6, 0.9, 0.95, 0.97], 10.0)
    body = ci.build_report(dvc_repo, "base")
    golden = GOLDEN / f"pr_comment_{case}.md"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(body)
    assert body == golden.read_text()
    assert ci.build_report(dvc_repo, "base") == body  # stable from run to run


def test_report_script_posts_once_and_job_summary_gets_it(dvc_repo, github, tmp_path):
    write_metrics(dvc_repo, 0.91, 0.001, [0.5, 0.8, 0.9], 12.5)
    commit(dvc_repo, "base")
    origin = tmp_path / "origin.git"
    run(["git", "clone", "-q", "--bare", str(dvc_repo), str(origin)], tmp_path)
    clone = tmp_path / "pr"
    run(["git", "clone", "-q", "--depth", "1", f"file://{origin}", str(clone)], tmp_path)
    shutil.copytree(ROOT / ".ci", clone / ".ci", dirs_exist_ok=True)
    run(["git", "update-ref", "-d", "refs/remotes/origin/main"], clone)  # as in a shallow PR checkout
    write_metrics(clone, 0.97, 0.004, [0.6, 0.9, 0.95, 0.97], 10.0)
    summary = tmp_path / "summary.md"
    env = {
        **os.environ,
        "GITHUB_TOKEN": "test-token",
        "GITHUB_REPOSITORY": "o/r",
        "PR_NUMBER": "7",
        "GITHUB_API_URL": github.url,
        "BASE_REF": "main",
        "GITHUB_STEP_SUMMARY": str(summary),
    }
    for _ in range(2):
        run(["bash", ".ci/gha/report.sh"], clone, env=env)
    assert len(github.comments) == 1 and github.comments[0]["body"].startswith(ci.MARKER)
    assert re.search(
        r"\| metrics/test-acl.json +\| accuracy.roi +\| 0.91 +\| 0.97 ", github.comments[0]["body"]
    )
    assert summary.read_text().count(ci.MARKER) == 2
    # A fork: no token, the report goes to the job summary only.
    env.pop("GITHUB_TOKEN")
    out = run(["bash", ".ci/gha/report.sh"], clone, env=env)
    assert "job summary only" in out.stderr and len(github.comments) == 1


def test_commit_back_pushes_lock_and_metrics_to_the_pr_branch(dvc_repo, tmp_path):
    origin = tmp_path / "origin.git"
    run(["git", "clone", "-q", "--bare", str(dvc_repo), str(origin)], tmp_path)
    clone = tmp_path / "job"
    run(["git", "clone", "-q", f"file://{origin}", str(clone)], tmp_path)
    run(["git", "checkout", "-q", "-b", "feature"], clone)
    shutil.copytree(ROOT / ".ci", clone / ".ci", dirs_exist_ok=True)
    commit(clone, "ci scripts")
    run(["git", "push", "-q", "origin", "feature"], clone)
    (clone / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (clone / "metrics").mkdir(exist_ok=True)
    (clone / "metrics" / "train.json").write_text("{}\n")
    (clone / "reports").mkdir(exist_ok=True)
    env = {**os.environ, "HEAD_REF": "feature", "GITHUB_TOKEN": "test-token"}
    run(["bash", ".ci/gha/commit-back.sh"], clone, env=env)
    log = run(["git", "log", "-1", "--format=%s", "feature"], origin).stdout
    assert "[skip ci]" in log and "dvc.lock and metrics" in log
    files = run(["git", "show", "--name-only", "--format=", "feature"], origin).stdout.split()
    assert sorted(files) == ["dvc.lock", "metrics/train.json"]
    again = run(["bash", ".ci/gha/commit-back.sh"], clone, env=env)
    assert "nothing to commit" in again.stdout


def test_split_jobs_give_the_same_dvc_lock_as_one_repro(dvc_repo, s3, params, tmp_path):
    """train job (push outputs and run-cache) -> test job (the three runtimes in
    test-backends.sh's order, compare) in a fresh clone, against one plain `dvc repro`: the same
    stages, the same data, model and deps."""
    use_remote(dvc_repo, s3)
    write_params(dvc_repo / "params.yaml", tiny(params))
    shutil.copytree(ROOT / ".ci", dvc_repo / ".ci", dirs_exist_ok=True)
    commit(dvc_repo, "pipeline with remote")
    jobs = {name: tmp_path / name for name in ("train", "test", "single")}
    for job in jobs.values():
        run(["git", "clone", "-q", str(dvc_repo), str(job)], tmp_path)
    env = {**os.environ, "DVC_PULL": "1", "DVC_PUSH": "1"}
    run(["bash", ".ci/gha/stage.sh", "train"], jobs["train"], env=env)
    shutil.copy(jobs["train"] / "dvc.lock", jobs["test"] / "dvc.lock")
    shutil.copytree(jobs["train"] / "metrics", jobs["test"] / "metrics", dirs_exist_ok=True)
    logs = [
        run(["bash", ".ci/gha/stage.sh", stage], jobs["test"], env=env).stdout
        for stage in ("test-openblas", "test-acl", "test-onnxruntime", "compare")
    ]
    assert "Running stage 'train'" not in "".join(logs) and "Running stage 'prepare'" not in "".join(logs)
    run(["dvc", "repro"], jobs["single"])
    split = yaml.safe_load((jobs["test"] / "dvc.lock").read_text())["stages"]
    single = yaml.safe_load((jobs["single"] / "dvc.lock").read_text())["stages"]
    assert split.keys() == single.keys() == STAGES
    for stage in ("fetch-gtsrb", "prepare", "train", "export"):
        assert split[stage] == single[stage], stage  # deterministic: identical, outputs included
    for stage in ("test-openblas", "test-acl", "test-onnxruntime"):  # timings differ; inputs must not
        assert split[stage]["deps"] == single[stage]["deps"]
        assert split[stage]["params"] == single[stage]["params"]
    assert [d["path"] for d in split["compare"]["deps"]] == [d["path"] for d in single["compare"]["deps"]]
    predictions = [
        (job / "metrics/test-acl/predictions.csv").read_text() for job in (jobs["test"], jobs["single"])
    ]
    assert predictions[0] == predictions[1]
