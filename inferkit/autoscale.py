"""Scale a predictor's replica pool on its load, in the manner of Ray Serve's autoscaler.

An :class:`Autoscaler` samples the predictor's requests in flight (queued and running),
smooths them with an EWMA, and resizes the pool towards ``target_in_flight`` requests per
replica, between ``min_replicas`` and ``max_replicas``. A change must be wanted for
``upscale_delay_s`` (growing) or ``downscale_delay_s`` (shrinking) before it is made, so a
short burst or lull does not make the pool flap. Shrinking drains: a removed replica finishes
what it holds, so no request is lost.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Self

import attrs

from inferkit._validators import fraction, integer, number
from inferkit.errors import Closed
from inferkit.event_log import LogObserver
from inferkit.events import Event, Observer, deliver
from inferkit.pool import LIVE_STATES
from inferkit.predictor import Predictor, State
from inferkit.stats import Stats

__all__ = ["AutoscaleConfig", "Autoscaler", "AutoscalerStats", "ScalingDecision", "ScalingFailed"]

_LIVE = frozenset(state.value for state in LIVE_STATES)  # Stats report states by value
_DECISIONS = 100  # decisions kept for stats()
_MAX_BACKOFF_S = 60.0  # the longest wait between retries of a failing resize (unless interval_s is longer)
_DIGITS = 9  # a load/target ratio is rounded to this many decimals before its ceiling (float noise)


@attrs.frozen
class AutoscaleConfig:
    """When and how far an :class:`Autoscaler` resizes the pool.

    =====================  ===================================================================
    ``min_replicas``       the fewest replicas (>= 1); a smaller pool grows to it at once
    ``max_replicas``       the most replicas (>= ``min_replicas``); a larger pool shrinks at once
    ``target_in_flight``   requests in flight (queued + running) per replica to aim for (> 0)
    ``upscale_delay_s``    seconds more replicas must be wanted, without a break, before growing
    ``downscale_delay_s``  seconds fewer replicas must be wanted, without a break, before shrinking
    ``smoothing``          EWMA weight of the newest load sample, in (0, 1] (1: no smoothing)
    ``interval_s``         seconds between samples on the background thread (> 0)
    =====================  ===================================================================
    """

    min_replicas: int = attrs.field(default=1, validator=integer(1))
    max_replicas: int = attrs.field(default=4, validator=integer(1))
    target_in_flight: float = attrs.field(default=8.0, validator=number(0, inclusive=False))
    upscale_delay_s: float = attrs.field(default=0.0, validator=number(0))
    downscale_delay_s: float = attrs.field(default=30.0, validator=number(0))
    smoothing: float = attrs.field(default=0.5, validator=fraction)
    interval_s: float = attrs.field(default=0.5, validator=number(0, inclusive=False))

    def __attrs_post_init__(self) -> None:
        if self.max_replicas < self.min_replicas:
            msg = f"max_replicas must be >= min_replicas ({self.min_replicas}), got {self.max_replicas}"
            raise ValueError(msg)
        if self.interval_s > threading.TIMEOUT_MAX:  # the thread's wait raised OverflowError: it died at once
            msg = f"interval_s must be at most {threading.TIMEOUT_MAX:g}, got {self.interval_s!r}"
            raise ValueError(msg)

    def desired(self, smoothed: float) -> int:
        """Replicas for a smoothed load: ``ceil(smoothed / target_in_flight)`` within the bounds."""
        # Rounded first: a steady 24 smoothed to 24.000000000000004, or 9.9 / 3.3, must not want one more.
        ratio = round(smoothed / self.target_in_flight, _DIGITS)
        wanted = math.ceil(ratio) if ratio < self.max_replicas else self.max_replicas  # inf for a tiny target
        return min(max(wanted, self.min_replicas), self.max_replicas)


@attrs.frozen
class ScalingDecision(Event):
    """The autoscaler resized the pool from ``current`` to ``desired`` replicas.

    ``at`` is the autoscaler's clock when it decided, ``load`` the requests in flight it
    sampled then and ``smoothed`` their EWMA; ``action`` is ``"up"`` or ``"down"``.
    """

    at: float
    load: float
    smoothed: float
    current: int
    desired: int
    action: str


@attrs.frozen
class ScalingFailed(Event):
    """A resize from the background thread raised (say, a replica failed to load).

    The thread retries, waiting twice as long after each failure in a row (up to a minute, or
    ``interval_s`` if longer).
    """

    at: float
    current: int
    desired: int
    error: str


@attrs.frozen
class AutoscalerStats:
    """What the autoscaler last saw and did.

    ``current`` is the live replicas (healthy or ejected) after the last step, ``desired``
    what the smoothed load asked for then, ``smoothed_load`` that EWMA (0 before the first
    step) and ``decisions`` the last 100 resizes, oldest first.
    """

    current: int
    desired: int
    smoothed_load: float
    decisions: tuple[ScalingDecision, ...]


def _live_replicas(stats: Stats) -> int:
    """Replicas that take work or will again (healthy or ejected, or loading: a replacement, a resize's)."""
    return sum(r.state in _LIVE for r in stats.replicas) + stats.loading


class _ScalingRule:
    """The decision alone, with no predictor or thread: the load's EWMA and how long each way was wanted."""

    def __init__(self, config: AutoscaleConfig) -> None:
        self.config = config
        self.smoothed: float | None = None
        self._up_since: float | None = None
        self._down_since: float | None = None

    def observe(self, load: float) -> float:
        """Fold a load sample into the EWMA and return it."""
        weight = self.config.smoothing
        smoothed = load if self.smoothed is None else weight * load + (1 - weight) * self.smoothed
        self.smoothed = smoothed
        return smoothed

    def target(self, now: float, current: int, desired: int) -> int | None:
        """The size to resize to now, or None; keeps the since-when of each direction."""
        config = self.config
        if not config.min_replicas <= current <= config.max_replicas:
            self._up_since = self._down_since = None
            return min(max(current, config.min_replicas), config.max_replicas)
        if desired > current:
            self._down_since = None
            self._up_since = now if self._up_since is None else self._up_since
            if now - self._up_since >= config.upscale_delay_s:
                self._up_since = None  # a failed resize waits out the delay again before retrying
                return desired
        elif desired < current:
            self._up_since = None
            self._down_since = now if self._down_since is None else self._down_since
            if now - self._down_since >= config.downscale_delay_s:
                self._down_since = None
                return desired
        else:
            self._up_since = self._down_since = None
        return None


class _Ticker(threading.Thread):
    """The autoscaler's daemon thread, and the event that ends its wait: ``close()``, or the predictor's close."""

    def __init__(self, run: Callable[[threading.Event], None], name: str) -> None:
        self.wake = threading.Event()
        super().__init__(target=run, args=(self.wake,), name=name, daemon=True)


class Autoscaler:
    """Scales a :class:`~inferkit.Predictor` between min and max replicas on its in-flight requests.

    Modelled on Ray Serve's autoscaler: a target of ongoing requests per replica, upscale and
    downscale delays, and a smoothed load. Each :meth:`step` samples ``stats().in_flight``,
    folds it into an EWMA (``smoothing`` weights the newest sample; the first sample is taken
    as it is), and computes ``desired = clamp(ceil(smoothed / target_in_flight), min, max)``.
    When ``desired`` stays above the live replica count for ``upscale_delay_s``, or below it
    for ``downscale_delay_s``, it calls ``predictor.resize(desired)``; the clock restarts
    whenever the condition breaks. A pool outside ``[min_replicas, max_replicas]`` is brought
    inside at once, whatever the delays. Each resize is a :class:`ScalingDecision` event,
    delivered to ``observers`` and logged through :class:`~inferkit.LogObserver`.

    Drive it with :meth:`step` (tests, or your own loop), or :meth:`start` a daemon thread
    that steps every ``interval_s``. The autoscaler never closes the predictor; close the
    autoscaler first (a context manager does), or its thread ends on its own as soon as the
    predictor is closed (it hears of it through :meth:`Predictor.on_closed`).
    """

    def __init__(
        self,
        predictor: Predictor,
        config: AutoscaleConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.predictor = predictor
        """The predictor being scaled."""
        self.config = config if config is not None else AutoscaleConfig()
        """The settings in force."""
        self._clock = clock
        self._observers = (*observers, LogObserver())
        self._step_lock = threading.Lock()  # one step at a time; held across a resize, which may load models
        self._lock = threading.Lock()  # guards what stats() reads, so it never waits for a resize
        self._rule = _ScalingRule(self.config)  # read and written under _step_lock; smoothed also under _lock
        self._current = _live_replicas(predictor.stats())
        self._desired = self._current
        self._decisions: collections.deque[ScalingDecision] = collections.deque(maxlen=_DECISIONS)
        self._stop = threading.Event()
        self._thread: _Ticker | None = None

    # -- scaling ---------------------------------------------------------------------------

    def step(self, now: float | None = None) -> ScalingDecision | None:
        """Sample the load once and resize if due; return the decision, or None when nothing changed.

        ``now`` is the time to decide at (default: the autoscaler's clock). Does nothing once
        the predictor is no longer ready to take requests. A failing resize raises here.
        """
        with self._step_lock:
            if self.predictor.state is not State.READY:
                return None
            now = self._clock() if now is None else now
            sample = self.predictor.stats()
            load = float(sample.in_flight)
            current = _live_replicas(sample)
            with self._lock:
                smoothed = self._rule.observe(load)
                desired = self._desired = self.config.desired(smoothed)
                self._current = current
            target = self._rule.target(now, current, desired)
            if target is None:
                return None
            decision = ScalingDecision(
                self.predictor.name, now, load, smoothed, current, target, "up" if target > current else "down"
            )
            self.predictor.resize(target)
            with self._lock:
                self._current = target  # resize grows synchronously and marks the removed replicas at once
                self._decisions.append(decision)
        self._emit(decision)
        return decision

    # -- background thread -----------------------------------------------------------------

    def start(self) -> Self:
        """Step once now (bringing the pool within bounds), then every ``interval_s`` on a thread.

        The daemon thread is named ``inferkit-autoscaler-<predictor name>``. Returns the
        autoscaler, so ``with Autoscaler(p, config).start() as scaler:`` reads well. A second
        call while running does nothing; raises ``RuntimeError`` after :meth:`close`. A failing
        first resize raises here and starts no thread; later failures are :class:`ScalingFailed` events.
        """
        with self._lock:
            if self._stop.is_set():
                msg = "the autoscaler is closed"
                raise RuntimeError(msg)
            if self._thread is not None:
                return self
        self.step()
        with self._lock:
            if self._stop.is_set() or self._thread is not None:  # closed or started by another caller meanwhile
                return self
            self._thread = _Ticker(self._run, f"inferkit-autoscaler-{self.predictor.name}")
            self._thread.start()
        return self

    def _run(self, wake: threading.Event) -> None:
        def closed(event: Event) -> None:  # noqa: ARG001 (an Observer: the event is the close)
            wake.set()  # the predictor closed: end now, not an interval (maybe an hour) later

        unwatch = self.predictor.on_closed(closed)  # at once if it closed already
        try:
            self._loop(wake)
        finally:
            unwatch()  # the predictor keeps nothing of this thread

    def _loop(self, wake: threading.Event) -> None:
        # Waiting on the event, not sleeping, lets close() or the predictor's close end the thread at once.
        interval = wait = self.config.interval_s
        failures = 0
        while not wake.wait(wait):
            try:
                decision = self.step()
            except Closed:  # the predictor closed during the resize: nothing left to scale, nothing failed
                return
            except Exception as error:  # noqa: BLE001 (a failed resize must not end the scaling)
                # Back off: a load that keeps failing (out of memory) is not retried, and logged, every interval.
                failures += 1
                wait = min(interval * 2 ** min(failures, 32), max(interval, _MAX_BACKOFF_S))
                with self._lock:
                    current, desired = self._current, self._desired
                self._emit(ScalingFailed(self.predictor.name, self._clock(), current, desired, repr(error)))
            else:
                with self._lock:
                    settled = decision is not None or self._desired == self._current
                if settled:  # resized, or nothing to resize: not a step merely waiting out a delay
                    failures, wait = 0, interval

    def close(self, timeout: float | None = None) -> None:
        """Stop the background thread and wait up to ``timeout`` for it; idempotent.

        A resize already under way finishes first. The predictor is left open.
        """
        with self._lock:  # with start()'s checks: a thread starts before this or not at all
            self._stop.set()
            thread = self._thread
        if thread is not None:
            thread.wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observability ---------------------------------------------------------------------

    def stats(self) -> AutoscalerStats:
        """A snapshot of the last step and the recent decisions."""
        with self._lock:
            return AutoscalerStats(
                current=self._current,
                desired=self._desired,
                smoothed_load=self._rule.smoothed if self._rule.smoothed is not None else 0.0,
                decisions=tuple(self._decisions),
            )

    def __repr__(self) -> str:
        config = self.config
        return f"<Autoscaler {self.predictor.name!r} {config.min_replicas}..{config.max_replicas} replicas>"

    def _emit(self, event: Event) -> None:
        deliver(self._observers, event)
