"""The server's own upload splitting, micro-batching, results and warm-up, against Starlette's parser,
its JSON and real threads."""

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.testclient import TestClient

from gtsrb.inference import SMALL_BATCH
from gtsrb.serve import uploads
from gtsrb.serve.app import FastJSON, create_app
from gtsrb.serve.batching import GATHER_TURNS, Batcher
from gtsrb.serve.front import UploadRoutes
from gtsrb.serve.runtime import Predictor, Settings
from gtsrb.serve.uploads import split_form
from tests.serve.conftest import make_checkpoint, make_onnx, png

TRICKY = b"\r\n--not-the-boundary\r\n\r\n" + bytes(range(256)) + b"\r\n"


def encoded(files, data=None) -> tuple[bytes, bytes]:
    """A multipart body and content type exactly as httpx sends them."""
    request = httpx.Request("POST", "http://x/", files=files, data=data)
    return request.read(), request.headers["content-type"].encode()


def starlette_parts(body: bytes, content_type: bytes) -> list[tuple[str, str, bytes]]:
    """The same body through Starlette's full parser (what FastAPI's File() uses)."""

    async def parse():
        sent = False

        async def receive():
            nonlocal sent
            chunk, sent = (b"" if sent else body), True
            return {"type": "http.request", "body": chunk, "more_body": False}

        scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type)]}
        async with Request(scope, receive).form() as form:
            return [(k, v.filename, await v.read()) for k, v in form.multi_items()]

    return asyncio.run(parse())


@pytest.mark.parametrize(
    "files",
    [
        {"file": ("sign.png", png())},
        {"file": ("tricky.bin", TRICKY)},
        {"file": ("empty.png", b"")},
        [("files", (f"{i}.png", png(color=(i, 2 * i, 3 * i)))) for i in range(5)],
        [("files", ("a b;c.png", png())), ("other", ("x.jpg", TRICKY))],
        {"file": ("panneau stop é.png", png())},
    ],
    ids=["one", "boundary-like bytes", "empty", "five", "two fields", "utf-8 filename"],
)
def test_split_form_agrees_with_starlette(files):
    body, content_type = encoded(files)
    assert split_form(body, content_type, 64) == starlette_parts(body, content_type)


@pytest.mark.parametrize(
    "body, content_type",
    [
        (encoded({"file": ("s.png", png())}, data={"note": "text"})),  # a text field: no filename
        (
            b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''%C3%A9.png\r\n\r\nx\r\n--b--\r\n",
            b"multipart/form-data; boundary=b",
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.png"\r\nContent-Transfer-Encoding: base64\r\n\r\neA==\r\n--b--\r\n',
            b"multipart/form-data; boundary=b",
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.png"\r\n\r\nx\r\n',
            b"multipart/form-data; boundary=b",
        ),  # no end
        (b"--b--\r\n", b"multipart/form-data; boundary=b"),  # no part
        (b"x", b"multipart/form-data"),  # no boundary
        (b'{"image": 1}', b"application/json"),
        (
            b'--b\r\nContent-Disposition:\x0cform-data; name="file"; filename="s.png"\r\n\r\nx\r\n--b--\r\n',
            b"multipart/form-data; boundary=b",
        ),
        (encoded([("files", (f"{i}.png", b"x")) for i in range(4)])),  # more parts than allowed
    ],
    ids=[
        "text field",
        "RFC 2231 filename",
        "other header",
        "unterminated",
        "no part",
        "no boundary",
        "json",
        "form feed for a space",
        "too many parts",
    ],
)
def test_split_form_leaves_anything_unusual_to_starlette(body, content_type):
    assert split_form(body, content_type, 3) is None


def test_upload_routes_leave_other_methods_and_paths_under_a_root_path_to_the_app():
    api = FastAPI()

    @api.post("/batch")
    async def batch():
        return {"by": "app"}

    async def upload(request: Request) -> JSONResponse:
        return JSONResponse({"by": "front"})

    app = UploadRoutes(api, {"/predict/batch": upload})
    with TestClient(app) as client:
        assert client.post("/predict/batch").json() == {"by": "front"}
        assert client.get("/predict/batch").status_code == 404  # the app's: it has no such route
    with TestClient(app, root_path="/predict") as client:  # the app mounted at /predict:
        # uvicorn's path holds the root path too, Starlette routes what follows it
        assert client.post("/predict/batch").json() == {"by": "app"}


