"""Tests for inferkit.experiments: the tests' maths, intervals, warnings, verdicts and thread safety."""

from __future__ import annotations

import itertools
import math
import threading
from types import ModuleType

import numpy as np
import pytest

from inferkit.experiments import _EDGES_MS, Experiment, Report, Window
from inferkit.significance import _t_two_sided_p, _t_two_sided_quantile, two_proportion_z_test, welch_t_test

# (n_a, n_b): Welch df from about 1 (two samples each) to about a million.
SIZES = [(2, 2), (2, 3), (3, 3), (3, 5), (4, 6), (5, 5), (2, 1000), (30, 40), (1000, 1000), (10**5, 10**6)]
# (mean_a, var_a, mean_b, var_b): small to huge effects, equal and very unequal spreads.
MOMENTS = [
    (0.0, 1.0, 1.0, 1.0),
    (0.0, 2.0, 0.1, 0.5),
    (3.0, 0.1, -2.0, 5.0),
    (1.0, 1.0, 1.0, 4.0),
    (0.0, 1.0, 0.003, 1.0),
]


@pytest.fixture(name="stats")
def _stats() -> ModuleType:
    """``scipy.stats``, the reference the pure-Python maths is checked against (skips without scipy)."""
    return pytest.importorskip("scipy.stats")


def fill(experiment: Experiment, arm: str, values: np.ndarray | list[float]) -> None:
    """Record every value as an outcome of ``arm``."""
    for value in values:
        experiment.record(arm, float(value))


def conversions(seed: int, rate_a: float, rate_b: float, n: int = 1000) -> Experiment:
    """An experiment whose arms "v1" and "v2" converted ``n`` users each at the given rates."""
    rng = np.random.default_rng(seed)
    experiment = Experiment(["v1", "v2"])
    fill(experiment, "v1", rng.random(n) < rate_a)
    fill(experiment, "v2", rng.random(n) < rate_b)
    return experiment


