"""The FastAPI app around a loaded predictor (``create_app``): the routes (the upload endpoints,
answered in front of FastAPI by ``front.UploadRoutes``, and FastAPI's own: health, ready, model
card, metrics, the demo page, the API docs), the OpenAPI schema of the upload endpoints, the
Prometheus metrics and the plain ASGI middleware that counts them. Knows no torch: the
predictor (``runtime``) brings the model.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import importlib.resources
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gtsrb.errors import GtsrbError
from gtsrb.serve.batching import INLINE_BATCH, Batcher
from gtsrb.serve.front import BodyLimit, Reconnects, UploadRoutes
from gtsrb.serve.monitoring import Monitor, process_stopped, ready_gauge
from gtsrb.serve.uploads import MULTIPART, ROI, TOP_K, decode_uploads, query_ints, read_uploads, roi_of

if TYPE_CHECKING:
    from gtsrb.serve.runtime import Predictor

log = logging.getLogger(__name__)

# prometheus_client's switch to keeping metrics in files that /metrics of any worker sums (set
# by ``workers.serve`` for several workers)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class FastJSON(JSONResponse):
    """Starlette's JSONResponse (compact UTF-8 JSON, the same values) written by orjson: 10x
    faster for a batch's results, where ``json`` took 5% of a request (with one sort per batch
    for the results: /predict/batch c8 38% -> 44% of the bare model). Only the spelling of
    some small numbers differs (0.000015 for 1.5e-05). On ONNX Runtime (bench/http_parts.py,
    2026-12-01, 2 workers, c8): /predict +16.9%, /predict/batch -4.6% (rounds of -8% to 0%)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def upload_schema(operation_id: str, field: str, many: bool, query: tuple[dict, ...] = ()) -> dict:
    """The OpenAPI operation of an upload endpoint: its query parameters, multipart body and
    responses (its handler reads the request itself)."""
    binary = {"type": "string", "format": "binary"}
    schema = {
        "type": "object",
        "required": [field],
        "properties": {field: {"type": "array", "items": binary} if many else binary},
    }
    parameters = [
        {
            "name": spec["name"],
            "in": "query",
            "required": False,
            "description": spec["description"],
            "schema": {
                "type": "integer",
                **{k: spec[k] for k in ("minimum", "maximum", "default") if k in spec},
            },
        }
        for spec in query
    ]
    detail = {"type": "object", "properties": {"detail": {"type": "string"}}}
    return {
        "operationId": operation_id,
        "parameters": parameters,
        "requestBody": {"required": True, "content": {MULTIPART: {"schema": schema}}},
        "responses": {
            "200": {
                "description": "the prediction",
                "content": {"application/json": {"schema": {"type": "object"}}},
            },
            "4XX": {
                "description": "bad input: the reason",
                "content": {"application/json": {"schema": detail}},
            },
        },
    }


