"""The alerting rules and the dashboard on the real thing: promtool checks and unit-tests
deploy/prometheus/alerts.yml; a real Prometheus scrapes a real `gtsrb serve` (two workers) fed
normal then skewed traffic, and its alerts go from inactive to firing; the Grafana dashboard's
expressions name only metrics the server exports, and render.py draws every panel from that
Prometheus. Needs Debian's prometheus package (the server and promtool): without it these
tests skip, in CI (CI set) they fail."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import stop_process
from tests.serve.conftest import Server, free_port
from tests.serve.monitoring_models import confident_model, prior_of, sign_png, stamp_prior

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "gtsrb.json"
RENDER = ROOT / "deploy" / "grafana" / "render.py"
SHORT_FOR = "3s"  # every `for:` of the live test's copy of the rules (production's: minutes)
ROUNDS = 8  # /predict/batch requests of each load
# README's picture of the dashboard: the same story, each load paced over that many seconds,
# rendered into that file:
#   GTSRB_DASHBOARD_SECONDS=150 GTSRB_DASHBOARD_PNG=deploy/grafana/dashboard.png \
#       python -m pytest tests/serve/test_prometheus.py
PICTURE_SECONDS = float(os.environ.get("GTSRB_DASHBOARD_SECONDS", "0"))
PICTURE = os.environ.get("GTSRB_DASHBOARD_PNG")


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is not installed: apt-get install -y prometheus (Debian's package has the server and promtool)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    return path


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = need("promtool")
    check = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert check.returncode == 0 and "SUCCESS: 7 rules found" in check.stdout, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", ALERTS_TEST.name], capture_output=True, text=True, cwd=ALERTS_TEST.parent
    )
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr


class Prometheus:
    """A real Prometheus on 127.0.0.1 (free port, temp data), stopped by its PID."""

    def __init__(self, folder: Path, target: str, rules: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "gtsrb", "static_configs": [{"targets": [target]}]}],
        }
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = folder / "prometheus.log"
        self.proc = subprocess.Popen(
            [
                need("prometheus"),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )
        self.until(lambda: httpx.get(self.url + "/-/ready", timeout=1).status_code == 200, 60, "ready")

    def until(self, condition, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"prometheus exited:\n{self.log.read_text()[-3000:]}"
            try:
                found = condition()
                if found:
                    return found
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"prometheus: not {what} after {timeout:.0f}s"
            time.sleep(0.25)

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10).json()
        assert r["status"] == "success", r
        return r["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def alert_states(self) -> dict[str, str]:
        """Every alerting rule's state: inactive, pending or firing."""
        groups = httpx.get(self.url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
        return {
            rule["name"]: rule["state"] for g in groups for rule in g["rules"] if rule["type"] == "alerting"
        }

    def stop(self) -> None:
        stop_process(self.proc)


def short_for(rules: Path, out: Path) -> Path:
    """A copy of ``rules`` with every `for:` SHORT_FOR: the same expressions, so that the live
    test's half minute of traffic can fire what production waits minutes for."""
    doc = yaml.safe_load(rules.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def load(server: Server, images: list[bytes], rounds: int, threads: int = 2) -> None:
    """``rounds`` /predict/batch requests of ``images`` from ``threads`` clients, a new
    connection each (so that both workers take some), bounded and on 127.0.0.1 only. With
    PICTURE_SECONDS, one request a second from one client for that long instead."""
    failures: list[str] = []

    def client(n: int, pace: float = 0) -> None:
        for _ in range(n):
            started = time.monotonic()
            files = [("files", (f"{i}.png", data)) for i, data in enumerate(images)]
            r = httpx.post(server.url + "/predict/batch", files=files, timeout=60)
            if r.status_code != 200:
                failures.append(r.text)
            time.sleep(max(0, pace - (time.monotonic() - started)))

    if PICTURE_SECONDS:
        client(round(PICTURE_SECONDS), pace=1.0)
        assert not failures, failures[:2]
        return
    workers = [threading.Thread(target=client, args=(rounds // threads,)) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not failures, failures[:2]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> dict:
    """The whole story, recorded for the tests below: Prometheus scraping a 2-worker server;
    normal traffic (alert states after it), skewed traffic (until the alerts fire), the
    dashboard rendered, then the server stopped (until "down" fires)."""
    need("promtool")
    need("prometheus")
    folder = tmp_path_factory.mktemp("prometheus")
    # Normal traffic: real-looking signs of every class, 1 to 3 of each (85 images), a model
    # that knows them and whose class prior is their shares: an untrained model does not read
    # signs, so it is given the answers (confident_model) and the prior they make, as a trained
    # model's traffic would match its training set. Skewed: one darkened stop sign, over and over.
    normal = [(sign_png(c, seed=s), c) for c in range(43) for s in range(1 + c % 3)]
    dark = sign_png(14, seed=0, dark=0.12)
    model = confident_model(
        folder / "model.onnx", [(sign_png(c, seed=s), c) for c in range(43) for s in range(3)], [dark]
    )
    stamp_prior(model, prior_of([c for _, c in normal]))
    window = 2 * len(normal)  # whole cycles of the normal traffic: its drift is 0 in each worker
    server = Server(model, "--workers", "2", "--drift-window", str(window), "--max-batch", "128").wait_ready()
    prometheus = None
    rounds = round(PICTURE_SECONDS) or ROUNDS
    found: dict = {"window": window, "answers": len(normal) * rounds}
    try:
        prometheus = Prometheus(folder, f"127.0.0.1:{server.port}", short_for(ALERTS, folder / "alerts.yml"))
        prometheus.until(
            lambda: prometheus.scalar('min(gtsrb_ready{job="gtsrb"})') == 1, 60, "scraping a ready server"
        )
        found["start"] = time.time()

        load(server, [image for image, _ in normal], ROUNDS)
        for bad in (b"not an image", b""):  # a few rejected uploads for the errors panel
            httpx.post(server.url + "/predict", files={"file": ("x.png", bad)})
        total = f'sum(gtsrb_confidence_count{{job="gtsrb"}}) >= {found["answers"]}'
        prometheus.until(lambda: prometheus.query(total), 30, "seeing the normal traffic")
        time.sleep(2 * int(SHORT_FOR[:-1]))  # longer than any `for:`: what was to fire has fired
        found["normal"] = prometheus.alert_states()
        found["normal_psi"] = prometheus.scalar('max(gtsrb_drift_psi{job="gtsrb"})')

        load(server, [dark] * len(normal), ROUNDS)
        found["skewed_psi"] = prometheus.until(
            lambda: prometheus.scalar('max(gtsrb_drift_psi{job="gtsrb"}) > 0.25'), 30, "seeing the drift"
        )
        wanted = ("GtsrbPredictionDrift", "GtsrbLowConfidence")
        prometheus.until(lambda: all(prometheus.alert_states()[a] == "firing" for a in wanted), 60, "firing")
        found["skewed"] = prometheus.alert_states()
        found["low_share"] = prometheus.scalar(
            'sum(increase(gtsrb_low_confidence_total{job="gtsrb"}[10m])) / sum(increase(gtsrb_confidence_count{job="gtsrb"}[10m]))'
        )
        found["metrics"] = httpx.get(server.url + "/metrics", timeout=10).text
        found["names"] = httpx.get(prometheus.url + "/api/v1/label/__name__/values", timeout=10).json()[
            "data"
        ]
        found["end"] = time.time()
        png = folder / "dashboard.png"
        minutes = f"{(found['end'] - found['start']) / 60 + 0.2:.2f}"
        rendered = subprocess.run(
            [
                *(sys.executable, str(RENDER), "--prometheus", prometheus.url, "-o", str(png)),
                *("--rate-interval", "15s" if PICTURE_SECONDS else "5s"),
                *("--minutes", minutes, "--end", str(found["end"])),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        found["render"] = (rendered, png)
        if PICTURE and rendered.returncode == 0:
            shutil.copyfile(png, PICTURE)

        server.stop()
        prometheus.until(
            lambda: prometheus.alert_states()["GtsrbServerDown"] == "firing", 30, "seeing it down"
        )
        found["stopped"] = prometheus.alert_states()
    finally:
        server.stop()
        if prometheus is not None:
            prometheus.stop()
    return found


def test_normal_traffic_fires_no_alert(stack):
    assert stack["normal_psi"] == pytest.approx(0, abs=1e-3)  # each worker's window: whole cycles
    states = stack["normal"]
    assert set(states) == {
        "GtsrbServerDown",
        "GtsrbNotReady",
        "GtsrbHighErrorRate",
        "GtsrbHighLatency",
        "GtsrbLowConfidence",
        "GtsrbPredictionDrift",
        "GtsrbMonitoringSkipped",
    }
    for alert in ("GtsrbServerDown", "GtsrbNotReady", "GtsrbHighErrorRate", "GtsrbLowConfidence"):
        assert states[alert] == "inactive", states
    assert states["GtsrbPredictionDrift"] == "inactive" and states["GtsrbMonitoringSkipped"] == "inactive"


def test_skewed_traffic_fires_drift_and_low_confidence(stack):
    states = stack["skewed"]
    assert states["GtsrbPredictionDrift"] == "firing" and states["GtsrbLowConfidence"] == "firing", states
    assert stack["skewed_psi"] > 1  # one class only: far past 0.25
    assert stack["low_share"] == pytest.approx(0.5, abs=0.05)  # half of all answers were dark
    assert states["GtsrbServerDown"] == "inactive" and states["GtsrbHighErrorRate"] == "inactive"


def test_a_stopped_server_fires_server_down(stack):
    assert stack["stopped"]["GtsrbServerDown"] == "firing"


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: its identifiers, less functions,
    aggregation clauses, label matchers, strings, durations and keywords."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*(?!\s*\()\b", expr)
    return {w for w in words if w not in {"and", "or", "unless", "bool", "offset"}}


def test_the_dashboard_reads_only_metrics_the_server_exports(stack):
    dashboard = json.loads(DASHBOARD.read_text())
    exported = {s.name for f in text_string_to_metric_families(stack["metrics"]) for s in f.samples}
    assert {"gtsrb_confidence_bucket", "gtsrb_drift_psi", "gtsrb_low_confidence_total"} <= exported
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, target["expr"]
            used |= names
    prometheus_own = {"up"}  # what Prometheus records of every scrape
    assert used - prometheus_own <= exported, sorted(used - prometheus_own - exported)
    assert used <= set(stack["names"]), sorted(used - set(stack["names"]))
    assert {"gtsrb_drift_psi", "gtsrb_predictions_total", "gtsrb_request_seconds_bucket"} <= used


def test_render_draws_every_panel_from_prometheus(stack):
    rendered, png = stack["render"]
    assert rendered.returncode == 0, rendered.stderr
    panels = len(json.loads(DASHBOARD.read_text())["panels"])
    assert f"{panels} of {panels} panels with data" in rendered.stdout, rendered.stdout
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width == 1440 and image.height > 600
    assert png.stat().st_size < 200_000
