"""Model versions: the model card of a checkpoint, and fetching a released version.

Releases follow GTO's git-tag convention for the ``traffic-sign-net`` artifact declared in
dvc.yaml: ``traffic-sign-net@v1.2.0`` registers a version, ``traffic-sign-net#prod#N`` assigns
a stage. A checkpoint is matched to its version by content: the md5 that ``dvc.lock``
recorded for ``models/model.pt`` at the tagged commit.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from gtsrb import models
from gtsrb.errors import GtsrbError
from gtsrb.fsutil import md5sum

ARTIFACT = "traffic-sign-net"
MODEL_PATH = "models/model.pt"
VERSION_TAG = re.compile(rf"^{re.escape(ARTIFACT)}@(v\d+\.\d+\.\d+)$")
STAGE_TAG = re.compile(rf"^{re.escape(ARTIFACT)}#([\w-]+)#(\d+)$")


def _git(repo: str | Path, *args: str) -> str | None:
    """git's output, or None if it fails or git is not installed (the server image has none)."""
    try:
        proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def remote_tags(url: str) -> dict[str, str]:
    """Tag name -> commit for the artifact's tags in the git repo at ``url`` (no clone)."""
    out = subprocess.run(["git", "ls-remote", "--tags", url], capture_output=True, text=True)
    if out.returncode != 0:
        raise GtsrbError(f"cannot read the tags of {url}: {out.stderr.strip() or 'git ls-remote failed'}")
    tags: dict[str, str] = {}
    for line in out.stdout.splitlines():
        sha, ref = line.split("\t")
        name = ref.removeprefix("refs/tags/")
        if name.endswith("^{}"):  # annotated tag: the commit it points to wins
            tags[name[:-3]] = sha
        elif name not in tags:
            tags[name] = sha
    return {t: sha for t, sha in tags.items() if VERSION_TAG.match(t) or STAGE_TAG.match(t)}


def versions(tags: dict[str, str]) -> list[str]:
    found = [m.group(1) for t in tags if (m := VERSION_TAG.match(t))]
    return sorted(found, key=lambda v: tuple(int(x) for x in v[1:].split(".")))


def stages(tags: dict[str, str]) -> dict[str, str]:
    """Stage -> the version its latest assignment points at."""
    by_commit = {sha: m.group(1) for t, sha in tags.items() if (m := VERSION_TAG.match(t))}
    latest: dict[str, tuple[int, str]] = {}
    for t, sha in tags.items():
        if (m := STAGE_TAG.match(t)) and sha in by_commit:
            n = int(m.group(2))
            if m.group(1) not in latest or n > latest[m.group(1)][0]:
                latest[m.group(1)] = (n, by_commit[sha])
    return {stage: version for stage, (_, version) in latest.items()}