def test_results_are_each_rows_top_k_in_the_json_starlette_writes():
    names = [f"class {c}" for c in range(43)]
    names[14] = "Stop (Halt, arrêt)"  # UTF-8 in the JSON, as Starlette writes it
    predictor = Predictor(Settings(), ckpt={"class_names": names}, version="v1.2.3")
    probs = torch.softmax(torch.randn(6, 43, generator=torch.Generator().manual_seed(0)) * 3, 1).numpy()
    probs[2] = 0
    probs[2, 14] = 1
    for k in (1, 5, 43):
        results = predictor.results(probs, k)
        assert len(results) == len(probs)
        for row, result in zip(probs, results, strict=True):
            expected = sorted(range(43), key=lambda c: -row[c])[:k]
            assert [e["class_id"] for e in result["top_k"]] == expected
            assert [e["probability"] for e in result["top_k"]] == [round(float(row[c]), 6) for c in expected]
            assert result["class_name"] == names[expected[0]] and result["model_version"] == "v1.2.3"
        body = {"results": results, "model_version": "v1.2.3"}
        ours, starlettes = FastJSON(body).body, JSONResponse(body).body
        assert json.loads(ours) == json.loads(starlettes) and "arrêt".encode() in ours
    assert predictor.results(probs, 1)[2]["class_name"] == "Stop (Halt, arrêt)"
    probs[4, 7] = np.nan
    with pytest.raises(ValueError, match=r"model v1\.2\.3 gave non-finite probabilities"):
        predictor.results(probs, 5)


def test_batcher_groups_waiting_requests_and_keeps_each_ones_rows():
    calls, gate = [], threading.Event()

    def model(images):
        gate.wait(5)  # the first call holds the model thread while the others queue up
        calls.append(len(images))
        return images[:, 0, 0, :1].astype(np.float32)

    async def run():
        batcher = Batcher(model, ThreadPoolExecutor(1), limit=6)
        requests = [np.full((n, 2, 2, 3), i, np.uint8) for i, n in enumerate([1, 2, 3, 1, 4])]
        tasks = [asyncio.create_task(batcher(requests[0]))]
        await asyncio.sleep(0.05)  # the model thread now runs the first request alone
        tasks += [asyncio.create_task(batcher(r)) for r in requests[1:]]
        await asyncio.sleep(0.05)
        gate.set()
        return requests, await asyncio.gather(*tasks)

    requests, results = asyncio.run(run())
    for request, rows in zip(requests, results, strict=True):
        assert rows.shape == (len(request), 1) and (rows == request[0, 0, 0, 0]).all()
    assert calls == [1, 6, 4]  # those waiting meanwhile: 2 + 3 + 1 fill the limit of 6, then the 4


def test_batcher_hands_a_model_error_to_every_waiting_request_and_goes_on():
    def model(images):
        if (images == 13).any():
            raise RuntimeError("bad batch")
        return images[:, 0, 0, :1].astype(np.float32)

    async def run():
        batcher = Batcher(model, ThreadPoolExecutor(1), limit=64)
        together = [batcher(np.full((1, 2, 2, 3), v, np.uint8)) for v in (1, 13)]  # one call
        failed = await asyncio.gather(*together, return_exceptions=True)
        return failed, await batcher(np.full((1, 2, 2, 3), 7, np.uint8))

    failed, after = asyncio.run(run())
    assert [str(e) for e in failed] == ["bad batch", "bad batch"]
    assert after[0, 0] == 7


def test_batcher_runs_small_groups_on_the_event_loop_and_large_ones_in_the_executor():
    ran_on = []

    def model(images):
        ran_on.append((len(images), threading.current_thread() is threading.main_thread()))
        return images[:, 0, 0, :1].astype(np.float32)

    async def run():
        batcher = Batcher(model, ThreadPoolExecutor(1), limit=64, inline=4)
        together = [batcher(np.full((n, 2, 2, 3), n, np.uint8)) for n in (1, 2)]
        small = await asyncio.gather(*together)
        large = await batcher(np.full((5, 2, 2, 3), 5, np.uint8))
        return small, large

    small, large = asyncio.run(run())
    assert ran_on == [(3, True), (5, False)]
    assert [r[:, 0].tolist() for r in small] == [[1.0], [2.0, 2.0]] and large[:, 0].tolist() == [5.0] * 5


