"""Decoding a REST inference request: the JSON header, JSON tensors and binary tensor data.

The body is JSON, or with the binary tensor data extension a JSON header of
``Inference-Header-Content-Length`` bytes followed by each binary input's raw bytes, in input
order (see :mod:`inferkit.server.rest`). Every mistake is an :class:`~inferkit.InvalidInput`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import numpy as np

from inferkit.server.budget import BYTES_ELEMENT_COST
from inferkit.server.protocol import (
    DTYPES,
    MAX_DIMS,
    element_count,
    fit,
    from_raw,
    invalid,
    refuse_unsupported,
    request_options,
    shaped,
)

try:  # orjson parses JSON several times faster; the stdlib stands in without it
    import orjson

    _loads: Callable[[Any], Any] = orjson.loads

except ImportError:  # pragma: no cover (the server extra installs orjson)

    def _loads(data: Any) -> Any:
        return json.loads(bytes(data))


def loads(data: Any) -> Any:
    """JSON ``data`` (bytes or a view of them) parsed; ``NaN``, ``Infinity`` and ``-Infinity`` as Triton reads them.

    Raises ``ValueError`` for anything that is not JSON, nesting too deep for the stdlib's parser included.
    """
    try:
        try:
            return _loads(data)
        except ValueError:
            raw = bytes(data)
            if b"NaN" not in raw and b"Infinity" not in raw:
                raise
            return json.loads(raw)  # the stdlib reads them (RFC 8259 has none; Triton and its clients write them)
    except RecursionError:  # a client's nesting, thousands deep (orjson stops at 1,024 with a ValueError)
        raise ValueError("the JSON is nested too deep") from None


__all__ = ["HEADER_LENGTH", "InferRequest", "decode_request", "is_int", "loads", "mapping"]

HEADER_LENGTH = "Inference-Header-Content-Length"
"""The binary tensor data extension's header: how many bytes of the body are the JSON header."""

Array = np.ndarray[Any, Any]
_INT64_MAX = 2**63 - 1


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


