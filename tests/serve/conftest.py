"""A real `gtsrb serve` process on 127.0.0.1 for the HTTP tests."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gtsrb import export, models, onnx_model
from gtsrb.errors import GtsrbError
from gtsrb.fsutil import md5sum
from gtsrb.serve import wait_ready
from tests.conftest import stop_process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_checkpoint(path: Path, arch: str = "traffic_sign_net", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    ckpt = models.make_checkpoint(models.build(arch), arch, 32, [0.5] * 3, [0.25] * 3, {"seed": seed})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def make_onnx(path: Path, checkpoint: Path | None = None, **kwargs) -> Path:
    """The ONNX export of ``checkpoint`` (default: a fresh ``make_checkpoint(**kwargs)`` beside
    it), as the export stage writes it (parity is the export stage's own test)."""
    checkpoint = checkpoint or make_checkpoint(path.with_suffix(".pt"), **kwargs)
    model, ckpt = models.load_checkpoint(checkpoint)
    path.write_bytes(export.served_onnx(model, ckpt["image_size"], 17))
    onnx_model.stamp(path, onnx_model.metadata(ckpt, md5sum(checkpoint), 17))
    return path


def png(size=(40, 36), color=(200, 20, 30), fmt="PNG") -> bytes:
    rng = np.random.default_rng(sum(color))
    pixels = (rng.integers(0, 40, (size[1], size[0], 3)) + np.array(color)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def serve_command(model: Path, port: int, *args: str) -> list[str]:
    """`gtsrb serve` on ``model`` and ``port`` of 127.0.0.1, with ``args``."""
    return [sys.executable, "-m", "gtsrb.cli", "serve", "--model", str(model), "--port", str(port), *args]


class Server:
    def __init__(self, model: Path, *args: str):
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = serve_command(model, self.port, *args)
        self.log = model.parent / f"serve-{self.port}.log"
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "GTSRB_MODEL_VERSION": "v0.0.0-test"},
        )

    def wait_ready(self, timeout: float = 120) -> Server:
        try:
            wait_ready(self.url, timeout, self.proc)
        except GtsrbError as exc:
            raise AssertionError(f"{exc}:\n{self.log.read_text()}") from None
        return self

    def stop(self) -> None:
        stop_process(self.proc)


SMALL_LIMITS = ("--max-upload-mb", "1", "--max-batch", "4", "--threads", "1")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    """The server as deployed: the ONNX export on ONNX Runtime (the default runtime)."""
    model = make_onnx(tmp_path_factory.mktemp("serve") / "models" / "model.onnx")
    s = Server(model, *SMALL_LIMITS).wait_ready()
    yield s
    s.stop()