def get_model(url: str, out: str | Path, version: str | None = None, stage: str | None = None) -> str:
    """Download the model of ``version`` (or of the one in ``stage``) with `dvc artifacts get`."""
    tags = remote_tags(url)
    known = versions(tags)
    if stage is not None:
        assigned = stages(tags)
        if stage not in assigned:
            raise GtsrbError(
                f"no version of {ARTIFACT} is in stage {stage!r} at {url} "
                f"(stages: {', '.join(f'{s}={v}' for s, v in sorted(assigned.items())) or 'none'})"
            )
        version = assigned[stage]
    if version is None:
        if not known:
            raise GtsrbError(f"{url} has no released version of {ARTIFACT} yet")
        version = known[-1]
    if version not in known:
        raise GtsrbError(
            f"{ARTIFACT} has no version {version} at {url} (known versions: {', '.join(known) or 'none'})"
        )
    cmd = ["dvc", "artifacts", "get", url, ARTIFACT, "--rev", version, "-o", str(out), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GtsrbError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return version


def _lock_md5(lock_text: str | None) -> str | None:
    if not lock_text:
        return None
    lock = yaml.safe_load(lock_text) or {}
    for out in lock.get("stages", {}).get("train", {}).get("outs", []):
        if out.get("path") == MODEL_PATH:
            return out.get("md5")
    return None


def card(
    model_path: str | Path, repo: str | Path = ".", verify: bool = True, ckpt: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a checkpoint is: arch, version, training data and params, test metrics, md5.

    ``ckpt``: the checkpoint already loaded from ``model_path`` (saves loading it twice).
    """
    model_path, repo = Path(model_path), Path(repo)
    if ckpt is None:
        _, ckpt = models.load_checkpoint(model_path)
    md5 = md5sum(model_path)
    info: dict[str, Any] = {
        "path": str(model_path),
        "md5": md5,
        "arch": ckpt["arch"],
        "image_size": ckpt["image_size"],
        "torch_version": ckpt.get("torch_version"),
        "classes": len(ckpt["class_names"]),
        "params": ckpt.get("params", {}),
        "data": ckpt.get("data", {}),
        "val_accuracy": ckpt.get("val_accuracy"),
        "version": None,
        "stages": [],
        "test": {},
    }
    in_git = _git(repo, "rev-parse", "--git-dir") is not None
    lock_md5 = _lock_md5((repo / "dvc.lock").read_text()) if (repo / "dvc.lock").is_file() else None
    info["dvc_lock_md5"] = lock_md5
    if verify and lock_md5 and model_path.resolve() == (repo / MODEL_PATH).resolve() and lock_md5 != md5:
        raise GtsrbError(
            f"{model_path}: md5 {md5} does not match dvc.lock ({lock_md5}): this is not the model this "
            f"commit recorded; run `dvc pull {MODEL_PATH}` (or `dvc checkout {MODEL_PATH}`)"
        )
    if in_git:
        tags = remote_tags(str(repo))
        matching = [
            v for v in versions(tags) if _lock_md5(_git(repo, "show", f"{ARTIFACT}@{v}:dvc.lock")) == md5
        ]
        if matching:
            info["version"] = matching[-1]
            info["stages"] = sorted(s for s, v in stages(tags).items() if v == info["version"])
            for backend in ("openblas", "acl"):
                text = _git(repo, "show", f"{ARTIFACT}@{info['version']}:metrics/test-{backend}.json")
                if text:
                    info["test"][backend] = _test_summary(json.loads(text))
    for backend in ("openblas", "acl"):
        path = repo / "metrics" / f"test-{backend}.json"
        if backend not in info["test"] and path.is_file():
            metrics = json.loads(path.read_text())
            if metrics.get("model_md5") == md5:
                info["test"][backend] = _test_summary(metrics)
    return info


def _test_summary(metrics: dict) -> dict:
    latency = {k: v["median_ms"] for k, v in metrics.get("latency", {}).items()}
    return {
        "accuracy": metrics.get("accuracy"),
        "macro_f1": metrics.get("macro_f1"),
        "median_ms": latency,
        "inference_path": metrics.get("runtime", {}).get("inference_path"),
    }


def render(info: dict[str, Any]) -> str:
    lines = [
        f"# {ARTIFACT} {info['version'] or '(unreleased)'}",
        "",
        f"- file: {info['path']} (md5 {info['md5']}"
        + (", matches dvc.lock)" if info["dvc_lock_md5"] == info["md5"] else ")"),
        f"- arch: {info['arch']}, {info['image_size']}x{info['image_size']} RGB input, {info['classes']} classes",
        f"- stages: {', '.join(info['stages']) or 'none'}",
        f"- trained with torch {info['torch_version']}; validation accuracy {info['val_accuracy']}",
    ]
    if info["data"]:
        lines.append("- data: " + ", ".join(f"{k} {v}" for k, v in sorted(info["data"].items())))
    if info["params"]:
        lines.append("- params: " + ", ".join(f"{k}={v}" for k, v in info["params"].items()))
    for backend, t in info["test"].items():
        latency = ", ".join(f"{k} {v} ms" for k, v in t["median_ms"].items())
        lines.append(
            f"- test ({backend}): accuracy {t['accuracy']}, macro F1 {t['macro_f1']}, "
            f"median latency {latency} ({t['inference_path']})"
        )
    if not info["test"]:
        lines.append("- test: no metrics recorded for this exact file")
    return "\n".join(lines) + "\n"
