"""Model monitoring (serve/monitoring.py): its parts, then /metrics of real servers: one worker
with a class prior, a model without one, monitoring off, and two workers (multiprocess mode)."""

from __future__ import annotations

import asyncio
import time
from collections import deque

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gtsrb.classes import CLASS_NAMES, NUM_CLASSES
from gtsrb.serve.monitoring import (
    FLUSH_IMAGES,
    PSI_EPSILON,
    BatchHistogram,
    Monitor,
    Window,
    psi,
    usable_prior,
)
from gtsrb.serve.uploads import decode
from tests.serve.conftest import Server, make_onnx
from tests.serve.monitoring_models import confident_model, prior_of, sign_png, stamp_prior

VERSION = "v0.0.0-test"


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """/metrics text -> {(sample name, its labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset({"model_version": VERSION, **labels}.items())))


def metrics(server: Server) -> dict:
    return samples(httpx.get(server.url + "/metrics", timeout=30).text)


def batch(server: Server, images: list[bytes], **params) -> list[dict]:
    files = [("files", (f"{i}.png", data)) for i, data in enumerate(images)]
    r = httpx.post(server.url + "/predict/batch", files=files, params=params, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"]


# --- the parts --------------------------------------------------------------------------------


def test_window_counts_the_classes_of_the_last_n_answers():
    rng = np.random.default_rng(0)
    window, last = Window(7, 5), deque(maxlen=7)
    for _ in range(300):
        classes = rng.integers(0, 5, rng.integers(1, 12))
        window.add(classes)
        last.extend(classes.tolist())
        assert window.counts.tolist() == np.bincount(list(last), minlength=5).tolist()
        assert window.filled == len(last) and window.full == (len(last) == 7)


def test_psi_is_zero_for_the_prior_and_large_for_one_class():
    prior = np.full(NUM_CLASSES, 1 / NUM_CLASSES)
    assert psi(np.full(NUM_CLASSES, 3), prior) == pytest.approx(0, abs=1e-12)
    one = np.zeros(NUM_CLASSES)
    one[14] = 100
    # (1 - 1/43) ln 43 for the class, (eps - 1/43) ln(43 eps) for each of the 42 empty ones
    expected = (1 - 1 / 43) * np.log(43) + 42 * (PSI_EPSILON - 1 / 43) * np.log(43 * PSI_EPSILON)
    assert psi(one, prior) == pytest.approx(expected) and psi(one, prior) > 5


def test_usable_prior():
    shares, why = usable_prior([2.0] * NUM_CLASSES, NUM_CLASSES)
    assert why is None and shares.sum() == pytest.approx(1) and shares[0] == pytest.approx(1 / 43)
    for bad, reason in (
        (None, "has no class prior"),
        ([0.1] * 42, "unusable"),
        ([float("nan")] * NUM_CLASSES, "unusable"),
        ([-1.0] + [1.0] * 42, "unusable"),
        ("high", "not a list of numbers"),
        ({"a": 1}, "not a list of numbers"),
    ):
        shares, why = usable_prior(bad, NUM_CLASSES)
        assert shares is None and reason in why and why.endswith("no drift score")


def test_a_batch_histogram_counts_as_observe_does():
    values = np.random.default_rng(1).uniform(-0.5, 1.5, 200)
    values[:3] = [0.5, 1.0, 0.1]  # on bucket bounds: le is <=

    def exported(observe) -> dict:
        registry = CollectorRegistry()
        child = Histogram("h", "h", ["v"], registry=registry, buckets=(0.1, 0.5, 0.9, 1.0)).labels("x")
        observe(child)
        return {k: v for k, v in samples(generate_latest(registry).decode()).items() if k[0] != "h_created"}

    one_by_one = exported(lambda child: [child.observe(v) for v in values.tolist()])
    at_once = exported(lambda child: BatchHistogram(child).observe(values))
    assert at_once == pytest.approx(one_by_one)  # the same counts, the sum but for rounding
    assert len(one_by_one) == 7 and one_by_one[("h_count", frozenset({"v": "x"}.items()))] == 200


def monitor(prior=None, low=0.5, window=4) -> tuple[Monitor, CollectorRegistry]:
    registry = CollectorRegistry()
    return Monitor(registry, VERSION, list(CLASS_NAMES), prior, low, window), registry


def test_monitoring_never_fails_a_prediction():
    """A statistic that cannot be computed is skipped and counted, and the answer goes on."""
    m, registry = monitor(prior=None)
    images = np.zeros((3, 32, 32, 3), np.uint8)
    probs = np.full((3, NUM_CLASSES), 1 / NUM_CLASSES)
    probs[1] = np.nan  # that answer will be a 500 (Predictor.results); the others are counted
    assert m.wrap(lambda x: probs)(images) is probs
    assert value(samples(generate_latest(registry).decode()), "gtsrb_confidence_count") == 0  # kept
    m.flush()
    found = samples(generate_latest(registry).decode())
    assert value(found, "gtsrb_monitoring_skipped_total", reason="non_finite_probabilities") == 1
    assert value(found, "gtsrb_monitoring_skipped_total", reason="no_class_prior") == 2
    assert value(found, "gtsrb_confidence_count") == 2 and value(found, "gtsrb_low_confidence_total") == 2
    assert value(found, "gtsrb_input_brightness_count") == 3
    assert not any(name.startswith("gtsrb_drift") for name, _ in found)

    def broken(images, probs):
        raise RuntimeError("a bug in monitoring")

    m.observe = broken
    assert m.wrap(lambda x: probs)(images) is probs
    m.flush()
    assert (
        value(samples(generate_latest(registry).decode()), "gtsrb_monitoring_skipped_total", reason="error")
        == 3
    )


def test_passes_are_kept_and_taken_together():
    """The statistics are taken once FLUSH_IMAGES images wait, on a timer and on demand."""
    m, registry = monitor(prior=[1.0] * NUM_CLASSES, window=100)
    model = m.wrap(lambda x: np.eye(NUM_CLASSES)[np.arange(len(x)) % NUM_CLASSES])
    images = np.zeros((8, 32, 32, 3), np.uint8)

    def count() -> float:
        return value(samples(generate_latest(registry).decode()), "gtsrb_confidence_count")

    for _ in range(FLUSH_IMAGES // 8 - 1):
        model(images)
    assert count() == 0
    model(images)
    assert count() == FLUSH_IMAGES

    async def quiet_moment():
        flusher = asyncio.create_task(m.flush_every(0.01))
        model(images[:3])
        m.observe_sides([30, 40])
        await asyncio.sleep(0.2)
        flusher.cancel()

    asyncio.run(quiet_moment())
    assert count() == FLUSH_IMAGES + 3
    assert value(samples(generate_latest(registry).decode()), "gtsrb_input_side_pixels_sum") == 70


def test_the_drift_gauge_waits_for_a_full_window():
    m, registry = monitor(prior=[1.0] * NUM_CLASSES, window=4)
    images = np.zeros((3, 32, 32, 3), np.uint8)
    probs = np.eye(NUM_CLASSES)[[5, 5, 6]]
    m.observe(images, probs)
    found = samples(generate_latest(registry).decode())
    assert value(found, "gtsrb_drift_psi") is None and value(found, "gtsrb_drift_window_predictions") == 3
    assert value(found, "gtsrb_class_prior", class_id="42") == pytest.approx(1 / 43)
    m.observe(images[:2], probs[:2])  # the window: 5 6 5 5
    found = samples(generate_latest(registry).decode())
    counts = np.bincount([5, 6, 5, 5], minlength=NUM_CLASSES)
    assert value(found, "gtsrb_drift_psi") == pytest.approx(psi(counts, np.full(NUM_CLASSES, 1 / 43)))
    assert value(found, "gtsrb_drift_window_predictions") == 4


# --- real servers -----------------------------------------------------------------------------

NORMAL_CLASSES = list(range(NUM_CLASSES))


@pytest.fixture(scope="module")
def signs():
    """Real-looking signs of every class (two each), and a darkened stop sign."""
    normal = [(sign_png(c, seed=s), c) for s in range(2) for c in NORMAL_CLASSES]
    return normal, sign_png(14, seed=0, dark=0.12)


@pytest.fixture(scope="module")
def model(tmp_path_factory, signs):
    """A model that knows the normal signs (sure of them) and not the dark one; its class prior:
    the normal signs' classes (uniform)."""
    normal, dark = signs
    path = confident_model(tmp_path_factory.mktemp("monitoring") / "model.onnx", normal, [dark])
    return stamp_prior(path, prior_of([c for _, c in normal]))