class TestWelchTTest:
    @pytest.mark.parametrize(("sizes", "moments"), list(itertools.product(SIZES, MOMENTS)))
    def test_matches_scipy(
        self, stats: ModuleType, sizes: tuple[int, int], moments: tuple[float, float, float, float]
    ) -> None:
        """t and the two-sided p equal scipy's unequal-variance t-test to 1e-6, from df near 1 to 10^6."""
        (n_a, n_b), (mean_a, var_a, mean_b, var_b) = sizes, moments
        t, _, p = welch_t_test(mean_a, var_a, n_a, mean_b, var_b, n_b)
        expected = stats.ttest_ind_from_stats(
            mean_a, math.sqrt(var_a), n_a, mean_b, math.sqrt(var_b), n_b, equal_var=False
        )
        assert t == pytest.approx(expected.statistic, rel=1e-9, abs=1e-12)
        assert p == pytest.approx(expected.pvalue, rel=1e-6, abs=1e-12)

    @pytest.mark.parametrize("sizes", SIZES)
    def test_df_is_welch_satterthwaite(self, sizes: tuple[int, int]) -> None:
        """The degrees of freedom follow the Welch-Satterthwaite formula."""
        n_a, n_b = sizes
        _, df, _ = welch_t_test(0.0, 2.0, n_a, 1.0, 3.0, n_b)
        sa, sb = 2.0 / n_a, 3.0 / n_b
        assert df == pytest.approx((sa + sb) ** 2 / (sa**2 / (n_a - 1) + sb**2 / (n_b - 1)), rel=1e-12)

    def test_a_huge_t_over_many_outcomes_is_p_zero(self) -> None:
        """Past 10^8 degrees of freedom the tail used t**3, which overflows past t ~ 1e102: welch_t_test (and an
        Experiment's report of 10^9 outcomes an arm) raised OverflowError where p is 0."""
        assert welch_t_test(1.0, 1e-200, 10**9, 0.0, 1e-200, 10**9)[2] == 0.0
        assert _t_two_sided_p(1e200, 1e9) == 0.0
        assert _t_two_sided_p(39.0, 1e9) == pytest.approx(math.erfc(39.0 / math.sqrt(2)), rel=1e-6)

    def test_equal_samples_give_the_pooled_df(self) -> None:
        """Equal sizes and variances give df = 2n - 2, here 2, 4, 6 and 8."""
        assert [welch_t_test(0.0, 1.0, n, 1.0, 1.0, n)[1] for n in (2, 3, 4, 5)] == pytest.approx([2, 4, 6, 8])

    @pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 2.5, 7.3, 30, 1e3, 1e5, 1e6, 1e7, 1e8, 1e9, 1e12])
    def test_student_t_tail_matches_scipy(self, stats: ModuleType, df: float) -> None:
        """The incomplete-beta t tail equals scipy's to 1e-6 relative, small df and large alike."""
        for t in (0.0, 1e-3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, -2.5):
            assert _t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-6, abs=1e-300)

    @pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 2.5, 30, 1e4, 1e7, 1e10])
    def test_student_t_quantile_matches_scipy(self, stats: ModuleType, df: float) -> None:
        """The 95% two-sided t quantile used for intervals equals scipy's ``t.ppf(0.975, df)``."""
        assert _t_two_sided_quantile(0.05, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)

    def test_sign_follows_a_minus_b(self) -> None:
        """t is positive when a's mean is higher, and swapping the arms flips only its sign."""
        t, df, p = welch_t_test(2.0, 1.0, 10, 1.0, 2.0, 20)
        assert t > 0
        assert welch_t_test(1.0, 2.0, 20, 2.0, 1.0, 10) == (-t, df, p)

    def test_zero_variance(self) -> None:
        """Constant samples give t = 0 and p = 1 when the means match, an infinite t and p = 0 when not."""
        assert welch_t_test(1.0, 0.0, 5, 1.0, 0.0, 7) == (0.0, 10.0, 1.0)
        assert welch_t_test(1.0, 0.0, 5, 2.0, 0.0, 7) == (-math.inf, 10.0, 0.0)

    @pytest.mark.parametrize("args", [(0.0, 1.0, 1, 0.0, 1.0, 5), (0.0, -1.0, 5, 0.0, 1.0, 5)])
    def test_rejects_bad_input(self, args: tuple[float, float, int, float, float, int]) -> None:
        """Fewer than two samples or a negative variance raise ``ValueError``."""
        with pytest.raises(ValueError, match="need n >= 2"):
            welch_t_test(*args)

    def test_tiny_and_huge_variances_neither_underflow_nor_overflow(self) -> None:
        """Squared per-arm variances of outcomes near 1e-160 underflowed to 0: report() raised
        ZeroDivisionError. The df is computed on the variances scaled by the larger one."""
        t, df, p = welch_t_test(0.0, 1e-320, 2, 1e-160, 1e-320, 2)
        assert (math.isfinite(t), df, 0.0 <= p <= 1.0) == (True, pytest.approx(2.0), True)
        assert welch_t_test(0.0, 1e300, 5, 0.0, 1e300, 5)[1] == pytest.approx(8.0)

    def test_outcomes_past_float_range_get_no_verdict(self) -> None:
        """Outcomes of +-1e308 overflow the running mean (NaN): the verdict read "no significant
        difference". Such a comparison is NaN, flagged, and the verdict says it cannot compare."""
        experiment = Experiment(["a", "b"], min_samples=2)
        for value in (1e308, -1e308) * 3:
            experiment.record("a", value)
        for value in (1.0, 2.0, 3.0):
            experiment.record("b", value)
        report = experiment.report()
        (comparison,) = report.comparisons
        assert math.isnan(comparison.p_value)
        assert not comparison.significant
        assert report.verdict.startswith("cannot compare")
        with pytest.raises(ValueError, match="finite"):
            experiment.record("a", 10**400)  # was an OverflowError

    def test_outcomes_whose_running_sums_overflow_never_make_report_raise(self) -> None:
        """1e308 then -8e307 overflow Welford's sums to -inf: the variance came out negative and
        report() raised ValueError (a math domain error in the interval, "var >= 0" in the test).
        Such an arm's spread is unknown (NaN): no interval, no verdict, and report() answers."""
        experiment = Experiment(["a", "b"], min_samples=2)
        for value in (1e308, -8e307):
            experiment.record("a", value)
        for value in (1.0, 2.0):
            experiment.record("b", value)
        report = experiment.report(baseline="b")
        a = next(arm for arm in report.arms if arm.arm == "a")
        assert (a.outcomes, a.ci_low, a.ci_high) == (2, None, None)
        (comparison,) = report.comparisons
        assert math.isnan(comparison.p_value)
        assert not comparison.significant
        assert report.verdict.startswith("cannot compare")
        assert "verdict: cannot compare" in str(report)


