"""ModelInfer messages: parsing a request (malformed bytes included), its options and tensors, the response.

Inputs come from ``raw_input_contents`` or each input's typed ``contents``; outputs always go
out in ``raw_output_contents``. Large messages are decoded and encoded on a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np

from inferkit.errors import InvalidInput
from inferkit.server import proto as pb
from inferkit.server.budget import BYTES_ELEMENT_COST, Budget, Hold
from inferkit.server.pipeline import Call
from inferkit.server.protocol import (
    KEY,
    check_outputs,
    datatype_of,
    dtype_of,
    element_count,
    fit,
    from_raw,
    invalid,
    refuse_unsupported,
    request_options,
    shaped,
    to_raw,
)
from inferkit.server.repository import InferResult
from inferkit.server.submission import LOOP_OBJECTS, objects

__all__ = [
    "BUDGETED_BYTES",
    "MAX_FIELDS",
    "OFFLOAD_BYTES",
    "Malformed",
    "TypedPart",
    "answer",
    "call",
    "parameter",
    "parser",
    "too_many_fields",
    "typed_part",
    "typed_too_large",
]

Array = np.ndarray[Any, Any]

OFFLOAD_BYTES = 2**20  # decode and encode larger messages on a worker thread, as REST does (and past LOOP_OBJECTS)
BUDGETED_BYTES = 2**15  # a typed part this large reserves its memory before it is parsed; smaller ones skip, as in REST

# The InferTensorContents field that carries each datatype, and the dtype protobuf gives its
# values. FP16 has none: it travels in raw_input_contents only.
_CONTENTS: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_WIDE: dict[str, np.dtype[Any]] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_OPTION_PARAMETERS = ("timeout", "priority", "key", "sequence_id", "sequence_start", "sequence_end")


class Echo(NamedTuple):
    """What a ModelInferResponse repeats from its request."""

    model_name: str
    model_version: str
    id: str


class Malformed:
    """A request message that did not parse; the handler answers INVALID_ARGUMENT."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def parser(message: Any) -> Callable[[bytes], Any]:
    """A deserializer for ``message`` that returns a :class:`Malformed` instead of raising."""

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except Exception as error:  # noqa: BLE001 (protobuf's DecodeError, or worse, on client bytes)
            return Malformed(error)

    return parse


async def call(box: list[Any], context: Any, *, large: bool, hold: Hold) -> Call:
    """The pipeline's view of the parsed ModelInferRequest taken out of ``box`` (decoded off the loop when ``large``).

    Raw BYTES inputs first reserve what their elements will take in ``hold`` (which holds what
    the typed part reserved before it was parsed): a few bytes of message each, ~64 bytes of
    memory once decoded. All is given back once the tensors are decoded.
    """
    request = box.pop()
    strings = _raw_strings(request)
    try:
        if strings:
            hold.take(strings * BYTES_ELEMENT_COST, "decoding this request's BYTES elements")
        if large or strings > LOOP_OBJECTS:
            inputs = await hold.offload(_decode_inputs, request)
        else:
            inputs = _decode_inputs(request)
    finally:
        hold.release()
    requested = _requested_outputs(request)
    key, timeout, priority = _options(request, context)
    # only the names the answer echoes: the parsed message (~12-14x its typed bytes) is freed before the model runs
    return Call(inputs, requested, key, timeout, priority, Echo(request.model_name, request.model_version, request.id))