def test_metrics_of_one_worker(model, signs):
    normal, dark = signs
    server = Server(model, "--drift-window", "86", "--low-confidence", "0.6").wait_ready()
    try:
        found = metrics(server)
        assert value(found, "gtsrb_ready") == 1 and value(found, "gtsrb_confidence_count") == 0
        assert value(found, "gtsrb_drift_psi") is None  # no window yet
        card = httpx.get(server.url + "/model").json()
        assert card["monitoring"] == {
            "enabled": True,
            "low_confidence": 0.6,
            "drift_window": 86,
            "drift": "PSI of the classes of the last 86 answers against the training set's class prior",
        }
        answers = batch(server, [image for image, _ in normal[:43]]) + batch(
            server, [image for image, _ in normal[43:]]
        )
        assert [a["class_id"] for a in answers] == [c for _, c in normal]  # the model knows them
        found = metrics(server)
        assert (
            value(found, "gtsrb_confidence_count") == 86 and value(found, "gtsrb_low_confidence_total") == 0
        )
        assert value(found, "gtsrb_confidence_sum") == pytest.approx(
            sum(a["probability"] for a in answers), abs=1e-3
        )
        assert value(found, "gtsrb_drift_psi") == pytest.approx(0, abs=1e-9)  # exactly the prior
        assert value(found, "gtsrb_drift_window_predictions") == 86
        assert value(found, "gtsrb_input_side_pixels_count") == 86
        assert value(found, "gtsrb_input_side_pixels_sum") == 86 * 48
        inputs = np.stack([decode(image, 32, 10**6) for image, _ in normal]).astype(np.float64)[:, ::2]
        means = inputs.mean(axis=(1, 2, 3))  # of every other row (monitoring.py)
        assert value(found, "gtsrb_input_brightness_sum") == pytest.approx(means.sum(), rel=1e-5)
        assert value(found, "gtsrb_input_contrast_sum") == pytest.approx(
            inputs.std(axis=(1, 2, 3)).sum(), rel=1e-3
        )
        assert value(found, "gtsrb_input_brightness_bucket", le="16.0") == 0

        # 10 dark stop signs, one on a region of interest: unsure answers, all of one class
        answers = [
            httpx.post(server.url + "/predict", files={"file": ("d.png", dark)}).json() for _ in range(9)
        ]
        roi = httpx.post(
            server.url + "/predict", files={"file": ("d.png", dark)}, params=dict(x1=2, y1=4, x2=40, y2=30)
        )
        assert roi.status_code == 200
        answers.append(roi.json())
        assert all(a["probability"] < 0.3 for a in answers) and len({a["class_id"] for a in answers[:9]}) == 1
        found = metrics(server)
        assert (
            value(found, "gtsrb_low_confidence_total") == 10 and value(found, "gtsrb_confidence_count") == 96
        )
        assert value(found, "gtsrb_input_side_pixels_sum") == 86 * 48 + 9 * 48 + 26  # the ROI's shorter side
        assert value(found, "gtsrb_input_brightness_bucket", le="16.0") == 10
        window = [c for _, c in normal][10:] + [a["class_id"] for a in answers]
        counts = np.bincount(window, minlength=NUM_CLASSES)
        expected = psi(counts, np.array(prior_of([c for _, c in normal])))
        assert value(found, "gtsrb_drift_psi") == pytest.approx(expected, rel=1e-4) and expected > 0.2
    finally:
        server.stop()