class TestTwoProportionZTest:
    @pytest.mark.parametrize(
        "counts",
        [(100, 1000, 150, 1000), (3, 10, 5, 12), (0, 50, 4, 60), (500, 1000, 520, 1100), (1, 1, 0, 1), (7, 9, 9, 9)],
    )
    def test_matches_the_pooled_normal_formula(self, stats: ModuleType, counts: tuple[int, int, int, int]) -> None:
        """z uses the pooled rate's standard error and p is twice the normal tail beyond |z|, to 1e-12."""
        s_a, n_a, s_b, n_b = counts
        pooled = (s_a + s_b) / (n_a + n_b)
        z_expected = (s_a / n_a - s_b / n_b) / math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
        z, p = two_proportion_z_test(*counts)
        assert z == pytest.approx(z_expected, rel=1e-12)
        assert p == pytest.approx(2 * stats.norm.sf(abs(z_expected)), rel=1e-12, abs=1e-300)

    def test_known_value(self) -> None:
        """10% vs 15% of 1000 each: z = -3.3806..., p = 0.000723..."""
        z, p = two_proportion_z_test(100, 1000, 150, 1000)
        assert z == pytest.approx(-0.05 / math.sqrt(0.125 * 0.875 * 0.002), rel=1e-12)
        assert z == pytest.approx(-3.380617, abs=1e-6)
        assert p == pytest.approx(0.000723, abs=1e-6)

    def test_no_variance_means_no_evidence(self) -> None:
        """Arms that all failed, or all succeeded, give z = 0 and p = 1."""
        assert two_proportion_z_test(0, 10, 0, 20) == (0.0, 1.0)
        assert two_proportion_z_test(10, 10, 20, 20) == (0.0, 1.0)

    @pytest.mark.parametrize("counts", [(1, 0, 1, 1), (5, 4, 1, 2), (-1, 4, 1, 2)])
    def test_rejects_bad_counts(self, counts: tuple[int, int, int, int]) -> None:
        """Empty arms and success counts outside 0..n raise ``ValueError``."""
        with pytest.raises(ValueError, match="need 0 <= successes <= n"):
            two_proportion_z_test(*counts)


