"""The S3 remote, shared run-cache and model versions, against a real moto S3 server."""

import json
import os
import shutil
import subprocess
import time

import pytest

from gtsrb import onnx_model
from gtsrb.fsutil import md5sum
from tests.conftest import BIN, S3Server, TcpProxy, run, tree_digest, use_remote, write_params

STAGES = ("fetch-gtsrb", "prepare", "train", "test-openblas", "test-acl", "compare")


def tiny(params: dict, seed: int = 0) -> dict:
    params["fetch"]["source"] = "synthetic"
    params["fetch"]["synthetic"].update(tracks_per_class=2, frames_per_track=3, test_per_class=2)
    params["train"].update(epochs=1, batch_size=32, threads=2, seed=seed)
    params["evaluate"].update(min_run_time=0.05, warmup=1, inference="eager")
    params["compare"].update(tolerance=0.05, bootstrap=200)
    return params


@pytest.fixture
def remote_repo(dvc_repo, s3, params):
    """The pipeline repo with its default remote on the test server, committed like a project's."""
    use_remote(dvc_repo, s3)
    write_params(dvc_repo / "params.yaml", tiny(params))
    run(["git", "add", "-A"], dvc_repo)
    run(["git", "commit", "-qm", "tiny synthetic run, S3 remote"], dvc_repo)
    return dvc_repo


def commit_run(repo, message):
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", message], repo)


def tracked(repo):
    return {
        **tree_digest(repo / "data"),
        **{f"models/{k}": v for k, v in tree_digest(repo / "models").items()},
    }


def test_push_then_a_fresh_clone_pulls_identical_bytes(remote_repo, tmp_path):
    run(["dvc", "repro"], remote_repo)
    commit_run(remote_repo, "run")
    run(["dvc", "push"], remote_repo)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(remote_repo), str(clone)], tmp_path)
    assert not (clone / "models" / "model.pt").exists()
    run(["dvc", "pull"], clone)
    assert tracked(clone) == tracked(remote_repo)
    assert "up to date" in run(["dvc", "status"], clone).stdout
    # metrics diff against the base needs no remote at all: the metrics are in git.
    run(["dvc", "remote", "modify", "storage", "endpointurl", "http://127.0.0.1:9"], clone)
    diff = run(["dvc", "metrics", "diff", "HEAD~1", "--md"], clone).stdout
    assert "metrics/test-acl.json" in diff and "accuracy" in diff


def test_split_jobs_restore_upstream_stages_instead_of_rerunning(remote_repo, tmp_path):
    """Job 1 trains and pushes outputs and run-cache; job 2, a fresh clone that received job 1's
    dvc.lock and cache: false metrics (a CI artifact), runs a test stage with `dvc repro --pull`."""
    job1, job2 = tmp_path / "job1", tmp_path / "job2"
    for job in (job1, job2):
        run(["git", "clone", "-q", str(remote_repo), str(job)], tmp_path)
    out1 = run(["dvc", "repro", "train"], job1).stdout
    assert "Running stage 'train'" in out1
    run(["dvc", "push", "--run-cache"], job1)
    shutil.copy(job1 / "dvc.lock", job2 / "dvc.lock")
    shutil.copytree(job1 / "metrics", job2 / "metrics", dirs_exist_ok=True)
    out2 = run(["dvc", "repro", "--pull", "test-openblas"], job2).stdout
    for stage in ("fetch-gtsrb", "prepare", "train"):
        assert f"Running stage '{stage}'" not in out2, out2
        assert f"Pulling data for stage: '{stage}'" in out2, out2
    assert "Running stage 'test-openblas'" in out2
    assert md5sum(job2 / "models/model.pt") == md5sum(job1 / "models/model.pt")
    details = json.loads((job2 / "metrics/test-openblas/details.json").read_text())
    assert details["model_md5"] == md5sum(job1 / "models/model.pt")


def register(repo, version, stage=None):
    for artifact in ("traffic-sign-net", "traffic-sign-net-onnx"):  # a release versions both files
        run([str(BIN / "gto"), "register", artifact, "HEAD", "--version", version], repo)
    if stage:
        run([str(BIN / "gto"), "assign", "traffic-sign-net", "--version", version, "--stage", stage], repo)


