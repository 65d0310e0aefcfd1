"""Reading REST bodies within their limits: size headers, inflating, and decoding or encoding off the loop.

Small bodies (under 32 KiB) are decoded, and small answers encoded, on the event loop; larger ones reserve
their estimated memory from the :class:`~inferkit.server.budget.Budget` first, then run
on a worker thread, so one large request holds up no other.
"""

from __future__ import annotations

import zlib
from typing import Any

from starlette.requests import ClientDisconnect, Request

from inferkit.errors import ClientDisconnected, RequestTooLarge, UnsupportedEncoding
from inferkit.server.budget import BINARY_COST_PER_BYTE, JSON_COST_PER_BYTE, Budget, Hold
from inferkit.server.protocol import invalid
from inferkit.server.repository import InferResult
from inferkit.server.rest_decode import HEADER_LENGTH, InferRequest, decode_request, loads, mapping
from inferkit.server.rest_encode import encode_cost, encode_response

__all__ = ["Bodies"]

_OFFLOAD_BYTES = 2**20  # encode bigger answers, and inflate past this, off the event loop
_INLINE_BYTES = 2**15  # decode bigger bodies off the loop: 32 KiB of JSON rows of one take ~4 ms, 1 MiB ~180
_MAX_MEMBERS = 64  # gzip members of one body: each costs a decompressor, and 20 bytes make an empty one
_MAX_HEADER_DIGITS = 18  # any byte count fits; int() of a longer string is work a client chooses


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


def _header(request: Request, name: str) -> str | None:
    """A header's one value; ``InvalidInput`` when it is given twice with different values.

    A proxy that reads the last of them would see another request than the one decoded here.
    """
    values = request.headers.getlist(name)
    if len(values) > 1 and len({v.strip().lower() for v in values}) > 1:
        raise invalid(f"{name} is given {len(values)} times with different values; send it once")
    return values[0] if values else None


def _header_int(request: Request, name: str) -> int | None:
    """A byte-count header as an int; ``InvalidInput`` unless it is a short run of ASCII digits."""
    value = _header(request, name)
    if value is None:
        return None
    value = value.strip()
    # str.isdigit() takes any script's digits ('٣'), and int() of a 5,000-digit string raises
    if not (value.isascii() and value.isdigit()) or len(value) > _MAX_HEADER_DIGITS:
        raise invalid(f"{name} must be a decimal number of at most {_MAX_HEADER_DIGITS} digits, got {value!r:.100}")
    return int(value)


class Bodies:
    """Request bodies read, inflated and decoded, and answers encoded, within the limits and the memory budget."""

    def __init__(self, limit: int, json_limit: int, capacity: int) -> None:
        self.limit = limit
        self.json_limit = json_limit
        self.budget = Budget(capacity)

    async def small_json(self, request: Request) -> dict[str, Any]:
        """A JSON object body (at most ``max_json_bytes``; empty: ``{}``)."""
        body = await self.body(request, json_only=True)
        if not body.strip():
            return {}
        try:
            value = loads(body)
        except ValueError as error:
            raise invalid(f"the body is not JSON: {error}") from None
        return mapping(value, "the body")

    def _too_much_json(self, nbytes: int | str) -> RequestTooLarge:
        return RequestTooLarge(
            f"the JSON part of the body is {nbytes} bytes, more than max_json_bytes={self.json_limit}; "
            "send tensors as binary data (the binary tensor data extension, tritonclient's default)"
        )

    async def decode(self, request: Request) -> InferRequest:
        """The request, decoded: small bodies on the loop, large ones on a thread within the budget."""
        header_length = _header_int(request, HEADER_LENGTH)
        if header_length is not None and header_length > self.json_limit:
            raise self._too_much_json(header_length)
        body = await self.body(request, json_only=header_length is None)
        if len(body) < _INLINE_BYTES:  # the fast path: a few ms at most, one at a time
            return decode_request(body, header_length)
        json_bytes = len(body) if header_length is None else min(header_length, len(body))
        if json_bytes > self.json_limit:
            raise self._too_much_json(json_bytes)
        hold = Hold(self.budget, "decoding this request")
        hold.take(len(body) * BINARY_COST_PER_BYTE + json_bytes * (JSON_COST_PER_BYTE - BINARY_COST_PER_BYTE))
        try:  # the loop's executor, not anyio's threads (joined at exit): a forced shutdown leaves it behind
            return await hold.offload(decode_request, body, header_length, hold.take)
        finally:
            hold.release()

    async def encode(self, model: str, request: InferRequest, result: InferResult) -> tuple[bytes, dict[str, str]]:
        """The response: small ones on the loop, large ones on a thread within the budget."""
        cost = encode_cost(request, result.outputs)
        if cost < _OFFLOAD_BYTES:
            return encode_response(model, request, result)
        hold = Hold(self.budget, "encoding the answer (ask for binary outputs: parameters.binary_data_output)")
        hold.take(cost)
        try:
            return await hold.offload(encode_response, model, request, result)
        finally:
            hold.release()

    async def body(self, request: Request, *, json_only: bool) -> bytes | bytearray:
        """The body, inflated; 413 past ``max_request_bytes`` (or ``max_json_bytes`` for a JSON-only body)."""
        encoding = (_header(request, "content-encoding") or "identity").strip().lower()
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
        """A compressed body inflated, gzip member by member (RFC 1952 allows several); nothing may follow."""
        out = await self._member(inflater, body, encoding, 0)
        for _ in range(_MAX_MEMBERS - 1):
            rest = inflater.unused_data
            if not rest or encoding != "gzip":
                break
            inflater = _inflater(encoding)
            out += await self._member(inflater, rest, encoding, len(out))
        if inflater.unused_data:
            more = "gzip members" if encoding == "gzip" else f"bytes after the {encoding} stream"
            raise invalid(f"the body has more {more} than inferkit reads (at most {_MAX_MEMBERS} gzip members)")
        return bytes(out)

    async def _member(self, inflater: Any, data: bytes | bytearray, encoding: str, before: int) -> bytearray:
        """One compressed stream inflated: the first MiB on the loop, the rest on a thread within the budget."""
        limit = self.limit - before  # what the body may still inflate to
        out = bytearray(_inflate(inflater, data, min(_OFFLOAD_BYTES, limit + 1), encoding))
        if len(out) <= limit and not inflater.eof and (inflater.unconsumed_tail or len(out) == _OFFLOAD_BYTES):
            hold = Hold(self.budget, f"inflating a {encoding} body (at most max_request_bytes)")
            hold.take(self.limit)  # all it may inflate to, before inflating it
            try:
                rest = await hold.offload(_inflate, inflater, inflater.unconsumed_tail, limit + 1 - len(out), encoding)
            finally:
                hold.release()
            out += rest
        if len(out) > limit or inflater.unconsumed_tail:
            raise RequestTooLarge(f"the decompressed body is larger than max_request_bytes={self.limit}")
        if not inflater.eof:
            raise invalid(f"the {encoding} body is truncated")
        return out