class TestConfidenceIntervals:
    def test_wilson_by_hand(self) -> None:
        """10 conversions in 100: the Wilson 95% interval is (0.0552, 0.1744), as computed by hand."""
        experiment = Experiment(["a"])
        fill(experiment, "a", [1.0] * 10 + [0.0] * 90)
        arm = experiment.report().arms[0]
        z = 1.959963984540054
        centre = (0.1 + z**2 / 200) / (1 + z**2 / 100)
        half = z / (1 + z**2 / 100) * math.sqrt(0.1 * 0.9 / 100 + z**2 / 40000)
        assert arm.outcome_mean == pytest.approx(0.1)
        assert (arm.ci_low, arm.ci_high) == pytest.approx((centre - half, centre + half), rel=1e-12)
        assert (arm.ci_low, arm.ci_high) == pytest.approx((0.05523, 0.17437), abs=1e-5)

    def test_wilson_stays_inside_zero_and_one(self) -> None:
        """All-zero outcomes give an interval from 0 up, not a degenerate or negative one."""
        experiment = Experiment(["a"])
        fill(experiment, "a", [0.0] * 20)
        arm = experiment.report().arms[0]
        assert arm.ci_low == pytest.approx(0.0, abs=1e-15)
        assert arm.ci_high == pytest.approx(1.959963984540054**2 / (20 + 1.959963984540054**2), rel=1e-12)

    def test_continuous_uses_student_t(self, stats: ModuleType) -> None:
        """Continuous outcomes get mean ± t(0.975, n-1)·s/√n, matching ``scipy.stats.t.interval``."""
        values = [1.0, 2.0, 3.0, 4.0, 10.0]
        experiment = Experiment(["a"])
        fill(experiment, "a", values)
        arm = experiment.report().arms[0]
        low, high = stats.t.interval(0.95, 4, loc=np.mean(values), scale=stats.sem(values))
        assert arm.outcome_mean == pytest.approx(4.0)
        assert (arm.ci_low, arm.ci_high) == pytest.approx((low, high), rel=1e-9)

    def test_welford_is_stable_far_from_zero(self, stats: ModuleType) -> None:
        """Values near 1e9 with unit spread keep an exact variance, which a naive sum of squares loses."""
        values = 1e9 + np.random.default_rng(7).normal(0.0, 1.0, 1000)
        experiment = Experiment(["a"])
        fill(experiment, "a", values)
        arm = experiment.report().arms[0]
        low, high = stats.t.interval(0.95, 999, loc=np.mean(values), scale=stats.sem(values))
        assert (arm.ci_low, arm.ci_high) == pytest.approx((low, high), rel=1e-14)

    def test_too_few_outcomes(self) -> None:
        """No outcomes: no mean or interval; one continuous outcome: a mean but no interval."""
        experiment = Experiment(["a", "b"])
        experiment.record("b", 2.5)
        a, b = experiment.report().arms
        assert (a.outcomes, a.outcome_mean, a.ci_low, a.ci_high) == (0, None, None, None)
        assert (b.outcomes, b.outcome_mean, b.ci_low, b.ci_high) == (1, 2.5, None, None)


class TestOutcomeKinds:
    def test_zero_one_outcomes_use_the_z_test(self) -> None:
        """Outcomes that are all 0 or 1 (floats, ints or bools) are compared with the two-proportion z-test."""
        experiment = Experiment(["a", "b"], min_samples=2)
        fill(experiment, "a", [0.0, 1.0, 1.0, 0.0])
        for value in (1, 0, True, False):
            experiment.record("b", value)
        (comparison,) = experiment.report().comparisons
        assert comparison.test == "two-proportion z-test"
        assert (comparison.statistic, comparison.p_value) == two_proportion_z_test(2, 4, 2, 4) == (0.0, 1.0)

    def test_one_other_value_makes_it_continuous(self) -> None:
        """A single value other than 0 or 1 in either arm switches to Welch's t-test on the running moments."""
        experiment = Experiment(["a", "b"], min_samples=2)
        fill(experiment, "a", [0.0, 1.0, 1.0, 0.0, 0.5])
        fill(experiment, "b", [1.0, 1.0, 0.0])
        (comparison,) = experiment.report().comparisons
        t, _, p = welch_t_test(2 / 3, np.var([1, 1, 0], ddof=1), 3, 0.5, np.var([0, 1, 1, 0, 0.5], ddof=1), 5)
        assert comparison.test == "Welch's t-test"
        assert comparison.arm == "b"
        assert comparison.baseline == "a"
        assert comparison.difference == pytest.approx(2 / 3 - 0.5)
        assert comparison.statistic == pytest.approx(t, rel=1e-12)
        assert comparison.p_value == pytest.approx(p, rel=1e-12)