def test_a_model_without_a_class_prior_has_no_drift_score(tmp_path):
    server = Server(make_onnx(tmp_path / "model.onnx")).wait_ready()  # an export without a prior
    try:
        batch(server, [sign_png(c) for c in range(5)])
        found = metrics(server)
        assert value(found, "gtsrb_monitoring_skipped_total", reason="no_class_prior") == 5
        assert value(found, "gtsrb_confidence_count") == 5
        assert not any(name.startswith(("gtsrb_drift", "gtsrb_class_prior")) for name, _ in found)
        drift = httpx.get(server.url + "/model").json()["monitoring"]["drift"]
        assert drift.startswith("off: the model has no class prior")
    finally:
        server.stop()
    assert "the model has no class prior" in server.log.read_text()


def test_no_monitoring_leaves_the_answers_and_the_other_metrics(model, signs):
    normal, _ = signs
    server = Server(model, "--no-monitoring").wait_ready()
    try:
        answers = batch(server, [image for image, _ in normal[:8]])
        assert [a["class_id"] for a in answers] == [c for _, c in normal[:8]]
        text = httpx.get(server.url + "/metrics").text
        found = samples(text)
        assert value(found, "gtsrb_ready") == 1
        assert 'gtsrb_requests_total{endpoint="/predict/batch",status="200"} 1.0' in text
        assert not any(
            name.startswith(
                ("gtsrb_confidence", "gtsrb_input", "gtsrb_drift", "gtsrb_low", "gtsrb_monitoring")
            )
            for name, _ in found
        )
        assert httpx.get(server.url + "/model").json()["monitoring"] == {"enabled": False}
    finally:
        server.stop()


