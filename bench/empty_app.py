"""The ceiling of the HTTP stack: an app built like `gtsrb serve` (FastAPI, with the upload
endpoint in front of it, `UploadRoutes`, reading the request body and splitting it with
`split_form`) that returns at once. bench/run_all.py runs it under uvicorn like the real server.

    uvicorn empty_app:app --app-dir bench --port 8001
"""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gtsrb.serve import UploadRoutes, split_form

api = FastAPI()


async def predict(request: Request) -> JSONResponse:
    split_form(await request.body(), request.headers.get("content-type", "").encode("latin-1"), 65)
    return JSONResponse({})


@api.get("/ready")
async def ready():
    return {"ready": True}


app = UploadRoutes(api, {"/predict": predict})
