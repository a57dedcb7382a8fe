"""The hand-written HTTP parts in front of FastAPI, plain ASGI, each kept for what it measured
(in its docstring): ``UploadRoutes`` answers the upload endpoints before FastAPI's middleware
and router, ``BodyLimit`` answers an oversized body with 413 before anything parses it, and
``Reconnects`` spreads keep-alive connections over several workers. ``app.create_app`` stacks
them: BodyLimit -> the metrics middleware (with Reconnects) -> UploadRoutes -> FastAPI.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException

# Several workers: how long a worker that serves several keep-alive connections keeps each
RECONNECT_SECONDS = 0.5


class Reconnects:
    """Several workers share the port, but a keep-alive connection stays with the worker that
    accepted it, and an idle worker accepts every connection waiting (uvloop takes them all at
    once): the 8 connections a client opens together could all land on one worker, the other
    idle for as long as they live. So a worker that has served several connections in the last
    ``seconds`` asks each (at most ``budget`` in that time) to reconnect once it is ``seconds``
    old, with "Connection: close" on a successful answer, and the worker that is free is the
    likelier to accept the new one. Its only connection, a worker keeps. Requests that came
    through a proxy (X-Forwarded-For) are left alone: the proxy spreads them.

    Measured with wrk and 2 workers: /predict/batch loads at concurrency 8 that started with all
    8 connections on one worker (5 trials in 6 of a test) reach 11,300 images/s instead of
    ~5,300, and at concurrency 2 stay at ~11,000 where they halved in 3 runs out of 3. On ONNX
    Runtime (bench/http_parts.py, 2026-12-01) the A/B's medians show no gain (/predict +3.6%,
    /predict/batch -5.1%): its gain is in the rounds whose connections landed on one worker
    (+31% and +44% in the one such round of three), which a median hides. Kept for those."""

    def __init__(self, seconds: float = RECONNECT_SECONDS, budget: int = 8):
        self.seconds, self.budget = seconds, budget
        self.seen: dict[tuple, list[float]] = {}  # client (host, port) -> [first, last request]
        self.period, self.left = -seconds, budget

    def should_close(self, scope: dict, now: float) -> bool:
        """Whether the answer to this request (at ``now``) should close its connection."""
        client = scope.get("client")
        if not client or any(name == b"x-forwarded-for" for name, _ in scope["headers"]):
            return False
        if now - self.period > self.seconds:  # a new period: forget the connections gone quiet
            self.period, self.left = now, self.budget
            self.seen = {k: v for k, v in self.seen.items() if now - v[1] <= self.seconds}
        key = tuple(client)
        seen = self.seen.get(key)
        if seen is None or now - seen[1] > self.seconds:  # new, or quiet for a while: as new
            self.seen[key] = [now, now]
            return False
        seen[1] = now
        if now - seen[0] < self.seconds or len(self.seen) < 2 or not self.left:
            return False
        self.left -= 1
        del self.seen[key]
        return True


class BodyLimit:
    """ASGI middleware: a request body larger than ``limit`` bytes gets 413 before it is parsed.
    Kept for that answer (with or without a Content-Length), not for speed: no gain measured
    (on ONNX Runtime, bench/http_parts.py 2026-12-01: +4.7% and -1.6%, within the noise)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge(self.limit)
            return message

        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:  # read outside the app's handlers (which answer it themselves)
            if not started:
                await self._reject(send)

    async def _reject(self, send):
        body = json.dumps({"detail": _TooLarge(self.limit).detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """A body over the limit, found while reading it (no Content-Length): an HTTPException, so
    the handler that was reading answers 413 itself."""

    def __init__(self, limit: int):
        super().__init__(413, f"upload larger than the limit of {limit} bytes")


class UploadRoutes:
    """ASGI: a POST to one of ``endpoints`` (path -> async function of a Request, returning a
    Response) is answered here, the rest by ``app`` (FastAPI). FastAPI's middleware stack and
    router cost about 50 us a request here, as much as uvicorn and all the rest of the HTTP
    stack together: more than decoding a sign. An HTTPException an endpoint raises gets
    FastAPI's own answer (its status, ``{"detail": ...}`` and headers); any other error goes to
    uvicorn, which logs it and answers 500, as FastAPI's ServerErrorMiddleware would.

    Measured: /predict +8-19% with 2 workers (A/B, wrk c8); an app that takes the same upload
    and does nothing, 8,825 -> 13,914 requests/s (bench/empty_app.py). Before, as Starlette
    routes of the FastAPI app (no dependency solving): /predict +13%, 1,917 -> 2,179 requests/s
    with one worker. On ONNX Runtime (bench/http_parts.py, 2026-12-01, 2 workers, c8): /predict
    +17.5%, /predict/batch +0.9%."""

    def __init__(self, app, endpoints: dict[str, Any]):
        self.app, self.endpoints = app, endpoints

    async def __call__(self, scope, receive, send):
        endpoint = self.endpoints.get(scope["path"]) if scope["type"] == "http" else None
        # FastAPI's: other methods (405), and any path under a root path (mounted elsewhere)
        if endpoint is None or scope["method"] != "POST" or scope.get("root_path"):
            return await self.app(scope, receive, send)
        scope["app"], scope["endpoint"] = self.app, endpoint  # as Starlette sets them (a form
        # error is a 400 from Starlette's parser only in an app's scope)
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except StarletteHTTPException as exc:  # FastAPI's HTTPException, or Starlette's own
            response = await http_exception_handler(request, exc)
        await response(scope, receive, send)
