"""Per-arm statistics for A/B tests and canaries: latency, errors, outcomes and significance.

An :class:`Experiment` counts what each arm served (``observe``) and the business outcomes
credited to it (``record``); ``report()`` compares every arm with the baseline:

* **Two-proportion z-test** when both arms' outcomes are all 0 or 1 (conversion rates): the
  standard large-sample test for a difference of proportions, with the pooled variance of the
  null hypothesis that both rates are equal.
* **Welch's t-test** otherwise (revenue, scores): arms get different traffic shares and models
  change the spread of outcomes, so neither equal sizes nor equal variances are assumed; the
  degrees of freedom are Welch-Satterthwaite's.

Both tests are two-sided: a change that makes things worse matters as much as one that helps.
There is **no multiple-comparison correction**: with several arms each is tested at ``alpha``
against the baseline, and the report warns that false positives add up (Bonferroni: use
``alpha / comparisons``). Both tests rest on normal approximations that need enough data, so
arms with fewer than ``min_samples`` outcomes are flagged and the verdict stays "not enough
data". Per-arm 95% intervals are Wilson score intervals for rates (sound near 0 and 1, unlike
the Wald interval) and ``mean ± t·se`` otherwise. The Student t distribution is computed in
:mod:`inferkit.significance`, so the library needs no scipy.
"""

from __future__ import annotations

import bisect
import copy
import math
import random
import threading
from collections.abc import Mapping, Sequence

import attrs
import numpy as np

from inferkit.significance import _t_two_sided_quantile, two_proportion_z_test, welch_t_test, wilson_interval

__all__ = ["ArmReport", "Comparison", "Experiment", "Report", "Window", "two_proportion_z_test", "welch_t_test"]

_SAMPLES = 4096  # recent latencies kept per arm
# Upper bucket edges in ms, 1-2-5 per decade from 0.1 ms to 10 s, then everything slower.
_EDGES_MS = (*(m * 10.0**e for e in range(-1, 4) for m in (1, 2, 5)), 10_000.0, math.inf)


class Window:
    """Counts and latencies of one arm over a span (a canary step). Not thread-safe; guarded by its owner.

    It keeps the latest ``max_samples`` latencies, or with ``uniform`` a uniform random sample
    of all the span's latencies (reservoir sampling): two arms with different shares of the
    traffic must keep that for their quantiles to describe the same span. Failed requests'
    latencies count too: one that hangs until a timeout is a latency problem as well.
    """

    def __init__(self, max_samples: int = _SAMPLES, *, uniform: bool = False) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples!r}")
        self.requests = 0
        self.failures = 0
        self._ring = np.zeros(max_samples)
        self._uniform = uniform
        self._rng: random.Random | None = None  # made when the sample is full: most windows never need one

    def observe(self, latency_s: float, failed: bool) -> None:
        """Count one request that took ``latency_s`` seconds."""
        if not 0 <= latency_s < math.inf:  # also refuses NaN
            raise ValueError(f"latency_s must be finite and >= 0, got {latency_s!r}")
        size, seen = len(self._ring), self.requests
        if not self._uniform or seen < size:
            self._ring[seen % size] = latency_s
        else:
            if self._rng is None:
                self._rng = random.Random(0)  # seeded: the same requests give the same decisions
            if (slot := int(self._rng.random() * (seen + 1))) < size:  # kept with probability size / (seen + 1)
                self._ring[slot] = latency_s
        self.requests += 1
        self.failures += failed

    @property
    def error_rate(self) -> float:
        """Failed requests over requests (0.0 when none)."""
        return self.failures / self.requests if self.requests else 0.0

    def latency_quantile(self, q: float) -> float:
        """The ``q`` quantile (0..1) of the kept latencies in seconds, 0.0 when none."""
        if not 0 <= q <= 1:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        n = min(self.requests, len(self._ring))
        return float(np.quantile(self._ring[:n], q)) if n else 0.0


