"""The Router: named predictors behind one ``predict``, split by a policy.

A router has the faces of a :class:`~inferkit.Predictor` (``predict``, ``submit``,
``apredict``, ``stats``, ``close``), so routers nest. ``predict`` returns exactly what the
chosen arm returns and runs on the caller's thread like the arm's own ``predict``; the chosen
arm is visible through ``on_route`` and on the future that ``submit`` returns (``future.arm``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Self

import attrs

from inferkit import events
from inferkit._bridge import await_future
from inferkit._closing import close_all
from inferkit._ledger import InForce, Ledger
from inferkit._served import key_id as _key_id
from inferkit.arrays import copied
from inferkit.batching import notify_cancelled
from inferkit.errors import Closed
from inferkit.event_log import LogObserver
from inferkit.events import Event, Observer, Routed, deliver
from inferkit.experiments import Report
from inferkit.policies import ABTest, Canary, Policy, Route, find_canary, observes_of
from inferkit.predictive import Predictive, ready_of, signature_of
from inferkit.shadow import ShadowStats, ShadowTraffic, agree
from inferkit.signature import Signature

__all__ = ["Predictive", "RoutedFuture", "Router", "RouterStats", "ShadowStats", "ready_of", "signature_of"]


class RoutedFuture(Future[Any]):
    """The future of a routed request: ``arm`` served it, ``request_id`` names it for ``record``."""

    def __init__(self, arm: str, request_id: int) -> None:
        super().__init__()
        self.arm = arm
        self.request_id = request_id
        self._inner: Future[Any] | None = None

    def cancel(self) -> bool:
        """Cancel the request if the arm has not started it."""
        inner = self._inner
        if inner is not None and not inner.cancel():
            return False
        if not super().cancel():
            return False
        notify_cancelled(self)  # so concurrent.futures.wait() and as_completed() see it
        return True


def _settle_copy(seen: Future[Any], done: Future[Any], error: BaseException | None) -> None:
    """``seen`` settled as ``done`` was, with a copy of its result; a copy that fails counts as the mirror's error."""
    try:
        if error is None:
            seen.set_result(copied(done.result()))
        else:
            seen.set_exception(error)
    except Exception as failed:  # noqa: BLE001 (memory, say: the caller's answer must still go out)
        if not seen.done():
            seen.set_exception(failed)


@attrs.frozen
class RouterStats:
    """Per-arm predictor stats, requests each arm answered (refusals not counted), shadow counts, the policy.

    ``policy_errors`` counts the feedback calls the policy raised (dropped; the first is logged).
    """

    routed: Mapping[str, int]
    arms: Mapping[str, Any]
    shadow: ShadowStats
    policy: str
    policy_errors: int = 0