class TestWarnings:
    def test_below_min_samples(self) -> None:
        """An arm under ``min_samples`` outcomes is named in a warning and the verdict is "not enough data"."""
        experiment = Experiment(["v1", "v2"])
        fill(experiment, "v1", [0.0, 1.0] * 60)
        fill(experiment, "v2", [1.0] * 37)
        report = experiment.report()
        warning = "fewer than min_samples outcomes (37 < 100) in 'v2'"
        assert report.warnings == (warning,)
        assert report.comparisons[0].warning == warning
        assert report.comparisons[0].significant
        assert report.verdict == "not enough data"

    def test_both_arms_below_min_samples(self) -> None:
        """When both arms are short, both are named, the baseline first."""
        experiment = Experiment(["v1", "v2"], min_samples=50)
        fill(experiment, "v1", [0.0, 1.0] * 5)
        fill(experiment, "v2", [0.0, 1.0] * 6)
        warnings = (
            "fewer than min_samples outcomes (10 < 50) in 'v1'",
            "fewer than min_samples outcomes (12 < 50) in 'v2'",
        )
        report = experiment.report()
        assert report.warnings == warnings
        assert report.comparisons[0].warning == "; ".join(warnings)

    def test_vanish_at_min_samples(self) -> None:
        """With ``min_samples`` outcomes in each arm there are no warnings and the verdict is decided."""
        experiment = Experiment(["v1", "v2"])
        fill(experiment, "v1", [0.0, 1.0] * 50)
        fill(experiment, "v2", [0.0, 1.0] * 50)
        report = experiment.report()
        assert report.warnings == ()
        assert report.comparisons[0].warning is None
        assert report.verdict == "no significant difference"

    def test_no_comparison_below_two_outcomes(self) -> None:
        """An arm with fewer than two outcomes is warned about and left out of the comparisons."""
        experiment = Experiment(["v1", "v2"], min_samples=2)
        fill(experiment, "v1", [1.0, 2.0, 3.0])
        experiment.record("v2", 1.0)
        report = experiment.report()
        assert report.comparisons == ()
        assert report.warnings == ("fewer than min_samples outcomes (1 < 2) in 'v2'",)
        assert report.verdict == "not enough data"

    def test_multiple_comparisons_are_flagged(self) -> None:
        """Three challengers tested at 0.05 each get a warning with the Bonferroni level."""
        experiment = Experiment(["a", "b", "c", "d"], min_samples=2)
        for arm in "abcd":
            fill(experiment, arm, [0.0, 1.0, 1.0])
        report = experiment.report()
        assert report.warnings == ("3 comparisons at alpha=0.05, uncorrected (Bonferroni: 0.0167)",)
        assert report.verdict == "no significant difference"


