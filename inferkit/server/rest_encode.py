"""Encoding a REST inference response: outputs as JSON, or as binary tensor data, and what that costs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from inferkit.server.budget import BINARY_COST_PER_BYTE, BYTES_ELEMENT_COST, JSON_OUTPUT_ELEMENT_COST
from inferkit.server.protocol import ARM, check_outputs, datatype_of, to_raw
from inferkit.server.repository import InferResult
from inferkit.server.rest_decode import HEADER_LENGTH, Array, InferRequest

try:  # orjson writes JSON several times faster; the stdlib stands in without it
    import orjson

    def _dumps(value: Any) -> bytes:
        return orjson.dumps(value)

except ImportError:  # pragma: no cover (the server extra installs orjson)

    def _dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":")).encode()


__all__ = ["encode_cost", "encode_response"]

_JSON = "application/json"
_BINARY = "application/octet-stream"


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
    exact = True  # no float sent as JSON is NaN or infinite
    for name in names:
        arr = np.asarray(outputs[name])
        tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
        data = None if request.binary.get(name, request.binary_default) else _json_data(arr)
        if data is not None and arr.dtype.kind in "fc" and exact:
            exact = bool(np.isfinite(arr).all())
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
        headers[ARM] = result.arm
    response["outputs"] = tensors
    # As Triton: NaN, Infinity and -Infinity written out (orjson would write null, which reads back as NaN)
    header = _dumps(response) if exact else json.dumps(response, separators=(",", ":")).encode()
    if not chunks:
        headers["content-type"] = _JSON
        return header, headers
    headers["content-type"] = _BINARY
    headers[HEADER_LENGTH] = str(len(header))
    return b"".join([header, *chunks]), headers


def encode_cost(request: InferRequest, outputs: Mapping[str, Any]) -> int:
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