def create_app(predictor: Predictor, workers: int = 1):
    """The FastAPI app around a loaded predictor, in one of ``workers`` processes."""
    settings = predictor.settings
    metrics_registry = CollectorRegistry()
    requests = Counter(
        "gtsrb_requests_total", "HTTP requests", ["endpoint", "status"], registry=metrics_registry
    )
    latency = Histogram(
        "gtsrb_request_seconds",
        "Request latency",
        ["endpoint"],
        registry=metrics_registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    )
    predictions = Counter(
        "gtsrb_predictions_total", "Predicted classes", ["class_id", "class_name"], registry=metrics_registry
    )
    errors = Counter(
        "gtsrb_errors_total", "Rejected requests", ["endpoint", "status"], registry=metrics_registry
    )
    ready_metric = ready_gauge(metrics_registry, predictor.version)  # 0 until warmed up
    monitor = None
    if settings.monitoring:  # model monitoring (monitoring.py): off, the code runs as before it
        monitor = Monitor(
            metrics_registry,
            predictor.version,
            predictor.ckpt["class_names"],
            predictor.ckpt.get("class_prior"),
            settings.low_confidence,
            settings.drift_window,
        )
        if monitor.drift_off:
            log.warning("model %s: %s (gtsrb_drift_psi not exported)", predictor.version, monitor.drift_off)
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    state = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await asyncio.get_running_loop().run_in_executor(model_thread, predictor.warm_up)
        # What exists now (torch, the graphs: ~450k objects) lives as long as the server: the
        # cyclic GC need not scan it again. Its full collections stalled requests ~100 ms each.
        gc.collect()  # what is garbage already should not be kept for good
        gc.freeze()
        state["ready"] = True
        ready_metric.set(1)
        log.info("model %s ready (%s, %s)", predictor.version, predictor.runtime["kernels"], predictor.path)
        flusher = asyncio.create_task(monitor.flush_every()) if monitor else None
        yield
        if flusher:
            flusher.cancel()
        ready_metric.set(0)
        process_stopped()  # with several workers: this one's live gauges go
        model_thread.shutdown(wait=False)

    app = FastAPI(
        title="GTSRB traffic-sign classifier",
        version=predictor.version,
        lifespan=lifespan,
        description="Predicts the GTSRB class of traffic-sign images.",
    )

    multiprocess = MULTIPROC_ENV in os.environ  # prometheus_client keeps its values in files

    # One model thread: forward passes run on the event loop (up to INLINE_BATCH). A thread
    # frees nothing there, the GIL changing hands costs more (measured with 64 small PNGs per
    # request: +7% images/s with 2 workers, +17% with 1), and a worker busy with a batch leaves
    # new connections to an idle one. On ONNX Runtime (bench/http_parts.py, 2026-12-01, 2
    # workers, c8), passes on the loop: /predict +20.2%, /predict/batch -0.1%; small images
    # decoded on the loop: /predict +33.0%, /predict/batch -3.7% (rounds of -16% to 0%). With
    # more threads, their pool runs the model (else the pool and the event loop would fight for
    # the cores).
    inline = INLINE_BATCH if predictor.runtime["threads"] == 1 else 0
    # Monitoring sees each forward pass's images and probabilities (once per micro-batch)
    model = monitor.wrap(predictor.probabilities) if monitor else predictor.probabilities
    batcher = Batcher(model, model_thread, settings.max_batch, inline)

    size, max_pixels = predictor.image_size, settings.max_pixels
    max_files, max_part_size = settings.max_batch + 1, settings.max_upload_bytes or float("inf")

    def count(results):
        """The predictions counter, once per class of ``results`` (a batch: ~0.2 ms less)."""
        for (class_id, name), n in collections.Counter(
            (r["class_id"], r["class_name"]) for r in results
        ).items():
            predictions.labels(str(class_id), name).inc(n)

    # The upload endpoints read the upload themselves (``read_uploads``) and answer with a
    # JSONResponse, in front of FastAPI (``UploadRoutes``): FastAPI's form, response and
    # dependency machinery (run even for ``request`` alone), its middleware and its router cost
    # more than the model at these sizes.
    async def predict(request: Request) -> JSONResponse:
        top_k, roi = query_ints(request, TOP_K), roi_of(request)
        items = await read_uploads(request, "file", max_files, max_part_size)
        if len(items) > 1:
            raise HTTPException(422, f"{len(items)} files in field 'file': send one, or use /predict/batch")
        sides = [] if monitor else None  # each image's side before resizing, for monitoring
        images = await decode_uploads(items, size, max_pixels, roi, sides)
        if monitor:
            monitor.observe_sides(sides)
        result = predictor.results(await batcher(images), top_k)[0]
        count([result])
        return FastJSON(result)

    async def predict_batch(request: Request) -> JSONResponse:
        top_k = query_ints(request, TOP_K)
        items = await read_uploads(request, "files", max_files, max_part_size)
        if len(items) > settings.max_batch:
            raise HTTPException(
                413, f"{len(items)} files in one batch, more than the limit of {settings.max_batch}"
            )
        sides = [] if monitor else None
        images = await decode_uploads(items, size, max_pixels, None, sides)
        if monitor:
            monitor.observe_sides(sides)
        probs = await batcher(images)
        results = predictor.results(probs, top_k)
        count(results)
        return FastJSON({"results": results, "model_version": predictor.version})

    upload_routes = {
        "/predict": (
            predict,
            "Classify one image",
            upload_schema("predict_predict_post", "file", many=False, query=(TOP_K, *ROI)),
        ),
        "/predict/batch": (
            predict_batch,
            "Classify several images in one forward pass",
            upload_schema("predict_batch_predict_batch_post", "files", many=True, query=(TOP_K,)),
        ),
    }
    front = UploadRoutes(app, {path: endpoint for path, (endpoint, _, _) in upload_routes.items()})
    path_of = {endpoint: path for path, endpoint in front.endpoints.items()}
    for path, endpoint in front.endpoints.items():  # FastAPI answers their other methods (405)
        app.router.add_route(path, endpoint, methods=["POST"])

    def openapi() -> dict:
        """FastAPI's schema of its own routes, and the upload routes'."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for path, (_, summary, operation) in upload_routes.items():
                schema["paths"][path] = {"post": {"summary": summary, **operation}}
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/health", summary="Liveness")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="Model loaded and warmed up")
    async def ready():
        if not state["ready"]:
            return JSONResponse({"ready": False}, status_code=503)
        return {"ready": True, "model_version": predictor.version}

    @app.get("/model", summary="The model card")
    async def model_card():
        monitoring = monitor.describe() if monitor else {"enabled": False}
        return {
            **predictor.card,
            "version": predictor.version,
            "runtime": predictor.runtime,
            "monitoring": monitoring,
        }

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        if monitor:  # what this worker's monitoring keeps (the others': FLUSH_SECONDS at most)
            monitor.flush()
        if multiprocess:  # every worker's counts (their files in that directory)
            every_worker = CollectorRegistry()
            MultiProcessCollector(every_worker)
            return Response(generate_latest(every_worker), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)

    demo_page = importlib.resources.files(__package__).joinpath("demo.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def demo():
        return demo_page

    @app.exception_handler(GtsrbError)
    async def gtsrb_error(request: Request, exc: GtsrbError):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    reconnects = Reconnects() if workers > 1 else None

    async def measured(scope, receive, send):
        """Request count, latency and errors per endpoint, and with several workers the
        "Connection: close" of ``reconnects`` (plain ASGI, where every answer starts already:
        Starlette's BaseHTTPMiddleware costs a task group and two streams per request; measured
        when this replaced it, /predict at concurrency 8: ~350 -> ~470-530 requests/s)."""
        if scope["type"] != "http":
            return await front(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if reconnects and status < 400 and reconnects.should_close(scope, time.monotonic()):
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        try:
            await front(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set on this same scope by FastAPI's routes
            endpoint = route.path if route is not None else path_of.get(scope.get("endpoint"), "other")
            requests.labels(endpoint, str(status)).inc()
            latency.labels(endpoint).observe(time.perf_counter() - started)
            if status >= 400:
                errors.labels(endpoint, str(status)).inc()

    return BodyLimit(measured, settings.max_upload_bytes) if settings.max_upload_bytes else measured
