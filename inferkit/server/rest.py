"""The REST face: an ASGI app (Starlette) speaking the KServe Open Inference Protocol v2.

::

    GET  /v2/health/live                        200 while the process serves
    GET  /v2/health/ready                       200 once every model is loaded and warmed, else 503
    GET  /v2                                    server metadata
    GET  /v2/models/{m}[/versions/{v}]          model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready    200 or 503 (404 for an unknown model or version)
    POST /v2/models/{m}[/versions/{v}]/infer    inference
    GET  /v2/models[/{m}[/versions/{v}]]/stats  Triton-shaped statistics (``Repository.stats``)
    GET  /metrics                               Prometheus text format

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
mistake), 404 unknown model or version, 413 a body over ``max_request_bytes``, 415 an
unsupported ``Content-Encoding``, 429 or 503 with ``Retry-After`` when a queue is full (503
also when no replica is healthy or the model is closing), 504 when the ``timeout`` passed
before the request ran, 500 when the model failed. A client that disconnects while its
request is queued has it cancelled: the model never runs it (counted with the outcome
``ClientDisconnected``). As in Triton, ``GET /v2/models/stats`` means every model's statistics,
so a model called ``stats`` has no metadata endpoint.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import attrs
import numpy as np
import prometheus_client
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

from inferkit.errors import InferkitError, ModelNotFound
from inferkit.server.metrics import Metrics
from inferkit.server.protocol import (
    ARM,
    DTYPES,
    KEY,
    check_outputs,
    datatype_of,
    fit,
    from_raw,
    http_status,
    invalid,
    refuse_unsupported,
    request_options,
    server_version,
    shaped,
    to_raw,
)
from inferkit.server.repository import InferResult, Repository

try:  # orjson parses and writes JSON several times faster; the stdlib stands in without it
    import orjson

    _loads: Callable[[Any], Any] = orjson.loads

    def _dumps(value: Any) -> bytes:
        return orjson.dumps(value)

except ImportError:  # pragma: no cover (the server extra installs orjson)

    def _loads(data: Any) -> Any:
        return json.loads(bytes(data))

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()


__all__ = [
    "ARM_HEADER",
    "HEADER_LENGTH",
    "KEY_HEADER",
    "InferRequest",
    "create_app",
    "decode_request",
    "encode_response",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
"""The binary tensor data extension's header: how many bytes of the body are the JSON header."""
KEY_HEADER = KEY
"""The request header that carries a Router's sticky key."""
ARM_HEADER = ARM
"""The response header that names the Router arm that served the request."""

Array = np.ndarray[Any, Any]
_T = TypeVar("_T")
_JSON = "application/json"
_BINARY = "application/octet-stream"
_OFFLOAD_BYTES = 2**20  # decode and encode bigger requests off the event loop, so others are not held up


# Failures only the REST face has; their class names are the ``outcome`` label in the metrics.


class RequestTooLarge(InferkitError):
    """The body is larger than ``max_request_bytes`` (413)."""


class UnsupportedEncoding(InferkitError):
    """The body's ``Content-Encoding`` is neither gzip, deflate nor identity (415)."""


class ClientDisconnected(InferkitError):
    """The client went away before its answer was ready; a queued request was cancelled (499)."""


_STATUS: dict[type[BaseException], int] = {
    RequestTooLarge: 413,
    UnsupportedEncoding: 415,
    ClientDisconnected: 499,
}  # 499: nginx's "client closed"


# -- decoding ------------------------------------------------------------------------------


