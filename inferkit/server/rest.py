"""The REST face: an ASGI app (Starlette) speaking the KServe Open Inference Protocol v2.

::

    GET  /v2/health/live                        200 while the process serves
    GET  /v2/health/ready                       200 once every model is loaded and warmed, else 503
    GET  /v2                                    server metadata
    GET  /v2/models/{m}[/versions/{v}]          model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready    200 or 503 (404 for an unknown model or version)
    POST /v2/models/{m}[/versions/{v}]/infer    inference
    GET  /v2/models[/{m}[/versions/{v}]]/stats  Triton-shaped statistics (``Repository.stats``)
    GET  /v2/models/{m}[/versions/{v}]/config   Triton-shaped model configuration (``Repository.config``)
    POST /v2/repository/index                   the models and their state
    POST /v2/repository/models/{m}/load         load, or hot-swap, a model (repository control)
    POST /v2/repository/models/{m}/unload       unload a model once it drains (repository control)
    GET  /metrics                               Prometheus text format
    GET  /v2/openapi.json                       the OpenAPI document of these routes
    GET  /, /v2/status, /docs                   the status page, its snapshot, the API page (``status_page``)

Every request goes through :meth:`Repository.infer <inferkit.server.Repository.infer>`, so
HTTP callers are batched with gRPC and in-process callers, and a Router's split applies.
``/versions/{v}`` pins that version; without one the model's target (a Predictor, or a Router)
decides. The Router's sticky key is the ``inferkit-key`` header, else the request parameter
``key`` (as a string either way); the arm that served is the response parameter ``arm`` and
the ``inferkit-arm`` header.

Tensors travel as JSON (``data`` flat or nested, row-major; BYTES as UTF-8 strings) or with
the binary tensor data extension that ``tritonclient.http`` uses by default: the body is a
JSON header of ``Inference-Header-Content-Length`` bytes followed by each binary input's raw
bytes, in input order, ``parameters.binary_data_size`` bytes each (BYTES elements framed as a
4-byte little-endian length and the bytes). Outputs are JSON unless the request sets
``parameters.binary_data_output`` or an output's ``parameters.binary_data``; a BYTES output
that is not UTF-8 is always sent binary. Request bodies may be gzip or deflate encoded.

Request parameters ``timeout`` (microseconds), ``priority`` (Triton's levels: 1 most urgent)
and ``key`` are read by :func:`inferkit.server.protocol.request_options`, as over gRPC. Other
parameters are ignored.

Errors are ``{"error": "..."}``: 400 for a malformed request (never a 5xx for a client's
mistake), 404 unknown model or version, 413 a body over ``max_request_bytes``, a JSON part
over ``max_json_bytes``, or a request (or answer) that could never be decoded (encoded) within
``max_decode_bytes``, 415 an unsupported ``Content-Encoding``, 429 or 503 with ``Retry-After``
when a queue is full or other large requests hold ``max_decode_bytes`` (503 also when no
replica is healthy or the model is closing), 504 when the ``timeout`` passed before the
request ran, 500 when the model failed.

Decoding is bounded before it starts: a body under 32 KiB is decoded on the event loop (a
few milliseconds at most); a larger one first reserves its estimated memory (see
:mod:`inferkit.server.budget`) from ``max_decode_bytes``, then is decoded on a
worker thread; large answers and compressed bodies past their first MiB likewise. A size
header (``Content-Length``, ``Inference-Header-Content-Length``) must be ASCII digits.

Load and unload are off unless ``control`` enables them, and then need the operator's token,
``Authorization: Bearer <token>`` (401 without, 403 when wrong; see
:mod:`inferkit.server.control`).

A client that disconnects while its
request is queued has it cancelled: the model never runs it (counted with the outcome
``ClientDisconnected``). As in Triton, ``GET /v2/models/stats`` means every model's statistics,
so a model called ``stats`` has no metadata endpoint.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import prometheus_client
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

from inferkit.errors import (  # defined in the one error tree; importable here too
    ClientDisconnected,
    DecodingBusy,
    InferkitError,
    ModelNotFound,
    RequestTooLarge,
    UnsupportedEncoding,
)
from inferkit.server import admin
from inferkit.server.control import (
    Controller,
    RepositoryControl,
    Unauthenticated,
    controller_of,
    load_parameters,
)
from inferkit.server.logs import RequestLog
from inferkit.server.metrics import Metrics
from inferkit.server.pipeline import Call, Pipeline, describe
from inferkit.server.protocol import ARM, KEY, extensions, http_status, invalid, server_version
from inferkit.server.repository import Failed, InferResult, Repository
from inferkit.server.rest_body import Bodies
from inferkit.server.rest_decode import is_int, mapping
from inferkit.server.status import status_routes

__all__ = [
    "ARM_HEADER",
    "KEY_HEADER",
    "ClientDisconnected",
    "DecodingBusy",
    "RequestTooLarge",
    "UnsupportedEncoding",
    "create_app",
]

KEY_HEADER = KEY
"""The request header that carries a Router's sticky key."""
ARM_HEADER = ARM
"""The response header that names the Router arm that served the request."""

