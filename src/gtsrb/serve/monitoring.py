"""Model monitoring in ``/metrics``: how sure the model is, what it is shown and whether the
classes it answers still look like the training set's (``Monitor``), cheap enough to leave on
(bench/monitoring_cost.py measures it; ``gtsrb serve --no-monitoring`` turns it off).

Every metric is labelled ``model_version``:

- ``gtsrb_confidence`` (histogram): the top-1 probability of each answer.
- ``gtsrb_low_confidence_total``: answers whose top-1 probability is below ``--low-confidence``;
  their share is its rate over ``gtsrb_confidence_count``'s.
- ``gtsrb_input_side_pixels`` (histogram): the shorter side of each uploaded image (of its
  region of interest when one is given), in pixels, before resizing.
- ``gtsrb_input_brightness``, ``gtsrb_input_contrast`` (histograms): the mean and the standard
  deviation of the resized uint8 model input (0-255, over the channels of every other row of
  its pixels: within ~1 of all of them on drawn signs, for half the cost).
- ``gtsrb_drift_psi`` (gauge): the population stability index of the classes predicted over
  the last ``--drift-window`` answers against the training set's class prior (the model's
  ``class_prior``), sum over classes of (a - e) ln(a / e), each share at least PSI_EPSILON.
  Absent until the window is full, and for a model without a prior.
- ``gtsrb_drift_window_predictions`` (gauge): how many answers the window holds.
- ``gtsrb_class_prior{class_id}`` (gauge): that prior, for the dashboard.
- ``gtsrb_monitoring_skipped_total{reason}``: answers a statistic was not computed for
  (``no_class_prior``, ``non_finite_probabilities``, ``error``). Monitoring never fails a
  prediction.
- ``gtsrb_ready`` (gauge, with or without monitoring): 1 once the model is warmed up.

Each forward pass's images and probabilities are kept (``wrap`` around the batcher's function:
a micro-batch of /predict requests or one /predict/batch), each request's image sides too
(``observe_sides``, where the decoded image is), and their statistics are taken for many
images at once (``flush``): a few numpy operations and one increment per histogram bucket hit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

DEFAULT_LOW_CONFIDENCE = 0.5
DEFAULT_DRIFT_WINDOW = 1000
PSI_EPSILON = 1e-4  # the share of a class that a window (or the prior) lacks
SKIP_REASONS = ("no_class_prior", "non_finite_probabilities", "error")
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
SIDE_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 512, 1024, 4096)
BRIGHTNESS_BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 255)
CONTRAST_BUCKETS = (4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 128)
# The statistics are taken for many images at once: a pass's images and probabilities are kept
# (a list append), and taken together once FLUSH_IMAGES wait, every FLUSH_SECONDS, and before
# /metrics answers. Taken per pass, their ~40 numpy calls cost /predict at concurrency 8
# (micro-batches of 1-3 images) 12-25% more CPU per request (a short A/B run, busy machine);
# at once, ~4 us a /predict request (bench/monitoring_cost.py: ~2% of the server's CPU).
FLUSH_IMAGES, FLUSH_SECONDS = 64, 0.5

# Several workers (prometheus_client's multiprocess mode, workers.serve): counters and
# histograms add up over the workers by themselves; a gauge needs a rule. The drift gauge is
# each worker's own: every worker scores the window of its own last N answers, and /metrics
# exports the largest of the live workers' values (``livemax``), one series per model version
# for the alert and the dashboard: the worst worker. Not a window shared through counters:
# the last N answers of every worker in one place would take a shared file and a lock per
# answer, or Prometheus computing the PSI over per-class rates, which makes the window a span
# of time instead of N answers. The workers take turns at the traffic (the kernel spreads new
# connections, ``front.Reconnects`` the old ones), so each sees a sample of the same answers:
# its window of N holds the classes of about the last N x workers answers, in their shares,
# and its PSI estimates the same drift with the noise of a window of N (simulated with
# GTSRB's prior, no drift: median 0.044, 99.9th percentile 0.09 for N = 1000, 0.097 for the
# larger of two workers; the alert is at 0.25). ``live``: the files of a worker that stopped
# are removed (``mark_process_dead`` at its shutdown), so its last value does not linger.
# The window's fill: the least full live worker (``livemin``); ready: 0 while any live worker
# is warming up (``livemin``); the prior: the same in every worker (``livemax``).
DRIFT_MODE, FILL_MODE, READY_MODE, PRIOR_MODE = "livemax", "livemin", "livemin", "livemax"


def ready_gauge(registry: CollectorRegistry, version: str):
    """``gtsrb_ready`` of this process, 0 (set it to 1 once the model is warmed up)."""
    doc = "1 once the model is loaded and warmed up (with several workers: all of them)"
    gauge = Gauge("gtsrb_ready", doc, ["model_version"], registry=registry, multiprocess_mode=READY_MODE)
    return gauge.labels(version)


def process_stopped() -> None:
    """Remove this worker's ``live*`` gauges from the multiprocess files (at shutdown)."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())