class Router:
    """Split requests between named predictors with a :class:`~inferkit.policies.Policy`.

    ``key`` makes assignment sticky (one key, one arm, stable across canary steps); without
    it a seedable RNG decides. ``attributes`` feed :class:`~inferkit.policies.Match`.
    ``record(value, key=...)`` or ``record(value, request_id=...)`` credits a business
    outcome to the arm that served that key or request; :meth:`report` compares the arms.
    """

    def __init__(
        self,
        arms: Mapping[str, Predictive],
        policy: Policy | None = None,
        *,
        seed: int | None = None,
        name: str = "router",
        on_route: Callable[[str], None] | None = None,
        observers: Sequence[Observer] = (),
        compare: Callable[[Any, Any], bool] = agree,
        shadow_queue_size: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not arms:
            msg = "a router needs at least one arm"
            raise ValueError(msg)
        self.name = name
        self._arms = dict(arms)
        self._rng = random.Random(seed)
        self._on_route = on_route
        self._observers = (*observers, LogObserver())
        self._ledger = Ledger(name, self._arms, self._submit_to, shadow_queue_size, clock)
        self._shadow = ShadowTraffic(name, self._submit_to, compare, self._ledger.mirrored, shadow_queue_size)
        self._closed = False
        self._shut = False
        self.set_policy(policy if policy is not None else ABTest(dict.fromkeys(self._arms, 1.0)))

    # -- routing ---------------------------------------------------------------------------

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        return self._ledger.in_force.policy

    def set_policy(self, policy: Policy) -> None:
        """Replace the policy while serving; requests already routed are not affected."""
        unknown = policy.arms() - self._arms.keys()
        if unknown:
            msg = f"policy routes to unknown arms {sorted(unknown)}; the router has {sorted(self._arms)}"
            raise ValueError(msg)
        canary = find_canary(policy)
        if canary is not None:
            canary.bind(self.name, self._emit)
        self._ledger.in_force = InForce(policy, observes_of(policy))

    def _route(self, key_id: int | None, attributes: Mapping[str, str] | None) -> Route:
        if self._closed:
            msg = f"router {self.name!r} is closed"
            raise Closed(msg)
        u = key_id / 2.0**64 if key_id is not None else self._rng.random()  # a key's stable point in [0, 1)
        route = self._ledger.in_force.policy.route(u, attributes or {})
        if events._taps:  # tracing: to tapped observers only, never logged per request
            deliver(events._taps, Routed(self.name, route.arm))
        if self._on_route is not None:
            self._on_route(route.arm)
        return route

    def predict(
        self,
        x: Any,
        *,
        key: Hashable | None = None,
        attributes: Mapping[str, str] | None = None,
        timeout: float | None = None,
        priority: int = 0,
    ) -> Any:
        """Route ``x`` and return the chosen arm's result, exactly as that arm returns it."""
        key_id = None if key is None else _key_id(key)
        route = self._route(key_id, attributes)
        taken = None if route.shadow is None else self._shadow.take(x)
        ledger = self._ledger
        start = ledger.clock()
        try:
            result = self._call(route.arm, "predict", x, timeout, priority)
        except Exception as error:
            ledger.served(route.arm, start, error, x)
            raise
        end = ledger.clock()
        if route.shadow is not None and taken is None:  # counted only once the primary accepted it
            self._shadow.drop()
        elif route.shadow is not None and taken is not None:  # mirrored before counted: a step it ends waits for it
            done: Future[Any] = Future()
            done.set_result(copied(result))  # compared later: the caller may write into its result
            self._shadow.mirror(route.shadow, taken, done)
        ledger.served(route.arm, start, None, end=end)  # the copies above are no latency of the arm's
        if key_id is not None:
            ledger.served_by.key(key_id, route.arm)
        return result

    def submit(
        self,
        x: Any,
        *,
        key: Hashable | None = None,
        attributes: Mapping[str, str] | None = None,
        timeout: float | None = None,
        priority: int = 0,
    ) -> RoutedFuture:
        """Route ``x`` and return a future of the arm's result; ``future.arm`` names the arm."""
        key_id = None if key is None else _key_id(key)
        route = self._route(key_id, attributes)
        taken = None if route.shadow is None else self._shadow.take(x)
        ledger = self._ledger
        outer = RoutedFuture(route.arm, ledger.served_by.next_id())
        start = ledger.clock()
        try:
            inner: Future[Any] = self._call(route.arm, "submit", x, timeout, priority)
        except Exception as error:
            ledger.served(route.arm, start, error)
            raise
        outer._inner = inner
        ledger.served_by.request(outer.request_id, route.arm)
        if key_id is not None:
            ledger.served_by.key(key_id, route.arm)

        # What a mirror is compared with: the result copied before the caller has it to write into.
        seen: Future[Any] | None = None if taken is None else Future()

        def relay(done: Future[Any]) -> None:
            if done.cancelled():
                if seen is not None:
                    seen.cancel()
                outer.cancel()
                return
            error = done.exception()
            try:
                ledger.served(route.arm, start, error, x)
            finally:  # accounting that goes wrong must never leave the caller (or the shadow) waiting for good
                if seen is not None:
                    _settle_copy(seen, done, error)
                if outer.set_running_or_notify_cancel():
                    if error is None:
                        outer.set_result(done.result())
                    else:
                        outer.set_exception(error)

        if route.shadow is not None and taken is None:  # counted only once the primary accepted it
            self._shadow.drop()
        elif route.shadow is not None and taken is not None and seen is not None:  # before relay can count it
            self._shadow.mirror(route.shadow, taken, seen)  # (a done inner runs relay at once)
        inner.add_done_callback(relay)
        return outer

    async def apredict(
        self,
        x: Any,
        *,
        key: Hashable | None = None,
        attributes: Mapping[str, str] | None = None,
        timeout: float | None = None,
        priority: int = 0,
    ) -> Any:
        """:meth:`predict` for asyncio."""
        future = self.submit(x, key=key, attributes=attributes, timeout=timeout, priority=priority)
        return await await_future(future)  # one loop wake-up per finished batch, as Predictor.apredict

    def _call(self, arm: str, method: str, x: Any, timeout: float | None, priority: int) -> Any:
        """Call the arm's predictor, again on its replacement when it was swapped meanwhile."""
        # tracing: the request the arm submits is this router's; scoped, so a refusal leaves nothing behind
        token = events.calling_arm.set((self.name, arm)) if events._taps else None
        try:
            while True:
                target = self._arms[arm]
                try:
                    return getattr(target, method)(x, timeout=timeout, priority=priority)
                except Closed:
                    if self._arms[arm] is target or self._closed:
                        raise
        finally:
            if token is not None:
                events.calling_arm.reset(token)

    def _submit_to(self, arm: str, x: Any) -> Future[Any]:
        """Side traffic (a mirror, a confirmation) to the arm in force now."""
        return self._arms[arm].submit(x)

    # -- experiments -----------------------------------------------------------------------

    def record(self, value: float, *, key: Hashable | None = None, request_id: int | None = None) -> str:
        """Credit a business outcome to the arm that served ``key`` (or ``request_id``); return the arm.

        Raises ``KeyError`` when the router has not served (or no longer remembers) that key or id,
        ``ValueError`` for a value that is not a finite number; never what the policy's ``feedback`` raises.
        """
        arm = self._ledger.served_by.arm(None if key is None else _key_id(key), request_id)
        if arm is None:
            msg = f"no request served for key={key!r} request_id={request_id!r}"
            raise KeyError(msg)
        self._ledger.record(arm, value)
        return arm

    def report(self) -> Report:
        """Per-arm requests, errors, latency and outcomes, compared with the baseline."""
        canary = find_canary(self._ledger.in_force.policy)
        return self._ledger.experiment.report(baseline=canary.baseline if canary is not None else None)

    def _canary(self) -> Canary:
        canary = find_canary(self._ledger.in_force.policy)
        if canary is None:
            msg = f"the policy {self._ledger.in_force.policy!r} has no Canary"
            raise TypeError(msg)
        return canary

    def promote(self) -> None:
        """Promote the policy's canary now."""
        self._canary().promote()

    def rollback(self) -> None:
        """Roll the policy's canary back now."""
        self._canary().rollback()

    def pause(self) -> None:
        """Hold the policy's canary at its current weight."""
        self._canary().pause()

    def resume(self) -> None:
        """Let a paused canary step forward again."""
        self._canary().resume()

    def map(self, data: Any, **options: Any) -> Any:
        """Bulk inference through the router, every batch routed like a request; as :meth:`Predictor.map`."""
        from inferkit.bulk import map_batches  # noqa: PLC0415

        return map_batches(self, data, **options)

    def stream(self, data: Any, **options: Any) -> Any:
        """An iterator of results, one per batch, in input order; as :meth:`Predictor.stream`."""
        from inferkit.bulk import stream_batches  # noqa: PLC0415

        return stream_batches(self, data, **options)

    # -- arms and lifecycle ----------------------------------------------------------------

    @property
    def signature(self) -> Signature | None:
        """The first declared signature of its arms (the arms of one router serve one model, so they agree)."""
        return next((sig for arm in self._arms.values() if (sig := signature_of(arm)) is not None), None)

    @property
    def ready(self) -> bool:
        """Whether every arm is ready: any of them may be routed a request."""
        return all(ready_of(arm) for arm in self._arms.values())

    @property
    def arms(self) -> Mapping[str, Predictive]:
        """The arms by name (a copy)."""
        return dict(self._arms)

    def swap(self, arm: str, predictor: Predictive, *, close_old: bool = True, timeout: float | None = None) -> None:
        """Replace an arm's model while serving; requests the old one accepted still finish there."""
        if arm not in self._arms:
            msg = f"unknown arm {arm!r}; the router has {sorted(self._arms)}"
            raise KeyError(msg)
        old = self._arms[arm]
        self._arms[arm] = predictor
        if close_old and old is not predictor:
            old.close(timeout)

    def stats(self) -> RouterStats:
        """Each arm's own stats, the split so far, shadow counts and the policy."""
        shadow = self._shadow.stats()
        routed = self._ledger.experiment.requests()  # under the experiment's own lock
        arms = {a: p.stats() for a, p in self._arms.items()}
        return RouterStats(routed, arms, shadow, repr(self._ledger.in_force.policy), self._ledger.policy_errors)

    def close(self, timeout: float | None = None) -> None:
        """Stop routing, hand the queued shadow work over, then let every arm drain and stop, all within ``timeout``.

        A Ctrl-C while an arm drains is raised at once, the arms after it closed without waiting
        (:func:`~inferkit._closing.close_all`); closing again finishes what it left.
        """
        if self._shut:
            return
        self._closed = True  # routes refused from now on; ``_shut`` once every part closed (a retry finishes)
        canary = find_canary(self._ledger.in_force.policy)
        steps: list[Callable[..., object]] = [lambda _: self._ledger.close(), self._shadow.close]
        if canary is not None:
            steps.append(lambda _: canary.close())  # a shared store's follower thread
        arms = {id(p): p for p in self._arms.values()}.values()  # an arm listed twice is closed once
        steps.extend(arm.close for arm in arms)  # each drains meanwhile: the last ones closed need less time
        close_all(steps, timeout)  # one arm failing to close must not leave the others open
        self._shut = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _emit(self, event: Event) -> None:
        deliver(self._observers, event)
