"""The HTTP front end of an :class:`~branchynet.serving.ExitServer` (FastAPI).

:func:`create_app` wraps a running server in an ASGI app; ``branchynet serve`` runs it on
uvicorn (:mod:`branchynet.serving.cli`), and each Ray Serve replica runs the same app in
front of its own server (:mod:`branchynet.serving.ray`). The app does not own the server:
whoever made it closes it, after the HTTP side has stopped (so queued requests are
answered, not failed).

Endpoints:

- ``POST /v1/predict``: a batch of samples, each answered by the server on its own (they
  may leave at different exits, batched with other clients' samples). Bodies:

  - ``application/json``: ``{"inputs": [sample, ...], "return_logits": false}``, each
    sample nested lists of the model's input shape (no batch dimension);
  - ``application/x-npy``: a ``.npy`` file of a float array [N, *input_shape] (read with
    ``allow_pickle=False``: never a pickle);
  - ``application/octet-stream``: raw little-endian float32, its shape [N, *input_shape]
    in the ``X-Shape`` header (``"8,1,28,28"``).

  Answer: ``{"outputs": [{"pred": int, "exit": int, "score": float, "logits": [...]}]}``
  in input order (``logits`` only with ``return_logits``; a query parameter
  ``?return_logits=true`` works for every body).
- ``GET /health``: 200 while the server accepts requests and its worker runs, else 503.
- ``GET /metrics``: Prometheus text (:mod:`branchynet.serving.metrics`).
- ``GET /docs``, ``GET /openapi.json``: FastAPI's OpenAPI pages.

Errors are JSON ``{"detail": message}``: 400 malformed JSON or header, 401 missing or
wrong bearer token (with ``api_key``), 413 a body over ``max_body_mb`` (refused from its
``Content-Length`` before any of it is read, or as soon as a streamed body passes the
limit), 415 another content type, 422 a wrong shape, a non-numeric or non-finite value, a
dtype that is not floating point, 503 with ``Retry-After`` when the server is overloaded
or closing, 500 when a stage raised on a run holding one of the request's samples.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import math
import time

import numpy as np
import torch

from .server import Overloaded

try:  # at module level: FastAPI reads the handlers' (string) annotations from these globals
    from fastapi import Request
except ImportError:  # create_app says what to install
    Request = None

__all__ = ["create_app", "decode_inputs", "HTTPInputError"]

#: Content types of the binary bodies.
NPY_TYPES = ("application/x-npy", "application/npy")
RAW_TYPE = "application/octet-stream"


class HTTPInputError(ValueError):
    """A request the server refuses or cannot answer: ``status`` and the message sent
    back as ``{"detail": message}``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise ImportError(f"the HTTP server needs {module}: pip install 'branchynet[serve]' "
                          f"(fastapi, uvicorn, prometheus-client)") from err


# --- request bodies -> one float array [N, *input_shape] -------------------------------------


def _from_json(body: bytes) -> tuple[np.ndarray, bool]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HTTPInputError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or "inputs" not in doc:
        raise HTTPInputError(422, 'expected a JSON object {"inputs": [sample, ...]}, got '
                                  + (f"keys {sorted(doc)[:5]}" if isinstance(doc, dict) else type(doc).__name__))
    logits = doc.get("return_logits", False)
    if not isinstance(logits, bool):
        raise HTTPInputError(422, f"return_logits must be true or false, got {logits!r}")
    inputs = doc["inputs"]
    if not isinstance(inputs, list):
        raise HTTPInputError(422, f"inputs must be a list of samples, got {type(inputs).__name__}")
    try:
        # No dtype here: numpy would turn "1.5" and true into numbers. Mixed or ragged
        # lists come out as object or string arrays (or raise), refused below.
        arr = np.array(inputs)
    except ValueError as err:
        raise HTTPInputError(422, f"inputs are not a regular array of numbers (ragged nesting?): {err}") from None
    if arr.dtype.kind not in "iuf" and arr.size:
        raise HTTPInputError(422, "inputs must hold numbers only (nested lists of the model's input shape), "
                                  f"got values of type {arr.dtype.kind!r} ({_kind(arr)})")
    return arr, logits


def _kind(arr: np.ndarray) -> str:
    return {"b": "booleans", "U": "strings", "S": "bytes", "O": "null, objects or ragged lists"}.get(
        arr.dtype.kind, str(arr.dtype))


