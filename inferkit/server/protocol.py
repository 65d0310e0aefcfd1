"""What the REST and gRPC faces share: datatypes, raw tensor bytes and the error mapping.

The KServe Open Inference Protocol v2 names tensor types as strings (``FP32``, ``BYTES``, ...);
both faces convert through :data:`DTYPES` and map inferkit's errors to status codes through
:func:`http_status` and :func:`grpc_code`, so a rule is written once.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import struct
from collections.abc import Collection, Container, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from inferkit.errors import (
    Closed,
    DeadlineExceeded,
    DecodingBusy,
    InferkitError,
    InvalidInput,
    ModelError,
    ModelNotFound,
    NoHealthyReplica,
    Overloaded,
    RequestTooLarge,
)

__all__ = [
    "ARM",
    "DTYPES",
    "KEY",
    "MAX_DIMS",
    "NO_DEADLINE_S",
    "check_datatypes",
    "check_outputs",
    "datatype_of",
    "dtype_of",
    "element_count",
    "extensions",
    "fit",
    "from_raw",
    "grpc_code",
    "http_status",
    "invalid",
    "pack_bytes",
    "refuse_unsupported",
    "request_options",
    "server_version",
    "shaped",
    "to_raw",
    "unpack_bytes",
]

KEY = "inferkit-key"
"""The HTTP header and gRPC metadata key that carry a Router's sticky key."""
ARM = "inferkit-arm"
"""The HTTP header and gRPC trailing metadata key that name the arm which served a request."""

DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_DIMS = 64
"""The most dimensions a tensor may have (NumPy's limit)."""


def dtype_of(datatype: str) -> np.dtype[Any]:
    """The NumPy dtype of a protocol datatype; ``InvalidInput`` for an unknown one."""
    try:
        return DTYPES[datatype]
    except (KeyError, TypeError):
        msg = f"unknown datatype {datatype!r}; expected one of {sorted(DTYPES)}"
        raise InvalidInput(msg) from None


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The protocol datatype of a NumPy dtype (strings and objects are ``BYTES``)."""
    if dtype.kind in "OSU":
        return "BYTES"
    name = _NAMES.get(dtype)  # native byte order: no dtype built per call (every request, input and output)
    if name is not None:
        return name
    try:
        return _NAMES[np.dtype(dtype).newbyteorder("=")]  # a big-endian model output is sent little-endian
    except KeyError:
        msg = f"dtype {dtype} has no Open Inference Protocol datatype"
        raise ModelError(msg) from None


def invalid(message: str, name: str | None = None) -> InvalidInput:
    """An ``InvalidInput`` whose message starts with the input it is about, when there is one."""
    label = f"input {name!r}: " if name is not None else ""
    return InvalidInput(label + message, input_name=name)


def fit(array: np.ndarray[Any, Any], datatype: str, name: str) -> np.ndarray[Any, Any]:
    """Integers ``array`` as ``datatype``'s dtype; ``InvalidInput`` when a value does not fit it."""
    dtype = DTYPES[datatype]
    if array.size and array.dtype != dtype:
        info, lo, hi = np.iinfo(dtype), int(array.min()), int(array.max())
        if lo < info.min or hi > info.max:
            raise invalid(f"values {lo}..{hi} do not fit {datatype} [{info.min}, {info.max}]", name)
    return array.astype(dtype, copy=False)


_U32 = struct.Struct("<I")


