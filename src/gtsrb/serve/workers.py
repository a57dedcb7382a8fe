"""Running the server: ``serve`` (one process, or N worker processes sharing the port under
uvicorn's supervisor), ``worker_app`` (the app of one worker, built from the settings its parent
handed over) and ``wait_ready`` (for whoever started a server and waits for it to answer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import tempfile
import threading
import time

from gtsrb import LOG_FORMAT
from gtsrb.errors import GtsrbError
from gtsrb.serve.app import MULTIPROC_ENV, create_app
from gtsrb.serve.runtime import Predictor, Settings

# How ``serve(workers=N)`` hands the settings to its workers
SETTINGS_ENV = "GTSRB_SERVE_SETTINGS"


def wait_ready(url: str, timeout: float = 120, proc=None) -> None:
    """Poll ``url``/ready until it answers 200; fail early if ``proc`` (the server) exits."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise GtsrbError(f"the server at {url} exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise GtsrbError(f"{url} was not ready after {timeout:.0f}s")


def serve(settings: Settings, host: str, port: int, access_log: bool = False, workers: int = 1) -> None:
    """Serve until stopped. ``workers`` > 1: that many processes share the port (uvicorn's
    supervisor), each with its own model and batcher, and /metrics sums them all."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    # uvicorn takes uvloop and httptools when installed (the serve extra): 1.5-1.8x the plain
    # asyncio + h11 request rate
    options = {"host": host, "port": port, "log_level": "info", "access_log": access_log}
    if workers == 1:
        uvicorn.run(create_app(Predictor.load(settings)), **options)
        return
    # what would stop every worker the same way stops the server now, with the reason
    Predictor.check(settings)
    with contextlib.ExitStack() as stack:
        metrics_dir = os.environ.get(MULTIPROC_ENV) or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="gtsrb-metrics-")
        )
        # read by the workers (spawned: they import everything afresh, prometheus_client too)
        handoff = {
            "settings": dataclasses.asdict(settings),
            "log_level": logging.getLogger().level,
            "workers": workers,
        }
        stack.enter_context(_environ({SETTINGS_ENV: json.dumps(handoff), MULTIPROC_ENV: metrics_dir}))
        config = uvicorn.Config(f"{__name__}:worker_app", factory=True, workers=workers, **options)
        supervisor = Multiprocess(config, sockets=[config.bind_socket()])
        supervisor.run()
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        raise GtsrbError("a worker failed to start (its error is logged above), so the server stopped")


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """``values`` in os.environ for the block (and the processes it starts), then as before."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def worker_app():
    """The app of one worker process of ``serve(workers=N)``, from what the parent handed over."""
    handoff = json.loads(os.environ[SETTINGS_ENV])
    logging.basicConfig(level=handoff["log_level"], format=LOG_FORMAT)  # as `gtsrb` sets it up
    with contextlib.suppress(ImportError):  # torch.compile's progress bars would lock with a
        from tqdm import tqdm  # process-shared semaphore, reported leaked when workers stop

        tqdm.set_lock(threading.RLock())
    return create_app(Predictor.load(Settings(**handoff["settings"])), handoff["workers"])
