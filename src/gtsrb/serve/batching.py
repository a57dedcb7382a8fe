"""Micro-batching: the requests that arrive while the model is busy, and those still being read
when it is free, share one forward pass (``Batcher``)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Turns of the event loop the batcher waits for more requests to join a call, while they come
# (measured: /predict's groups grew from ~3.4 to 8 images, +26% requests/s; on ONNX Runtime,
# bench/http_parts.py 2026-12-01: /predict +7.8%, /predict/batch -4.0%, within its noise).
# Micro-batching itself, on ONNX Runtime: /predict +48.1%, /predict/batch +2.6%.
GATHER_TURNS = 8
# With one model thread, forward passes of up to this many images (~5 ms) run on the event loop
INLINE_BATCH = 64


class Batcher:
    """Runs ``fn`` (uint8 images -> one row per image) one call at a time; the requests that
    arrive meanwhile wait and then share the next call (at most ``limit`` images, unless a
    single request brings more). Calls of up to ``inline`` images run on the event loop itself,
    larger ones in ``executor``."""

    def __init__(self, fn, executor: ThreadPoolExecutor, limit: int, inline: int = 0):
        self.fn, self.executor, self.limit, self.inline = fn, executor, limit, inline
        self.waiting: list[tuple[np.ndarray, asyncio.Future]] = []
        self.task: asyncio.Task | None = None  # the one draining ``waiting`` (a reference keeps it)

    async def __call__(self, images: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((images, future))
        # one drain task per loop; it starts after the requests already on the loop's queue
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.task = loop.create_task(self._drain())
        return await future

    def _next_group(self) -> list[tuple[np.ndarray, asyncio.Future]]:
        take, size = 0, 0
        while take < len(self.waiting) and (take == 0 or size + len(self.waiting[take][0]) <= self.limit):
            size += len(self.waiting[take][0])
            take += 1
        group, self.waiting = self.waiting[:take], self.waiting[take:]
        return group

    async def _gather(self) -> None:
        """Let the requests being read join the next call: yield to the event loop for as long
        as each turn brings more (a few turns at most, or until ``limit`` images wait)."""
        for _ in range(GATHER_TURNS):
            waiting = len(self.waiting)
            if sum(len(images) for images, _ in self.waiting) >= self.limit:
                return
            await asyncio.sleep(0)
            if len(self.waiting) == waiting:
                return

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        group: list[tuple[np.ndarray, asyncio.Future]] = []
        try:
            while self.waiting:
                await self._gather()
                group = self._next_group()
                try:
                    images = group[0][0] if len(group) == 1 else np.concatenate([g[0] for g in group])
                    if len(images) <= self.inline:
                        rows = self.fn(images)
                    else:
                        rows = await loop.run_in_executor(self.executor, self.fn, images)
                except Exception as exc:  # every request of the group gets the model's error
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    start = 0
                    for part, future in group:
                        if not future.done():  # a cancelled request (client gone) takes nothing
                            future.set_result(rows[start : start + len(part)])
                        start += len(part)
                group = []
        except BaseException:  # cancelled (shutdown): no request is left waiting
            for _, future in group + self.waiting:
                future.cancel()
            self.waiting = []
            raise