def unpack_bytes(buffer: bytes | memoryview, count: int, name: str) -> np.ndarray[Any, Any]:
    """``count`` BYTES elements, each a 4-byte little-endian length then that many bytes.

    One tight loop (about 0.15 us an element): a client chooses how many elements its bytes
    hold, up to one per 4 bytes, and each becomes a Python object.
    """
    data = bytes(buffer)  # a slice of bytes is bytes: one object per element, nothing in between
    size = len(data)
    if count * 4 > size:  # before allocating: a client may claim any count
        raise invalid(f"{size} bytes cannot hold {count} BYTES elements", name)
    items: list[Any] = [None] * count
    unpack = _U32.unpack_from
    offset = 0
    try:
        for i in range(count):
            start = offset + 4
            offset = start + unpack(data, offset)[0]
            items[i] = data[start:offset]  # past the end it is short; ``offset`` then says so below
    except struct.error:
        offset = size + 1
    if offset > size:
        raise _framing_error(data, count, name)
    if offset != size:
        raise invalid(f"{size - offset} bytes left over after {count} BYTES elements", name)
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def _framing_error(data: bytes, count: int, name: str) -> InvalidInput:
    """What is wrong with BYTES framing that ran past its data: which element, and how."""
    offset = 0
    for i in range(count):
        if offset + 4 > len(data):
            return invalid(f"BYTES data ends after {i} of {count} elements", name)
        (length,) = _U32.unpack_from(data, offset)
        offset += 4
        if offset + length > len(data):
            return invalid(f"BYTES element {i} claims {length} bytes, {len(data) - offset} remain", name)
        offset += length
    return invalid(f"BYTES data does not hold {count} elements", name)


def pack_bytes(array: np.ndarray[Any, Any]) -> bytes:
    """Serialize a BYTES tensor: each element as a 4-byte little-endian length and its bytes."""
    pack = _U32.pack
    parts: list[bytes] = []
    append = parts.append
    for item in array.reshape(-1).tolist():
        if type(item) is not bytes:
            item = item if isinstance(item, bytes) else str(item).encode()  # noqa: PLW2901 (what goes out)
        append(pack(len(item)))
        append(item)
    return b"".join(parts)


_UNSUPPORTED = {  # parameters of protocol extensions inferkit does not implement, on either face
    "shared_memory_region": "shared memory",
    "shared_memory_byte_size": "shared memory",
    "shared_memory_offset": "shared memory",
    "classification": "the classification extension",  # what tritonclient sends for class_count
    "class_count": "the classification extension",
}


def refuse_unsupported(parameters: Container[str], where: str, input_name: str | None = None) -> None:
    """``InvalidInput`` (``where`` says for what) when ``parameters`` use an extension inferkit lacks."""
    for key, what in _UNSUPPORTED.items():
        if key in parameters:
            msg = f"{where}: {what} is not supported"
            raise InvalidInput(msg, input_name=input_name)


@functools.cache
def server_version() -> str:
    """Inferkit's version, as both faces' server metadata report it."""
    try:
        return importlib.metadata.version("inferkit-serve")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "0+unknown"


def from_raw(raw: bytes | memoryview, datatype: str, count: int, name: str) -> np.ndarray[Any, Any]:
    """``count`` elements of a known ``datatype`` from their raw little-endian bytes, flat.

    ``InvalidInput`` naming input ``name`` when the bytes do not hold exactly that: a wrong
    size, BOOL bytes other than 0 and 1, BYTES framing that does not add up.
    """
    dtype = DTYPES[datatype]
    if dtype.kind == "O":
        return unpack_bytes(raw, count, name)
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise invalid(f"{len(raw)} bytes of raw data, but {count} {datatype} elements take {expected}", name)
    array = np.frombuffer(raw, dtype=dtype.newbyteorder("<"))
    if dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
        raise invalid("BOOL data must be bytes 0 or 1", name)
    return array if array.flags.aligned else array.copy()  # models may assume aligned data


MAX_EMPTY_CLAIM = 2**20
"""The most positions (the product of the non-zero dimensions) an empty tensor may claim: [N, 0] is
a real request, [1, 2**40, 0] carries nothing yet makes a model allocate terabytes."""