def test_any_model_version_on_demand(remote_repo, tmp_path, params, monkeypatch, capsys):
    models, exports = {}, {}
    for version, seed in (("v1.0.0", 0), ("v2.0.0", 1)):
        write_params(remote_repo / "params.yaml", tiny(params, seed=seed))
        run(["dvc", "repro", "export"], remote_repo)
        commit_run(remote_repo, f"train seed {seed}")
        run(["dvc", "push"], remote_repo)
        register(remote_repo, version, stage="prod" if version == "v1.0.0" else None)
        models[version] = (remote_repo / "models/model.pt").read_bytes()
        exports[version] = (remote_repo / "models/model.onnx").read_bytes()
    assert models["v1.0.0"] != models["v2.0.0"]
    out = tmp_path / "out"
    out.mkdir()
    url = str(remote_repo)
    run(["dvc", "artifacts", "get", url, "traffic-sign-net", "--rev", "v1.0.0", "-o", "v1.pt"], out)
    run(["dvc", "artifacts", "get", url, "traffic-sign-net", "--stage", "prod", "-o", "prod.pt"], out)
    run(["dvc", "get", url, "models/model.pt", "--rev", "traffic-sign-net@v2.0.0", "-o", "v2.pt"], out)
    assert (out / "v1.pt").read_bytes() == models["v1.0.0"] == (out / "prod.pt").read_bytes()
    assert (out / "v2.pt").read_bytes() == models["v2.0.0"]
    run(["dvc", "artifacts", "get", url, "traffic-sign-net-onnx", "--rev", "v1.0.0", "-o", "v1.onnx"], out)
    assert (out / "v1.onnx").read_bytes() == exports["v1.0.0"]
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", url, str(clone)], tmp_path)
    run(["git", "checkout", "-q", "traffic-sign-net@v1.0.0"], clone)
    run(["dvc", "pull", "models/model.pt"], clone)
    assert (clone / "models/model.pt").read_bytes() == models["v1.0.0"]

    # The gtsrb wrapper: latest by default, names the known versions when asked for another.
    from gtsrb.cli import main

    monkeypatch.chdir(out)
    assert main(["get-model", url, "-o", "latest.pt"]) == 0
    assert (out / "latest.pt").read_bytes() == models["v2.0.0"]
    assert main(["get-model", url, "--stage", "prod", "--format", "onnx"]) == 0  # -> model.onnx
    assert (out / "model.onnx").read_bytes() == exports["v1.0.0"]
    assert onnx_model.read(out / "model.onnx").checkpoint()["checkpoint_md5"] == md5sum(out / "v1.pt")
    assert main(["get-model", url, "--version", "v9.9.9"]) == 1
    assert "has no version v9.9.9 at " in capsys.readouterr().err
    assert main(["get-model", url, "--stage", "staging"]) == 1
    assert "(stages: prod=v1.0.0)" in capsys.readouterr().err

    # The model card knows the version by content, and refuses a model that is not dvc.lock's.
    monkeypatch.chdir(clone)
    assert main(["card", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["version"] == "v1.0.0" and card["stages"] == ["prod"] and card["md5"] == card["dvc_lock_md5"]
    assert card["params"]["seed"] == 0 and card["data"]["train_images"] > 0
    shutil.copy(out / "v2.pt", clone / "models/model.pt")
    assert main(["card"]) == 1
    assert "does not match dvc.lock" in capsys.readouterr().err


def test_server_stopped_mid_push_then_a_rerun_completes(tmp_path, dvc_env, s3):
    repo = tmp_path / "blobs"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    (repo / "blob").mkdir()
    for i in range(60):
        (repo / "blob" / f"{i:03d}.bin").write_bytes(os.urandom(256 * 1024))
    run(["dvc", "add", "blob"], repo)
    proxy = TcpProxy(s3.port).start()
    use_remote(repo, proxy, connect_timeout="2", read_timeout="5")
    commit_run(repo, "blobs")
    cache = tree_digest(repo / ".dvc" / "cache")
    # One attempt per request (botocore retries each file for seconds): the failure shows quickly.
    env = {**os.environ, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"}
    push = subprocess.Popen(
        ["dvc", "push", "-j", "2"],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 60
    while len(s3.client().list_objects_v2(Bucket=s3.bucket).get("Contents", [])) < 5:
        assert time.monotonic() < deadline and push.poll() is None, "push ended before it could be stopped"
        time.sleep(0.05)
    proxy.stop()  # the endpoint goes away mid-push: connections dropped, new ones refused
    output, _ = push.communicate(timeout=120)
    proxy.start()
    assert push.returncode != 0, output
    assert tree_digest(repo / ".dvc" / "cache") == cache
    run(["dvc", "push"], repo)
    for key, data in s3.objects().items():  # content-addressed: every object's key is its md5
        if "/files/md5/" in key and not key.endswith(".dir"):
            digest = key.split("/files/md5/")[1].replace("/", "")
            assert md5sum_bytes(data) == digest, key
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    run(["dvc", "pull"], clone)
    assert tree_digest(clone / "blob") == tree_digest(repo / "blob")


def md5sum_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data).hexdigest()


def test_missing_bucket_and_unreachable_remote_fail_clearly(remote_repo, s3):
    run(["dvc", "repro", "prepare"], remote_repo)
    use_remote(remote_repo, s3, bucket="no-such-bucket")
    proc = run(["dvc", "push"], remote_repo, check=False)
    assert proc.returncode != 0 and "The specified bucket does not exist" in proc.stderr
    use_remote(remote_repo, s3, connect_timeout="1")
    run(["dvc", "remote", "modify", "storage", "endpointurl", "http://127.0.0.1:9"], remote_repo)
    proc = run(["dvc", "push"], remote_repo, check=False)
    assert proc.returncode != 0 and "127.0.0.1:9" in proc.stderr + proc.stdout


def test_wrong_credentials_are_refused(remote_repo, tmp_path, monkeypatch):
    """A second moto server with IAM authentication on: only the created key may write."""
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "4")
    server = S3Server(tmp_path / "auth-moto.log", bucket="locked").start()
    try:
        server.create_bucket()
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=server.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        iam.create_user(UserName="ci")
        key = iam.create_access_key(UserName="ci")["AccessKey"]
        iam.put_user_policy(
            UserName="ci",
            PolicyName="all",
            PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
            ),
        )
        run(["dvc", "repro", "prepare"], remote_repo)
        use_remote(remote_repo, server, bucket=server.bucket)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        proc = run(["dvc", "push"], remote_repo, check=False, env=dict(os.environ))
        assert proc.returncode != 0
        assert "InvalidAccessKeyId" in proc.stderr + proc.stdout or "403" in proc.stderr + proc.stdout
        assert "wrong" not in (proc.stderr + proc.stdout).replace("AKIAWRONGWRONGWRONG1", "")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        run(["dvc", "push"], remote_repo, env=dict(os.environ))
    finally:
        server.stop()
