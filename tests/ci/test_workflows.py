"""The workflows pass actionlint (with shellcheck) and zizmor, and keep to least privilege."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}:/usr/bin:/usr/local/bin")
    if not path:
        message = f"{name} is not installed (pip install -e '.[dev]'; apt-get install shellcheck)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return path


def test_actionlint_with_shellcheck():
    proc = subprocess.run(
        [tool("actionlint"), "-shellcheck", tool("shellcheck"), "-no-color"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_zizmor_has_no_findings():
    proc = subprocess.run(
        [tool("zizmor"), "--offline", "--no-progress", ".github/"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "No findings to report" in proc.stdout + proc.stderr


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege(workflow):
    text = workflow.read_text()
    spec = yaml.safe_load(text)
    assert spec["permissions"] == {}, "default to no permissions; grant per job"
    for name, job in spec["jobs"].items():
        assert "permissions" in job, f"job {name} must declare its permissions"
        for step in job["steps"]:
            if "uses" in step and not step["uses"].startswith("./"):
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
            if "run" in step:
                assert "${{" not in step["run"], f"{name}: pass values through env, not into the script"
            if step.get("uses", "").startswith("actions/checkout"):
                assert step["with"]["persist-credentials"] is False
    assert "concurrency" in spec


def test_scripts_the_workflows_call_exist():
    for workflow in WORKFLOWS:
        for script in re.findall(r"bash (\.ci/gha/[\w.-]+\.sh)", workflow.read_text()):
            assert (ROOT / script).is_file(), script


def test_shellcheck_the_ci_scripts():
    scripts = [str(p) for p in [ROOT / ".ci" / "run", *sorted((ROOT / ".ci").rglob("*.sh"))]]
    scripts += [str(p) for p in (ROOT / ".ci").glob("provision-*")]
    proc = subprocess.run([tool("shellcheck"), "-x", *scripts], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
