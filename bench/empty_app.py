"""The ceiling of the HTTP stack: a FastAPI app whose /predict takes the same multipart upload
as `gtsrb serve` and returns at once. bench/run_all.py loads it like the real server.

    uvicorn empty_app:app --app-dir bench --port 8001
"""

from typing import Annotated

from fastapi import FastAPI, File, UploadFile

app = FastAPI()


@app.post("/predict")
async def predict(file: Annotated[UploadFile, File()]):
    await file.read()
    return {}


@app.get("/ready")
async def ready():
    return {"ready": True}