@attrs.frozen
class InferRequest:
    """A decoded inference request: input arrays by name and what the client asked for."""

    inputs: dict[str, Array]
    id: str | None = None
    outputs: tuple[str, ...] | None = None
    """Output names asked for, in order; None: every output."""
    binary: Mapping[str, bool] = attrs.field(factory=dict)
    """Per requested output, whether it goes back as binary data."""
    binary_default: bool = False
    """``parameters.binary_data_output``: binary for outputs not listed in :attr:`binary`."""
    key: str | None = None
    timeout: float | None = None
    """The deadline in seconds (the request's ``timeout`` is in microseconds)."""
    priority: int = 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _mapping(value: object, what: str, name: str | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid(f"{what} must be a JSON object, got {type(value).__name__}", name)
    return value


def _shape(value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(_is_int(d) and d >= 0 for d in value):
        raise invalid(f"shape must be a list of integers >= 0, got {value!r:.100}", name)
    return tuple(value)


def _count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)  # Python ints: a lying shape cannot overflow


def _flatten(data: list[Any]) -> list[Any]:
    """The leaves of nested lists, row-major (iteratively: no recursion limit to hit)."""
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _json_bytes(data: list[Any], shape: tuple[int, ...], name: str) -> Array:
    leaves = _flatten(data)
    if len(leaves) != _count(shape):
        raise invalid(f"shape {list(shape)} needs {_count(shape)} elements, data has {len(leaves)}", name)
    out = np.empty(len(leaves), dtype=object)
    for i, item in enumerate(leaves):
        if not isinstance(item, str):
            raise invalid(f"BYTES data must be strings, element {i} is {type(item).__name__}", name)
        out[i] = item.encode()
    return shaped(out, shape, name)


_KINDS = {"f": "iuf", "i": "iu", "u": "iu", "b": "b"}  # JSON number kinds each datatype takes


def _big_ints(data: list[Any], dtype: np.dtype[Any], datatype: str, name: str) -> Array:
    """Integers that NumPy would not infer exactly (e.g. UINT64 past 2**63), converted one by one."""
    leaves = _flatten(data)
    for item in leaves:
        if type(item) is not int:
            raise invalid(f"{datatype} data must be integers, got {item!r:.50}", name)
    try:
        return np.array(leaves, dtype=dtype)
    except OverflowError:
        info = np.iinfo(dtype)
        raise invalid(
            f"values {min(leaves)}..{max(leaves)} do not fit {datatype} [{info.min}, {info.max}]", name
        ) from None


def _json_tensor(data: object, shape: tuple[int, ...], datatype: str, name: str) -> Array:
    """A tensor from JSON ``data`` (flat or nested lists), checked against shape and datatype."""
    if not isinstance(data, list):
        raise invalid(f"data must be a JSON list, got {type(data).__name__}", name)
    dtype = DTYPES[datatype]
    if dtype.kind == "O":
        return _json_bytes(data, shape, name)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError) as exc:  # ragged nesting, mixed items
        raise invalid(f"data is not a regular array of {datatype} values ({exc})", name) from None
    if arr.size != _count(shape):
        raise invalid(f"shape {list(shape)} needs {_count(shape)} elements, data has {arr.size}", name)
    if dtype.kind in "iu" and arr.dtype.kind in "fO":  # NumPy turns ints past int64 into floats or objects
        arr = _big_ints(data, dtype, datatype, name)
    if arr.size and arr.dtype.kind not in _KINDS[dtype.kind]:
        got = {"U": "strings", "O": "mixed or out-of-range values", "b": "booleans", "f": "floats"}
        raise invalid(f"{datatype} data cannot hold {got.get(arr.dtype.kind, str(arr.dtype))}", name)
    if dtype.kind in "iu":
        arr = fit(arr, datatype, name)
    try:
        with np.errstate(over="raise", invalid="raise"):
            flat = arr.astype(dtype, copy=False).reshape(-1)
    except FloatingPointError:
        raise invalid(f"values overflow {datatype}", name) from None
    return shaped(flat, shape, name)


def _binary_tensor(raw: memoryview, shape: tuple[int, ...], datatype: str, name: str) -> Array:
    """A tensor from its raw bytes (the binary tensor data extension)."""
    return shaped(from_raw(raw, datatype, _count(shape), name), shape, name)


