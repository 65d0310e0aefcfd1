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

Decoding is bounded before it starts: a body under 1 MiB is decoded on the event loop (a
few milliseconds); a larger one first reserves its estimated memory (see
:data:`JSON_COST_PER_BYTE` and its neighbours) from ``max_decode_bytes``, then is decoded on a
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
import json
import math
import threading
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

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

from inferkit.errors import (  # defined in the one error tree; importable here too
    ClientDisconnected,
    DecodingBusy,
    InferkitError,
    ModelNotFound,
    RequestTooLarge,
    UnsupportedEncoding,
)
from inferkit.server import admin
from inferkit.server.control import Controller, RepositoryControl, Unauthenticated, load_parameters
from inferkit.server.logs import RequestLog
from inferkit.server.metrics import Metrics
from inferkit.server.pipeline import Call, Pipeline, describe
from inferkit.server.protocol import (
    ARM,
    DTYPES,
    KEY,
    MAX_DIMS,
    check_outputs,
    datatype_of,
    element_count,
    extensions,
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
from inferkit.server.repository import Failed, InferResult, Repository
from inferkit.server.status import status_routes

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
    "BINARY_COST_PER_BYTE",
    "BYTES_ELEMENT_COST",
    "HEADER_LENGTH",
    "JSON_COST_PER_BYTE",
    "JSON_OUTPUT_ELEMENT_COST",
    "KEY_HEADER",
    "ClientDisconnected",
    "DecodingBusy",
    "InferRequest",
    "RequestTooLarge",
    "UnsupportedEncoding",
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
_JSON = "application/json"
_BINARY = "application/octet-stream"
_OFFLOAD_BYTES = 2**20  # decode and encode bigger requests off the event loop, so others are not held up
_INT64_MAX = 2**63 - 1
_MAX_HEADER_DIGITS = 18  # any byte count fits; int() of a longer string is work a client chooses

# What decoding or encoding costs in memory, per byte of the body or element of a tensor, as
# measured (peak RSS over the body, see the module's tests): JSON tensors 3.5x their text for
# full-precision floats, 15x for short numbers, 23x for BYTES strings, 26x for rows of one, 35x
# for rows of none. Binary tensors are a view of the body, copied once when unaligned; BYTES
# elements are one Python object each.
JSON_COST_PER_BYTE = 32
"""Bytes of memory reserved per byte of a body's JSON part while it is decoded."""
BINARY_COST_PER_BYTE = 2
"""Bytes of memory reserved per byte of a body's binary part while it is decoded."""
BYTES_ELEMENT_COST = 64
"""Bytes of memory reserved per BYTES element while it is decoded or encoded (a Python object)."""
JSON_OUTPUT_ELEMENT_COST = 64
"""Bytes of memory reserved per element of an output sent as JSON (a Python number and its text)."""


# Failures only the REST face has; their class names are the ``outcome`` label in the metrics.


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
    if not isinstance(value, list):
        raise invalid(f"shape must be a list of integers >= 0, got {value!r:.100}", name)
    if len(value) > MAX_DIMS:  # before looking at each: a client may send a million dimensions
        msg = f"shape has {len(value)} dimensions, over the maximum supported dimension count {MAX_DIMS}"
        raise invalid(msg, name)
    if not all(_is_int(d) and 0 <= d <= _INT64_MAX for d in value):
        raise invalid(f"shape must be a list of integers in [0, 2**63), got {value!r:.100}", name)
    return tuple(value)


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
    count = element_count(shape, name)
    if len(leaves) != count:
        raise invalid(f"shape {list(shape)} needs {count} elements, data has {len(leaves)}", name)
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
    count = element_count(shape, name)
    if arr.size != count:
        raise invalid(f"shape {list(shape)} needs {count} elements, data has {arr.size}", name)
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
    return shaped(from_raw(raw, datatype, element_count(shape, name), name), shape, name)


def _outputs(value: object) -> tuple[tuple[str, ...] | None, dict[str, bool]]:
    if value is None:
        return None, {}
    if not isinstance(value, list):
        raise invalid(f"outputs must be a list, got {type(value).__name__}")
    names: dict[str, None] = {}  # ordered, and a set: a repeat is found in O(1)
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
        names[name] = None
    return tuple(names), binary


def decode_request(
    body: bytes | bytearray, header_length: int | None = None, reserve: Callable[[int], None] | None = None
) -> InferRequest:
    """Decode an inference request body; ``header_length`` is ``Inference-Header-Content-Length``.

    Raises :class:`~inferkit.InvalidInput` (naming the input where there is one) for anything
    malformed: bad JSON, a shape that does not match the data, an unknown datatype, binary
    sizes that do not add up to the body. ``reserve(n)``, when given, is called before a binary
    BYTES input is unpacked with the bytes of memory its elements will take (it may raise to
    refuse them): unlike numbers, they are not a view of the body.
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
        if reserve is not None and datatype == "BYTES":  # at most one element per 4 bytes of framing
            reserve(min(element_count(shape, name), size // 4) * BYTES_ELEMENT_COST)
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
    check_outputs(names, outputs, model)
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


def _discard(task: asyncio.Future[Any]) -> None:
    """Retrieve a cancelled request's outcome, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Budget:
    """Bytes of memory that large requests being decoded, and large answers being encoded, hold at once.

    Refuses instead of waiting, as a full queue does: what can never fit is a 413, what does
    not fit now gets the overload status with ``Retry-After``. Thread-safe, because a decoding
    thread adds what binary BYTES inputs take once it has read their shapes.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._lock = threading.Lock()

    def take(self, nbytes: int, what: str) -> None:
        """Hold ``nbytes`` for ``what``; ``RequestTooLarge`` or ``DecodingBusy`` when they do not fit."""
        if nbytes > self.capacity:
            msg = (
                f"{what} needs about {nbytes} bytes of memory, more than max_decode_bytes={self.capacity} "
                f"(JSON tensors take about {JSON_COST_PER_BYTE}x their text); send tensors as binary data "
                "(the binary tensor data extension, tritonclient's default) or split the request"
            )
            raise RequestTooLarge(msg)
        with self._lock:
            if self.used + nbytes > self.capacity:
                msg = (
                    f"other large requests hold {self.used} of max_decode_bytes={self.capacity} bytes "
                    f"and {what} needs about {nbytes}; retry later"
                )
                raise DecodingBusy(msg)
            self.used += nbytes

    def give(self, nbytes: int) -> None:
        """Return ``nbytes`` taken earlier."""
        with self._lock:
            self.used -= nbytes


class _Hold:
    """What one request holds of the budget, given back at once by :meth:`release`."""

    def __init__(self, budget: _Budget, what: str) -> None:
        self.budget = budget
        self.what = what
        self.held = 0

    def take(self, nbytes: int) -> None:
        self.budget.take(nbytes, self.what)
        self.held += nbytes

    def release(self) -> None:
        self.budget.give(self.held)
        self.held = 0


def _inflater(encoding: str) -> Any:
    wbits = {"gzip": 31, "deflate": 15}.get(encoding)
    if wbits is None:
        raise UnsupportedEncoding(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or identity")
    return zlib.decompressobj(wbits)


def _inflate(inflater: Any, data: bytes | bytearray, max_length: int, encoding: str) -> bytes:
    try:
        return bytes(inflater.decompress(data, max_length))
    except zlib.error as exc:
        raise invalid(f"the {encoding} body does not decompress ({exc})") from None


def _encode_cost(request: InferRequest, outputs: Mapping[str, Any]) -> int:
    """About the bytes of memory encoding ``outputs`` takes: a few integer operations per output."""
    cost = 0
    for name in request.outputs if request.outputs is not None else outputs:
        if name not in outputs:
            continue  # an unknown output: encode_response refuses it
        arr = np.asarray(outputs[name])
        if arr.dtype.kind in "OSU" or not request.binary.get(name, request.binary_default):
            cost += arr.size * max(BYTES_ELEMENT_COST, JSON_OUTPUT_ELEMENT_COST)
        else:
            cost += arr.nbytes * BINARY_COST_PER_BYTE
    return cost


class _App:
    """The endpoints, over one repository."""

    def __init__(
        self,
        repository: Repository,
        metrics: Metrics,
        limits: tuple[int, int, int],
        overload: int,
        retry_after: str,
        control: RepositoryControl,
    ) -> None:
        self.repository = repository
        self.control = control
        self.controller = Controller(repository, control)
        self.metrics = metrics
        self.limit, self.json_limit, capacity = limits
        self.budget = _Budget(capacity)
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
            body = await self._small_json(request)
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
            body = await self._small_json(request)
            params = _mapping(body.get("parameters"), "parameters")
            await self.controller.load(request.path_params["model"], load_parameters(params))
        except InferkitError as error:
            return self.fail(error)
        return JSONResponse({})

    async def unload(self, request: Request) -> Response:
        """Unload a model once what it accepted is answered (``unload_dependents`` has no meaning here)."""
        try:
            self.control.authorize(request.headers.get("authorization"))
            body = await self._small_json(request)
            params = _mapping(body.get("parameters"), "parameters")
            if not isinstance(params.get("unload_dependents", False), bool):
                raise invalid("invalid value type for 'unload_dependents' parameter, expected bool_param.")
            await self.controller.unload(request.path_params["model"])
        except InferkitError as error:
            return self.fail(error)
        return JSONResponse({})

    async def _small_json(self, request: Request) -> dict[str, Any]:
        """A JSON object body (at most ``max_json_bytes``; empty: ``{}``)."""
        body = await self._body(request, json_only=True)
        if not body.strip():
            return {}
        try:
            value = _loads(body)
        except ValueError as error:
            raise invalid(f"the body is not JSON: {error}") from None
        return _mapping(value, "the body")

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
        decoded = await self._decode(request)
        key = request.headers.get(KEY_HEADER, decoded.key)
        return Call(decoded.inputs, decoded.outputs or (), key, decoded.timeout, decoded.priority, decoded)

    async def _answer(self, model: str, call: Call, result: InferResult) -> tuple[bytes, dict[str, str]]:
        return await self._encode(model, call.request, result)

    def _too_much_json(self, nbytes: int | str) -> RequestTooLarge:
        return RequestTooLarge(
            f"the JSON part of the body is {nbytes} bytes, more than max_json_bytes={self.json_limit}; "
            "send tensors as binary data (the binary tensor data extension, tritonclient's default)"
        )

    async def _decode(self, request: Request) -> InferRequest:
        """The request, decoded: small bodies on the loop, large ones on a thread within the budget."""
        header_length = _header_int(request, HEADER_LENGTH)
        if header_length is not None and header_length > self.json_limit:
            raise self._too_much_json(header_length)
        body = await self._body(request, json_only=header_length is None)
        if len(body) < _OFFLOAD_BYTES:  # the fast path: under a few dozen MB at most, one at a time
            return decode_request(body, header_length)
        json_bytes = len(body) if header_length is None else min(header_length, len(body))
        if json_bytes > self.json_limit:
            raise self._too_much_json(json_bytes)
        hold = _Hold(self.budget, "decoding this request")
        hold.take(len(body) * BINARY_COST_PER_BYTE + json_bytes * (JSON_COST_PER_BYTE - BINARY_COST_PER_BYTE))
        try:  # a started thread is not abandoned on cancel: the hold lasts as long as the work
            return await run_in_threadpool(decode_request, body, header_length, hold.take)
        finally:
            hold.release()

    async def _encode(self, model: str, request: InferRequest, result: InferResult) -> tuple[bytes, dict[str, str]]:
        """The response: small ones on the loop, large ones on a thread within the budget."""
        cost = _encode_cost(request, result.outputs)
        if cost < _OFFLOAD_BYTES:
            return encode_response(model, request, result)
        hold = _Hold(self.budget, "encoding the answer (ask for binary outputs: parameters.binary_data_output)")
        hold.take(cost)
        try:
            return await run_in_threadpool(encode_response, model, request, result)
        finally:
            hold.release()

    async def _body(self, request: Request, *, json_only: bool) -> bytes | bytearray:
        """The body, inflated; 413 past ``max_request_bytes`` (or ``max_json_bytes`` for a JSON-only body)."""
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        plain = encoding in {"", "identity"}
        inflater = None if plain else _inflater(encoding)  # 415 before reading the body
        length = _header_int(request, "content-length")
        if length is not None and length > self.limit:
            raise RequestTooLarge(f"the body is {length} bytes, more than max_request_bytes={self.limit}")
        if length is not None and plain and json_only and length > self.json_limit:
            raise self._too_much_json(length)
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > self.limit:
                    raise RequestTooLarge(f"the body is more than max_request_bytes={self.limit}")
        except ClientDisconnect:
            raise ClientDisconnected("the client disconnected while sending its request") from None
        if inflater is None:
            return body
        return await self._inflate(inflater, body, encoding)

    async def _inflate(self, inflater: Any, body: bytearray, encoding: str) -> bytes:
        """A compressed body inflated: the first MiB on the loop, the rest on a thread within the budget."""
        out = _inflate(inflater, body, _OFFLOAD_BYTES, encoding)
        if not inflater.eof and (inflater.unconsumed_tail or len(out) == _OFFLOAD_BYTES):
            hold = _Hold(self.budget, f"inflating a {encoding} body (at most max_request_bytes)")
            hold.take(self.limit)  # all it may inflate to, before inflating it
            try:
                rest = await run_in_threadpool(
                    _inflate, inflater, inflater.unconsumed_tail, self.limit + 1 - len(out), encoding
                )
            finally:
                hold.release()
            out += rest
        if len(out) > self.limit or inflater.unconsumed_tail:
            raise RequestTooLarge(f"the decompressed body is larger than max_request_bytes={self.limit}")
        if not inflater.eof:
            raise invalid(f"the {encoding} body is truncated")
        return out

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


def _header_int(request: Request, name: str) -> int | None:
    """A byte-count header as an int; ``InvalidInput`` unless it is a short run of ASCII digits."""
    value = request.headers.get(name)
    if value is None:
        return None
    value = value.strip()
    # str.isdigit() takes any script's digits ('٣'), and int() of a 5,000-digit string raises
    if not (value.isascii() and value.isdigit()) or len(value) > _MAX_HEADER_DIGITS:
        raise invalid(f"{name} must be a decimal number of at most {_MAX_HEADER_DIGITS} digits, got {value!r:.100}")
    return int(value)


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
    control: RepositoryControl | None = None,
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
    - ``max_decode_bytes``: the memory that large bodies (1 MiB and more) being decoded and
      large answers being encoded may hold at once, estimated before the work starts (JSON at
      :data:`JSON_COST_PER_BYTE` per byte, binary at :data:`BINARY_COST_PER_BYTE`, BYTES
      elements at :data:`BYTES_ELEMENT_COST`). A request that could never fit is a 413; one
      that does not fit beside those under way is refused like a full queue, below.

    A full queue answers ``overload_status`` (429 or 503) with ``Retry-After: retry_after_s``
    (rounded up to whole seconds). The app does not own the repository: closing the models
    is the caller's part. ``control`` turns on load and unload (see
    :mod:`inferkit.server.control`); off by default.

    ``GET /v2/openapi.json`` describes the routes served. ``status_page`` adds the status
    page at ``/``, its snapshot at ``/v2/status`` and ``/docs`` (see :mod:`inferkit.server.status`).
    """
    for option, value in [
        ("max_request_bytes", max_request_bytes),
        ("max_json_bytes", max_json_bytes),
        ("max_decode_bytes", max_decode_bytes),
    ]:
        if not _is_int(value) or value < 1:
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
    control = control if control is not None else RepositoryControl()
    app = _App(repository, metrics, limits, overload_status, str(math.ceil(retry_after_s)), control)
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
    routes += admin.routes(repository, control.token, app.fail)  # canary control: on with a token only
    routes += status_routes(repository, page=status_page, served=lambda: starlette.routes)
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {HTTPException: _http_error}
    starlette = Starlette(routes=routes, exception_handlers=handlers)
    starlette.state.metrics = metrics
    return starlette