def usable_prior(prior: Any, classes: int) -> tuple[np.ndarray | None, str | None]:
    """The class prior as shares summing to 1, or None and why there is no drift score."""
    if prior is None:
        return None, "the model has no class prior (trained before it was recorded): no drift score"
    try:
        shares = np.asarray(prior, np.float64)
    except (TypeError, ValueError):
        return None, f"the model's class prior is not a list of numbers ({prior!r:.60}): no drift score"
    if shares.shape != (classes,) or not np.isfinite(shares).all() or (shares < 0).any() or shares.sum() <= 0:
        return None, (
            f"the model's class prior is unusable (expected {classes} non-negative shares, "
            f"got shape {shares.shape}): no drift score"
        )
    return shares / shares.sum(), None


def psi(counts: np.ndarray, prior: np.ndarray, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of class ``counts`` against the ``prior`` shares."""
    actual = np.maximum(counts / counts.sum(), epsilon)
    expected = np.maximum(prior, epsilon)
    return float(np.dot(actual - expected, np.log(actual) - np.log(expected)))


class Window:
    """The classes of the last ``size`` answers (a ring) and their counts."""

    def __init__(self, size: int, classes: int):
        self.size, self.ring = size, np.zeros(size, np.int16)
        self.counts = np.zeros(classes, np.int64)
        self.filled = self.pos = 0

    def add(self, classes: np.ndarray) -> None:
        if len(classes) >= self.size:  # the window holds the last ``size`` of these alone
            self.ring[:] = classes[-self.size :]
            self.counts[:] = np.bincount(self.ring, minlength=len(self.counts))
            self.filled, self.pos = self.size, 0
            return
        first = min(len(classes), self.size - self.pos)  # up to the ring's end, the rest from 0
        self._put(self.pos, classes[:first])
        if first < len(classes):
            self._put(0, classes[first:])
        self.filled = min(self.size, self.filled + len(classes))
        self.pos = (self.pos + len(classes)) % self.size

    def _put(self, start: int, classes: np.ndarray) -> None:
        old = min(start + len(classes), self.filled) - start  # slots below ``filled``: answers that leave
        if old > 0:
            self.counts -= np.bincount(self.ring[start : start + old], minlength=len(self.counts))
        self.ring[start : start + len(classes)] = classes
        self.counts += np.bincount(classes, minlength=len(self.counts))

    @property
    def full(self) -> bool:
        return self.filled == self.size


class BatchHistogram:
    """A histogram child observed an array at a time: one increment per bucket hit instead of
    prometheus_client's per-value Python loop over the buckets (a few us a value in
    multiprocess mode, where each increment writes a file). Through the child's own value
    objects, so that both modes keep working; without them (another prometheus_client), one
    ``observe`` per value."""

    def __init__(self, child):
        self.child = child
        self.batched = all(hasattr(child, name) for name in ("_upper_bounds", "_buckets", "_sum"))
        self.bounds = np.asarray(child._upper_bounds if self.batched else ())

    def observe(self, values) -> None:
        """Observe each of ``values`` (a sequence of numbers)."""
        if len(values) == 1 or not self.batched:
            for value in values:
                self.child.observe(float(value))
            return
        values = np.asarray(values, np.float64)
        # bucket i counts the values <= bound i (+Inf last): the first bound >= value
        hits = np.bincount(np.searchsorted(self.bounds, values), minlength=len(self.bounds))
        for i in np.flatnonzero(hits).tolist():
            self.child._buckets[i].inc(int(hits[i]))
        self.child._sum.inc(float(values.sum()))


class Monitor:
    """The monitoring metrics of one server process, in ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        version: str,
        class_names: list[str],
        class_prior: Any,
        low_confidence: float = DEFAULT_LOW_CONFIDENCE,
        drift_window: int = DEFAULT_DRIFT_WINDOW,
    ):
        self.version, self.low, self.window_size = version, low_confidence, drift_window
        labels = ["model_version"]

        def histogram(name: str, doc: str, buckets: tuple) -> BatchHistogram:
            child = Histogram(name, doc, labels, registry=registry, buckets=buckets).labels(version)
            return BatchHistogram(child)

        def gauge(name: str, doc: str, mode: str, *more: str) -> Gauge:
            return Gauge(name, doc, [*labels, *more], registry=registry, multiprocess_mode=mode)

        self.confidence = histogram(
            "gtsrb_confidence", "Top-1 probability of each answer", CONFIDENCE_BUCKETS
        )
        self.side = histogram(
            "gtsrb_input_side_pixels",
            "Shorter side of each uploaded image (of its region of interest), pixels, before resizing",
            SIDE_BUCKETS,
        )
        self.brightness = histogram(
            "gtsrb_input_brightness", "Mean of the resized uint8 model input (0-255)", BRIGHTNESS_BUCKETS
        )
        self.contrast = histogram(
            "gtsrb_input_contrast",
            "Standard deviation of the resized uint8 model input (0-255)",
            CONTRAST_BUCKETS,
        )
        self.low_confidence = Counter(
            "gtsrb_low_confidence",
            "Answers whose top-1 probability is below the server's --low-confidence (its value: /model)",
            labels,
            registry=registry,
        ).labels(version)
        skipped = Counter(
            "gtsrb_monitoring_skipped",
            "Answers a monitoring statistic was not computed for, by reason",
            [*labels, "reason"],
            registry=registry,
        )
        self.skipped = {reason: skipped.labels(version, reason) for reason in SKIP_REASONS}
        self.prior, self.drift_off = usable_prior(class_prior, len(class_names))
        self.window = self.psi = self.fill = None
        if self.prior is not None:
            self.window = Window(drift_window, len(class_names))
            self.psi_gauge = gauge(
                "gtsrb_drift_psi",
                "Population stability index of the classes of the last --drift-window answers (/model) "
                "against the training set's class prior, once the window is full",
                DRIFT_MODE,
            )
            self.fill = gauge(
                "gtsrb_drift_window_predictions", "Answers in the drift score's window", FILL_MODE
            ).labels(version)
            prior = gauge(
                "gtsrb_class_prior", "Share of each class in the training set", PRIOR_MODE, "class_id"
            )
            for class_id, share in enumerate(self.prior.tolist()):
                prior.labels(version, str(class_id)).set(share)
        self.ones: np.ndarray | None = None  # sums each image's pixels in one matrix product
        self.error_logged = False
        self.lock = threading.Lock()
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # (images, probabilities) per pass
        self.pending_images = 0
        self.pending_sides: list[int] = []

    def describe(self) -> dict[str, Any]:
        """What /model says about monitoring."""
        drift = (
            f"PSI of the classes of the last {self.window_size} answers against the training set's class prior"
            if self.drift_off is None
            else f"off: {self.drift_off}"
        )
        return {"enabled": True, "low_confidence": self.low, "drift_window": self.window_size, "drift": drift}

    def wrap(self, fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
        """``fn`` (uint8 images -> probabilities), its passes kept for ``flush``: it takes their
        statistics once FLUSH_IMAGES images wait (``flush_every`` and /metrics take the rest)."""

        def monitored(images: np.ndarray) -> np.ndarray:
            probs = fn(images)
            with self.lock:
                self.pending.append((images, probs))
                self.pending_images += len(images)
                due = self.pending_images >= FLUSH_IMAGES
            if due:
                self.flush()
            return probs

        return monitored

    def observe_sides(self, sides: list[int]) -> None:
        """The shorter side of each image of one request, before resizing (kept for ``flush``)."""
        with self.lock:
            self.pending_sides += sides

    def flush(self) -> None:
        """Take the statistics of every pass and side kept since the last flush. Monitoring's
        own errors are counted and logged (once), never raised."""
        with self.lock:  # the model thread's passes and the event loop's flushes, one at a time
            passes, sides = self.pending, self.pending_sides
            if not passes and not sides:
                return
            self.pending, self.pending_images, self.pending_sides = [], 0, []
            try:
                if sides:
                    self.side.observe(sides)
                if passes:
                    images = np.concatenate([p[0] for p in passes]) if len(passes) > 1 else passes[0][0]
                    probs = np.concatenate([p[1] for p in passes]) if len(passes) > 1 else passes[0][1]
                    self.observe(images, probs)
            except Exception:
                self.skipped["error"].inc(max(len(sides), sum(len(p[0]) for p in passes)))
                if not self.error_logged:
                    self.error_logged = True
                    log.exception(
                        "monitoring failed (counted in gtsrb_monitoring_skipped_total, logged once)"
                    )

    async def flush_every(self, seconds: float = FLUSH_SECONDS) -> None:
        """``flush`` every ``seconds`` (a task of the event loop): what a quiet moment leaves
        waiting reaches /metrics all the same."""
        while True:
            await asyncio.sleep(seconds)
            self.flush()

    def observe(self, images: np.ndarray, probs: np.ndarray) -> None:
        """The statistics of uint8 images [N, S, S, 3] and their class probabilities [N, C]."""
        # every other row (one strided conversion: 40 us for 64 images instead of 80)
        x = np.asarray(images[:, ::2], np.float32).reshape(len(images), -1)
        values = x.shape[1]
        if self.ones is None or len(self.ones) != values:
            self.ones = np.ones(values, np.float32)
        # E[x] and E[x^2] by BLAS (float32: std to ~0.3 of 255 for a flat image: enough here)
        mean = (x @ self.ones) / values
        square = np.matmul(x[:, None, :], x[:, :, None]).ravel() / values
        self.brightness.observe(mean)
        self.contrast.observe(np.sqrt(np.maximum(square - mean * mean, 0)))
        top = probs.max(axis=1)  # NaN for a row with a NaN (inf: NaN after softmax)
        finite = np.isfinite(top)
        if not finite.all():  # the answer is a 500 (Predictor.results): no statistic of it
            self.skipped["non_finite_probabilities"].inc(int((~finite).sum()))
            probs, top = probs[finite], top[finite]
            if not len(probs):
                return
        self.confidence.observe(top)
        low = int((top < self.low).sum())
        if low:
            self.low_confidence.inc(low)
        if self.window is None:
            self.skipped["no_class_prior"].inc(len(probs))
            return
        self.window.add(probs.argmax(axis=1))  # the answer's class (ties: the lower id, as served)
        self.fill.set(self.window.filled)
        if self.window.full:
            if self.psi is None:  # absent until the window is full: a few answers are no score
                self.psi = self.psi_gauge.labels(self.version)
            self.psi.set(psi(self.window.counts, self.prior))