def _outputs(value: object) -> tuple[tuple[str, ...] | None, dict[str, bool]]:
    if value is None:
        return None, {}
    if not isinstance(value, list):
        raise invalid(f"outputs must be a list, got {type(value).__name__}")
    names: list[str] = []
    binary: dict[str, bool] = {}
    for item in value:
        out = _mapping(item, "each output")
        name = out.get("name")
        if not isinstance(name, str):
            raise invalid(f"each output needs a string name, got {name!r:.100}")
        if name in names:
            raise invalid(f"output {name!r} is asked for twice")
        params = _mapping(out.get("parameters"), f"output {name!r} parameters")
        refuse_unsupported(params, f"output {name!r}")
        flag = params.get("binary_data")
        if flag is not None:
            if not isinstance(flag, bool):
                raise invalid(f"output {name!r}: parameters.binary_data must be true or false, got {flag!r:.100}")
            binary[name] = flag
        names.append(name)
    return tuple(names), binary


def decode_request(body: bytes | bytearray, header_length: int | None = None) -> InferRequest:
    """Decode an inference request body; ``header_length`` is ``Inference-Header-Content-Length``.

    Raises :class:`~inferkit.InvalidInput` (naming the input where there is one) for anything
    malformed: bad JSON, a shape that does not match the data, an unknown datatype, binary
    sizes that do not add up to the body.
    """
    view = memoryview(body)
    if header_length is None:
        header_length = len(body)
    elif not 0 <= header_length <= len(body):
        raise invalid(f"{HEADER_LENGTH} is {header_length}, the body has {len(body)} bytes")
    try:
        header = _loads(body if header_length == len(body) else view[:header_length])
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid(f"the request is not valid JSON ({str(exc)[:200]})") from None
    header = _mapping(header, "the request")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("the request needs a non-empty list of inputs")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise invalid(f"id must be a string, got {request_id!r:.100}")
    parameters = _mapping(header.get("parameters"), "parameters")
    timeout, priority, key = request_options(parameters)
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise invalid(f"parameters.binary_data_output must be true or false, got {binary_default!r:.100}")
    outputs, binary = _outputs(header.get("outputs"))

    arrays: dict[str, Array] = {}
    offset = header_length
    for item in inputs:
        tensor = _mapping(item, "each input")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise invalid(f"each input needs a string name, got {name!r:.100}")
        if name in arrays:
            raise invalid("is given twice", name)
        shape = _shape(tensor.get("shape"), name)
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str) or datatype not in DTYPES:
            raise invalid(f"unknown datatype {datatype!r:.100}; expected one of {sorted(DTYPES)}", name)
        params = _mapping(tensor.get("parameters"), "parameters", name)
        refuse_unsupported(params, f"input {name!r}", name)
        size = params.get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise invalid("has neither data nor parameters.binary_data_size", name)
            arrays[name] = _json_tensor(tensor["data"], shape, datatype, name)
            continue
        if not _is_int(size) or size < 0:
            raise invalid(f"parameters.binary_data_size must be an integer >= 0, got {size!r:.100}", name)
        if "data" in tensor:
            raise invalid("has both data and parameters.binary_data_size", name)
        if offset + size > len(body):
            left = len(body) - offset
            raise invalid(f"binary_data_size is {size} bytes, only {left} remain in the body", name)
        arrays[name] = _binary_tensor(view[offset : offset + size], shape, datatype, name)
        offset += size
    if offset != len(body):
        extra = len(body) - offset
        raise invalid(f"{extra} bytes after the JSON header are not claimed by any input's binary_data_size")
    return InferRequest(arrays, request_id, outputs, binary, binary_default, key, timeout, priority)


# -- encoding ------------------------------------------------------------------------------


def _json_data(arr: Array) -> list[Any] | None:
    """An output's flat JSON data; None for BYTES that are not UTF-8 (those go binary)."""
    flat = arr.reshape(-1)
    if arr.dtype.kind not in "OS":
        return flat.tolist()
    out = []
    for item in flat:
        if isinstance(item, bytes):
            try:
                out.append(item.decode())
            except UnicodeDecodeError:
                return None
        else:
            out.append(str(item))
    return out


