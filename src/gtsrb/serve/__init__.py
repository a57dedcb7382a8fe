"""``gtsrb serve``: the model over HTTP (FastAPI + uvicorn).

- ``POST /predict``: one image (multipart field ``file``: PPM, PNG, JPEG or WebP) -> class id,
  name, probability, the top k (``?top_k=``) and the model version. Optional ``x1,y1,x2,y2``
  query params crop a region of interest first, exactly as ``prepare`` crops GTSRB's ROI.
- ``POST /predict/batch``: several images (fields ``files``), one forward pass, one result each.
- ``GET /health`` (alive), ``GET /ready`` (model loaded and warmed up), ``GET /model`` (the
  model card), ``GET /metrics`` (Prometheus), ``GET /`` (a demo page, no external assets),
  ``GET /docs`` and ``/openapi.json``.

The model runs in micro-batches (``Batcher``): the images of all requests that arrived while it
was busy, or were still being read when it became free, go through one forward pass (a batch
of 8 costs about as much as 3 single images here). With one model thread (the default), the
passes (up to 64 images) run on the event loop itself. Images of up to 256 x 256 pixels and
32 KiB decode there too, for at most 20 ms per request; larger ones, and the rest of a request
past that, in a worker thread. The upload endpoints are answered before FastAPI's middleware
and router (``UploadRoutes``) and read the body themselves (``split_form`` for plain multipart
as browsers, curl and httpx send it, Starlette's full parser for anything unusual). Bad input
gets a 4xx with a reason, never a 500: empty, not an image, truncated, not multipart or a bad
query parameter (422), oversized upload (413), too many pixels (413), too many files (413, or
400 from Starlette's parser past its own limit). ``serve(workers=N)`` runs N such processes
on one port (one Python process keeps about one core busy); a worker that serves several
keep-alive connections asks each to reconnect once it is RECONNECT_SECONDS old
(``Reconnects``), so that they spread over the workers.

Where each concern lives (one module each):

- ``app``: ``create_app``, the FastAPI app: its routes, the upload endpoints' OpenAPI schema,
  the Prometheus metrics and the middleware that counts them.
- ``uploads``: what a request brings: the multipart split, the query parameters, image decoding
  and their 4xx answers.
- ``front``: the hand-written ASGI in front of FastAPI: ``UploadRoutes``, ``BodyLimit``,
  ``Reconnects``, each with what it measured.
- ``batching``: ``Batcher``, the micro-batches.
- ``monitoring``: ``Monitor``, the model monitoring metrics (confidence, input statistics, the
  drift of the predicted classes) and ``gtsrb_ready``.
- ``runtime``: ``Settings`` and ``Predictor``, the model: the one module that imports torch.
- ``workers``: ``serve`` (one process or N workers), ``worker_app``, ``wait_ready``.
- ``png``: plain PNG uploads decoded without Pillow's per-file Python (for ``uploads.decode``).
- ``demo.html``: the demo page at ``/``, package data.

This package re-exports the names used elsewhere (``gtsrb serve``, bench/, the tests' server),
and ``gtsrb.serve:worker_app`` stays a valid uvicorn factory.
"""

from gtsrb.serve.app import create_app
from gtsrb.serve.front import UploadRoutes
from gtsrb.serve.runtime import Predictor, Settings
from gtsrb.serve.uploads import BadImage, decode, split_form
from gtsrb.serve.workers import serve, wait_ready, worker_app

__all__ = [
    "BadImage",
    "Predictor",
    "Settings",
    "UploadRoutes",
    "create_app",
    "decode",
    "serve",
    "split_form",
    "wait_ready",
    "worker_app",
]