class TestSignificance:
    def test_clear_conversion_effect(self, stats: ModuleType) -> None:
        """10% vs 15% conversion over 1000 users each is significant, and the verdict says v2 is better."""
        experiment = conversions(seed=1, rate_a=0.10, rate_b=0.15)
        report = experiment.report()
        (comparison,) = report.comparisons
        v1, v2 = report.arms
        s1, s2 = round(v1.outcome_mean * 1000), round(v2.outcome_mean * 1000)
        z, p = two_proportion_z_test(s2, 1000, s1, 1000)
        assert comparison.test == "two-proportion z-test"
        assert comparison.statistic == z
        assert comparison.p_value == p == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-12)
        assert comparison.difference == pytest.approx((s2 - s1) / 1000)
        assert comparison.significant
        assert p < 0.01
        assert report.verdict == f"v2 better than v1 (p={p:.3g})"

    def test_null_conversion_effect(self) -> None:
        """Two arms converting at the same 10% are not significantly different."""
        report = conversions(seed=5, rate_a=0.10, rate_b=0.10).report()
        assert not report.comparisons[0].significant
        assert report.comparisons[0].p_value == pytest.approx(0.774107, abs=1e-6)
        assert report.verdict == "no significant difference"

    def test_clear_continuous_effect(self) -> None:
        """Revenue 10 ± 2 vs 10.5 ± 3 over 1000 each is significant under Welch's t-test."""
        rng = np.random.default_rng(3)
        v1, v2 = rng.normal(10.0, 2.0, 1000), rng.normal(10.5, 3.0, 1000)
        experiment = Experiment(["v1", "v2"])
        fill(experiment, "v1", v1)
        fill(experiment, "v2", v2)
        report = experiment.report()
        (comparison,) = report.comparisons
        t, _, p = welch_t_test(v2.mean(), v2.var(ddof=1), 1000, v1.mean(), v1.var(ddof=1), 1000)
        assert comparison.test == "Welch's t-test"
        assert comparison.statistic == pytest.approx(t, rel=1e-9)
        assert comparison.p_value == pytest.approx(p, rel=1e-6)
        assert comparison.significant
        assert p < 1e-4
        assert report.verdict == "v2 better than v1 (p<0.0001)"

    def test_lower_is_better(self) -> None:
        """With ``higher_is_better=False`` a significantly higher mean reads as worse."""
        experiment = Experiment(["v1", "v2"], higher_is_better=False, min_samples=2)
        fill(experiment, "v1", [1.0, 1.1, 0.9, 1.0])
        fill(experiment, "v2", [2.0, 2.1, 1.9, 2.0])
        assert experiment.report().verdict == "v2 worse than v1 (p<0.0001)"

    def test_alpha_sets_significance(self) -> None:
        """The same data is significant at alpha 0.05 and not at 0.0001."""
        for alpha, significant in ((0.05, True), (1e-4, False)):
            experiment = Experiment(["v1", "v2"], alpha=alpha, min_samples=2)
            fill(experiment, "v1", [1.0, 1.5, 0.5, 1.0])
            fill(experiment, "v2", [2.0, 2.5, 1.5, 2.0])
            assert experiment.report().comparisons[0].significant is significant


class TestWindow:
    def test_ring_buffer_keeps_the_most_recent(self) -> None:
        """After 10 requests in a window of 4, quantiles come from the last four latencies only."""
        window = Window(max_samples=4)
        for i in range(1, 11):
            window.observe(float(i), failed=i % 5 == 0)
        assert window.requests == 10
        assert window.failures == 2
        assert window.error_rate == 0.2
        assert [window.latency_quantile(q) for q in (0.0, 0.5, 1.0)] == [7.0, 8.5, 10.0]

    def test_uniform_keeps_a_sample_of_the_whole_span(self) -> None:
        """A canary step's window kept only the latest latencies, so an arm with 20x the traffic had a
        p99 over the step's end only; with ``uniform`` a slow first tenth of the span stays in the sample."""
        window = Window(max_samples=1000, uniform=True)
        for i in range(10_000):
            window.observe(1.0 if i < 1000 else 0.0, failed=False)
        kept = window._ring
        assert 50 < np.count_nonzero(kept) < 200  # about 10% of 1000, drawn with a fixed seed
        assert (window.latency_quantile(0.5), window.latency_quantile(0.99)) == (0.0, 1.0)
        assert Window(max_samples=1000).latency_quantile(0.99) == 0.0  # the default keeps the latest only

    def test_partly_filled(self) -> None:
        """Before the ring wraps, quantiles use exactly the latencies seen so far."""
        window = Window()
        for latency in (0.3, 0.1, 0.2):
            window.observe(latency, failed=False)
        assert window.latency_quantile(0.5) == 0.2
        assert window.latency_quantile(1.0) == 0.3

    def test_empty(self) -> None:
        """An empty window has no errors and zero latency quantiles."""
        window = Window()
        assert (window.requests, window.failures, window.error_rate, window.latency_quantile(0.99)) == (0, 0, 0.0, 0.0)

    def test_rejects_bad_input(self) -> None:
        """A non-positive size, a quantile outside [0, 1] and a negative or non-finite latency raise ``ValueError``."""
        with pytest.raises(ValueError, match="max_samples"):
            Window(0)
        with pytest.raises(ValueError, match="q must be"):
            Window().latency_quantile(1.5)
        for latency in (-1.0, math.nan, math.inf):
            with pytest.raises(ValueError, match="latency_s"):
                Window().observe(latency, failed=False)


