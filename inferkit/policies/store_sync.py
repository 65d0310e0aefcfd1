"""A canary's side of its store: reading, following and writing its state, and the store's health.

:class:`StoreSync` is a mixin of :class:`~inferkit.policies.canary.Canary`, which owns the
state; every method here that reads or changes it runs under the canary's lock unless its
docstring says it takes it. A state the canary cannot take (invalid, another rollout's) and a
store it cannot reach both freeze its decisions (``store_ok`` False) instead of raising.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import attrs

from inferkit.errors import StoreUnavailable
from inferkit.policies.rollout import Position, StepCounts, StoreHealth, counter, number
from inferkit.policies.state import CanaryState, CanaryStore

if TYPE_CHECKING:
    import threading

    from inferkit.policies.canary import Canary

__all__ = ["StoreSync"]

RETRY_S = 0.02  # while the store is not ok, how often a due decision (or an unsaved rollback) tries it again
RACE = "another process decided first"

_log = logging.getLogger("inferkit")


class StoreSync:
    """Reading, following and writing a canary's state in its store; the store's health."""

    baseline: str
    candidate: str
    steps: tuple[float, ...]
    store: CanaryStore | None
    _lock: threading.RLock
    _position: Position
    _counts: StepCounts
    _health: StoreHealth

    if TYPE_CHECKING:  # provided by the canary

        @property
        def name(self) -> str:
            """The name of the router the canary steers."""

        def _snapshot(self, position: Position) -> dict[str, Any]: ...

    def _open(self, store: CanaryStore) -> None:
        try:
            saved = store.load()
            if saved is not None and self._matches(saved):
                self._position = self._load(saved)
            else:  # nothing saved, or a different rollout: this one starts over from the saved revision
                revision = 0 if saved is None else counter(saved, "revision", 0)
                self._position = attrs.evolve(self._position, revision=revision)
                # An epoch no earlier rollout on this store used (epochs never outrun revisions), so
                # pooled counts left under the store's key by the previous rollout are never read.
                epoch = 1 if saved is None else max(revision, counter(saved, "epoch", 0)) + 1
                fresh = attrs.evolve(self._position, revision=revision + 1, epoch=epoch)
                won = store.transition(revision, self._snapshot(fresh))
                self._position = fresh if won is None else self._load(won)
        except ValueError as error:  # no last known weights to keep yet: the operator must fix it
            msg = f"{store!r}: {error}; fix or remove the saved state"
            raise ValueError(msg) from error
        store.attach(cast("Canary", self))

    def _matches(self, saved: Mapping[str, Any]) -> bool:
        steps = saved.get("steps")
        return (
            isinstance(steps, list)
            and all(number(s) for s in steps)
            and [float(s) for s in steps] == list(self.steps)
            and (saved.get("baseline"), saved.get("candidate")) == (self.baseline, self.candidate)
        )

    def _load(self, state: object) -> Position:
        """The position in ``state`` if it is a valid state of this rollout; ``ValueError`` saying why not."""
        if not isinstance(state, Mapping):
            msg = f"a canary state must be a JSON object, got {type(state).__name__}"
            raise ValueError(msg)  # noqa: TRY004 (one ValueError for every way a saved state is wrong)
        if not self._matches(state):
            msg = (
                f"the state is of a canary {state.get('baseline')!r} -> {state.get('candidate')!r} "
                f"with steps {state.get('steps')!r}, not of {self!r}"
            )
            raise ValueError(msg)
        try:
            return Position.load(state, self.steps)
        except ValueError as error:
            msg = f"the state of {self!r} is not valid: {error}"
            raise ValueError(msg) from None

    @property
    def store_ok(self) -> bool:
        """False while the store cannot be reached or holds a state this canary cannot take.

        The canary then holds its last known weights and makes no automatic decision.
        """
        return self._health.error is None

    def restore(self, state: Mapping[str, Any]) -> None:
        """Take a saved state (from :meth:`snapshot`) when it is newer than this canary's.

        A new step (or rollout) starts its counts afresh; the same step keeps them. ``ValueError``
        naming the field when ``state`` is not valid or is of another canary.
        """
        position = self._load(state)
        with self._lock:
            self._take(position, newer_only=True)

    def follow(self, state: object) -> None:
        """Take what a store's follower read: a state (adopted when newer), ``None`` or a ``ValueError``.

        ``None`` says nothing is saved; a ``ValueError``, why what is saved cannot be decoded.

        Never raises. A state that is not valid or is of another rollout is not taken: the canary
        keeps its weight, makes no decision, and :attr:`store_ok` is False with :meth:`status`
        saying why, until a valid state of its rollout (or none) is read again.
        """
        with self._lock:
            self._adopt(state, newer_only=True)

    def _adopt(self, state: object, *, newer_only: bool) -> None:
        """Take a state a store gave (under the lock); an invalid one freezes decisions instead of raising."""
        if isinstance(state, BaseException):
            self._set_invalid(str(state))
            return
        if state is None:
            self._set_invalid(None)
            return
        try:
            position = self._load(state)
        except ValueError as error:
            self._set_invalid(str(error))
            return
        self._set_invalid(None)
        self._take(position, newer_only=newer_only)

    def _take(self, position: Position, *, newer_only: bool) -> None:
        """Move to ``position`` (under the lock); older ones are skipped when ``newer_only``."""
        current = self._position
        if newer_only and position.revision <= current.revision and current.revision:
            return
        if self._health.unsaved:  # a rollback made here stays in force on top of whatever the store says
            if position.state is CanaryState.ROLLED_BACK:
                self._health.unsaved = False
            else:
                position = position.after(CanaryState.ROLLED_BACK, position.step, 0.0, current.history[-1])
        self._position = position
        if position.epoch != current.epoch:
            self._counts = self._counts.fresh()

    def store_failed(self, error: BaseException | None) -> None:
        """Called by a store: whether it can be reached (``None``: it can again). Logged on each change."""
        was = self._health.unreachable
        self._health.unreachable = None if error is None else str(error) or type(error).__name__
        if (was is None) == (error is None):
            return
        if error is None:
            _log.warning("canary %s: store reachable again at revision %d", self.name, self._position.revision)
        else:
            _log.warning(
                "canary %s: store unreachable (%s); keeping the last known weight %s, making no decision",
                self.name,
                error,
                self._position.weight,
            )

    def _set_invalid(self, why: str | None) -> None:
        was, self._health.invalid = self._health.invalid, why
        if (was is None) == (why is None):
            return
        if why is None:
            _log.warning(
                "canary %s: the store's state is valid again at revision %d", self.name, self._position.revision
            )
        else:
            _log.warning(
                "canary %s: the store's state cannot be taken (%s); keeping the last known weight %s, deciding nothing",
                self.name,
                why,
                self._position.weight,
            )

    def _write(self, store: CanaryStore, expected: int, position: Position) -> str | None:
        """Save ``position`` over revision ``expected`` (under the lock): None when saved, else why not.

        Never while the store holds a state this canary cannot take (another rollout's, say, at the
        same revision after a flush): frozen means no decision is written over it either.
        """
        if self._health.invalid is not None:
            self._health.retry_at = time.monotonic() + RETRY_S
            return self._health.invalid
        try:
            won = store.transition(expected, self._snapshot(position))
        except StoreUnavailable as error:
            self.store_failed(error)
            why = self._health.unreachable
        except ValueError as error:  # what the store holds is not even a JSON object
            self._set_invalid(str(error))
            why = self._health.invalid
        else:
            if won is None:
                self.store_failed(None)
                self._set_invalid(None)
                return None
            self._adopt(won, newer_only=False)  # another process decided first, or the state is not valid
            why = self._health.invalid
        self._health.retry_at = time.monotonic() + RETRY_S
        return why or RACE

    def _save_rollback(self) -> None:
        """Try again to save the manual rollback in force here (under the lock), at most every ``RETRY_S``."""
        if self.store is None or time.monotonic() < self._health.retry_at:
            return
        position = self._position  # the rollback, one revision past the state it was made on
        if self._write(self.store, position.revision - 1, position) is None:
            self._health.unsaved = False