# Failures only the REST face has; their class names are the ``outcome`` label in the metrics.


_STATUS: dict[type[BaseException], int] = {
    RequestTooLarge: 413,
    UnsupportedEncoding: 415,
    ClientDisconnected: 499,
}  # 499: nginx's "client closed"


# -- the app -------------------------------------------------------------------------------


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _discard(task: asyncio.Future[Any]) -> None:
    """Retrieve a cancelled request's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _App:
    """The endpoints, over one repository."""

    def __init__(
        self,
        repository: Repository,
        metrics: Metrics,
        limits: tuple[int, int, int],
        overload: int,
        retry_after: str,
        controller: Controller,
    ) -> None:
        self.repository = repository
        self.control = controller.control
        self.controller = controller
        self.metrics = metrics
        self.bodies = Bodies(*limits)
        self.overload = overload
        self.retry_after = retry_after
        self.pipeline = Pipeline(repository, "rest", metrics)

    @property
    def log(self) -> RequestLog:
        """The request log (create_app's ``request_log`` replaces the default)."""
        return self.pipeline.log

    @log.setter
    def log(self, log: RequestLog) -> None:
        self.pipeline.log = log

    def fail(self, error: BaseException) -> JSONResponse:
        """The error response for ``error``."""
        if isinstance(error, DecodingBusy):
            status = self.overload
        else:
            status = _STATUS.get(type(error)) or http_status(error, overload_status=self.overload)
        headers = {"Retry-After": self.retry_after} if status in {429, 503} else None
        if isinstance(error, Unauthenticated):
            headers = {"WWW-Authenticate": "Bearer"}
        return _error(status, describe(error), headers)

    async def live(self, _request: Request) -> Response:
        """Liveness: the process answers."""
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        """Readiness of the server (every model) or of one model or version."""
        name = request.path_params.get("model")
        try:
            ready = self.repository.ready(name, request.path_params.get("version"))
        except ModelNotFound as error:
            return self.fail(error)
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def server_metadata(self, _request: Request) -> Response:
        """Server name, version and the protocol extensions it speaks."""
        served = extensions("http", repository_control=self.control.enabled)
        return JSONResponse({"name": "inferkit", "version": server_version(), "extensions": served})

    async def model_metadata(self, request: Request) -> Response:
        """A model's name, versions, platform, inputs and outputs."""
        try:
            meta = self.repository.metadata(request.path_params["model"], request.path_params.get("version"))
        except ModelNotFound as error:
            return self.fail(error)
        return JSONResponse(meta)

    async def stats(self, request: Request) -> Response:
        """Triton-shaped statistics of one model (or version), or of every model."""
        try:
            stats = self.repository.stats(
                request.path_params.get("model"), request.path_params.get("version"), split=True
            )
        except ModelNotFound as error:
            return self.fail(error)
        return JSONResponse(stats)

    async def config(self, request: Request) -> Response:
        """A model's Triton-shaped configuration."""
        try:
            config = self.repository.config(request.path_params["model"], request.path_params.get("version"))
        except ModelNotFound as error:
            return self.fail(error)
        return JSONResponse(config)

    async def repository_index(self, request: Request) -> Response:
        """Every model the server knows and its state; ``{"ready": true}`` keeps the ready ones."""
        try:
            body = await self.bodies.small_json(request)
            ready = body.get("ready", False)
            if not isinstance(ready, bool):
                raise invalid("Invalid value for 'ready': expected a boolean")
        except InferkitError as error:
            return self.fail(error)
        return JSONResponse([e for e in self.repository.index() if not ready or e["state"] == "READY"])

    async def load(self, request: Request) -> Response:
        """Load (or hot-swap) a model: the operator's token, then the build on a worker thread."""
        try:
            self.control.authorize(request.headers.get("authorization"))
            body = await self.bodies.small_json(request)
            params = mapping(body.get("parameters"), "parameters")
            await self.controller.load(request.path_params["model"], load_parameters(params))
        except InferkitError as error:
            return self.fail(error)
        return JSONResponse({})

    async def unload(self, request: Request) -> Response:
        """Unload a model once what it accepted is answered (``unload_dependents`` has no meaning here)."""
        try:
            self.control.authorize(request.headers.get("authorization"))
            body = await self.bodies.small_json(request)
            params = mapping(body.get("parameters"), "parameters")
            if not isinstance(params.get("unload_dependents", False), bool):
                raise invalid("invalid value type for 'unload_dependents' parameter, expected bool_param.")
            await self.controller.unload(request.path_params["model"])
        except InferkitError as error:
            return self.fail(error)
        return JSONResponse({})

    async def metrics_text(self, _request: Request) -> Response:
        """Prometheus metrics."""
        body, content_type = self.metrics.render()
        return Response(body, headers={"content-type": content_type})

    async def infer(self, request: Request) -> Response:
        """Decode, run through the pipeline (find, check, infer, record), encode."""
        start = self.pipeline.begin(request.headers)
        name = request.path_params["model"]
        try:
            body, headers = await self.pipeline.run(
                start,
                name,
                request.path_params.get("version"),
                functools.partial(self._call, request),
                functools.partial(self._answer, name),
                wait=functools.partial(self._unless_disconnected, request.receive),
            )
        except Failed as failed:
            response = self.fail(failed.error)
            if failed.arm is not None:
                response.headers[ARM_HEADER] = failed.arm
            return response
        return Response(body, headers=headers)

    async def _call(self, request: Request) -> Call:
        decoded = await self.bodies.decode(request)
        key = request.headers.get(KEY_HEADER, decoded.key)
        return Call(decoded.inputs, decoded.outputs or (), key, decoded.timeout, decoded.priority, decoded)

    async def _answer(self, model: str, call: Call, result: InferResult) -> tuple[bytes, dict[str, str]]:
        return await self.bodies.encode(model, call.request, result)

    @staticmethod
    async def _unless_disconnected(receive: Receive, infer: Awaitable[InferResult]) -> InferResult:
        """Await ``infer``; if the client disconnects first, cancel it (a queued request never runs)."""
        task = asyncio.ensure_future(infer)
        watch = asyncio.ensure_future(_until_disconnected(receive))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is itself cancelled
            watch.cancel()
            if not task.done():
                task.cancel()  # cancels the request's future: a queued request never runs
                task.add_done_callback(_discard)
        if not task.done():
            raise ClientDisconnected("the client disconnected before its answer was ready")
        return task.result()


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail), exc.headers)


