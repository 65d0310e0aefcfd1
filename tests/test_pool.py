"""Tests for inferkit.pool: balancers, pool settings, ejection maths and replica latencies."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

import inferkit
from inferkit.pool import (
    BALANCERS,
    LATENCY_WINDOW,
    LeastOutstanding,
    PoolConfig,
    PowerOfTwoChoices,
    Replica,
    ReplicaState,
    RoundRobin,
    may_eject,
    record_batch,
)


def make_replica(name: str = "r0") -> Replica:
    """A replica around a trivial backend, as the batcher builds them."""
    return Replica(name, inferkit.CallableBackend(lambda x: x), threading.Condition())


def make_pool(n: int) -> list[Replica]:
    """``n`` healthy replicas."""
    return [make_replica(f"r{i}") for i in range(n)]


def fail(replica: Replica, times: int, now: float, config: PoolConfig, replicas: list[Replica]) -> list[bool]:
    """Record ``times`` failed batches at ``now``; return what each call returned."""
    return [record_batch(replica, False, now, config, replicas) for _ in range(times)]


class TestRoundRobin:
    def test_cycles_through_every_replica_in_order(self) -> None:
        """Successive picks visit each replica once per round, in index order, whatever the loads."""
        balancer = RoundRobin()
        picks = [balancer.choose([9, 0, 5]) for _ in range(9)]
        assert sorted(picks[:3]) == [0, 1, 2]
        assert picks == picks[:3] * 3
        assert all(b == (a + 1) % 3 for a, b in itertools.pairwise(picks))

    def test_stays_in_range_when_the_pool_shrinks(self) -> None:
        """A pick is always a valid index into the loads it was given, even after they shrink."""
        balancer = RoundRobin()
        for _ in range(4):
            balancer.choose([0, 0, 0, 0])
        assert [balancer.choose([0, 0]) for _ in range(4)] in ([0, 1, 0, 1], [1, 0, 1, 0])

    def test_is_a_balancer(self) -> None:
        """Every built-in balancer satisfies the runtime-checkable ``Balancer`` protocol."""
        for make in BALANCERS.values():
            assert isinstance(make(), inferkit.Balancer)


class TestLeastOutstanding:
    def test_picks_the_least_loaded(self) -> None:
        """The replica with the fewest outstanding rows is chosen."""
        assert LeastOutstanding().choose([3, 1, 2]) == 1
        assert LeastOutstanding().choose([5, 4, 0]) == 2

    def test_picks_the_first_on_ties(self) -> None:
        """Among equally loaded replicas the lowest index wins, every time."""
        balancer = LeastOutstanding()
        assert [balancer.choose([2, 1, 1, 1]) for _ in range(5)] == [1] * 5
        assert balancer.choose([0, 0]) == 0

    def test_one_replica(self) -> None:
        """A pool of one always gets index 0."""
        assert LeastOutstanding().choose([7]) == 0


class TestPowerOfTwoChoices:
    def test_never_picks_the_more_loaded_of_two(self) -> None:
        """With two replicas of different load the less loaded one is always chosen."""
        balancer = PowerOfTwoChoices(seed=1)
        assert {balancer.choose([4, 1]) for _ in range(200)} == {1}
        assert {balancer.choose([0, 3]) for _ in range(200)} == {0}

    def test_never_picks_the_unique_maximum(self) -> None:
        """The single most loaded replica loses every comparison, so it is never chosen."""
        balancer = PowerOfTwoChoices(seed=2)
        loads = [3, 1, 4, 1, 5, 9, 2, 6]
        picks = {balancer.choose(loads) for _ in range(500)}
        assert 5 not in picks
        assert len(picks) > 2  # the two candidates really are random

    def test_deterministic_with_a_seed(self) -> None:
        """Two balancers with the same seed make the same picks; another seed makes others."""
        loads = [0] * 8
        a, b, c = PowerOfTwoChoices(seed=7), PowerOfTwoChoices(seed=7), PowerOfTwoChoices(seed=8)
        seq_a = [a.choose(loads) for _ in range(100)]
        assert seq_a == [b.choose(loads) for _ in range(100)]
        assert seq_a != [c.choose(loads) for _ in range(100)]

    def test_one_replica(self) -> None:
        """A pool of one always gets index 0 (there is no second choice)."""
        assert PowerOfTwoChoices(seed=0).choose([5]) == 0


class TestPoolConfig:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"replicas": 0}, "replicas must be an int >= 1, got 0"),
            ({"execution_timeout": 0}, "execution_timeout must be > 0 or None, got 0"),
            ({"execution_timeout": -1.5}, "execution_timeout must be > 0 or None, got -1.5"),
            ({"max_ejected_fraction": 0}, "max_ejected_fraction must be in (0, 1], got 0"),
            ({"max_ejected_fraction": 1.5}, "max_ejected_fraction must be in (0, 1], got 1.5"),
            ({"eject_after": 0}, "eject_after must be an int >= 1, got 0"),
            ({"cooldown": 0}, "cooldown must be a finite number > 0, got 0"),
            ({"max_cooldown": -1}, "max_cooldown must be a finite number > 0, got -1"),
        ],
    )
    def test_rejects_out_of_range_values(self, kwargs: dict[str, object], message: str) -> None:
        """An out-of-range setting raises ValueError naming the field and showing the value."""
        with pytest.raises(ValueError) as excinfo:
            PoolConfig(**kwargs)  # type: ignore[arg-type]
        assert str(excinfo.value) == message

    def test_rejects_an_unknown_balancing(self) -> None:
        """An unknown balancing name raises ValueError listing the valid choices and the value."""
        with pytest.raises(ValueError) as excinfo:
            PoolConfig(balancing="bogus")
        message = str(excinfo.value)
        assert message.startswith("balancing must be 'shared', one of ")
        assert "'least_outstanding'" in message
        assert "'power_of_two'" in message
        assert "'round_robin'" in message
        assert message.endswith("got 'bogus'")

    def test_rejects_a_non_int_replica_count(self) -> None:
        """A float replica count raises ValueError naming the field and the value."""
        with pytest.raises(ValueError, match=r"replicas must be an int >= 1, got 1\.5"):
            PoolConfig(replicas=1.5)  # type: ignore[arg-type]

    def test_defaults(self) -> None:
        """The defaults are one replica on a shared queue with Envoy-like ejection settings."""
        config = PoolConfig()
        assert (config.replicas, config.balancing, config.execution_timeout) == (1, "shared", None)
        assert (config.eject_after, config.cooldown, config.max_cooldown) == (5, 5.0, 60.0)
        assert config.max_ejected_fraction == 0.5

    def test_balancer_for_each_setting(self) -> None:
        """``balancer()`` is None for the shared queue, a fresh instance per name, the object itself."""
        assert PoolConfig().balancer() is None
        config = PoolConfig(balancing="least_outstanding")
        first, second = config.balancer(), config.balancer()
        assert isinstance(first, LeastOutstanding)
        assert first is not second
        assert isinstance(PoolConfig(balancing="round_robin").balancer(), RoundRobin)
        assert isinstance(PoolConfig(balancing="power_of_two").balancer(), PowerOfTwoChoices)
        custom = LeastOutstanding()
        assert PoolConfig(balancing=custom).balancer() is custom


class TestEjection:
    def test_ejected_after_exactly_eject_after_failures(self) -> None:
        """The ``eject_after``-th consecutive failed batch ejects the replica for ``cooldown`` s."""
        config = PoolConfig(eject_after=3, cooldown=2.0)
        replicas = make_pool(2)
        replica = replicas[0]
        assert fail(replica, 3, 100.0, config, replicas) == [False, False, True]
        assert replica.state is ReplicaState.EJECTED
        assert replica.ejections == 1
        assert replica.ejected_until == 102.0
        assert replica.failed_batches == 3
        assert not replica.usable(101.999)
        assert replica.usable(102.0)  # its probe batch

    def test_a_success_resets_the_count(self) -> None:
        """A good batch between failures starts the count of consecutive failures again."""
        config = PoolConfig(eject_after=3)
        replicas = make_pool(2)
        replica = replicas[0]
        assert fail(replica, 2, 0.0, config, replicas) == [False, False]
        assert not record_batch(replica, True, 0.0, config, replicas)
        assert replica.consecutive_failures == 0
        assert fail(replica, 2, 0.0, config, replicas) == [False, False]
        assert replica.state is ReplicaState.HEALTHY
        assert replica.failed_batches == 4
        assert fail(replica, 1, 0.0, config, replicas) == [True]

    def test_probe_failure_re_ejects_at_once(self) -> None:
        """A failed probe batch ejects again straight away, without another ``eject_after`` failures."""
        config = PoolConfig(eject_after=4, cooldown=1.0, max_cooldown=100.0)
        replicas = make_pool(2)  # another stays healthy: the last healthy one is never ejected
        replica = replicas[0]
        assert fail(replica, 4, 0.0, config, replicas)[-1]
        assert replica.ejected_until == 1.0
        assert record_batch(replica, False, 1.0, config, replicas)
        assert replica.state is ReplicaState.EJECTED
        assert replica.ejections == 2

    def test_probe_success_restores_the_replica(self) -> None:
        """A good probe batch makes an ejected replica healthy with a clean failure count."""
        config = PoolConfig(eject_after=1, cooldown=1.0)
        replicas = make_pool(2)  # another stays healthy: the last healthy one is never ejected
        replica = replicas[0]
        assert record_batch(replica, False, 0.0, config, replicas)
        assert not record_batch(replica, True, 1.0, config, replicas)
        assert replica.state is ReplicaState.HEALTHY
        assert replica.consecutive_failures == 0
        assert replica.usable(1.0)

    def test_cooldown_doubles_and_caps(self) -> None:
        """Each repeated ejection doubles the cooldown until it reaches ``max_cooldown``."""
        config = PoolConfig(eject_after=2, cooldown=1.0, max_cooldown=5.0)
        replicas = make_pool(2)  # another stays healthy: the last healthy one is never ejected
        replica = replicas[0]
        now = 10.0
        assert fail(replica, 2, now, config, replicas) == [False, True]
        cooldowns = [replica.ejected_until - now]
        for _ in range(4):
            now = replica.ejected_until  # the probe runs when the cooldown is over
            assert record_batch(replica, False, now, config, replicas)
            cooldowns.append(replica.ejected_until - now)
        assert cooldowns == [1.0, 2.0, 4.0, 5.0, 5.0]
        assert replica.ejections == 5

    def test_at_most_max_ejected_fraction(self) -> None:
        """No more than ``max_ejected_fraction`` of the replicas are ejected at once."""
        config = PoolConfig(eject_after=1, max_ejected_fraction=0.5)
        replicas = make_pool(4)
        assert fail(replicas[0], 1, 0.0, config, replicas) == [True]
        assert fail(replicas[1], 1, 0.0, config, replicas) == [True]
        assert not may_eject(replicas, 0.5)
        assert fail(replicas[2], 3, 0.0, config, replicas) == [False, False, False]
        assert replicas[2].state is ReplicaState.HEALTHY
        assert replicas[2].consecutive_failures == 3
        assert replicas[2].failed_batches == 3
        assert [r.state for r in replicas].count(ReplicaState.EJECTED) == 2

    def test_a_freed_slot_ejects_the_next_failure(self) -> None:
        """Once an ejected replica recovers, a replica already past ``eject_after`` goes on its next failure."""
        config = PoolConfig(eject_after=2, cooldown=1.0, max_ejected_fraction=0.5)
        replicas = make_pool(2)
        assert fail(replicas[0], 2, 0.0, config, replicas) == [False, True]
        assert fail(replicas[1], 3, 0.0, config, replicas) == [False, False, False]
        assert not record_batch(replicas[0], True, 1.0, config, replicas)
        assert record_batch(replicas[1], False, 1.0, config, replicas)

    def test_always_at_least_one(self) -> None:
        """However small the fraction, one replica may be ejected, but only one."""
        config = PoolConfig(eject_after=1, max_ejected_fraction=0.01)
        replicas = make_pool(3)
        assert may_eject(replicas, 0.01)
        assert fail(replicas[0], 1, 0.0, config, replicas) == [True]
        assert not may_eject(replicas, 0.01)
        assert fail(replicas[1], 1, 0.0, config, replicas) == [False]

    def test_a_lone_replica_is_never_ejected(self) -> None:
        """A pool of one keeps its only replica in service, however often it fails (the panic threshold)."""
        config = PoolConfig(eject_after=1, max_ejected_fraction=1.0)
        replicas = make_pool(1)
        assert fail(replicas[0], 10, 0.0, config, replicas) == [False] * 10
        assert replicas[0].state is ReplicaState.HEALTHY
        assert replicas[0].failed_batches == 10

    def test_the_last_healthy_replica_is_never_ejected(self) -> None:
        """Even with max_ejected_fraction=1.0, one replica of a pool stays in service."""
        config = PoolConfig(eject_after=1, max_ejected_fraction=1.0)
        replicas = make_pool(3)
        assert fail(replicas[0], 1, 0.0, config, replicas) == [True]
        assert fail(replicas[1], 1, 0.0, config, replicas) == [True]
        assert not may_eject(replicas, 1.0)
        assert fail(replicas[2], 3, 0.0, config, replicas) == [False] * 3
        assert replicas[2].state is ReplicaState.HEALTHY

    def test_draining_and_dead_replicas_do_not_count(self) -> None:
        """The fraction is of the live replicas: draining and dead ones are neither counted nor ejected."""
        config = PoolConfig(eject_after=1, max_ejected_fraction=0.5)
        replicas = make_pool(4)
        replicas[2].state = ReplicaState.DRAINING
        replicas[3].state = ReplicaState.DEAD
        assert fail(replicas[0], 1, 0.0, config, replicas) == [True]
        assert not may_eject(replicas, 0.5)  # 2 of 2 live would be ejected
        assert fail(replicas[2], 5, 0.0, config, replicas) == [False] * 5
        assert replicas[2].state is ReplicaState.DRAINING
        assert replicas[2].failed_batches == 5


class TestReplicaLatencies:
    def test_no_latencies(self) -> None:
        """A replica that served nothing reports zero percentiles."""
        assert make_replica().percentiles() == (0.0, 0.0, 0.0)

    def test_percentiles_in_milliseconds(self) -> None:
        """Percentiles are of the recorded seconds, reported in milliseconds."""
        replica = make_replica()
        values = np.linspace(0.001, 0.1, 100).tolist()
        replica.record_latencies(values)
        expected = np.percentile(values, [50, 95, 99]) * 1000.0
        assert replica.percentiles() == pytest.approx(tuple(expected))
        assert replica.latency_count == 100

    def test_wraps_around_keeping_the_most_recent(self) -> None:
        """Past the buffer's size, the oldest latencies are overwritten in place."""
        replica = make_replica()
        replica.record_latencies([1.0] * (LATENCY_WINDOW - 48))
        replica.record_latencies([2.0] * 100)  # 48 at the end, 52 wrapped to the front
        assert replica.latency_count == LATENCY_WINDOW + 52
        ring = np.asarray(replica.latencies)
        assert len(ring) == LATENCY_WINDOW
        assert np.all(ring[:52] == 2.0)
        assert np.all(ring[52:-48] == 1.0)
        assert np.all(ring[-48:] == 2.0)
        window = [1.0] * (LATENCY_WINDOW - 100) + [2.0] * 100
        expected = np.percentile(window, [50, 95, 99]) * 1000.0
        assert replica.percentiles() == pytest.approx(tuple(expected))

    def test_a_batch_larger_than_the_buffer(self) -> None:
        """A batch with more latencies than the buffer holds keeps its last ones, from any offset."""
        replica = make_replica()
        replica.record_latencies([-1.0] * 10)
        values = np.arange(3 * LATENCY_WINDOW, dtype=float)
        replica.record_latencies(values.tolist())
        ring = np.asarray(replica.latencies)
        last = values[-LATENCY_WINDOW:]
        assert np.array_equal(np.sort(ring), last)
        assert np.array_equal(ring[10:], last[: LATENCY_WINDOW - 10])  # the ring goes on from where it was
        assert np.array_equal(ring[:10], last[LATENCY_WINDOW - 10 :])
        assert replica.percentiles() == pytest.approx(tuple(np.percentile(last, [50, 95, 99]) * 1000.0))

    def test_any_sequence_of_batches(self) -> None:
        """Whatever the batch sizes, the buffer holds exactly the most recent latencies."""
        rng = np.random.default_rng(0)
        for _ in range(20):
            replica = make_replica()
            recorded: list[float] = []
            for _ in range(int(rng.integers(1, 12))):
                batch = rng.random(int(rng.integers(0, 900))).tolist()
                replica.record_latencies(batch)
                recorded += batch
            kept = min(len(recorded), LATENCY_WINDOW)
            window = recorded[len(recorded) - kept :]
            assert replica.latency_count == len(recorded)
            assert sorted(replica.latencies[:kept]) == sorted(window)
            if window:
                expected = np.percentile(window, [50, 95, 99]) * 1000.0
                assert replica.percentiles() == pytest.approx(tuple(expected))