def test_two_workers_sum_counts_and_export_the_worst_workers_drift(model, signs):
    """prometheus_client's multiprocess mode: histograms and counters add up over the workers;
    the drift gauge is the largest of the live workers' windows' (livemax), one series."""
    _, dark = signs
    server = Server(model, "--workers", "2", "--drift-window", "10").wait_ready()
    try:
        deadline = time.monotonic() + 60  # /ready answers once one worker is ready
        while value(metrics(server), "gtsrb_ready") != 1:
            assert time.monotonic() < deadline, "gtsrb_ready stayed 0"
            time.sleep(0.2)
        answers = [httpx.post(server.url + "/predict", files={"file": ("d.png", dark)}) for _ in range(30)]
        assert {a.status_code for a in answers} == {200}  # a new connection each: both workers
        deadline = time.monotonic() + 10  # the other worker's monitoring flushes within 0.5 s
        while value(found := metrics(server), "gtsrb_confidence_count") != 30:
            assert time.monotonic() < deadline, value(found, "gtsrb_confidence_count")
            time.sleep(0.1)
        assert (
            value(found, "gtsrb_confidence_count") == 30 and value(found, "gtsrb_low_confidence_total") == 30
        )
        assert value(found, "gtsrb_input_side_pixels_count") == 30
        drift = [(name, labels) for name, labels in found if name == "gtsrb_drift_psi"]
        assert drift == [("gtsrb_drift_psi", frozenset({"model_version": VERSION}.items()))]  # no pid
        one_class = np.bincount([answers[0].json()["class_id"]] * 10, minlength=NUM_CLASSES)
        assert value(found, "gtsrb_drift_psi") == pytest.approx(psi(one_class, np.full(NUM_CLASSES, 1 / 43)))
        assert value(found, "gtsrb_drift_window_predictions") <= 10
        assert (
            len({line for line in server.log.read_text().splitlines() if "Started server process" in line})
            == 2
        )
    finally:
        server.stop()
    assert server.proc.returncode == 0
