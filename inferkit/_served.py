"""Which arm served each key and request, remembered for ``Router.record``."""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections.abc import Hashable

__all__ = ["ServedBy", "key_id"]

_REMEMBER = 100_000  # keys and request ids remembered for record()


def key_id(key: Hashable) -> int:
    """A stable 64-bit digest of a key, the same in every process (unlike ``hash()``: ``hash(-1) == hash(-2)``)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "big")


class ServedBy:
    """Which arm served each sticky key (by its digest) and each submitted request id, for ``record``.

    A store is dict operations (each atomic), so the request path takes no lock; ``_lock`` only
    serialises the pruning that forgets the oldest tenth past ``_REMEMBER`` entries (for keys,
    those served least recently).
    """

    __slots__ = ("_by_id", "_by_key", "_ids", "_lock")

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._by_key: dict[int, str] = {}  # by digest: a client's long keys are not kept alive
        self._by_id: dict[int, str] = {}
        self._lock = threading.Lock()

    def next_id(self) -> int:
        """A new request id."""
        return next(self._ids)

    def key(self, key_id: int, arm: str) -> None:
        """Remember that ``arm`` served the key digested to ``key_id``, as the newest (pruned last)."""
        self._by_key.pop(key_id, None)  # re-inserted at the end: pruning forgets the keys served least recently
        self._remember(self._by_key, key_id, arm)

    def request(self, request_id: int, arm: str) -> None:
        """Remember that ``arm`` took request ``request_id``."""
        self._remember(self._by_id, request_id, arm)

    def arm(self, key_id: int | None, request_id: int | None) -> str | None:
        """The arm remembered for the key (when given) or else the request id; ``None`` if forgotten."""
        return self._by_key.get(key_id) if key_id is not None else self._by_id.get(request_id)  # type: ignore[arg-type]

    def _remember(self, table: dict[int, str], key: int, arm: str) -> None:
        table[key] = arm
        if len(table) > _REMEMBER:
            with self._lock:  # forget the oldest tenth in one go
                for old in list(itertools.islice(table, _REMEMBER // 10)):
                    table.pop(old, None)