def test_batcher_waits_for_requests_still_being_read_while_they_keep_coming():
    calls = []

    def model(images):
        calls.append(images[:, 0, 0, 0].tolist())
        return images[:, 0, 0, :1].astype(np.float32)

    async def run():
        batcher = Batcher(model, ThreadPoolExecutor(1), limit=64, inline=64)

        async def request(value: int, turns: int):
            for _ in range(turns):  # still reading its body
                await asyncio.sleep(0)
            return await batcher(np.full((1, 2, 2, 3), value, np.uint8))

        await asyncio.gather(*(request(v, turns=v) for v in range(5)))  # one more each turn
        await asyncio.gather(request(5, 0), request(6, GATHER_TURNS + 3))  # the late one: alone

    asyncio.run(run())
    assert calls == [[0, 1, 2, 3, 4], [5], [6]]


@pytest.mark.parametrize("arch", ["traffic_sign_net", "fast_sign_net"])
def test_after_warm_up_no_request_waits_for_a_graph_to_be_built(tmp_path, arch):
    """Every batch size a request can bring runs a graph that warm-up built: no recompilation
    (a request that set one off waited seconds). Warm-up runs in the model thread and the
    requests on the event loop's, as in the server."""
    model = make_checkpoint(tmp_path / "model.pt", arch)
    predictor = Predictor.load(Settings(model=str(model), runtime="torch", inference="compile"))
    assert predictor.path == "compile", predictor.runtime["fallback"]
    with ThreadPoolExecutor(1) as model_thread:
        model_thread.submit(predictor.warm_up).result()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (1, 3, SMALL_BATCH, 13, 16, 40, 64):
            assert predictor.probabilities(np.zeros((batch, 32, 32, 3), np.uint8)).shape == (batch, 43)


def test_small_uploads_decode_and_run_on_the_event_loop_and_large_ones_decode_in_a_thread(
    tmp_path, monkeypatch
):
    """With one model thread, a request of small images never leaves the event loop (a thread
    hop cost more than it freed); large images, and whatever outlasts the loop's time budget,
    decode in a thread, so the loop serves on."""
    predictor = Predictor.load(Settings(model=str(make_onnx(tmp_path / "m.onnx"))))
    threads = {"decode": [], "model": []}
    decode, probabilities = uploads.decode, predictor.probabilities

    def traced_decode(*args, **kwargs):
        image = decode(*args, **kwargs)  # after NotSmall (a header read on the loop): not counted
        threads["decode"].append(threading.current_thread().name)
        return image

    def traced_model(images):
        threads["model"].append(threading.current_thread().name)
        return probabilities(images)

    monkeypatch.setattr(uploads, "decode", traced_decode)
    monkeypatch.setattr(uploads, "INLINE_DECODE_SECONDS", 60.0)  # where images go, not how fast
    predictor.probabilities = traced_model
    with TestClient(create_app(predictor)) as client:
        loop = client.portal.call(threading.current_thread).name  # the thread of the app's loop

        def where(images: list[bytes]) -> list[str]:
            """Where each image decoded: "loop" or "thread"; the model must have run on the loop."""
            threads["decode"].clear()
            threads["model"].clear()
            files = [("files", (f"{i}.png", data)) for i, data in enumerate(images)]
            assert client.post("/predict/batch", files=files).status_code == 200
            assert threads["model"] == [loop]
            return ["loop" if name == loop else "thread" for name in threads["decode"]]

        assert where([png((40, 36))]) == ["loop"]
        assert where([png((64, 64))] * 64) == ["loop"] * 64
        assert where([png((256, 256), fmt="JPEG"), png()]) == ["loop"] * 2
        assert where([png((257, 256), fmt="JPEG")]) == ["thread"]  # over 256 x 256 pixels
        assert where([png(), png((160, 160)), png()]) == ["loop", "thread", "thread"]  # over 32 KiB
        monkeypatch.setattr(uploads, "INLINE_DECODE_SECONDS", 0.0)  # no time left for the loop
        assert where([png()] * 3) == ["thread"] * 3
