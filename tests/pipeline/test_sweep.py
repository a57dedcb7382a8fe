"""A hyper-parameter sweep through DVC's own experiment queue, as README's "Tune with the queue".

Real DVC 3 queue (celery workers started by `dvc queue start`), on the tiny synthetic set: four
experiments from a grid of `-S` values plus one with a value of the wrong type, two at a time;
then the table, and adopting one with `dvc exp apply` and `dvc exp branch`. Only `train` is
targeted, from a baseline whose dvc.lock is committed, so each experiment trains one short epoch.
"""

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import run, write_params
from tests.pipeline.test_remote import tiny


def cached_stages(repo: Path) -> list[str]:
    """Stages with an output in the DVC cache. A baseline whose dvc.lock has them all is what
    `dvc exp apply` of an experiment run only up to `train` needs: it checks out every cached
    output the experiment's dvc.lock lists, stale downstream ones included, and fails on one it
    does not list."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]

    def cached(out) -> bool:
        return isinstance(out, str) or (next(iter(out.values())) or {}).get("cache", True)

    return [name for name, stage in stages.items() if any(cached(o) for o in stage.get("outs", []))]


def train_metrics_file(repo: Path) -> str:
    """The metrics file the train stage declares in dvc.yaml."""
    (entry, *_) = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["train"]["metrics"]
    return entry if isinstance(entry, str) else next(iter(entry))


def leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"val": {"acc": 0.1}} -> {"val.acc": 0.1}"""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


GRID = {(0.003, "fast_sign_net"), (0.003, "micronnet"), (0.01, "fast_sign_net"), (0.01, "micronnet")}


