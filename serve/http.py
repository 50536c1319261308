"""`cigl-serve MODEL.onnx`: calibrated predictions over HTTP (FastAPI + uvicorn, no torch).

    POST /v1/predict   multipart image upload(s) (any field name), or JSON {"inputs": [...]}
                       with arrays at the model's input size (C x H x W, normalised); optional
                       "top_k" and "abstain_below" (JSON) or query parameters (multipart)
    GET  /v1/metadata  the model card: classes, input size, density, temperature, recorded metrics
    GET  /healthz      liveness and the execution provider in use
    GET  /docs         OpenAPI documentation

Every bad request gets a 4xx with {"error": "..."}; one onnxruntime session is shared by all
request threads (onnxruntime sessions are thread-safe).
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cigl.errors import ArgumentParser, CiglError, InputError, cli_entry
from cigl.serve.predictor import Predictor


class PredictRequest(BaseModel):
    """JSON body of POST /v1/predict."""

    model_config = ConfigDict(extra="forbid")
    inputs: list = Field(..., description="arrays of shape C x H x W (normalised), one per image")
    top_k: int = Field(1, ge=1, le=1000)
    abstain_below: float = Field(0.0, ge=0.0, le=1.0)


def _error(status: int, message: str, close: bool = False) -> JSONResponse:
    """A 4xx answer; `close` when the request body was left unread, so the client does not send
    its next request on a connection the server is about to drop."""
    return JSONResponse(
        status_code=status, content={"error": message}, headers={"connection": "close"} if close else None
    )


def create_app(predictor: Predictor, max_batch: int = 64, max_body_mb: float = 10.0) -> FastAPI:
    app = FastAPI(title="cigl-serve", description="Calibrated predictions of a sparse model exported by cigl.")
    max_body = int(max_body_mb * 1024 * 1024)
    card = predictor.card

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "send a Content-Length header (chunked uploads are not accepted)", close=True)
            if not length.isdigit() or int(length) > max_body:
                return _error(413, f"request body larger than {max_body_mb:g} MB (--max-body-mb)", close=True)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(CiglError)
    async def user_error(request: Request, exc: CiglError):
        return _error(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # Starlette's own refusals (multipart framing, too many files or fields, 404, 405) keep
        # their status and get the documented {"error": ...} body instead of {"detail": ...}
        return _error(exc.status_code, str(exc.detail))

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "provider": predictor.provider}

    @app.get("/v1/metadata")
    def metadata() -> dict:
        raw = card.raw
        return {
            "classes": card.classes,
            "input_size": list(card.input_size),
            "mean": card.mean.tolist(),
            "std": card.std.tolist(),
            "temperature": card.temperature,
            "method": raw.get("method"),
            "arch": raw.get("arch"),
            "target_density": card.number("target_density"),
            "actual_density": card.number("actual_density"),
            "recorded": {
                "accuracy": card.number("test_accuracy"),
                "ece": card.number("test_ece"),
                "nll": card.number("test_nll"),
            },
            "max_batch": max_batch,
        }

    def respond(sources: list[str], x: np.ndarray, top_k: int, abstain_below: float) -> dict:
        if len(sources) > max_batch:
            raise InputError(f"{len(sources)} inputs in one request; at most {max_batch} (--max-batch)")
        _, probs = predictor.predict(x)
        return {"predictions": predictor.records(sources, probs, top_k, abstain_below)}

    @app.post("/v1/predict", responses={400: {"description": "bad input"}, 413: {"description": "too large"}})
    async def predict(request: Request, top_k: int = 1, abstain_below: float = 0.0):
        kind = request.headers.get("content-type", "")
        if kind.startswith("application/json"):
            try:
                body = PredictRequest.model_validate(json.loads(await request.body()))
            except json.JSONDecodeError as exc:
                return _error(400, f"body is not valid JSON ({exc.msg})")
            except RecursionError:
                return _error(400, "body nests JSON arrays or objects too deeply; send C x H x W arrays")
            except UnicodeDecodeError:
                return _error(400, "body is not UTF-8 JSON")
            except ValueError as exc:  # pydantic's ValidationError
                first = exc.errors()[0] if hasattr(exc, "errors") else {}
                where = ".".join(str(p) for p in first.get("loc", ()))
                return _error(422, f"{where or 'body'}: {first.get('msg', str(exc))}")
            if not body.inputs:
                raise InputError("no inputs")
            try:
                x = np.asarray(body.inputs, dtype=np.float32)
            except (ValueError, TypeError, RecursionError):
                raise InputError("inputs must be equally shaped numeric arrays (C x H x W each)") from None
            return respond([f"inputs[{i}]" for i in range(len(x))], x, body.top_k, body.abstain_below)
        if kind.startswith("multipart/form-data"):
            if top_k < 1 or not 0 <= abstain_below <= 1:
                raise InputError("need top_k >= 1 and 0 <= abstain_below <= 1")
            form = await request.form(max_files=max_batch + 1, max_fields=max_batch + 1)
            uploads = [(k, v) for k, v in form.multi_items() if hasattr(v, "read")]
            if not uploads:
                raise InputError("no files in the multipart body; upload images as file fields")
            if len(uploads) > max_batch:
                raise InputError(f"{len(uploads)} inputs in one request; at most {max_batch} (--max-batch)")
            images = []
            for _, upload in uploads:
                data = await upload.read()
                images.append(predictor.load_image(io.BytesIO(data), name=upload.filename or "upload"))
            names = [u.filename or f"file[{i}]" for i, (_, u) in enumerate(uploads)]
            return respond(names, predictor.normalize(np.stack(images)), top_k, abstain_below)
        return _error(415, 'send multipart/form-data image uploads or application/json {"inputs": [...]}')

    return app


def app_from_env() -> FastAPI:
    """App factory for uvicorn workers: settings come from the CIGL_SERVE_* environment."""
    predictor = Predictor(
        os.environ["CIGL_SERVE_MODEL"],
        device=os.environ.get("CIGL_SERVE_DEVICE", "auto"),
        max_batch=int(os.environ.get("CIGL_SERVE_MAX_BATCH", "64")),
    )
    return create_app(predictor, predictor.max_batch, float(os.environ.get("CIGL_SERVE_MAX_BODY_MB", "10")))


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="cigl-serve", description="Serve an exported model.onnx over HTTP (docs at /docs).")
    p.add_argument("model", help="model.onnx written by cigl-export")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--max-batch", type=int, default=64, help="most inputs per request (default 64)")
    p.add_argument("--max-body-mb", type=float, default=10.0, help="largest request body in MB (default 10)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(argv)
    if args.workers < 1 or args.max_batch < 1 or args.max_body_mb <= 0:
        raise InputError("--workers and --max-batch must be >= 1 and --max-body-mb > 0")
    Predictor(args.model, device=args.device)  # fail here, with one line, before uvicorn starts
    os.environ.update(
        {
            "CIGL_SERVE_MODEL": str(args.model),
            "CIGL_SERVE_DEVICE": args.device,
            "CIGL_SERVE_MAX_BATCH": str(args.max_batch),
            "CIGL_SERVE_MAX_BODY_MB": str(args.max_body_mb),
        }
    )
    import uvicorn

    print(
        f"cigl-serve: {args.model} on http://{args.host}:{args.port} (API docs at /docs)", file=sys.stderr, flush=True
    )
    uvicorn.run(
        "cigl.serve.http:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