def element_count(shape: Sequence[int], name: str) -> int:
    """The number of elements of a client's ``shape``; ``InvalidInput`` for a negative dimension or too many.

    The dimensions are counted first: the product of a million large dimensions is a number of
    millions of digits, and computing it would hold the caller (an event loop) for minutes.
    """
    if len(shape) > MAX_DIMS:
        msg = f"shape has {len(shape)} dimensions, over the maximum supported dimension count {MAX_DIMS}"
        raise invalid(msg, name)
    if shape and min(shape) < 0:
        raise invalid(f"shape {list(shape)} has a negative dimension", name)
    count = math.prod(shape)  # Python ints: a lying shape cannot overflow
    if count == 0 and shape:
        claimed = math.prod(d for d in shape if d)
        if claimed > MAX_EMPTY_CLAIM:  # no data, but a model may still allocate what the shape says
            msg = (
                f"shape {list(shape)} holds no data but claims {claimed} positions; "
                f"an empty tensor may claim at most {MAX_EMPTY_CLAIM}"
            )
            raise invalid(msg, name)
    return count


def shaped(flat: np.ndarray[Any, Any], shape: tuple[int, ...], name: str) -> np.ndarray[Any, Any]:
    """``flat`` in ``shape``; ``InvalidInput`` naming input ``name`` where NumPy cannot (over 64 dimensions)."""
    try:
        return flat.reshape(shape)
    except ValueError as error:  # the shape is a client's: quote a bounded part of it
        raise invalid(f"shape {list(shape)!s:.200}: {error}", name) from None


