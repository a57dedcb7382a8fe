"""The ceiling of the HTTP stack: a FastAPI app whose /predict reads the same multipart upload
as `gtsrb serve` (the request body, split by `split_form`) and returns at once.
bench/run_all.py runs it under uvicorn like the real server.

    uvicorn empty_app:app --app-dir bench --port 8001
"""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gtsrb.serve import split_form

app = FastAPI()


@app.post("/predict")
async def predict(request: Request):
    split_form(await request.body(), request.headers.get("content-type", "").encode("latin-1"), 65)
    return JSONResponse({})


@app.get("/ready")
async def ready():
    return {"ready": True}