def is_int(value: object) -> bool:
    """Whether ``value`` is a JSON integer (an int, not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def mapping(value: object, what: str, name: str | None = None) -> dict[str, Any]:
    """``value`` as a JSON object (None: empty); ``InvalidInput`` naming ``what`` otherwise."""
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
    if not all(is_int(d) and 0 <= d <= _INT64_MAX for d in value):
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
        try:
            out[i] = item.encode()
        except UnicodeEncodeError:  # a lone surrogate: the stdlib's JSON reads "\ud800", orjson refuses it
            raise invalid(f"BYTES element {i} is not valid Unicode text (a lone surrogate)", name) from None
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


_SMALL = 64
"""Number tensors of at most this many elements are searched for booleans outright (a fraction of a
microsecond); larger ones only when :func:`_array_bools` finds room for one in the JSON text."""
_WHITESPACE = b" \t\n\r"


def _array_bools(text: bytes | bytearray, end: int, limit: int) -> bool:
    """Whether JSON ``text[:end]`` may hold ``true`` or ``false`` as an array element.

    False means that none of its arrays holds one: an element follows ``[`` or ``,`` (and JSON
    whitespace), where an object's value follows ``:`` (``"binary_data": false``). Each word is
    found by its ``u`` or ``l``, which no number, ``NaN`` or ``Infinity`` has, so the search
    (memchr) passes over the numbers at memory speed. True when unsure: text with more than
    ``limit`` of those letters to look at, or a word after 64 bytes of whitespace.
    """
    find = text.find
    candidates = 0
    for letter, after, word in ((0x75, 0x65, b"true"), (0x6C, 0x73, b"false")):  # "u" then "e", "l" then "s"
        i = find(letter, 2, end)  # the letter is each word's third byte
        while i >= 0:
            candidates += 1
            if candidates > limit:
                return True
            if i + 1 < end and text[i + 1] == after and text.startswith(word, i - 2):
                start = i - 2
                before = text[start - 1] if start else 0
                if before in _WHITESPACE:
                    window = text[max(0, start - 64) : start].rstrip(_WHITESPACE)
                    before = window[-1] if window else (0x2C if start > 64 else 0)  # unsure: as if ","
                if before in b"[,":
                    return True
            i = find(letter, i + 1, end)
    return False


def _holds_bool(data: list[Any], ndim: int) -> bool:
    """Whether regular nested lists ``data`` of depth ``ndim`` have a bool among their leaves."""
    leaves: Iterable[Any] = data
    for _ in range(ndim - 1):
        leaves = itertools.chain.from_iterable(leaves)
    return bool in map(type, leaves)


def _json_tensor(
    data: object,
    shape: tuple[int, ...],
    datatype: str,
    name: str,
    unchecked: list[tuple[str, str, list[Any], int, int]],
) -> Array:
    """A tensor from JSON ``data`` (flat or nested lists), checked against shape and datatype.

    A number tensor of over :data:`_SMALL` elements is not searched for booleans here but
    appended to ``unchecked`` as ``(name, datatype, data, depth, size)``: :func:`decode_request`
    searches those when the request's JSON text may hold a boolean in an array.
    """
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
    kind, read = dtype.kind, arr.dtype.kind  # what the datatype wants, what NumPy read
    if kind != "b" and read in "iuf":  # NumPy reads true and false among numbers as 1 and 0; Triton refuses them
        if count > _SMALL:
            unchecked.append((name, datatype, data, arr.ndim, count))
        elif _holds_bool(data, arr.ndim):
            raise invalid(f"{datatype} data cannot hold booleans", name)
    if kind in "iu" and read in "fO":  # NumPy turns ints past int64 into floats or objects
        arr = _big_ints(data, dtype, datatype, name)
        read = arr.dtype.kind
    if count and read not in _KINDS[kind]:
        got = {"U": "strings", "O": "mixed or out-of-range values", "b": "booleans", "f": "floats"}
        raise invalid(f"{datatype} data cannot hold {got.get(read, str(arr.dtype))}", name)
    if kind in "iu":
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
        out = mapping(item, "each output")
        name = out.get("name")
        if not isinstance(name, str):
            raise invalid(f"each output needs a string name, got {name!r:.100}")
        if name in names:
            raise invalid(f"output {name!r} is asked for twice")
        params = mapping(out.get("parameters"), f"output {name!r} parameters")
        refuse_unsupported(params, f"output {name!r}")
        flag = params.get("binary_data")
        if flag is not None:
            if not isinstance(flag, bool):
                raise invalid(f"output {name!r}: parameters.binary_data must be true or false, got {flag!r:.100}")
            binary[name] = flag
        names[name] = None
    return (tuple(names) or None), binary  # an empty list asks for every output, as in Triton (and over gRPC)


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
        header = loads(body if header_length == len(body) else view[:header_length])
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise invalid(f"the request is not valid JSON ({str(exc)[:200]})") from None
    header = mapping(header, "the request")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("the request needs a non-empty list of inputs")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise invalid(f"id must be a string, got {request_id!r:.100}")
    parameters = mapping(header.get("parameters"), "parameters")
    timeout, priority, key = request_options(parameters)
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise invalid(f"parameters.binary_data_output must be true or false, got {binary_default!r:.100}")
    outputs, binary = _outputs(header.get("outputs"))

    arrays: dict[str, Array] = {}
    unchecked: list[tuple[str, str, list[Any], int, int]] = []  # large number tensors, not searched for booleans yet
    offset = header_length
    for item in inputs:
        tensor = mapping(item, "each input")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise invalid(f"each input needs a string name, got {name!r:.100}")
        if name in arrays:
            raise invalid("is given twice", name)
        shape = _shape(tensor.get("shape"), name)
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str) or datatype not in DTYPES:
            raise invalid(f"unknown datatype {datatype!r:.100}; expected one of {sorted(DTYPES)}", name)
        params = mapping(tensor.get("parameters"), "parameters", name)
        refuse_unsupported(params, f"input {name!r}", name)
        size = params.get("binary_data_size")
        if size is None:
            if "data" not in tensor:
                raise invalid("has neither data nor parameters.binary_data_size", name)
            arrays[name] = _json_tensor(tensor["data"], shape, datatype, name, unchecked)
            continue
        if not is_int(size) or size < 0:
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
    if unchecked:  # large number tensors: one search of the text for them all
        limit = 16  # letters looked at before giving up (~150 ns each): half what searching the tensors costs
        for item in unchecked:  # (~20 ns an element)
            limit += item[4] // 16
        if _array_bools(body, header_length, limit):
            for name, datatype, data, depth, _ in unchecked:
                if _holds_bool(data, depth):
                    raise invalid(f"{datatype} data cannot hold booleans", name)
    return InferRequest(arrays, request_id, outputs, binary, binary_default, key, timeout, priority)
