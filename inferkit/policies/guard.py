"""A canary's :class:`Guard` (the limits its candidate must stay within) and the per-step numbers it judges."""

from __future__ import annotations

from typing import Any

import attrs

from inferkit._validators import integer, number, optional_positive
from inferkit.experiments import Window
from inferkit.significance import wilson_interval

_share = number(0)
MIN_VERDICTS = 20  # checks judged in a step before its unchecked failures are counted by their share


def _optional_share(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    """``None``, or a rate >= 0 (0 allowed: no failure at all)."""
    if value is not None:
        _share(instance, attribute, value)


@attrs.frozen
class Guard:
    """Limits a canary's candidate must stay within; ``None`` switches a check off.

    Only failures of the model or its replicas count as errors, never the caller's
    ``InvalidInput`` or ``Overloaded``.

    ===========================  ===========================================================
    ``max_error_rate``           the candidate's error rate in the step
    ``max_error_rate_increase``  candidate error rate minus the baseline's
    ``max_p99_ratio``            candidate p99 latency over the baseline's
    ``max_disagreement``         share of shadow comparisons that disagreed
    ``min_outcome_ratio``        candidate's mean recorded outcome over the baseline's
    ``min_baseline_requests``    baseline requests needed before relative checks apply
    ===========================  ===========================================================
    """

    max_error_rate: float | None = attrs.field(default=0.01, validator=_optional_share)
    max_error_rate_increase: float | None = attrs.field(default=None, validator=_optional_share)
    max_p99_ratio: float | None = attrs.field(default=None, validator=optional_positive)
    max_disagreement: float | None = attrs.field(default=None, validator=_optional_share)
    min_outcome_ratio: float | None = attrs.field(default=None, validator=optional_positive)
    min_baseline_requests: int = attrs.field(default=20, validator=integer(0))

    def check(self, baseline: _StepWindow, candidate: _StepWindow) -> tuple[str, dict[str, float]] | None:
        """The first limit the candidate breaks, with the numbers that broke it; None if none."""
        broken = self.errors(baseline, candidate)
        if broken is not None:
            return broken
        cand_rate = candidate.window.error_rate
        numbers = {"candidate_requests": float(candidate.window.requests), "candidate_error_rate": cand_rate}
        base_ok = baseline.window.requests >= self.min_baseline_requests
        if self.max_p99_ratio is not None and base_ok:
            base_p99 = baseline.window.latency_quantile(0.99)
            cand_p99 = candidate.window.latency_quantile(0.99)
            if base_p99 > 0 and cand_p99 / base_p99 > self.max_p99_ratio:
                ratio = cand_p99 / base_p99
                return "max_p99_ratio", numbers | {"p99_ratio": ratio, "limit": self.max_p99_ratio}
        if self.max_disagreement is not None and candidate.compared:
            share = candidate.disagreed / candidate.compared
            if share > self.max_disagreement:
                return "max_disagreement", numbers | {"disagreement": share, "limit": self.max_disagreement}
        if self.min_outcome_ratio is not None and candidate.outcomes and baseline.outcomes:
            base_mean = baseline.outcome_sum / baseline.outcomes
            cand_mean = candidate.outcome_sum / candidate.outcomes
            if base_mean > 0 and cand_mean / base_mean < self.min_outcome_ratio:
                ratio = cand_mean / base_mean
                return "min_outcome_ratio", numbers | {"outcome_ratio": ratio, "limit": self.min_outcome_ratio}
        return None

    def errors(self, baseline: _StepWindow, candidate: _StepWindow) -> tuple[str, dict[str, float]] | None:
        """The first error-rate limit (``max_error_rate``, ``max_error_rate_increase``) it breaks; None if none."""
        cand_rate = candidate.window.error_rate
        numbers = {"candidate_requests": float(candidate.window.requests), "candidate_error_rate": cand_rate}
        if self.max_error_rate is not None and cand_rate > self.max_error_rate:
            return "max_error_rate", numbers | {"limit": self.max_error_rate}
        if self.max_error_rate_increase is not None and baseline.window.requests >= self.min_baseline_requests:
            # The baseline's rate as it is: bad input in it (its failures are not checked) hides an increase as
            # large as its share; a share estimated on the candidate's traffic let a client with a sticky key
            # and bad input set the baseline's rate to 0 and roll a healthy canary back.
            base_rate = baseline.window.error_rate
            increase = cand_rate - base_rate
            if increase > self.max_error_rate_increase:
                return "max_error_rate_increase", numbers | {
                    "baseline_error_rate": base_rate,
                    "increase": increase,
                    "limit": self.max_error_rate_increase,
                }
        return None


class _Checks:
    """A canary candidate's model errors checked against the baseline in one step (this process's).

    A failure is ``convicted`` (the baseline served the input: counted in the window),
    ``repeated`` (the baseline failed the same way: the input's, in no window), ``unchecked`` (no
    check was sent: too many in flight; in no window either), or judged by nothing (a check the
    baseline refused or failed otherwise says nothing: not counted at all, as the baseline's load
    is for a client to set, and must not set what the candidate is blamed for).
    """

    __slots__ = ("checked", "convicted", "due", "repeated", "sent", "unchecked")

    def __init__(self) -> None:
        self.sent = 0
        self.checked = 0
        self.due: int | None = None  # checks sent when the step was otherwise done: it waits for as many
        self.convicted = 0
        self.repeated = 0
        self.unchecked = 0

    def own_unchecked(self) -> float:
        """The unchecked failures taken as the arm's own: by the least share of the judged ones that could be.

        The low end of its 95% interval, and none before :data:`MIN_VERDICTS` verdicts: a few
        convictions among a flood of bad input must not make the unchecked failures the candidate's.
        """
        return self.unchecked * self._least_share(self.convicted)

    def too_few_verdicts(self) -> bool:
        """Whether failures went unchecked and fewer than :data:`MIN_VERDICTS` checks judged: whose is unknown."""
        return bool(self.unchecked) and self.convicted + self.repeated < MIN_VERDICTS

    def _least_share(self, part: int) -> float:
        judged = self.convicted + self.repeated
        return wilson_interval(part / judged, judged)[0] if judged >= MIN_VERDICTS and self.unchecked else 0.0


class _StepWindow:
    """One arm's numbers within the current canary step."""

    def __init__(self, window: Window | None = None, checks: _Checks | None = None) -> None:
        # Sampled uniformly: the arms' p99s over the same span, whatever their traffic shares.
        self.window = Window(uniform=True) if window is None else window
        self.checks = _Checks() if checks is None else checks
        self.compared = 0
        self.disagreed = 0
        self.mirrored = 0  # mirrors sent to the arm in the step: each ends compared or failed (settled)
        self.settled = 0
        self.due: int | None = None  # mirrors sent when the step was otherwise done: it waits for as many to settle
        self.outcomes = 0
        self.outcome_sum = 0.0

    def view(self, window: Window) -> _StepWindow:
        """These numbers with another window (pooled, or estimated): for one decision."""
        view = _StepWindow(window, self.checks)
        view.compared, view.disagreed = self.compared, self.disagreed
        view.outcomes, view.outcome_sum = self.outcomes, self.outcome_sum
        return view

    def with_unchecked(self) -> _StepWindow:
        """These numbers with the failures no check was sent for that were (at least) the arm's own, at a step's end.

        Left out, a candidate faster than its baseline would have its successes in the window and
        its failures, outrunning the checks, mostly not. Never mid-step: a few verdicts say little.
        """
        extra = self.checks.own_unchecked()
        return self.view(_Estimated(self.window, extra)) if extra else self

    def with_all_unchecked(self) -> _StepWindow:
        """These numbers with every failure no check was sent for counted as the arm's own: the worst they can be."""
        return self.view(_Estimated(self.window, self.checks.unchecked)) if self.checks.unchecked else self


class _PooledWindow(Window):
    """Every process's request and failure counts, with this process's latencies."""

    def __init__(self, local: Window, requests: int, failures: int) -> None:
        super().__init__(1)
        self.local = local
        self.requests = max(requests, local.requests)
        self.failures = max(failures, local.failures)

    def latency_quantile(self, q: float) -> float:
        """Latencies of this process only: they are not pooled."""
        return self.local.latency_quantile(q)


class _Estimated(Window):
    """A window with ``extra`` failed requests more: the unchecked failures estimated to be the arm's own."""

    def __init__(self, local: Window, extra: float) -> None:
        super().__init__(1)
        self.local = local
        self.requests = local.requests + extra  # type: ignore[assignment]
        self.failures = local.failures + extra  # type: ignore[assignment]

    def latency_quantile(self, q: float) -> float:
        """The latencies of the requests it was made from."""
        return self.local.latency_quantile(q)