def encode_response(model: str, request: InferRequest, result: InferResult) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers (content type, binary header length, arm)."""
    outputs = result.outputs
    names = request.outputs if request.outputs is not None else tuple(outputs)
    check_outputs(names, outputs)
    tensors = []
    chunks: list[bytes] = []
    for name in names:
        arr = np.asarray(outputs[name])
        tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
        data = None if request.binary.get(name, request.binary_default) else _json_data(arr)
        if data is None:
            raw = to_raw(arr)
            chunks.append(raw)
            tensor["parameters"] = {"binary_data_size": len(raw)}
        else:
            tensor["data"] = data
        tensors.append(tensor)
    response: dict[str, Any] = {"model_name": model, "model_version": result.version or ""}
    if request.id is not None:
        response["id"] = request.id
    headers = {}
    if result.arm is not None:
        response["parameters"] = {"arm": result.arm}
        headers[ARM_HEADER] = result.arm
    response["outputs"] = tensors
    header = _dumps(response)
    if not chunks:
        headers["content-type"] = _JSON
        return header, headers
    headers["content-type"] = _BINARY
    headers[HEADER_LENGTH] = str(len(header))
    return b"".join([header, *chunks]), headers


# -- the app -------------------------------------------------------------------------------


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _off_loop(size: int, fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)``, on a worker thread when ``size`` bytes of tensors make it slow enough to stall the loop."""
    if size < _OFFLOAD_BYTES:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