def create_app(
    repository: Repository,
    *,
    metrics: Metrics | None = None,
    max_request_bytes: int = 64 * 2**20,
    max_json_bytes: int = 16 * 2**20,
    max_decode_bytes: int = 2**30,
    overload_status: int = 503,
    retry_after_s: float = 1.0,
    control: RepositoryControl | Controller | None = None,
    request_log: RequestLog | None = None,
    status_page: bool = False,
) -> Starlette:
    """The REST app over ``repository``: run it with uvicorn, or mount it in a Starlette/FastAPI app.

    ``metrics`` (default: a :class:`~inferkit.server.metrics.Metrics` on a fresh registry) is
    served at ``/metrics``; pass one to share it with the gRPC server or the host's registry.

    Limits, each refused with 413 and a message that names it:

    - ``max_request_bytes``: a body (also once decompressed).
    - ``max_json_bytes``: the JSON part of a body (all of it without binary tensor data);
      JSON tensors take 4-35 times their size in memory while decoded.
    - ``max_decode_bytes``: the memory that large bodies (32 KiB and more) being decoded and
      large answers being encoded may hold at once, estimated before the work starts (JSON at
      :data:`~inferkit.server.budget.JSON_COST_PER_BYTE` per byte, binary at
      :data:`~inferkit.server.budget.BINARY_COST_PER_BYTE`, BYTES elements at
      :data:`~inferkit.server.budget.BYTES_ELEMENT_COST`). A request that could never fit is a 413; one
      that does not fit beside those under way is refused like a full queue, below.

    A full queue answers ``overload_status`` (429 or 503) with ``Retry-After: retry_after_s``
    (rounded up to whole seconds). The app does not own the repository: closing the models
    is the caller's part. ``control`` turns on load and unload (see
    :mod:`inferkit.server.control`); off by default. Pass a
    :class:`~inferkit.server.control.Controller` to share it with the gRPC server: changes then
    take turns across both.

    ``GET /v2/openapi.json`` describes the routes served. ``status_page`` adds the status
    page at ``/``, its snapshot at ``/v2/status`` and ``/docs`` (see :mod:`inferkit.server.status`).
    """
    for option, value in [
        ("max_request_bytes", max_request_bytes),
        ("max_json_bytes", max_json_bytes),
        ("max_decode_bytes", max_decode_bytes),
    ]:
        if not is_int(value) or value < 1:
            msg = f"{option} must be an int >= 1, got {value!r}"
            raise ValueError(msg)
    if overload_status not in {429, 503}:
        msg = f"overload_status must be 429 or 503, got {overload_status!r}"
        raise ValueError(msg)
    if not retry_after_s >= 0:
        msg = f"retry_after_s must be >= 0, got {retry_after_s!r}"
        raise ValueError(msg)
    if metrics is None:
        metrics = Metrics(repository, prometheus_client.CollectorRegistry())
    limits = (max_request_bytes, max_json_bytes, max_decode_bytes)
    controller = controller_of(repository, control)
    app = _App(repository, metrics, limits, overload_status, str(math.ceil(retry_after_s)), controller)
    if request_log is not None:
        app.log = request_log
    model = "/v2/models/{model}"
    version = model + "/versions/{version}"
    routes = [
        Route("/v2/health/live", app.live, methods=["GET"]),
        Route("/v2/health/ready", app.ready, methods=["GET"]),
        Route("/v2", app.server_metadata, methods=["GET"]),
        Route("/v2/models/stats", app.stats, methods=["GET"]),
        Route("/metrics", app.metrics_text, methods=["GET"]),
        Route("/v2/repository/index", app.repository_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", app.load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", app.unload, methods=["POST"]),
    ]
    for base in (model, version):
        routes += [
            Route(base, app.model_metadata, methods=["GET"]),
            Route(base + "/ready", app.ready, methods=["GET"]),
            Route(base + "/stats", app.stats, methods=["GET"]),
            Route(base + "/config", app.config, methods=["GET"]),
            Route(base + "/infer", app.infer, methods=["POST"]),
        ]
    routes += admin.routes(repository, controller.control.token, app.fail)  # canary control: on with a token only
    routes += status_routes(repository, page=status_page, served=lambda: starlette.routes)
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {HTTPException: _http_error}
    starlette = Starlette(routes=routes, exception_handlers=handlers)
    starlette.state.metrics = metrics
    return starlette