def _raw_strings(request: Any) -> int:
    """The most BYTES elements the raw inputs can decode to: one per 4 bytes at most, fewer if the shape says so."""
    raw = request.raw_input_contents
    if not raw or len(raw) != len(request.inputs):
        return 0  # typed contents are bounded by ``max_json_bytes``; a count mismatch is refused unread
    strings = 0
    for tensor, data in zip(request.inputs, raw, strict=True):
        if tensor.datatype == "BYTES":
            strings += min(element_count(tuple(tensor.shape), tensor.name), len(data) // 4)
    return strings


async def answer(call: Call, result: InferResult, *, budget: Budget) -> tuple[Any, str | None]:
    """The ModelInferResponse for ``result`` (encoded off the loop when large) and the arm that served it."""
    outputs = [np.asarray(o) for o in result.outputs.values()]
    strings = objects(outputs)
    if strings > LOOP_OBJECTS or sum(o.nbytes for o in outputs) >= OFFLOAD_BYTES:
        hold = Hold(budget, "encoding the answer's BYTES elements")
        hold.take(strings * BYTES_ELEMENT_COST)
        try:
            response = await hold.offload(_encode_response, call.request, result.outputs, call.outputs)
        finally:
            hold.release()
    else:
        response = _encode_response(call.request, result.outputs, call.outputs)
    if result.arm is not None:
        response.parameters["arm"].string_param = result.arm
    return response, result.arm


# -- request options -------------------------------------------------------------------------


def parameter(value: Any) -> bool | int | str | float | None:
    """The value an InferParameter holds (None when it holds none)."""
    which = value.WhichOneof("parameter_choice")
    return None if which is None else getattr(value, which)


def _options(request: Any, context: Any) -> tuple[Hashable | None, float | None, int]:
    """The sticky key, the deadline in seconds and the priority of a ModelInfer request."""
    params = request.parameters
    plain = {}
    if params:
        refuse_unsupported(params, "the request's parameters")
        plain = {name: parameter(params[name]) for name in _OPTION_PARAMETERS if name in params}
    header = next((str(v) for k, v in context.invocation_metadata() or () if k == KEY), None)
    timeout, priority, key = request_options(plain, key=header, remaining_s=context.time_remaining())
    return key, timeout, priority


def _requested_outputs(request: Any) -> list[str]:
    names: dict[str, None] = {}  # ordered, and a repeat found in O(1)
    for output in request.outputs:
        if output.parameters:
            refuse_unsupported(output.parameters, f"output {output.name!r}")
        if output.name in names:
            msg = f"output {output.name!r:.200} is requested twice"
            raise InvalidInput(msg)
        names[output.name] = None
    return list(names)


# -- tensors ---------------------------------------------------------------------------------


_RAW_TAG = 7 << 3 | 2  # ModelInferRequest.raw_input_contents (field 7, length-delimited)
_FIXED = {1: 8, 5: 4}  # the bytes of the fixed-size wire types; groups (3, 4) and 6, 7 are not walked
_LOOP_FIELDS = 4096  # top-level fields (raw entries too) walked on the event loop (~1 ms); more go on to a thread
MAX_FIELDS = 2**16
"""Top-level fields (inputs, outputs, parameters, raw entries) a ModelInferRequest may have: a request needs
one per input, output and parameter. Past it the walk stops (~25 ms on a thread; 8M fields took 3 s of CPU)."""


class TypedPart:
    """What a serialized ModelInferRequest holds besides its raw contents, read from its top-level tags.

    Typed ``contents`` become a Python object per value (~30x their bytes, like JSON over REST),
    and even parsing an input, output or parameter builds messages and maps: this part is
    bounded (``max_json_bytes``) and reserves its memory before the message is parsed.
    ``nbytes`` counts every byte but the payloads of ``raw_input_contents`` (their tags and
    lengths count: each entry is an object once parsed), ``fields`` the other top-level fields.
    ``walked`` counts every top-level field, raw entries too: past :data:`MAX_FIELDS` the walk
    stops (``too_many``), whatever the bytes. Nothing is parsed or copied; a field that cannot
    be walked counts with all after it, and the parser reports it.
    """

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._at = 0
        self.nbytes = 0
        self.fields = 0
        self.walked = 0

    @property
    def too_many(self) -> bool:
        """Whether the message has more than :data:`MAX_FIELDS` top-level fields (the walk stopped there)."""
        return self.walked > MAX_FIELDS

    def walk(self, limit: int, steps: int | None = None) -> bool:
        """Walk on to the end, or until ``nbytes`` is past ``limit``; stop early after ``steps`` more fields (raw too).

        True once done (the end, past ``limit``, or past :data:`MAX_FIELDS` fields).
        """
        view, at, nbytes, count = self._view, self._at, self.nbytes, self.fields
        end, left = len(view), steps if steps is not None else len(view)
        left = min(left, MAX_FIELDS + 1 - self.walked)  # one past the most: enough to tell
        taken = left
        start = at
        try:
            while at < end and nbytes <= limit and left:
                left -= 1
                start = at
                tag = view[at]  # a one-byte varint in any message worth walking fast
                at += 1
                if tag & 0x80:
                    tag, at = _varint(view, start)
                kind = tag & 7
                if kind == 2:
                    length = view[at]
                    at += 1
                    if length & 0x80:
                        length, at = _varint(view, at - 1)
                    if tag == _RAW_TAG and at + length <= end:
                        nbytes += at - start
                        at += length
                        continue
                    at += length
                elif kind == 0:
                    _, at = _varint(view, at)
                else:
                    at += _FIXED[kind]
                nbytes += min(at, end) - start
                count += 1
        except (IndexError, KeyError):  # not a message: count it all, the parser says what is wrong
            nbytes += end - start
            at = end
        self._at, self.nbytes, self.fields, self.walked = at, nbytes, count, self.walked + taken - left
        return at >= end or nbytes > limit or self.too_many


async def typed_part(data: bytes, limit: int) -> TypedPart:
    """The :class:`TypedPart` of ``data``, walked until past ``limit``; a message of many fields on a worker thread."""
    part = TypedPart(data)
    if not part.walk(limit, _LOOP_FIELDS):
        await asyncio.to_thread(part.walk, limit)  # ~0.35 s a million fields: at most MAX_FIELDS of them
    return part


def _varint(view: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = view[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise IndexError


def too_many_fields() -> InvalidInput:
    """The error for a message of more than :data:`MAX_FIELDS` top-level fields (the walk stopped there)."""
    return InvalidInput(
        f"the request has more than {MAX_FIELDS} top-level fields (inputs, outputs, parameters and "
        "raw_input_contents together); a request needs one per input, output and parameter"
    )


def typed_too_large(limit: int) -> InvalidInput:
    """The error for a message whose :class:`TypedPart` is over ``limit`` bytes (counted until past it)."""
    return InvalidInput(
        f"the request holds more than max_json_bytes={limit} bytes besides raw_input_contents (typed contents "
        "and the rest); send the tensors in raw_input_contents (as tritonclient does)"
    )


def _decode_inputs(request: Any) -> dict[str, Array]:
    """The input arrays of a ModelInferRequest by name; ``InvalidInput`` naming the bad one."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        msg = f"the request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents; send one per input"
        raise InvalidInput(msg)
    arrays: dict[str, Array] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            msg = f"input {name!r} appears twice"
            raise InvalidInput(msg, input_name=name)
        arrays[name] = _decode(tensor, raw[i] if raw else None, request.model_name)
    return arrays


def _decode(tensor: Any, raw: bytes | None, model: str) -> Array:
    name, datatype = tensor.name, tensor.datatype
    if tensor.parameters:
        refuse_unsupported(tensor.parameters, f"input {name!r}", name)
    try:
        dtype = dtype_of(datatype)
    except InvalidInput as error:
        raise invalid(str(error), name) from None
    shape = tuple(tensor.shape)
    count = element_count(shape, name)
    if raw is not None:
        if tensor.HasField("contents"):
            msg = (
                f"contents field must not be specified when using raw_input_contents for {name!r:.200} "
                f"for model {model!r:.200}; send one or the other"
            )
            raise InvalidInput(msg, input_name=name)
        flat = from_raw(raw, datatype, count, name)
    else:
        flat = _from_contents(name, datatype, dtype, count, tensor.contents)
    return shaped(flat, shape, name)


def _from_contents(name: str, datatype: str, dtype: np.dtype[Any], count: int, contents: Any) -> Array:
    field = _CONTENTS.get(datatype)
    if field is None:
        raise invalid(f"{datatype} data must come in raw_input_contents", name)
    for descriptor, _ in contents.ListFields():
        if descriptor.name != field:
            raise invalid(f"{datatype} data goes in {field}, got {descriptor.name}", name)
    values = getattr(contents, field)
    if len(values) != count:
        raise invalid(f"has {len(values)} values in {field}, but shape needs {count}", name)
    if dtype.kind == "O":
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array
    if field == "fp32_contents":  # bit for bit: widened to Python floats, a signalling NaN came back quiet
        packed = _packed(contents.SerializeToString(), _FP32_TAG)
        if packed is not None:
            return from_raw(packed, datatype, count, name)
    wide = np.fromiter(values, dtype=_WIDE[field], count=count)  # no list of Python numbers in between
    return wide if wide.dtype == dtype else fit(wide, datatype, name)


_FP32_TAG = 6 << 3 | 2  # InferTensorContents.fp32_contents, packed (length-delimited)


def _packed(wire: bytes, tag: int) -> memoryview | None:
    """The bytes of the packed repeated field ``tag`` that ``wire`` (a message's serialization) starts with.

    Empty for an empty message; None when it starts with another field.
    """
    if not wire:
        return memoryview(wire)
    if wire[0] != tag:
        return None
    at, length, shift = 1, 0, 0
    while at < len(wire):  # the length, a varint
        byte = wire[at]
        at += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return memoryview(wire)[at : at + length]
    return None


def _encode_response(echo: Echo, outputs: dict[str, Array], requested: Sequence[str]) -> Any:
    """A ModelInferResponse with ``outputs`` (only ``requested`` ones, in order, when given)."""
    if requested:
        check_outputs(requested, outputs, echo.model_name)
    response = pb.ModelInferResponse(model_name=echo.model_name, model_version=echo.model_version, id=echo.id)
    for name in requested or outputs:
        array = np.asarray(outputs[name])
        datatype = datatype_of(array.dtype)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(to_raw(array))
    return response