def _from_npy(body: bytes) -> np.ndarray:
    try:
        # The .npy reader itself (np.load would also try .npz and pickles): a file of
        # Python objects needs a pickle and is refused.
        arr = np.lib.format.read_array(io.BytesIO(body), allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise HTTPInputError(422, "the .npy body holds Python objects (it would need a pickle, which is "
                                      "never loaded): send a float array") from None
        raise HTTPInputError(400, f"the body is not a .npy file: {err}") from None
    except Exception as err:  # truncated
        raise HTTPInputError(400, f"the body is not a .npy file ({type(err).__name__}: {err})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        raise HTTPInputError(422, "a .npy body must hold a floating-point array (float16/32/64), got "
                                  f"dtype {getattr(arr, 'dtype', type(arr).__name__)}")
    return arr


def _from_raw(body: bytes, shape_header: str | None) -> np.ndarray:
    if not shape_header:
        raise HTTPInputError(400, f"{RAW_TYPE} needs the array's shape in the X-Shape header "
                                  "(e.g. X-Shape: 8,1,28,28)")
    try:
        shape = tuple(int(s) for s in shape_header.split(","))
    except ValueError:
        raise HTTPInputError(400, f"X-Shape must be comma-separated integers, got {shape_header!r}") from None
    if any(s < 0 for s in shape):
        raise HTTPInputError(400, f"X-Shape must be non-negative integers, got {shape_header!r}")
    want = math.prod(shape) * 4
    if len(body) != want:
        raise HTTPInputError(422, f"X-Shape {list(shape)} is {want} bytes of float32, the body is {len(body)}")
    return np.frombuffer(body, dtype="<f4").reshape(shape)


def decode_inputs(body: bytes, content_type: str, input_shape, shape_header: str | None = None):
    """One request body as a numeric array [N, *input_shape] and whether it asks
    for logits (JSON only; None for the binary forms).

    Raises:
        HTTPInputError: the body is malformed (400), of another type (415) or not such an
            array (422): the message names what was expected.
    """
    ctype = (content_type or "").split(";")[0].strip().lower()
    logits = None
    if ctype == "application/json":
        arr, logits = _from_json(body)
    elif ctype in NPY_TYPES:
        arr = _from_npy(body)
    elif ctype == RAW_TYPE:
        arr = _from_raw(body, shape_header)
    else:
        raise HTTPInputError(415, f"Content-Type must be application/json, {NPY_TYPES[0]} or {RAW_TYPE}, "
                                  f"got {content_type or 'none'!r}")
    if arr.dtype.kind not in "iuf":
        raise HTTPInputError(422, f"inputs must be floating-point numbers, got dtype {arr.dtype}")
    want = tuple(input_shape)
    if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != want or arr.shape[0] == 0:
        raise HTTPInputError(422, f"inputs must be N >= 1 samples of shape {list(want)} (array "
                                  f"[N, {', '.join(map(str, want))}]), got an array of shape {list(arr.shape)}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr).reshape(arr.shape[0], -1).all(1))[0])
        raise HTTPInputError(422, f"inputs must be finite: sample {bad} holds NaN or infinity")
    return arr, logits


# --- the app ---------------------------------------------------------------------------------


def create_app(server, input_shape, *, dtype: torch.dtype = torch.float32, max_body_mb: float = 16.0,
               api_key: str | None = None, retry_after_s: int = 1, metrics=None, title: str = "branchynet"):
    """A FastAPI app answering ``POST /v1/predict`` with ``server`` (see the module
    docstring for the endpoints and errors).

    Args:
        server: a running :class:`~branchynet.serving.ExitServer`; not closed by the app.
        input_shape: the shape of one sample, e.g. ``(1, 28, 28)``.
        dtype: the model's floating dtype; inputs are cast to it.
        max_body_mb: largest request body accepted, in MiB.
        api_key: if set, ``/v1/predict`` and ``/metrics`` need ``Authorization: Bearer
            <api_key>`` (``/health`` and the docs stay open for probes).
        retry_after_s: the ``Retry-After`` sent with a 503.
        metrics: a :class:`~branchynet.serving.metrics.ServingMetrics` (default: a new one
            on its own registry, reading ``server.stats()``).
    """
    fastapi = _need("fastapi")
    from fastapi.responses import JSONResponse, Response

    from .metrics import ServingMetrics

    if not (isinstance(max_body_mb, (int, float)) and max_body_mb > 0):
        raise ValueError(f"max_body_mb must be a number > 0, got {max_body_mb!r}")
    if input_shape is None:
        raise ValueError("input_shape is needed (the shape of one sample, e.g. (1, 28, 28))")
    input_shape = tuple(int(s) for s in input_shape)
    limit = int(max_body_mb * 2**20)
    metrics = metrics or ServingMetrics(server)
    app = fastapi.FastAPI(title=title, description="BranchyNet early-exit inference: each sample leaves "
                                                   "at the first exit confident enough.")
    app.state.server, app.state.metrics = server, metrics

    @app.exception_handler(HTTPInputError)
    async def _refused(request: Request, err: HTTPInputError):
        metrics.requests.labels(request.url.path, str(err.status)).inc()
        return JSONResponse({"detail": str(err)}, status_code=err.status, headers=err.headers)

    def _check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise HTTPInputError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                 {"WWW-Authenticate": "Bearer"})

    @app.post("/v1/predict", summary="Classify samples with early exit", openapi_extra=_PREDICT_DOC)
    async def predict(request: Request, return_logits: bool = False):
        t0 = time.perf_counter()
        _check_key(request)
        body = await _read_limited(request, limit)
        arr, want_logits = decode_inputs(body, request.headers.get("content-type"), input_shape,
                                         request.headers.get("x-shape"))
        x = torch.tensor(arr, dtype=dtype)  # one copy, cast on the way (a raw body is read-only)
        answers = await _answer_all(server, x, retry_after_s)
        with_logits = return_logits or bool(want_logits)
        out = []
        for a in answers:
            o = {"pred": a.pred, "exit": a.exit, "score": a.score}
            if with_logits:
                o["logits"] = a.logits.tolist()
            out.append(o)
            metrics.answer_latency.labels(str(a.exit)).observe(a.latency_s)
        metrics.samples.inc(len(answers))
        metrics.requests.labels("/v1/predict", "200").inc()
        metrics.request_latency.observe(time.perf_counter() - t0)
        return JSONResponse({"outputs": out})  # no pydantic pass over plain lists and numbers

    @app.get("/health", summary="200 while the model is loaded and the worker runs")
    async def health():
        alive = server.alive
        return JSONResponse({"status": "ok" if alive else "unavailable"}, status_code=200 if alive else 503)

    @app.get("/metrics", summary="Prometheus metrics (names prefixed branchynet_)")
    async def prometheus(request: Request):
        _check_key(request)
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    return app


async def _read_limited(request, limit: int) -> bytes:
    """The body, refused with 413 once it passes ``limit`` bytes: from Content-Length
    before reading any of it, or while a chunked body streams in."""
    size = request.headers.get("content-length")
    if size is not None:
        try:
            n = int(size)
        except ValueError:
            raise HTTPInputError(400, f"Content-Length must be an integer, got {size!r}") from None
        if n > limit:
            raise HTTPInputError(413, f"the body is {n} bytes, over the limit of {limit} bytes (--max-body-mb)")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise HTTPInputError(413, f"the body passed the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


async def _answer_all(server, x: torch.Tensor, retry_after_s: int) -> list:
    """Every row of x submitted on its own; their answers in row order. A refusal part-way
    cancels the rows already queued (the worker skips cancelled rows) and sends 503."""
    futures = []
    try:
        for row in x:
            futures.append(server.submit(row))
    except (Overloaded, RuntimeError) as err:
        for f in futures:
            f.cancel()
        what = "overloaded" if isinstance(err, Overloaded) else "closing"
        raise HTTPInputError(503, f"the server is {what}: {err}", {"Retry-After": str(retry_after_s)}) from None
    try:
        return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    except Exception as err:  # a stage raised on a run holding one of these samples
        raise HTTPInputError(500, f"the model failed on this request ({type(err).__name__}: {err})") from None


#: The request bodies /v1/predict reads itself (so FastAPI does not parse, or buffer past
#: the size limit), described for the OpenAPI page.
_PREDICT_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {
                "type": "object", "required": ["inputs"],
                "properties": {
                    "inputs": {"type": "array", "description": "samples, each nested lists of the model's "
                                                                "input shape (no batch dimension)",
                               "items": {}},
                    "return_logits": {"type": "boolean", "default": False}}}},
            NPY_TYPES[0]: {"schema": {"type": "string", "format": "binary",
                                      "description": ".npy float array [N, *input_shape], no pickle"}},
            RAW_TYPE: {"schema": {"type": "string", "format": "binary",
                                  "description": "little-endian float32, shape [N, *input_shape] "
                                                 "in the X-Shape header"}},
        },
    },
    "responses": {
        "200": {"description": "one answer per sample, in input order",
                "content": {"application/json": {"example": {
                    "outputs": [{"pred": 3, "exit": 0, "score": 0.012}]}}}},
        "401": {"description": "missing or wrong bearer token"},
        "413": {"description": "body over --max-body-mb"},
        "415": {"description": "another content type"},
        "422": {"description": "wrong shape, non-numeric or non-finite values"},
        "503": {"description": "overloaded or closing; see Retry-After"},
    },
}
