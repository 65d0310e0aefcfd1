"""A canary's rollout state: where it is (:class:`CanaryState`), the decisions that move it, the stores that keep it."""

from __future__ import annotations

import enum
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from inferkit.errors import StoreUnavailable
from inferkit.events import Event

if TYPE_CHECKING:
    from inferkit.policies.canary import Canary


class CanaryState(enum.Enum):
    """Where a canary rollout is."""

    RUNNING = "running"
    PAUSED = "paused"  # holds its weight; no automatic promotion (guards still roll back)
    PROMOTED = "promoted"  # the candidate takes all traffic
    ROLLED_BACK = "rolled_back"  # the baseline takes all traffic


@attrs.frozen
class CanaryDecision(Event):
    """A canary moved: ``action`` is ``"step"``, ``"promote"``, ``"rollback"``, ``"pause"`` or ``"resume"``.

    ``reason`` names the guard that failed (or ``"manual"``, ``"guard passed"``), and ``numbers``
    the figures that triggered it.
    """

    action: str
    step: int
    weight: float
    reason: str
    numbers: Mapping[str, float]


@runtime_checkable
class CanaryStore(Protocol):
    """**Protocol**: where a :class:`Canary` keeps its state, so that it survives a restart or is shared.

    A state is a JSON-able mapping with an integer ``"revision"`` that every decision raises by
    one. :class:`FileStore` keeps one process's canary in a file;
    :class:`inferkit.integrations.redis.RedisStore` shares one canary between processes.
    """

    pooled: bool
    """Whether :meth:`totals` adds up every process's requests (the guard then judges those)."""

    def load(self) -> Mapping[str, Any] | None:
        """The saved state, or None when there is none.

        Raises :class:`StoreUnavailable` when the store cannot be reached, ``ValueError`` when
        what is saved is not a JSON object (the canary checks the object's fields itself).
        """

    def transition(self, expected: int, state: Mapping[str, Any]) -> Mapping[str, Any] | None:
        """Save ``state`` if the saved revision is ``expected`` (or nothing is saved), atomically.

        Returns None when saved, else the saved state that won (another process decided first,
        or what is saved is not valid: it is never overwritten). Raises :class:`StoreUnavailable`
        when the store cannot be reached, ``ValueError`` when what is saved is not a JSON object.
        """

    def count(self, epoch: int, arm: str, *, failed: bool) -> None:
        """Add one served request of ``arm`` in step ``epoch`` to the pooled counts."""

    def totals(self, epoch: int) -> Mapping[str, tuple[int, int]]:
        """``{arm: (requests, failures)}`` of step ``epoch`` over every process (empty when not pooled)."""

    def attach(self, canary: Canary) -> None:
        """Called once by the canary that uses this store (a shared store starts following it).

        A follower gives what it reads to :meth:`Canary.follow` and says whether the store can
        be reached through :meth:`Canary.store_failed`.
        """

    def close(self) -> None:
        """Stop any background work; idempotent."""


def decode_state(text: str, where: str) -> dict[str, Any]:
    """A saved state's text as a JSON object; ``ValueError`` saying ``where`` and why otherwise."""
    try:
        state = json.loads(text)
    except ValueError as error:  # empty, truncated or not JSON at all
        msg = f"{where} holds no canary state: not JSON ({error})"
        raise ValueError(msg) from None
    if not isinstance(state, dict):
        msg = f"{where} holds no canary state: a JSON {type(state).__name__}, not an object"
        raise ValueError(msg)  # noqa: TRY004 (one ValueError for every way a saved state is wrong)
    return state


class FileStore:
    """A canary's state in a JSON file, replaced atomically (written beside it, then renamed).

    For one process: two processes must not share a file (use Redis for that).
    """

    pooled = False

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> Mapping[str, Any] | None:
        """The saved state; None when the file does not exist, ``ValueError`` when it holds no JSON object."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        return decode_state(text, str(self.path))

    def transition(self, expected: int, state: Mapping[str, Any]) -> Mapping[str, Any] | None:  # noqa: ARG002 (protocol: one writer)
        """Write ``state``: a temporary file in the same directory, flushed, then renamed over the old one."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(state, out)
                    out.flush()
                    os.fsync(out.fileno())
                Path(tmp).replace(self.path)  # atomic: a reader sees the old state or the new, never half
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as error:
            msg = f"cannot write the canary state to {self.path}: {error}"
            raise StoreUnavailable(msg) from error
        return None

    def count(self, epoch: int, arm: str, *, failed: bool) -> None:
        """Nothing pooled: the canary counts its own requests."""

    def totals(self, epoch: int) -> Mapping[str, tuple[int, int]]:  # noqa: ARG002 (protocol)
        """Nothing pooled."""
        return {}

    def attach(self, canary: Canary) -> None:
        """Nothing to follow."""

    def close(self) -> None:
        """Nothing to stop."""

    def __repr__(self) -> str:
        return f"FileStore({str(self.path)!r})"
