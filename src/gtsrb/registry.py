"""Model versions: the model card of a checkpoint, and fetching a released version.

Releases follow GTO's git-tag convention for the ``traffic-sign-net`` artifact declared in
dvc.yaml: ``traffic-sign-net@v1.2.0`` registers a version, ``traffic-sign-net#prod#N`` assigns
a stage. A model file is matched to its version by content: the md5 that ``dvc.lock``
recorded for it (``models/model.pt`` or its export ``models/model.onnx``) at the tagged commit.
The ONNX file is the declared artifact ``traffic-sign-net-onnx``, released with the same
version as the checkpoint (README, Get a model version).

No torch at import: the server that runs ONNX Runtime shows its model card too.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from gtsrb.errors import GtsrbError
from gtsrb.fsutil import md5sum
from gtsrb.runtimes import RUNTIMES

ARTIFACT = "traffic-sign-net"
MODEL_PATH, ONNX_PATH = "models/model.pt", "models/model.onnx"
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


def get_model(
    url: str, out: str | Path, version: str | None = None, stage: str | None = None, onnx: bool = False
) -> str:
    """Download the checkpoint of ``version`` (or of the one in ``stage``) with `dvc artifacts get`;
    ``onnx``: its ONNX export instead, the file the same release tag's dvc.lock recorded."""
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
    if onnx:  # one release tag versions both files: no second registration needed for this
        cmd = ["dvc", "get", url, ONNX_PATH, "--rev", f"{ARTIFACT}@{version}", "-o", str(out), "--force"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GtsrbError(f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()}")
    return version


def _lock_md5(lock_text: str | None, path: str = MODEL_PATH) -> str | None:
    """The md5 a dvc.lock recorded for the output ``path``."""
    if not lock_text:
        return None
    lock = yaml.safe_load(lock_text) or {}
    for stage in lock.get("stages", {}).values():
        for out in stage.get("outs", []):
            if out.get("path") == path:
                return out.get("md5")
    return None


def _load(model_path: Path) -> dict[str, Any]:
    """The checkpoint fields of a model file: models.py's checkpoint, or an ONNX export's metadata."""
    if model_path.suffix == ".onnx":
        from gtsrb import onnx_model

        return onnx_model.read(model_path).checkpoint()
    from gtsrb import models

    return models.load_checkpoint(model_path)[1]


def card(
    model_path: str | Path, repo: str | Path = ".", verify: bool = True, ckpt: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a model file is (a checkpoint or its ONNX export): arch, version, training data and
    params, test metrics, md5.

    ``ckpt``: the checkpoint fields already loaded from ``model_path`` (saves loading it twice).
    """
    model_path, repo = Path(model_path), Path(repo)
    if ckpt is None:
        ckpt = _load(model_path)
    lock_path = ONNX_PATH if model_path.suffix == ".onnx" else MODEL_PATH
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
    lock_md5 = (
        _lock_md5((repo / "dvc.lock").read_text(), lock_path) if (repo / "dvc.lock").is_file() else None
    )
    info["dvc_lock_md5"] = lock_md5
    if verify and lock_md5 and model_path.resolve() == (repo / lock_path).resolve() and lock_md5 != md5:
        raise GtsrbError(
            f"{model_path}: md5 {md5} does not match dvc.lock ({lock_md5}): this is not the model this "
            f"commit recorded; run `dvc pull {lock_path}` (or `dvc checkout {lock_path}`)"
        )
    ours = {md5, ckpt.get("checkpoint_md5")}  # an export's test metrics, and its checkpoint's
    if in_git:
        tags = remote_tags(str(repo))
        matching = [
            v
            for v in versions(tags)
            if _lock_md5(_git(repo, "show", f"{ARTIFACT}@{v}:dvc.lock"), lock_path) == md5
        ]
        if matching:
            info["version"] = matching[-1]
            info["stages"] = sorted(s for s, v in stages(tags).items() if v == info["version"])
            for runtime in RUNTIMES:
                text = _git(repo, "show", f"{ARTIFACT}@{info['version']}:{_details(runtime)}")
                if text:
                    info["test"][runtime] = _test_summary(json.loads(text))
    for runtime in RUNTIMES:
        path = repo / _details(runtime)
        if runtime not in info["test"] and path.is_file():
            details = json.loads(path.read_text())
            if details.get("model_md5") in ours:
                info["test"][runtime] = _test_summary(details)
    return info


def _details(runtime: str) -> str:
    return f"metrics/test-{runtime}/details.json"


def _test_summary(details: dict) -> dict:
    latency = {k: v["median_ms"] for k, v in details.get("latency", {}).items()}
    return {
        "accuracy": details.get("accuracy"),
        "macro_f1": details.get("macro_f1"),
        "median_ms": latency,
        "inference_path": details.get("runtime", {}).get("inference_path"),
    }


def _framings(value: Any) -> str:
    """``{"roi": a, "whole": b}`` as "a (ROI crop), b (whole image)"; anything else as it is."""
    if isinstance(value, dict) and set(value) == {"roi", "whole"}:
        return f"{value['roi']} (ROI crop), {value['whole']} (whole image)"
    return str(value)


def render(info: dict[str, Any]) -> str:
    lines = [
        f"# {ARTIFACT} {info['version'] or '(unreleased)'}",
        "",
        f"- file: {info['path']} (md5 {info['md5']}"
        + (", matches dvc.lock)" if info["dvc_lock_md5"] == info["md5"] else ")"),
        f"- arch: {info['arch']}, {info['image_size']}x{info['image_size']} RGB input, {info['classes']} classes",
        f"- stages: {', '.join(info['stages']) or 'none'}",
        f"- trained with torch {info['torch_version']}; validation accuracy {_framings(info['val_accuracy'])}",
    ]
    if info["data"]:
        lines.append("- data: " + ", ".join(f"{k} {v}" for k, v in sorted(info["data"].items())))
    if info["params"]:
        lines.append("- params: " + ", ".join(f"{k}={v}" for k, v in info["params"].items()))
    for backend, t in info["test"].items():
        latency = ", ".join(f"{k} {v} ms" for k, v in t["median_ms"].items())
        lines.append(
            f"- test ({backend}): accuracy {_framings(t['accuracy'])}, macro F1 {_framings(t['macro_f1'])}, "
            f"median latency {latency} ({t['inference_path']})"
        )
    if not info["test"]:
        lines.append("- test: no metrics recorded for this exact file")
    return "\n".join(lines) + "\n"
