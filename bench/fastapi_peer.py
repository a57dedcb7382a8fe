"""The peer of `gtsrb serve`: the server an ML engineer would write around the same ONNX model,
the way FastAPI's tutorials show it (UploadFile, a sync ``def`` handler, PIL to decode and
resize, numpy to standardise, ``session.run``), nothing tuned. bench/peers.py serves it with
uvicorn, the same workers and the same load as ours.

    GTSRB_PEER_MODEL=models/model.onnx uvicorn fastapi_peer:app --app-dir bench --workers 2
"""

import io
import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, UploadFile
from PIL import Image

session = ort.InferenceSession(
    os.environ.get("GTSRB_PEER_MODEL", "models/model.onnx"), providers=["CPUExecutionProvider"]
)
meta = session.get_modelmeta().custom_metadata_map
SIZE = int(meta["gtsrb.image_size"])
MEAN = np.array(json.loads(meta["gtsrb.mean"]), dtype=np.float32)
STD = np.array(json.loads(meta["gtsrb.std"]), dtype=np.float32)
CLASS_NAMES = json.loads(meta["gtsrb.class_names"])
INPUT_NAME = session.get_inputs()[0].name

app = FastAPI(title="Traffic sign classifier")


def preprocess(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 255.0
    return ((x - MEAN) / STD).transpose(2, 0, 1)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def result(probs: np.ndarray, top_k: int) -> dict:
    best = np.argsort(probs)[::-1][:top_k]
    entries = [
        {"class_id": int(c), "class_name": CLASS_NAMES[c], "probability": float(probs[c])} for c in best
    ]
    return {**entries[0], "top_k": entries}


@app.post("/predict")
def predict(file: UploadFile, top_k: int = 5):
    x = preprocess(file.file.read())[np.newaxis]
    probs = softmax(session.run(None, {INPUT_NAME: x})[0])
    return result(probs[0], top_k)


@app.post("/predict/batch")
def predict_batch(files: list[UploadFile], top_k: int = 5):
    x = np.stack([preprocess(f.file.read()) for f in files])
    probs = softmax(session.run(None, {INPUT_NAME: x})[0])
    return {"results": [result(p, top_k) for p in probs]}


@app.get("/ready")
def ready():
    return {"ready": True}
