"""What the REST and gRPC faces share: datatypes, BYTES framing and the error mapping.

The KServe Open Inference Protocol v2 names tensor types as strings (``FP32``, ``BYTES``, ...);
both faces convert through :data:`DTYPES` and map inferkit's errors to status codes through
:func:`http_status` and :func:`grpc_code`, so a rule is written once.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from inferkit.errors import (
    Closed,
    DeadlineExceeded,
    InvalidInput,
    ModelError,
    ModelNotFound,
    NoHealthyReplica,
    Overloaded,
)

__all__ = [
    "DTYPES",
    "datatype_of",
    "dtype_of",
    "grpc_code",
    "http_status",
    "pack_bytes",
    "unpack_bytes",
]

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
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        msg = f"dtype {dtype} has no Open Inference Protocol datatype"
        raise ModelError(msg) from None


def unpack_bytes(buffer: bytes | memoryview, count: int, name: str) -> np.ndarray[Any, Any]:
    """``count`` BYTES elements, each a 4-byte little-endian length then that many bytes."""
    view = memoryview(buffer)
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(view):
            msg = f"input {name!r}: BYTES data ends after {i} of {count} elements"
            raise InvalidInput(msg, input_name=name)
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            msg = f"input {name!r}: BYTES element {i} claims {length} bytes, {len(view) - offset} remain"
            raise InvalidInput(msg, input_name=name)
        out[i] = bytes(view[offset : offset + length])
        offset += length
    if offset != len(view):
        msg = f"input {name!r}: {len(view) - offset} bytes left over after {count} BYTES elements"
        raise InvalidInput(msg, input_name=name)
    return out


def pack_bytes(array: np.ndarray[Any, Any]) -> bytes:
    """Serialize a BYTES tensor: each element as a 4-byte little-endian length and its bytes."""
    parts = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def http_status(error: BaseException, *, overload_status: int = 503) -> int:
    """The HTTP status for an error: 400 input, 404 model, 429/503 overload, 504 deadline, 500 model."""
    if isinstance(error, InvalidInput):
        return 400
    if isinstance(error, ModelNotFound):
        return 404
    if isinstance(error, Overloaded):
        return overload_status
    if isinstance(error, DeadlineExceeded):
        return 504
    if isinstance(error, NoHealthyReplica | Closed):
        return 503
    return 500


def grpc_code(error: BaseException) -> Any:
    """The ``grpc.StatusCode`` for an error, following :func:`http_status`."""
    import grpc  # noqa: PLC0415 (the server extra)

    codes = {
        400: grpc.StatusCode.INVALID_ARGUMENT,
        404: grpc.StatusCode.NOT_FOUND,
        503: grpc.StatusCode.UNAVAILABLE,
        504: grpc.StatusCode.DEADLINE_EXCEEDED,
    }
    return codes.get(http_status(error), grpc.StatusCode.INTERNAL)
