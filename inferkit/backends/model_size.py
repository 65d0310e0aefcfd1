"""How many bytes of weights an ONNX model brings, external data files included.

A model over 2 GiB must keep its initializers in files beside the ``.onnx`` (external data),
so the ``.onnx`` file's own size can be a tiny part of what each session loads. The files are
named in the model's protobuf; reading them needs no ``onnx`` package: this walks the wire
format just far enough (``ModelProto.graph`` -> ``GraphProto.initializer`` ->
``TensorProto.external_data`` -> ``location``), skipping every other field unread.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

__all__ = ["model_bytes"]

_GRAPH, _INITIALIZER, _EXTERNAL_DATA = 7, 5, 13  # field numbers in onnx.proto
_KEY, _VALUE = 1, 2  # StringStringEntryProto


def model_bytes(model: str | os.PathLike[str] | bytes) -> int:
    """The model's size plus that of every external data file its main graph's initializers name."""
    if isinstance(model, bytes):
        return len(model)
    path = Path(model)
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        view = memoryview(data)
        try:
            locations = _external_locations(view)
        except ValueError:  # not a protobuf this walk understands: ONNX Runtime will say what is wrong
            locations = set()
        finally:
            view.release()
    for location in locations:
        file = path.parent / location
        if file.is_file():
            size += file.stat().st_size
    return size


def _external_locations(model: memoryview) -> set[str]:
    locations: set[str] = set()
    for graph in _fields(model, _GRAPH):
        for tensor in _fields(graph, _INITIALIZER):
            for entry in _fields(tensor, _EXTERNAL_DATA):
                keys = [bytes(k) for k in _fields(entry, _KEY)]
                values = [bytes(v) for v in _fields(entry, _VALUE)]
                if keys == [b"location"] and len(values) == 1:
                    locations.add(values[0].decode("utf-8", "replace"))
    return locations


def _fields(message: memoryview, number: int) -> list[memoryview]:
    """The length-delimited fields numbered ``number`` of one message, others skipped."""
    found = []
    pos, end = 0, len(message)
    while pos < end:
        tag, pos = _varint(message, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _varint(message, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(message, pos)
            if pos + length > end:
                raise ValueError("truncated field")
            if tag >> 3 == number:
                found.append(message[pos : pos + length])
            pos += length
        else:
            raise ValueError(f"wire type {wire}")
    if pos != end:
        raise ValueError("truncated message")
    return found


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