@attrs.define
class _Outcomes:
    """Welford's running count, mean and squared deviations, and whether every value was 0 or 1."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    total: float = 0.0
    binary: bool = True

    def add(self, value: float) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)
        self.total += value
        self.binary = self.binary and value in (0.0, 1.0)

    @property
    def average(self) -> float:
        return self.total / self.count if self.binary else self.mean  # a rate is exact as successes / n

    @property
    def variance(self) -> float:
        if self.count < 2:
            return 0.0
        if not self.m2 >= 0:  # -inf or NaN: the running sums overflowed, the spread is unknown
            return math.nan
        return self.m2 / (self.count - 1)


@attrs.define
class _Arm:
    window: Window = attrs.field(factory=Window)
    histogram: list[int] = attrs.field(factory=lambda: [0] * len(_EDGES_MS))
    outcomes: _Outcomes = attrs.field(factory=_Outcomes)


@attrs.frozen
class ArmReport:
    """One arm: traffic, errors, latency (ms) and outcomes with a 95% confidence interval.

    The percentiles are of the arm's latest 4096 requests; the counts and histogram of all.
    ``latency_histogram`` maps each upper bucket edge in ms (0.1 ms to 10 s, 1-2-5 per decade,
    then ``inf``) to the requests that took at most that long. The interval is Wilson's for 0/1
    outcomes and ``mean ± t·se`` otherwise; ``None`` when there are too few outcomes, or when
    their mean or variance overflowed (outcomes near float's limits).
    """

    arm: str
    requests: int
    failures: int
    error_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    latency_histogram: Mapping[float, int]
    outcomes: int
    outcome_mean: float | None
    ci_low: float | None
    ci_high: float | None


@attrs.frozen
class Comparison:
    """One arm's outcomes against the baseline's: ``difference`` is arm mean minus baseline mean.

    ``significant`` is ``p_value < alpha``; ``warning`` says why the result should not be trusted
    yet (too few outcomes), or is ``None``.
    """

    arm: str
    baseline: str
    test: str
    difference: float
    statistic: float
    p_value: float
    significant: bool
    warning: str | None


@attrs.frozen
class Report:
    """Every arm, every comparison with the baseline, what to be wary of, and the verdict in words."""

    baseline: str | None
    arms: tuple[ArmReport, ...]
    comparisons: tuple[Comparison, ...]
    warnings: tuple[str, ...]
    verdict: str

    def __str__(self) -> str:
        vs = {c.arm: f"{c.difference:+.4g}, {_fmt_p(c.p_value)}" for c in self.comparisons}
        rows = [("arm", "requests", "error rate", "p50/p99 ms", "outcomes", "mean [95% CI]", "vs baseline")]
        for a in self.arms:
            mean = "-" if a.outcome_mean is None else f"{a.outcome_mean:.4g}"
            if a.ci_low is not None and a.ci_high is not None:
                mean += f" [{a.ci_low:.4g}, {a.ci_high:.4g}]"
            versus = "baseline" if a.arm == self.baseline else vs.get(a.arm, "-")
            latency = f"{a.p50_ms:.1f}/{a.p99_ms:.1f}"
            rows.append((a.arm, str(a.requests), f"{a.error_rate:.2%}", latency, str(a.outcomes), mean, versus))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        numeric = (False, True, True, True, True, False, False)
        lines = [
            "  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(row, widths, numeric, strict=True))
            for row in rows
        ]
        lines.append(f"verdict: {self.verdict}")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(line.rstrip() for line in lines)


class Experiment:
    """Per-arm counters for an A/B test or canary; thread-safe, one lock per experiment.

    ``baseline`` (default: the first arm) is what every other arm is compared with; it is added
    as an arm if missing. A comparison is significant at ``alpha`` (two-sided); arms with fewer
    than ``min_samples`` outcomes get a warning. ``higher_is_better`` says which way the verdict
    reads a difference (False for costs). Unknown arm names raise ``KeyError``.
    """

    def __init__(
        self,
        arms: Sequence[str] = (),
        *,
        baseline: str | None = None,
        alpha: float = 0.05,
        min_samples: int = 100,
        higher_is_better: bool = True,
    ) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
        if min_samples < 2:
            raise ValueError(f"min_samples must be >= 2, got {min_samples!r}")
        self._lock = threading.Lock()
        self._arms: dict[str, _Arm] = {}
        self._baseline = baseline
        self._alpha = alpha
        self._min_samples = min_samples
        self._higher_is_better = higher_is_better
        for arm in (*arms, *([baseline] if baseline is not None else [])):
            self.add_arm(arm)

    def add_arm(self, arm: str) -> None:
        """Start counting ``arm`` (nothing happens if it is already counted)."""
        with self._lock:
            self._arms.setdefault(arm, _Arm())

    def observe(self, arm: str, latency_s: float, failed: bool) -> None:
        """Count one request that ``arm`` served in ``latency_s`` seconds; ``failed``: the model or replica failed."""
        with self._lock:
            state = self._get(arm)
            state.window.observe(latency_s, failed)
            state.histogram[bisect.bisect_left(_EDGES_MS, latency_s * 1000.0)] += 1

    def requests(self) -> dict[str, int]:
        """Requests counted per arm so far (cheap: no statistics are computed)."""
        with self._lock:
            return {arm: state.window.requests for arm, state in self._arms.items()}

    def record(self, arm: str, value: float) -> None:
        """Credit a business outcome to ``arm``: 0/1 for conversions, any finite number otherwise."""
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int past float's range
            finite = False
        if not finite:
            raise ValueError(f"value must be finite, got {value!r:.40}")
        with self._lock:
            self._get(arm).outcomes.add(float(value))

    def reset(self) -> None:
        """Forget every count and outcome; the arms and the baseline stay."""
        with self._lock:
            self._arms = {arm: _Arm() for arm in self._arms}

    def report(self, baseline: str | None = None) -> Report:
        """A snapshot of every arm compared with ``baseline`` (default: the experiment's)."""
        with self._lock:  # copy under the lock, compute outside it: observers never wait on the maths
            base = next((b for b in (baseline, self._baseline) if b is not None), next(iter(self._arms), None))
            if base is not None:
                self._get(base)
            snapshot = [(name, _copy(state)) for name, state in self._arms.items()]
        arms = tuple(_arm_report(name, state) for name, state in snapshot)
        outcomes = {name: state.outcomes for name, state in snapshot}
        comparisons: list[Comparison] = []
        warnings: dict[str, None] = {}  # ordered and unique
        for name, stats in outcomes.items():
            if base is None or name == base:
                continue
            few = [
                f"fewer than min_samples outcomes ({o.count} < {self._min_samples}) in {arm!r}"
                for arm, o in ((base, outcomes[base]), (name, stats))
                if o.count < self._min_samples
            ]
            warnings.update(dict.fromkeys(few))
            if stats.count >= 2 and outcomes[base].count >= 2:
                comparisons.append(self._compare(name, stats, base, outcomes[base], "; ".join(few) or None))
        if (k := len(comparisons)) > 1:
            warnings[f"{k} comparisons at alpha={self._alpha:g}, uncorrected (Bonferroni: {self._alpha / k:.3g})"] = (
                None
            )
        return Report(base, arms, tuple(comparisons), tuple(warnings), self._verdict(comparisons, len(outcomes) - 1))

    def _verdict(self, comparisons: Sequence[Comparison], challengers: int) -> str:
        # Only comparisons with enough data on both sides may claim a difference, or rule one out.
        trusted = [c for c in comparisons if c.warning is None]
        winners = [c for c in trusted if c.significant]
        if winners:
            better = [(c.difference > 0) == self._higher_is_better for c in winners]
            return "; ".join(
                f"{c.arm} {'better' if b else 'worse'} than {c.baseline} ({_fmt_p(c.p_value)})"
                for c, b in zip(winners, better, strict=True)
            )
        if challengers > 0 and len(trusted) == challengers:
            return "no significant difference"
        if any(c.warning == _OUT_OF_RANGE for c in comparisons):
            return "cannot compare: " + _OUT_OF_RANGE
        return "not enough data"

    def _get(self, arm: str) -> _Arm:
        try:
            return self._arms[arm]
        except KeyError:
            raise KeyError(f"unknown arm {arm!r}; known: {sorted(self._arms)} (add it with add_arm)") from None

    def _compare(self, arm: str, a: _Outcomes, base: str, b: _Outcomes, warning: str | None) -> Comparison:
        if a.binary and b.binary:
            test = "two-proportion z-test"
            statistic, p = two_proportion_z_test(round(a.total), a.count, round(b.total), b.count)
        else:
            test = "Welch's t-test"
            statistic, _, p = welch_t_test(a.mean, a.variance, a.count, b.mean, b.variance, b.count)
        if math.isnan(p):  # never a verdict from NaN: "no significant difference" would be a claim
            warning = _OUT_OF_RANGE
        return Comparison(arm, base, test, a.average - b.average, statistic, p, p < self._alpha, warning)


_OUT_OF_RANGE = "outcomes past floating-point range (their mean or variance overflowed)"


def _copy(state: _Arm) -> _Arm:
    window = copy.copy(state.window)
    window._ring = window._ring.copy()
    return _Arm(window, list(state.histogram), attrs.evolve(state.outcomes))


def _arm_report(name: str, state: _Arm) -> ArmReport:
    o = state.outcomes
    low: float | None = None
    high: float | None = None
    if o.binary and o.count >= 1:  # Wilson score interval
        low, high = wilson_interval(o.average, o.count)
    elif o.count >= 2 and math.isfinite(o.mean) and math.isfinite(o.variance):  # no interval past float range
        half = _t_two_sided_quantile(0.05, o.count - 1) * math.sqrt(o.variance / o.count)
        low, high = o.mean - half, o.mean + half
    w = state.window
    p50, p95, p99 = (w.latency_quantile(q) * 1000.0 for q in (0.5, 0.95, 0.99))
    histogram = dict(zip(_EDGES_MS, state.histogram, strict=True))
    mean = o.average if o.count else None
    return ArmReport(name, w.requests, w.failures, w.error_rate, p50, p95, p99, histogram, o.count, mean, low, high)


def _fmt_p(p: float) -> str:
    return "p<0.0001" if p < 1e-4 else f"p={p:.3g}"
