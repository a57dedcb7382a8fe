"""The aarch64 leg: commands run as aarch64 under qemu-user emulation, in the arm64 Debian root
filesystem that `bash .ci/provision-arm64` builds (PyPI's torch 2.3.0, with oneDNN built with the
Arm Compute Library and OpenBLAS, and numpy<2, as the Arm backend images ship).

Each ``arm64.run`` gets a fresh copy of this working tree at /work/gtsrb, installed editable in
the rootfs's venv, on a copy-on-write overlay thrown away afterwards: runs do not see each
other's files. Files go in and out through ``arm64.exchange``, a host folder bound at /exchange.

Emulation says what runs and what it computes (correctness, which kernels), never how fast:
timings under qemu are about 100x slower and not an Arm core's, so never report them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / ".ci" / "provision-arm64"
HINT = "run `bash .ci/provision-arm64`"
EXCHANGE = "/exchange"  # where arm64.exchange is inside


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "arm64: runs commands as aarch64 under qemu-user (bash .ci/provision-arm64 first)"
    )


def unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Arm64:
    root: Path  # the provisioned rootfs (never written: runs get an overlay of it)
    exchange: Path  # bound at /exchange inside every run

    def run(
        self,
        cmd: str | Sequence[str],
        env: Mapping[str, str] | None = None,
        timeout: float = 900,
        cpu: str | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` (a shell command line, or an argv) as aarch64 in /work/gtsrb inside the rootfs.

        ``env`` adds variables (the host's environment does not go in); ``cpu`` is the QEMU CPU
        model (default the script's, "neoverse-n1"; "max" is qemu's own, with 512-bit SVE, under
        which oneDNN picks its own kernels over ACL's). Output is captured as text; the
        return code is the command's. On ``timeout`` everything the run started is killed and
        subprocess.TimeoutExpired raised; ``check`` raises AssertionError on a non-zero exit.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        options = ["--exchange", str(self.exchange)]
        if cpu:
            options += ["--cpu", cpu]
        for name, value in (env or {}).items():
            options += ["--env", f"{name}={value}"]
        full = ["bash", str(SCRIPT), "run", *options, "--", *argv]
        # Its own session: on a timeout the whole group goes (the script, then its namespace).
        proc = subprocess.Popen(
            full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    stdout, stderr = proc.communicate(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            raise subprocess.TimeoutExpired(full, timeout, output=stdout, stderr=stderr) from None
        result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{argv} failed on aarch64 ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )
        return result


@pytest.fixture(scope="session")
def arm64(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arm64]:
    """The provisioned arm64 rootfs; skips (fails under CI) with the hint to provision it."""
    if os.geteuid() != 0:
        unavailable(f"the aarch64 tests need root (mount, chroot): {HINT} and pytest as root")
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=120)
    if status.returncode != 0:
        reason = status.stderr.strip().removeprefix("provision-arm64: error: ")
        unavailable(reason if HINT in reason else f"{reason}: {HINT}")
    yield Arm64(root=Path(status.stdout.strip()), exchange=tmp_path_factory.mktemp("arm64-exchange"))