class TestExperiment:
    def test_latency_percentiles_and_histogram(self) -> None:
        """Percentiles are reported in ms and each latency lands in the first bucket whose edge holds it."""
        experiment = Experiment(["a"])
        for latency_s in (0.00005, 0.0015, 0.0015, 0.003, 20.0):
            experiment.observe("a", latency_s, failed=False)
        arm = experiment.report().arms[0]
        assert list(arm.latency_histogram) == list(_EDGES_MS)
        assert {edge: n for edge, n in arm.latency_histogram.items() if n} == {0.1: 1, 2.0: 2, 5.0: 1, math.inf: 1}
        assert arm.p50_ms == pytest.approx(1.5)
        assert arm.p99_ms == pytest.approx(np.percentile([0.05, 1.5, 1.5, 3.0, 20000.0], 99))

    def test_bucket_edges(self) -> None:
        """Buckets run 1-2-5 per decade from 0.1 ms to 10 s, then +inf."""
        assert _EDGES_MS[:4] == pytest.approx((0.1, 0.2, 0.5, 1.0))
        assert _EDGES_MS[-4:] == (2000.0, 5000.0, 10_000.0, math.inf)
        assert len(_EDGES_MS) == 17

    def test_errors_per_arm(self) -> None:
        """Failures count against the arm that served them."""
        experiment = Experiment(["a", "b"])
        for i in range(10):
            experiment.observe("a", 0.01, failed=i < 3)
            experiment.observe("b", 0.01, failed=False)
        a, b = experiment.report().arms
        assert (a.requests, a.failures, a.error_rate) == (10, 3, 0.3)
        assert (b.requests, b.failures, b.error_rate) == (10, 0, 0.0)

    def test_arms_and_baseline(self) -> None:
        """``add_arm`` is idempotent, the baseline defaults to the first arm and may be overridden per report."""
        experiment = Experiment(["a", "b"])
        experiment.add_arm("b")
        experiment.add_arm("c")
        report = experiment.report()
        assert [arm.arm for arm in report.arms] == ["a", "b", "c"]
        assert report.baseline == "a"
        assert experiment.report(baseline="c").baseline == "c"
        assert Experiment(["a", "b"], baseline="b").report().baseline == "b"

    def test_baseline_is_added_when_missing(self) -> None:
        """A ``baseline`` that is not among ``arms`` becomes an arm of its own."""
        report = Experiment(["v2"], baseline="v1").report()
        assert [arm.arm for arm in report.arms] == ["v2", "v1"]
        assert report.baseline == "v1"

    def test_unknown_arm(self) -> None:
        """Observing, recording or comparing against an arm never added raises ``KeyError``."""
        experiment = Experiment(["a"])
        with pytest.raises(KeyError, match="unknown arm 'x'"):
            experiment.observe("x", 0.1, failed=False)
        with pytest.raises(KeyError, match="unknown arm 'x'"):
            experiment.record("x", 1.0)
        with pytest.raises(KeyError, match="unknown arm 'x'"):
            experiment.report(baseline="x")

    def test_no_arms(self) -> None:
        """An experiment without arms reports nothing and has not enough data."""
        assert Experiment().report() == Report(None, (), (), (), "not enough data")

    def test_rejects_bad_settings(self) -> None:
        """alpha outside (0, 1), min_samples below 2 and non-finite outcomes raise ``ValueError``."""
        with pytest.raises(ValueError, match="alpha"):
            Experiment(alpha=1.0)
        with pytest.raises(ValueError, match="min_samples"):
            Experiment(min_samples=1)
        with pytest.raises(ValueError, match="finite"):
            Experiment(["a"]).record("a", math.inf)

    def test_reset(self) -> None:
        """``reset`` zeroes every count and outcome but keeps the arms and the baseline."""
        experiment = Experiment(["a", "b"], baseline="b")
        experiment.observe("a", 0.01, failed=True)
        experiment.record("a", 1.0)
        experiment.reset()
        report = experiment.report()
        assert report.baseline == "b"
        assert [(arm.arm, arm.requests, arm.failures, arm.outcomes) for arm in report.arms] == [
            ("a", 0, 0, 0),
            ("b", 0, 0, 0),
        ]
        assert sum(report.arms[0].latency_histogram.values()) == 0

    def test_report_is_a_snapshot(self) -> None:
        """A report does not change when the experiment goes on counting."""
        experiment = Experiment(["a"])
        experiment.observe("a", 0.002, failed=False)
        report = experiment.report()
        experiment.observe("a", 0.5, failed=True)
        assert (report.arms[0].requests, report.arms[0].p99_ms) == (1, pytest.approx(2.0))
        assert sum(report.arms[0].latency_histogram.values()) == 1

    def test_thread_safety(self) -> None:
        """8 threads x 1000 observe and record calls, with reports taken meanwhile, lose no count."""
        experiment = Experiment(["a", "b"])
        start = threading.Barrier(9)

        def work(index: int) -> None:
            arm = "ab"[index % 2]
            start.wait()
            for i in range(1000):
                experiment.observe(arm, 0.001 * (i % 7), failed=i % 10 == 0)
                experiment.record(arm, float(i % 2))

        threads = [threading.Thread(target=work, args=(i,), name=f"test-observe-{i}") for i in range(8)]
        for thread in threads:
            thread.start()
        start.wait()
        while any(thread.is_alive() for thread in threads):
            experiment.report()
        for thread in threads:
            thread.join()
        report = experiment.report()
        for arm in report.arms:
            assert (arm.requests, arm.failures, arm.outcomes, arm.outcome_mean) == (4000, 400, 4000, 0.5)
            assert sum(arm.latency_histogram.values()) == 4000
        assert report.comparisons[0].p_value == 1.0


