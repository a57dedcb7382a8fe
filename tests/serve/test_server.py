"""HTTP tests against a real uvicorn process: every endpoint and every bad input."""

import io
import re
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from gtsrb import onnx_model
from gtsrb.cli import main
from gtsrb.serve.front import RECONNECT_SECONDS, Reconnects
from gtsrb.serve.uploads import BadImage, decode
from tests import archives
from tests.conftest import set_key, write_params
from tests.serve.conftest import Server, free_port, make_checkpoint, make_onnx, png, serve_command


def post(server, data: bytes, name="sign.png", path="/predict", **params):
    return httpx.post(server.url + path, files={"file": (name, data)}, params=params, timeout=30)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "PPM"])
def test_predict_each_format(server, fmt):
    r = post(server, png(fmt=fmt), name=f"sign.{fmt.lower()}", top_k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0 <= body["class_id"] < 43 and 0 < body["probability"] <= 1
    assert body["top_k"][0]["class_id"] == body["class_id"] and len(body["top_k"]) == 3
    assert (
        body["top_k"][0]["probability"] >= body["top_k"][1]["probability"] >= body["top_k"][2]["probability"]
    )
    assert body["class_name"] and body["model_version"] == "v0.0.0-test"


def test_batch_is_one_result_per_image_in_order(server):
    images = [png(color=(200, 20, 30)), png(color=(20, 60, 200)), png(color=(250, 200, 20))]
    single = [post(server, data).json()["class_id"] for data in images]
    r = httpx.post(
        server.url + "/predict/batch",
        files=[("files", (f"{i}.png", d)) for i, d in enumerate(images)],
        params={"top_k": 2},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["class_id"] for x in results] == single and all(len(x["top_k"]) == 2 for x in results)


def test_health_ready_model_docs_and_demo(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").json() == {"ready": True, "model_version": "v0.0.0-test"}
    card = httpx.get(server.url + "/model").json()
    assert card["arch"] == "traffic_sign_net" and len(card["md5"]) == 32 and card["version"] == "v0.0.0-test"
    assert card["runtime"]["runtime"] == "onnxruntime" and card["runtime"]["threads"] == 1
    assert card["runtime"]["execution_provider"] == "CPUExecutionProvider"
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/predict", "/predict/batch", "/health", "/ready", "/model", "/metrics"} <= set(schema["paths"])
    query = {p["name"]: p["schema"] for p in schema["paths"]["/predict"]["post"]["parameters"]}
    assert query["top_k"] == {"type": "integer", "minimum": 1, "maximum": 43, "default": 5}
    assert set(query) == {"top_k", "x1", "y1", "x2", "y2"}
    operations = [schema["paths"][p]["post"]["operationId"] for p in ("/predict", "/predict/batch")]
    assert operations == ["predict_predict_post", "predict_batch_predict_batch_post"]  # as before
    page = httpx.get(server.url + "/").text
    assert '<input id="file"' in page and "http://" not in page and "https://" not in page


def test_metrics_count_requests_latency_classes_and_errors(server):
    before = httpx.get(server.url + "/metrics").text
    post(server, png())
    post(server, b"not an image")
    text = httpx.get(server.url + "/metrics").text

    def value(text, prefix):
        lines = [line for line in text.splitlines() if line.startswith(prefix)]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    assert (
        value(text, 'gtsrb_requests_total{endpoint="/predict",status="200"}')
        == value(before, 'gtsrb_requests_total{endpoint="/predict",status="200"}') + 1
    )
    assert value(text, 'gtsrb_errors_total{endpoint="/predict",status="415"}') >= 1
    assert value(text, 'gtsrb_request_seconds_count{endpoint="/predict"}') >= 2
    assert value(text, "gtsrb_predictions_total{") > value(before, "gtsrb_predictions_total{")


def bomb_png(width=60000, height=60000) -> bytes:
    """A valid 1x1 PNG whose header declares a huge image (a decompression bomb's calling card)."""
    data = bytearray(png(size=(1, 1)))
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


BAD = {
    "not an image": (lambda: b"hello, this is text", 415, "not an image"),
    "truncated image": (lambda: png(size=(200, 200))[:300], 400, "truncated or corrupt image"),
    "empty upload": (lambda: b"", 400, "empty upload"),
    "huge upload": (lambda: b"\0" * (2 * 1024 * 1024), 413, "larger than the limit of 1048576 bytes"),
    "decompression bomb": (bomb_png, 413, "image too large"),
    "too many pixels": (
        lambda: bomb_png(5000, 5000),
        413,
        "image too large: 5000x5000 pixels, more than the limit",
    ),
    "unsupported format": (lambda: png(fmt="GIF"), 415, "unsupported image format GIF"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_clear_4xx(server, case):
    make, status, message = BAD[case]
    r = post(server, make())
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_wrong_content_type_and_params(server):
    r = httpx.post(server.url + "/predict", json={"image": "abc"}, timeout=30)
    assert r.status_code == 422
    assert post(server, png(), top_k=0).status_code == 422
    assert post(server, png(), x1=1).status_code == 422
    for bad, why in (("abc", "top_k='abc' is not an integer"), ("44", "top_k=44 is out of range (1 to 43)")):
        r = post(server, png(), top_k=bad)
        assert r.status_code == 422 and why in r.json()["detail"]
    r = post(server, png(), top_k="9" * 30)
    assert r.status_code == 422 and f"top_k={'9' * 30} is out of range (1 to 43)" in r.json()["detail"]
    assert post(server, png(), top_k=" 2").status_code == 200  # ?top_k=+2 unescaped: a space
    r = post(server, png(), path="/predict/batch", top_k="1.5")
    assert r.status_code == 422 and "top_k='1.5' is not an integer" in r.json()["detail"]
    r = post(server, png(size=(20, 20)), x1=-1, y1=0, x2=10, y2=10)
    assert r.status_code == 422 and "x1=-1 is out of range (0 or more)" in r.json()["detail"]
    r = post(server, png(size=(20, 20)), x1=0, y1=0, x2=30, y2=10)
    assert r.status_code == 422 and "outside the 20x20 image" in r.json()["detail"]


def test_any_multipart_form_works_the_same(server):
    """Plain uploads take the server's quick split; a form with a text field too, Starlette's parser."""
    image = png()
    plain = post(server, image).json()
    with_text = httpx.post(server.url + "/predict", files={"file": ("s.png", image)}, data={"note": "x"})
    assert with_text.status_code == 200 and with_text.json() == plain
    as_text = httpx.post(server.url + "/predict", data={"file": "text"}, files={"other": ("o.png", image)})
    assert as_text.status_code == 422 and "must be a file upload" in as_text.json()["detail"]
    urlencoded = httpx.post(server.url + "/predict", data={"file": "text"})
    assert urlencoded.status_code == 422 and "as multipart/form-data" in urlencoded.json()["detail"]
    missing = httpx.post(server.url + "/predict", files={"image": ("s.png", image)})
    assert missing.status_code == 422 and "no file in field 'file'" in missing.json()["detail"]
    two = httpx.post(server.url + "/predict", files=[("file", ("a.png", image)), ("file", ("b.png", image))])
    assert two.status_code == 422 and "use /predict/batch" in two.json()["detail"]


def test_the_upload_endpoints_answer_what_fastapi_answered_in_front_of_it(server):
    """They are answered before FastAPI's router (UploadRoutes): its answers for them stay."""
    r = httpx.get(server.url + "/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = httpx.post(server.url + "/predict/", files={"file": ("s.png", png())})
    assert r.status_code == 307 and r.headers["location"] == server.url + "/predict"
    no_boundary = {"content-type": "multipart/form-data"}  # Starlette's parser's own 400
    r = httpx.post(server.url + "/predict/batch", content=b"x", headers=no_boundary)
    assert r.status_code == 400 and r.json() == {"detail": "Missing boundary in multipart."}
    text = httpx.get(server.url + "/metrics").text
    assert 'gtsrb_errors_total{endpoint="/predict",status="405"}' in text
    assert 'gtsrb_errors_total{endpoint="/predict/batch",status="400"}' in text


def test_both_runtimes_serve_the_same_classes(tmp_path):
    """A checkpoint on torch and its export on ONNX Runtime: the same class for every image, the
    same top-k order, probabilities equal to their printed precision but for rounding."""
    checkpoint = make_checkpoint(tmp_path / "model.pt", "fast_sign_net")
    servers = {
        "torch": Server(checkpoint, "--runtime", "torch", "--inference", "eager"),
        "onnxruntime": Server(make_onnx(tmp_path / "model.onnx", checkpoint)),
    }
    try:
        images = [png(color=(c, 255 - c, (7 * c) % 256)) for c in range(0, 256, 16)]
        answers = {}
        for name, server in servers.items():
            server.wait_ready()
            assert httpx.get(server.url + "/model").json()["runtime"]["runtime"] == name
            files = [("files", (f"{i}.png", d)) for i, d in enumerate(images)]
            r = httpx.post(server.url + "/predict/batch", files=files, params={"top_k": 3}, timeout=30)
            assert r.status_code == 200, r.text
            answers[name] = r.json()["results"]
    finally:
        for server in servers.values():
            server.stop()
    for ours, theirs in zip(answers["torch"], answers["onnxruntime"], strict=True):
        assert [e["class_id"] for e in ours["top_k"]] == [e["class_id"] for e in theirs["top_k"]]
        assert ours["probability"] == pytest.approx(theirs["probability"], abs=2e-6)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_a_broken_model_is_a_500_with_the_reason_logged_and_the_server_goes_on(tmp_path, runtime):
    model = make_checkpoint(tmp_path / "model.pt")
    ckpt = torch.load(model, weights_only=True)
    ckpt["state_dict"]["fc2.bias"][0] = float("nan")
    torch.save(ckpt, model)
    if runtime == "onnxruntime":
        model = make_onnx(tmp_path / "model.onnx", model)
    server = Server(model, "--inference", "eager").wait_ready()
    try:
        for _ in range(2):
            r = post(server, png())
            assert r.status_code == 500 and r.text == "Internal Server Error"
        assert httpx.get(server.url + "/health").status_code == 200
        text = httpx.get(server.url + "/metrics").text
        assert 'gtsrb_errors_total{endpoint="/predict",status="500"} 2.0' in text
    finally:
        server.stop()
    assert "gave non-finite probabilities (NaN or inf)" in server.log.read_text()


def test_an_oversized_upload_without_a_length_is_a_413_too(server):
    """Chunked: the limit is found while the handler reads the body."""
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="s.png"\r\n\r\n'

    def body():
        yield head
        for _ in range(32):
            yield b"\0" * 65536  # 2 MiB, the test server's limit is 1 MiB

    r = httpx.post(
        server.url + "/predict",
        content=body(),
        headers={"content-type": "multipart/form-data; boundary=b"},
        timeout=30,
    )
    assert r.status_code == 413 and "larger than the limit of 1048576 bytes" in r.json()["detail"]
    assert server.proc.poll() is None


def test_too_many_files_in_a_batch(server):
    files = [("files", (f"{i}.png", png())) for i in range(5)]
    r = httpx.post(server.url + "/predict/batch", files=files, timeout=30)
    assert r.status_code == 413 and "5 files in one batch, more than the limit of 4" in r.json()["detail"]


def test_keeps_answering_good_requests_while_bad_ones_arrive(server):
    good, statuses = png(), []

    def bad_traffic():
        for make, _, _ in list(BAD.values()) * 3:
            statuses.append(post(server, make()).status_code)

    threads = [threading.Thread(target=bad_traffic) for _ in range(3)]
    for t in threads:
        t.start()
    answers = [post(server, good) for _ in range(20)]
    for t in threads:
        t.join()
    assert all(a.status_code == 200 for a in answers)
    assert len({a.json()["class_id"] for a in answers}) == 1
    assert statuses and all(400 <= s < 500 for s in statuses)
    assert server.proc.poll() is None


def _tamper(path):
    """Change one weight of the export, leaving its metadata (and digest) as they were."""
    import onnx

    model = onnx.load(str(path))
    weights = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    weights.flat[0] += 1
    model.graph.initializer[0].CopyFrom(
        onnx.numpy_helper.from_array(weights, model.graph.initializer[0].name)
    )
    onnx.save(model, str(path))


def _restamp(path, **changes):
    """Rewrite the export's metadata with ``changes`` (and a matching digest)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    meta.pop(onnx_model.DIGEST)
    onnx_model.stamp(path, {**meta, **changes})


DAMAGE = {
    "missing": ("model.pt", lambda path: path.unlink(), "model not found"),
    "corrupt": (
        "model.pt",
        lambda path: path.write_bytes(path.read_bytes()[:1000]),
        "truncated or corrupt checkpoint",
    ),
    "missing onnx": (
        "model.onnx",
        lambda path: path.unlink(),
        "ONNX model not found; run `dvc repro export`",
    ),
    "truncated onnx": (
        "model.onnx",
        lambda path: path.write_bytes(path.read_bytes()[:5000]),
        "truncated or not an ONNX model",
    ),
    "tampered onnx": ("model.onnx", _tamper, "its graph or weights were changed after export"),
    "onnx of another size": (
        "model.onnx",
        lambda path: _restamp(path, **{"gtsrb.image_size": "48"}),
        "does not fit its metadata (input [N, 3, 48, 48])",
    ),
    "onnx without metadata": (
        "model.onnx",
        lambda path: _restamp(path, **{"gtsrb.format": "not a number"}),
        "unreadable metadata",
    ),
}


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("damage", DAMAGE)
def test_refuses_to_start_without_a_good_model(tmp_path, damage, workers):
    name, breaker, expected = DAMAGE[damage]
    model = make_checkpoint(tmp_path / "model.pt")
    if name == "model.onnx":
        model = make_onnx(tmp_path / "model.onnx", model)
    breaker(model)
    proc = subprocess.run(
        serve_command(model, 1, "--workers", workers),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert f"gtsrb serve: error: {model}" in proc.stderr and expected in proc.stderr


def test_onnxruntime_missing_says_how_to_install_it(tmp_path):
    """onnxruntime made unimportable in the server process (it is installed here)."""
    model = make_onnx(tmp_path / "model.onnx")
    code = "import sys; sys.modules['onnxruntime'] = None; from gtsrb.cli import main; sys.exit(main(sys.argv[1:]))"
    args = serve_command(model, free_port())[3:]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "reading an ONNX model needs onnxruntime: pip install onnxruntime onnx" in proc.stderr


def test_workers_share_the_port_and_metrics_count_every_request(tmp_path):
    """Two worker processes start on one port, and /metrics, whichever worker answers, counts
    every request (each on a fresh connection, so both workers take some: without the
    multiprocess collector, scrapes disagreed, 15 against 30)."""
    server = Server(make_onnx(tmp_path / "model.onnx"), "--workers", "2").wait_ready()
    try:
        answers = [post(server, png()) for _ in range(30)]  # a new connection each
        assert [a.status_code for a in answers] == [200] * 30
        counted = set()
        for _ in range(8):
            text = httpx.get(server.url + "/metrics").text
            counted.add(re.search(r'gtsrb_requests_total\{endpoint="/predict",status="200"\} (\S+)', text)[1])
        assert counted == {"30.0"}
    finally:
        server.stop()
    assert server.proc.returncode == 0
    log = server.log.read_text()
    assert len(set(re.findall(r"Started server process \[(\d+)\]", log))) == 2, log
    assert "leaked" not in log


def test_a_worker_asks_its_older_connections_to_reconnect_but_keeps_its_only_one():
    r = Reconnects(seconds=1.0, budget=1)

    def close(port: int, now: float, **headers) -> bool:
        scope = {
            "client": ("10.0.0.1", port),
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        }
        return r.should_close(scope, now)

    assert not any(close(1, t) for t in (0.0, 0.5, 1.0, 1.5, 2.0))  # alone: kept, however old
    assert not close(2, 2.1) and close(1, 2.2)  # a second connection: the old one goes
    assert not close(2, 2.5) and not close(1, 2.6)  # 2 is young, and 1 is a new connection
    assert close(2, 3.2)  # 2 is old now, and 1 is there
    assert not close(2, 3.3) and not close(1, 3.4) and not close(1, 4.0)  # 1 is old: budget spent
    assert close(1, 4.3) and not close(2, 4.4)  # the next second: one more (2 is old too)
    assert not close(2, 5.4)  # 1 went quiet (it reconnected elsewhere): 2 is alone
    assert not close(3, 5.5) and not close(4, 9.0)  # the others went quiet: 4 is alone
    assert not close(5, 9.1) and not close(4, 9.2, **{"x-forwarded-for": "1.2.3.4"})  # a proxy's
    assert not r.should_close({"client": None, "headers": []}, 9.3)


def test_connections_opened_at_once_spread_over_the_workers(tmp_path):
    """8 keep-alive clients that start together may all land on one worker (it accepts every
    waiting connection at once). Told to reconnect after RECONNECT_SECONDS, they spread over
    both workers within a few seconds, and every request is answered."""
    server = Server(make_onnx(tmp_path / "model.onnx"), "--workers", "2").wait_ready()
    body = png()
    stop = time.monotonic() + 10 * RECONNECT_SECONDS
    statuses, closed, failures, lock = [], [], [], threading.Lock()

    def client():
        try:
            with httpx.Client(timeout=30) as c:
                while time.monotonic() < stop:
                    r = c.post(server.url + "/predict", files={"file": ("s.png", body)})
                    with lock:
                        statuses.append(r.status_code)
                        closed.append(r.headers.get("connection") == "close")
        except Exception as exc:  # reported below, not lost with the thread
            failures.append(repr(exc))

    def held() -> list[int]:
        """The connections each worker holds now (a connection may be between two workers)."""
        processes = psutil.Process(server.proc.pid).children()
        workers = [p for p in processes if "spawn_main" in " ".join(p.cmdline())]  # not the resource tracker
        return [
            sum(c.laddr.port == server.port and c.status == "ESTABLISHED" for c in w.net_connections("tcp"))
            for w in workers
        ]

    try:
        clients = [threading.Thread(target=client) for _ in range(8)]
        for t in clients:
            t.start()
        time.sleep(6 * RECONNECT_SECONDS)  # the clients still at work
        splits = []
        for _ in range(10):  # a few looks, 0.1 s apart
            splits.append(held())
            time.sleep(0.1)
        for t in clients:
            t.join()
    finally:
        server.stop()
    assert not failures and set(statuses) == {200} and any(closed)
    assert all(len(split) == 2 for split in splits)
    assert sum(min(split) >= 1 for split in splits) >= 5, splits  # on both workers, most looks


def test_a_worker_that_cannot_start_stops_the_server_with_an_error(tmp_path):
    """A checkpoint that loads but cannot run (normalisation for 2 channels): every worker fails
    its warm-up; the server exits 1 with an error, and leaves no environment behind."""
    model = make_checkpoint(tmp_path / "model.pt")
    ckpt = torch.load(model, weights_only=True)
    torch.save({**ckpt, "mean": [0.5, 0.5], "std": [0.25, 0.25]}, model)
    code = (
        "import os, sys; from gtsrb.cli import main; rc = main(sys.argv[1:]); "
        "print('left:', [k for k in ('PROMETHEUS_MULTIPROC_DIR', 'GTSRB_SERVE_SETTINGS') if k in os.environ]); "
        "sys.exit(rc)"
    )
    args = serve_command(model, free_port(), "--workers", "2")[3:]  # what main() takes: serve ...
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "gtsrb serve: error: a worker failed to start" in proc.stderr
    assert "left: []" in proc.stdout


def test_serving_preprocessing_is_prepares(tmp_path, monkeypatch, params):
    """The same PPM and ROI give the same model input through prepare and through the server."""
    s = archives.build(classes=(0,), tracks=2, frames=1, n_test=1)
    pixels = np.random.default_rng(3).integers(0, 256, (47, 51, 3), dtype=np.uint8)
    roi = (6, 5, 44, 41)
    s.zips[archives.TEST_IMAGES]["GTSRB/Final_Test/Images/00000.ppm"] = archives.ppm(pixels)
    s.zips[archives.TEST_GT]["GT-final_test.csv"] = archives.csv([("00000.ppm", 51, 47, *roi, 0)])
    s.write(tmp_path / "data" / "raw")
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", set_key(params, "prepare.workers", 1))
    assert main(["prepare"]) == 0
    prepared = np.load(tmp_path / "data/prepared/test.npz")["images"][0]
    served = decode(archives.ppm(pixels), 32, 10**6, roi)
    assert np.array_equal(served, prepared)
    whole = decode(archives.ppm(pixels), 32, 10**6)
    assert np.array_equal(whole, np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BILINEAR)))
    with pytest.raises(BadImage):
        decode(io.BytesIO(b"x").getvalue(), 32, 10**6)
