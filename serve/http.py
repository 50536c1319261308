"""`cigl-serve MODEL.onnx`: calibrated predictions over HTTP (FastAPI + uvicorn, no torch).

    POST /v1/predict   multipart image upload(s) (any field name), or JSON {"inputs": [...]}
                       with arrays at the model's input size (C x H x W, normalised); optional
                       "top_k", "abstain_below" and "alpha" (JSON) or query parameters (multipart)
    GET  /v1/metadata  the model card: classes, input size, density, temperature, recorded metrics
    GET  /healthz      liveness and the engine in use (onnxruntime's provider, sparse, or auto's choice)
    GET  /docs         OpenAPI documentation

Every bad request gets a 4xx with {"error": "..."}; one onnxruntime session is shared by all
request threads (onnxruntime sessions are thread-safe).
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from cigl.errors import ArgumentParser, CiglError, InputError, cli_entry
from cigl.serve.engines import add_engine_option
from cigl.serve.predictor import MAX_BATCH_LIMIT, Predictor
from cigl.serve.session import add_device_option


class PredictRequest(BaseModel):
    """JSON body of POST /v1/predict."""

    model_config = ConfigDict(extra="forbid")
    inputs: list = Field(..., description="arrays of shape C x H x W (normalised), one per image")
    top_k: int = Field(1, ge=1, le=1000)
    abstain_below: float | None = Field(None, ge=0.0, le=1.0, description="default: the card's certified threshold")
    alpha: float | None = Field(None, gt=0.0, lt=1.0, description="add the conformal prediction set at this alpha")


def _error(status: int, message: str, close: bool = False) -> JSONResponse:
    """A 4xx answer; `close` when the request body was left unread, so the client does not send
    its next request on a connection the server is about to drop."""
    return JSONResponse(
        status_code=status, content={"error": message}, headers={"connection": "close"} if close else None
    )


class BadRequest(Exception):
    """A request refused with `status` before it reaches the model."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _add_error_handlers(app: FastAPI) -> None:
    """Every refusal answers {"error": "..."} with a 4xx status."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where or 'body'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(CiglError)
    async def user_error(_request: Request, exc: CiglError):
        return _error(400, str(exc))

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, exc: BadRequest):
        return _error(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        # Starlette's own refusals (multipart framing, too many files or fields, 404, 405) keep
        # their status and get the documented {"error": ...} body instead of {"detail": ...}
        return _error(exc.status_code, str(exc.detail))


async def json_inputs(request: Request) -> tuple[list[str], np.ndarray, PredictRequest]:
    """(names, float batch, the request's options) of a JSON body; BadRequest or InputError otherwise."""
    try:
        body = request_options(json.loads(await request.body()))
    except json.JSONDecodeError as exc:
        raise BadRequest(400, f"body is not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise BadRequest(400, "body nests JSON arrays or objects too deeply; send C x H x W arrays") from None
    except UnicodeDecodeError:
        raise BadRequest(400, "body is not UTF-8 JSON") from None
    if not body.inputs:
        raise InputError("no inputs")
    try:
        x = np.asarray(body.inputs, dtype=np.float32)
    except (ValueError, TypeError, RecursionError):
        raise InputError("inputs must be equally shaped numeric arrays (C x H x W each)") from None
    return [f"inputs[{i}]" for i in range(len(x))], x, body


async def multipart_inputs(request: Request, predictor: Predictor, max_batch: int) -> tuple[list[str], np.ndarray]:
    """(names, normalised batch) of the image files in a multipart body."""
    form = await request.form(max_files=max_batch + 1, max_fields=max_batch + 1)
    uploads = [v for _, v in form.multi_items() if hasattr(v, "read")]
    if not uploads:
        raise InputError("no files in the multipart body; upload images as file fields")
    if len(uploads) > max_batch:
        raise InputError(f"{len(uploads)} inputs in one request; at most {max_batch} (--max-batch)")
    images = [predictor.load_image(io.BytesIO(await u.read()), name=u.filename or "upload") for u in uploads]
    names = [u.filename or f"file[{i}]" for i, u in enumerate(uploads)]
    return names, predictor.normalize(np.stack(images))


def request_options(raw) -> PredictRequest:
    """A JSON body, or a multipart request's query options, checked against PredictRequest's
    fields and bounds (one set of rules for both); BadRequest 422 naming the field otherwise."""
    try:
        return PredictRequest.model_validate(raw)
    except ValueError as exc:  # pydantic's ValidationError
        first = exc.errors()[0] if hasattr(exc, "errors") else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise BadRequest(422, f"{where or 'body'}: {first.get('msg', str(exc))}") from None


def metadata_of(predictor: Predictor, max_batch: int) -> dict:
    """GET /v1/metadata: the model card's entries a client needs."""
    card = predictor.card
    found = card.conformal()
    return {
        "classes": card.classes,
        "input_size": list(card.input_size),
        "mean": card.mean.tolist(),
        "std": card.std.tolist(),
        "temperature": card.temperature,
        "method": card.raw.get("method"),
        "arch": card.raw.get("arch"),
        "target_density": card.number("target_density"),
        "actual_density": card.number("actual_density"),
        "recorded": card.recorded(),
        "conformal_alphas": sorted(found[1], reverse=True) if found else [],
        "abstain_threshold": card.abstain_threshold(),
        "max_batch": max_batch,
    }


def create_app(predictor: Predictor, max_batch: int = 64, max_body_mb: float = 10.0) -> FastAPI:
    """The FastAPI app serving `predictor`; requests over `max_batch` inputs or `max_body_mb` are refused."""
    app = FastAPI(title="cigl-serve", description="Calibrated predictions of a sparse model exported by cigl.")
    max_body = int(max_body_mb * 1024 * 1024)
    _add_error_handlers(app)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return _error(411, "send a Content-Length header (chunked uploads are not accepted)", close=True)
            if not length.isdigit() or int(length) > max_body:
                return _error(413, f"request body larger than {max_body_mb:g} MB (--max-body-mb)", close=True)
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "provider": predictor.provider}

    @app.get("/v1/metadata")
    def metadata() -> dict:
        return metadata_of(predictor, max_batch)

    @app.post("/v1/predict", responses={400: {"description": "bad input"}, 413: {"description": "too large"}})
    async def predict(request: Request, top_k: int = 1, abstain_below: float | None = None, alpha: float | None = None):
        kind = request.headers.get("content-type", "")
        if kind.startswith("application/json"):
            names, x, body = await json_inputs(request)
            top_k, abstain_below, alpha = body.top_k, body.abstain_below, body.alpha
        elif kind.startswith("multipart/form-data"):
            request_options({"inputs": [], "top_k": top_k, "abstain_below": abstain_below, "alpha": alpha})
            names, x = await multipart_inputs(request, predictor, max_batch)
        else:
            raise BadRequest(415, 'send multipart/form-data image uploads or application/json {"inputs": [...]}')
        if len(names) > max_batch:
            raise InputError(f"{len(names)} inputs in one request; at most {max_batch} (--max-batch)")
        _, probs = predictor.predict(x)
        return {"predictions": predictor.records(names, probs, top_k, abstain_below, alpha)}

    return app


def app_from_env() -> FastAPI:
    """App factory for uvicorn workers: settings come from the CIGL_SERVE_* environment."""
    predictor = Predictor(
        os.environ["CIGL_SERVE_MODEL"],
        device=os.environ.get("CIGL_SERVE_DEVICE", "auto"),
        engine=os.environ.get("CIGL_SERVE_ENGINE", "auto"),
        max_batch=int(os.environ.get("CIGL_SERVE_MAX_BATCH", "64")),
    )
    return create_app(predictor, predictor.max_batch, float(os.environ.get("CIGL_SERVE_MAX_BODY_MB", "10")))


EXAMPLES = [
    "cigl-serve runs/demo-cigl/model.onnx                   # http://127.0.0.1:8000, docs at /docs",
    "cigl-serve model.onnx --host 0.0.0.0 --port 0          # any free port; the URL is printed",
    "curl -F image=@cat.png 'http://127.0.0.1:8000/v1/predict?top_k=3'",
]


MAX_WORKERS = 64  # worker processes: each holds its own copy of the model
MAX_BODY_MB = 1024


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="cigl-serve", description="Serve an exported model.onnx over HTTP (docs at /docs).", examples=EXAMPLES
    )
    p.add_argument("model", help="model.onnx written by cigl-export")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port, printed)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--max-batch", type=int, default=64, help="most inputs per request (default 64)")
    p.add_argument("--max-body-mb", type=float, default=10.0, help="largest request body in MB (default 10)")
    add_device_option(p)
    add_engine_option(p)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.workers <= MAX_WORKERS:
        raise InputError(f"--workers must lie in 1..{MAX_WORKERS}, got {args.workers}")
    if not 1 <= args.max_batch <= MAX_BATCH_LIMIT:
        raise InputError(f"--max-batch must lie in 1..{MAX_BATCH_LIMIT}, got {args.max_batch}")
    if not 0 < args.max_body_mb <= MAX_BODY_MB:  # NaN fails this too
        raise InputError(f"--max-body-mb must be > 0 and <= {MAX_BODY_MB}, got {args.max_body_mb}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must lie in 0..65535, got {args.port}")
    if args.port == 0 and args.workers > 1:
        raise InputError("--port 0 (any free port) needs --workers 1; give a port number to run several workers")
    Predictor(args.model, device=args.device, engine=args.engine)  # fail here, with one line, before uvicorn starts
    os.environ.update(
        {
            "CIGL_SERVE_MODEL": str(args.model),
            "CIGL_SERVE_DEVICE": args.device,
            "CIGL_SERVE_ENGINE": args.engine,
            "CIGL_SERVE_MAX_BATCH": str(args.max_batch),
            "CIGL_SERVE_MAX_BODY_MB": str(args.max_body_mb),
        }
    )
    import uvicorn

    config = uvicorn.Config(
        "cigl.serve.http:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )
    if args.workers > 1:
        _announce(args.model, args.host, args.port)
        uvicorn.run(config.app, factory=True, host=args.host, port=args.port, workers=args.workers, log_level="warning")
        return 0
    sock = _bind(args.host, args.port)  # first, so the URL printed has the real port (also for --port 0)
    _announce(args.model, args.host, sock.getsockname()[1])
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (uvicorn listens on it); InputError when that is refused."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host") from None
    return sock


def _announce(model: str, host: str, port: int) -> None:
    print(f"cigl-serve: {model} on http://{host}:{port} (API docs at /docs)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