class TestReportStr:
    def test_table(self) -> None:
        """The table names every arm, its comparison's difference and p-value, and the verdict."""
        experiment = conversions(seed=1, rate_a=0.10, rate_b=0.15)
        experiment.add_arm("v3")
        for arm in ("v1", "v2", "v3"):
            experiment.observe(arm, 0.004, failed=False)
        report = experiment.report()
        text = str(report)
        p = report.comparisons[0].p_value
        lines = text.splitlines()
        header = ["arm", "requests", "error rate", "p50/p99 ms", "outcomes", "mean [95% CI]", "vs baseline"]
        assert [column.strip() for column in lines[0].split("  ") if column.strip()] == header
        assert [line.split()[0] for line in lines[1:4]] == ["v1", "v2", "v3"]
        assert lines[1].endswith("baseline")
        assert f"p={p:.3g}" in lines[2]
        assert f"{report.comparisons[0].difference:+.4g}" in lines[2]
        assert lines[3].endswith("-")
        assert "4.0/4.0" in lines[1]
        assert lines[4] == f"verdict: {report.verdict}"
        assert "warning: fewer than min_samples outcomes (0 < 100) in 'v3'" in lines[5:]
        # Fixed width: every column starts where its header does.
        column = lines[0].index("vs baseline")
        assert all(line[column - 2 : column] == "  " for line in lines[1:4])