def to_raw(array: np.ndarray[Any, Any]) -> bytes:
    """An array's raw protocol bytes: C order and little-endian, BYTES framed by :func:`pack_bytes`."""
    if array.dtype.kind in "OSU":
        return pack_bytes(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()  # C order, whatever the array's layout


def check_datatypes(inputs: Mapping[str, np.ndarray[Any, Any]], specs: Iterable[Any], model: str = "") -> None:
    """``InvalidInput`` (in Triton's words) for the first input sent as another datatype than its spec's.

    On the wire a client names each tensor's datatype, as the model's metadata gives it: one
    sent as another is its mistake, refused as Triton does, never cast (``FP64`` to ``FP32``
    would round its values, 1e-50 to 0). ``predict`` in a process still casts within a kind.
    """
    for spec in specs:
        array = inputs.get(spec.name)
        if array is None or array.dtype == spec.dtype:
            continue  # missing: the signature's check says so; the same dtype: the same datatype
        sent, expected = datatype_of(array.dtype), datatype_of(spec.dtype)
        if sent != expected:
            msg = f"input {spec.name!r} data-type is {sent!r}, but model {model!r} expects {expected!r}"
            raise InvalidInput(msg, input_name=spec.name)


def check_outputs(requested: Iterable[str], available: Collection[str], model: str = "") -> None:
    """``InvalidInput`` (in Triton's words) for the first requested output name the model does not have."""
    for name in requested:
        if name not in available:
            msg = f"unexpected inference output {name!r:.200} for model {model!r}; the model has {sorted(available)}"
            raise InvalidInput(msg)


def extensions(protocol: str, *, repository_control: bool) -> list[str]:
    """The Triton protocol extensions served over ``protocol`` (``"http"`` or ``"grpc"``), sorted.

    ``model_repository`` only where load and unload are enabled; ``binary_tensor_data`` is
    HTTP's alone (gRPC always carries raw bytes).
    """
    names = {"model_configuration", "parameters", "statistics"}
    if protocol == "http":
        names.add("binary_tensor_data")
    if repository_control:
        names.add("model_repository")
    return sorted(names)


NO_DEADLINE_S = 365 * 86400.0
"""A deadline further out than a year is treated as none (timers cannot wait arbitrarily long)."""

_SEQUENCE = ("sequence_id", "sequence_start", "sequence_end")
_WIRE_PRIORITY_TOP = 2**31  # wire priority p >= 1 becomes TOP - p: any explicit level outranks the default


def request_options(
    parameters: Mapping[str, Any], *, key: str | None = None, remaining_s: float | None = None
) -> tuple[float | None, int, str | None]:
    """``(deadline in seconds or None, inferkit priority, sticky key or None)`` of a request.

    ``parameters`` are the request's protocol parameters, already plain Python values.
    ``timeout`` is in microseconds as tritonclient sends it (0: none); ``remaining_s`` is a
    transport deadline (gRPC's), and the earlier of the two wins. ``priority`` follows Triton on
    the wire: 0 (or absent) is the default level, 1 the most urgent, larger less urgent; every
    explicit level runs before the default (levels from ``2**31 - 1`` on, the uint64 the protocol
    allows, are one level, the least urgent explicit one). ``key`` (a header or metadata value)
    wins over the ``key`` parameter, a string or an int taken as its string so both faces route alike.
    ``InvalidInput`` names a bad value, and refuses sequence batching (``sequence_id``, ...).
    """
    for name in _SEQUENCE:
        if parameters.get(name):
            msg = f"parameter {name!r}: sequence batching is not supported"
            raise InvalidInput(msg)
    timeout_us = parameters.get("timeout")
    timeout = None
    if timeout_us is not None:
        if isinstance(timeout_us, bool) or not isinstance(timeout_us, int | float) or not timeout_us >= 0:
            msg = f"parameter 'timeout' must be microseconds >= 0 (0: none), got {timeout_us!r:.100}"
            raise InvalidInput(msg)
        # compared before dividing: an int of 400 digits (the stdlib's JSON reads one) has no float
        timeout = timeout_us / 1e6 if timeout_us and timeout_us <= NO_DEADLINE_S * 1e6 else None
    if remaining_s is not None:
        timeout = remaining_s if timeout is None else min(timeout, remaining_s)
    if timeout is not None and timeout > NO_DEADLINE_S:
        timeout = None
    wire = parameters.get("priority", 0)
    if isinstance(wire, bool) or not isinstance(wire, int) or wire < 0:
        msg = f"parameter 'priority' must be an integer >= 0 (1 is the most urgent), got {wire!r:.100}"
        raise InvalidInput(msg)
    priority = _WIRE_PRIORITY_TOP - min(wire, _WIRE_PRIORITY_TOP - 1) if wire else 0  # past 2**31 - 1: the last level
    if key is None:
        value = parameters.get("key")
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            msg = f"parameter 'key' must be a string or an integer, got {value!r:.100}"
            raise InvalidInput(msg)
        key = None if value is None else str(value)
    return timeout, priority, key


def http_status(error: BaseException, *, overload_status: int = 503) -> int:
    """The HTTP status for an error: 400 input, 404 model, 429/503 overload, 504 deadline, 500 model.

    An error class may carry its own ``status`` (the repository control's 401 and 403).
    """
    own = getattr(type(error), "status", None)
    if isinstance(error, InferkitError) and isinstance(own, int):
        return own
    if isinstance(error, InvalidInput | ModelNotFound):
        return 400 if isinstance(error, InvalidInput) else 404
    if isinstance(error, Overloaded):
        return overload_status
    if isinstance(error, DeadlineExceeded):
        return 504
    if isinstance(error, NoHealthyReplica | Closed):
        return 503
    return 500


def grpc_code(error: BaseException) -> Any:
    """The ``grpc.StatusCode`` for an error, following :func:`http_status`.

    A request that could never be decoded within ``max_decode_bytes`` is RESOURCE_EXHAUSTED (as a
    message over the size limit is); one that cannot be now, UNAVAILABLE (retry).
    """
    import grpc  # noqa: PLC0415 (the server extra)

    if isinstance(error, RequestTooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, DecodingBusy):
        return grpc.StatusCode.UNAVAILABLE

    codes = {
        400: grpc.StatusCode.INVALID_ARGUMENT,
        401: grpc.StatusCode.UNAUTHENTICATED,
        403: grpc.StatusCode.PERMISSION_DENIED,
        404: grpc.StatusCode.NOT_FOUND,
        503: grpc.StatusCode.UNAVAILABLE,
        504: grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    return codes.get(http_status(error), grpc.StatusCode.INTERNAL)