def processes_in(folder: Path) -> dict[int, str]:
    """PID -> command line of every process whose working directory is inside ``folder``."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # gone, or not ours to read
            continue
        if cwd == str(folder) or cwd.startswith(f"{folder}/"):
            found[int(proc.name)] = cmdline
    return found


def stop_queue(repo: Path, timeout: float = 60) -> dict[int, str]:
    """`dvc queue stop --kill`, then wait for every process working in the repo to end.
    Returns those still alive at the deadline, and ends them by PID (they are this test's)."""
    run(["dvc", "queue", "stop", "--kill"], repo, check=False)
    deadline = time.monotonic() + timeout
    while (left := processes_in(repo)) and time.monotonic() < deadline:
        time.sleep(0.5)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_in(repo) if left else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            time.sleep(1)
    return left


def start_queue(repo: Path, jobs: int) -> None:
    """`dvc queue start`: its workers are daemons that keep the stdout they were given, so it
    writes to a file; a pipe would keep `subprocess.run` waiting until they exit."""
    with (repo.parent / "queue-start.log").open("ab") as log:
        subprocess.run(
            ["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, stdout=log, stderr=log, check=True
        )


@pytest.fixture
def sweep_repo(dvc_repo, params):
    """The pipeline on the tiny synthetic set, its cached outputs made and committed (dvc.lock),
    as on a project's main branch."""
    params = tiny(params)
    params["fetch"]["synthetic"].update(frames_per_track=2, test_per_class=1)
    params["prepare"]["image_size"] = 16  # both architectures take it; a quarter of the work of 32
    params["train"]["threads"] = 1  # two experiments at a time on 2 cores
    write_params(dvc_repo / "params.yaml", params)
    run(["dvc", "repro", *cached_stages(dvc_repo)], dvc_repo)
    run(["git", "add", "-A"], dvc_repo)
    run(["git", "commit", "-qm", "tiny synthetic run"], dvc_repo)
    yield dvc_repo
    assert not stop_queue(dvc_repo), "queue workers were still running after `dvc queue stop`"


def wait_for_queue(repo: Path, timeout: float = 600) -> str:
    """Poll `dvc queue status` until no task is queued or running (dvc 3.67 has no `queue wait`).
    Fails if tasks wait with no worker alive for 30 s (a worker that died would leave them)."""
    deadline = time.monotonic() + timeout
    no_worker_since = None
    while True:
        status = run(["dvc", "queue", "status"], repo).stdout
        states = [line.split()[-1] for line in status.splitlines()[1:] if line.strip()]
        if not {"Queued", "Running"} & set(states):
            return status
        if "Worker status: 0 active, 0 idle" in status:
            no_worker_since = no_worker_since or time.monotonic()
            assert time.monotonic() - no_worker_since < 30, f"tasks left but no worker:\n{status}"
        else:
            no_worker_since = None
        assert time.monotonic() < deadline, f"the queue did not finish in {timeout}s:\n{status}"
        time.sleep(2)  # each `dvc queue status` costs a core-second: leave the cores to the workers


def experiments(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json`: name -> commit, state, train params, train metrics."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)
    metrics_file = train_metrics_file(repo)
    baseline = next(row for row in shown if row["rev"] != "workspace")
    found = {}
    for exp in baseline["experiments"] or []:
        (rev,) = exp["revs"]
        data = rev["data"] or {}
        executor = exp.get("executor") or {}
        found[exp["name"]] = {
            "rev": rev["rev"],
            "state": executor.get("state"),
            "train": data.get("params", {}).get("params.yaml", {}).get("data", {}).get("train", {}),
            "metrics": data.get("metrics", {}).get(metrics_file, {}).get("data"),
        }
    return found


def test_a_queued_sweep_runs_compares_and_is_adopted(sweep_repo):
    repo = sweep_repo
    # The bad one first: it fails in seconds, and the grid fills both workers after it.
    run(["dvc", "exp", "run", "--queue", "-S", "train.lr=fast", "-n", "bad-lr", "train"], repo)
    grid = ["-S", "train.lr=0.003,0.01", "-S", "train.arch=fast_sign_net,micronnet"]
    queued = run(["dvc", "exp", "run", "--queue", *grid, "train"], repo).stdout
    assert queued.count("Queued experiment") == 4, queued

    start_queue(repo, jobs=2)
    status = wait_for_queue(repo)
    exps = experiments(repo)
    assert "bad-lr" in exps and len(exps) == 5, status

    good = {name: e for name, e in exps.items() if name != "bad-lr"}
    assert {(e["train"]["lr"], e["train"]["arch"]) for e in good.values()} == GRID
    for name, e in good.items():
        assert e["state"] == "success", (name, status)
        assert e["train"]["epochs"] == 1 and e["train"]["threads"] == 1  # the rest from the baseline
        assert e["metrics"] and all(isinstance(v, int | float) for v in leaves(e["metrics"]).values()), e

    bad = exps["bad-lr"]
    assert bad["state"] == "failed" and bad["train"]["lr"] == "fast"
    log = run(["dvc", "queue", "logs", "bad-lr"], repo).stdout
    assert "gtsrb train: error: params.yaml: train.lr: expected a number, got 'fast'" in log, log

    # The table a user reads: only what differs, one row per experiment.
    table = run(["dvc", "exp", "show", "--md", "--only-changed"], repo).stdout
    header = table.splitlines()[0]
    assert "train.lr" in header and "train.arch" in header, header
    assert "train.epochs" not in header and "train.threads" not in header  # unchanged: left out
    assert any(metric.rsplit(".", 1)[-1] in header for e in good.values() for metric in leaves(e["metrics"]))
    rows = {name: next(row for row in table.splitlines() if f"[{name}]" in row) for name in exps}
    for name, e in exps.items():
        assert f" {e['train']['lr']} " in rows[name] and f" {e['train']['arch']} " in rows[name], rows[name]

    # Adopt one that differs from the baseline in both: params, metrics and model in the workspace.
    (chosen,) = [n for n, e in good.items() if (e["train"]["lr"], e["train"]["arch"]) == (0.003, "micronnet")]
    run(["dvc", "exp", "apply", chosen], repo)
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"] == good[chosen]["train"]
    metrics_file = train_metrics_file(repo)
    assert json.loads((repo / metrics_file).read_text()) == good[chosen]["metrics"]
    assert torch.load(repo / "models/model.pt", weights_only=True)["arch"] == "micronnet"

    # ... or on a branch of its own, whose commit is the experiment's.
    run(["dvc", "exp", "branch", chosen, "tuned"], repo)
    assert (
        yaml.safe_load(run(["git", "show", "tuned:params.yaml"], repo).stdout)["train"]
        == good[chosen]["train"]
    )
    on_branch = json.loads(run(["git", "show", f"tuned:{metrics_file}"], repo).stdout)
    assert on_branch == good[chosen]["metrics"]
    assert run(["git", "rev-parse", "tuned"], repo).stdout.strip() == good[chosen]["rev"]
