"""A schemathesis fuzz pass over the OpenAPI schema, and the demo page in a real Chromium."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import png


def test_schemathesis_finds_no_server_error(server, tmp_path):
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert st, "schemathesis is not installed (pip install -e '.[dev]')"
    proc = subprocess.run(
        [
            st,
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--generation-database",
            "none",
            "--phases",
            "examples,coverage,fuzzing",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-2000:]
    assert server.proc.poll() is None


CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_demo_page_shows_the_prediction_of_an_uploaded_image(server, tmp_path):
    if not Path(CHROMIUM).exists():
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from playwright.sync_api import sync_playwright

    image = tmp_path / "stop.png"
    image.write_bytes(png(size=(48, 48)))
    expected = httpx.post(server.url + "/predict", files={"file": ("s.png", image.read_bytes())}).json()
    with sync_playwright() as p:
        # launch() gives Chromium a fresh, empty temporary profile of its own.
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#top1", timeout=30_000)
            top1 = page.inner_text("#top1")
            rows = page.locator("#results table tr").count()
            page.screenshot(path=str(tmp_path / "demo.png"))
        finally:
            browser.close()
    assert expected["class_name"] in top1 and f"class {expected['class_id']}" in top1
    assert rows == 1 + 5  # header + top 5