def _discard(task: asyncio.Future[Any]) -> None:
    """Retrieve a cancelled request's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _decompress(body: bytearray, encoding: str, limit: int) -> bytearray:
    wbits = {"gzip": 31, "deflate": 15}.get(encoding)
    if wbits is None:
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or identity")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise invalid(f"the {encoding} body does not decompress ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise RequestTooLarge(f"the decompressed body is larger than max_request_bytes={limit}")
    if not inflater.eof:
        raise invalid(f"the {encoding} body is truncated")
    return bytearray(out)


class _App:
    """The endpoints, over one repository."""

    def __init__(self, repository: Repository, metrics: Metrics, limit: int, overload: int, retry_after: str) -> None:
        self.repository = repository
        self.metrics = metrics
        self.limit = limit
        self.overload = overload
        self.retry_after = retry_after

    def fail(self, error: BaseException) -> JSONResponse:
        """The error response for ``error``."""
        status = _STATUS.get(type(error)) or http_status(error, overload_status=self.overload)
        headers = {"Retry-After": self.retry_after} if status in {429, 503} else None
        message = str(error) if isinstance(error, InferkitError) else f"internal error: {type(error).__name__}: {error}"
        return _error(status, message or type(error).__name__, headers)

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
        extensions = ["binary_tensor_data", "statistics"]
        return JSONResponse({"name": "inferkit", "version": server_version(), "extensions": extensions})

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
            stats = self.repository.stats(request.path_params.get("model"), request.path_params.get("version"))
        except ModelNotFound as error:
            return self.fail(error)
        return JSONResponse(stats)

    async def metrics_text(self, _request: Request) -> Response:
        """Prometheus metrics."""
        body, content_type = self.metrics.render()
        return Response(body, headers={"content-type": content_type})

    async def infer(self, request: Request) -> Response:
        """Decode, run through the repository, encode; count the outcome."""
        start = time.perf_counter()
        name = request.path_params["model"]
        version = request.path_params.get("version")
        arm: str | None = None
        try:
            self.repository.resolve(name, version)  # 404 before reading the body
        except ModelNotFound as error:
            return self.fail(error)  # not counted: a label per unknown name would let clients grow the metrics
        try:
            raw = await self._body(request)
            decoded = await _off_loop(len(raw), decode_request, raw, _header_length(request))
            if decoded.outputs is not None:  # refuse unknown outputs before the model runs, where we can
                known = self.repository.output_names(name, version)
                if known:
                    check_outputs(decoded.outputs, known)
            key = request.headers.get(KEY_HEADER, decoded.key)
            result = await self._unless_disconnected(
                request.receive,
                self.repository.infer(
                    name, version, decoded.inputs, key=key, timeout=decoded.timeout, priority=decoded.priority
                ),
            )
            arm = result.arm
            size = sum(np.asarray(o).nbytes for o in result.outputs.values())
            body, headers = await _off_loop(size, encode_response, name, decoded, result)
        except Exception as error:  # noqa: BLE001 (every failure becomes an answer and a count)
            arm = getattr(error, "arm", arm)
            self.metrics.observe(name, arm, type(error).__name__, time.perf_counter() - start)
            response = self.fail(error)
            if arm is not None:
                response.headers[ARM_HEADER] = arm
            return response
        self.metrics.observe(name, arm, "success", time.perf_counter() - start)
        return Response(body, headers=headers)

    async def _body(self, request: Request) -> bytearray:
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise invalid(f"Content-Length must be a number, got {length!r:.100}")
            if int(length) > self.limit:
                raise RequestTooLarge(f"the body is {length} bytes, more than max_request_bytes={self.limit}")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.limit:
                    raise RequestTooLarge(f"the body is more than max_request_bytes={self.limit}")
        except ClientDisconnect:
            raise ClientDisconnected("the client disconnected while sending its request") from None
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in {"", "identity"}:
            body = _decompress(body, encoding, self.limit)
        return body

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


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        raise invalid(f"{HEADER_LENGTH} must be a number, got {value!r:.100}")
    return int(value)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return _error(exc.status_code, str(exc.detail), exc.headers)


def create_app(
    repository: Repository,
    *,
    metrics: Metrics | None = None,
    max_request_bytes: int = 64 * 2**20,
    overload_status: int = 503,
    retry_after_s: float = 1.0,
) -> Starlette:
    """The REST app over ``repository``: run it with uvicorn, or mount it in a Starlette/FastAPI app.

    ``metrics`` (default: a :class:`~inferkit.server.metrics.Metrics` on a fresh registry) is
    served at ``/metrics``; pass one to share it with the gRPC server or the host's registry.
    A body larger than ``max_request_bytes`` (also once decompressed) is refused with 413.
    A full queue answers ``overload_status`` (429 or 503) with ``Retry-After: retry_after_s``
    (rounded up to whole seconds). The app does not own the repository: closing the models
    is the caller's part.
    """
    if not _is_int(max_request_bytes) or max_request_bytes < 1:
        msg = f"max_request_bytes must be an int >= 1, got {max_request_bytes!r}"
        raise ValueError(msg)
    if overload_status not in {429, 503}:
        msg = f"overload_status must be 429 or 503, got {overload_status!r}"
        raise ValueError(msg)
    if not retry_after_s >= 0:
        msg = f"retry_after_s must be >= 0, got {retry_after_s!r}"
        raise ValueError(msg)
    if metrics is None:
        metrics = Metrics(repository, prometheus_client.CollectorRegistry())
    app = _App(repository, metrics, max_request_bytes, overload_status, str(math.ceil(retry_after_s)))
    model = "/v2/models/{model}"
    version = model + "/versions/{version}"
    routes = [
        Route("/v2/health/live", app.live, methods=["GET"]),
        Route("/v2/health/ready", app.ready, methods=["GET"]),
        Route("/v2", app.server_metadata, methods=["GET"]),
        Route("/v2/models/stats", app.stats, methods=["GET"]),
        Route("/metrics", app.metrics_text, methods=["GET"]),
    ]
    for base in (model, version):
        routes += [
            Route(base, app.model_metadata, methods=["GET"]),
            Route(base + "/ready", app.ready, methods=["GET"]),
            Route(base + "/stats", app.stats, methods=["GET"]),
            Route(base + "/infer", app.infer, methods=["POST"]),
        ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {HTTPException: _http_error}
    starlette = Starlette(routes=routes, exception_handlers=handlers)
    starlette.state.metrics = metrics
    return starlette
