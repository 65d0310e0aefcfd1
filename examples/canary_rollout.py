"""Canary rollout: a Router moves traffic to a new model, and backs out of a broken one.

Two versions of the bundled digits classifier sit behind one ``inferkit.Router``. Simulated
users (each request carries ``key=user``, so a user always sees the same version) send test
rows from several threads, and a ``Canary`` policy decides how much traffic the candidate
gets: 5%, then 25%, then all of it, each step once the candidate has served 100 requests
with at most 1% of them failing (``Guard(max_error_rate=0.01)``).

Part 1 rolls out a healthy candidate (the same model, loaded again). Every canary decision
is printed as it happens and the rollout ends PROMOTED. Each answer is scored as a business
outcome (1.0 when the predicted digit is right) with ``router.record(value, key=user)``, and
``router.report()`` compares the two versions' accuracy with a two-proportion z-test.

Part 2 rolls out a broken candidate: the same model behind ``Predictor.from_callable``, with
a bug that crashes on about 1 input in 20. The guard sees the failures long before the first
step could pass and rolls back on its own; the example prints that decision with its numbers,
how many errors users saw, and then shows that every later request goes to v1.

Exits 1 unless part 1 ends PROMOTED, part 2 ends ROLLED_BACK, and nothing reaches the broken
candidate after its rollback. Run it with ``python examples/canary_rollout.py``.

The users, rows and the broken candidate's bad inputs come from fixed seeds, and a key's
version depends only on its hash, so the outcome is the same on every run; the exact counts
(how many requests each step took to fill, how many reached the broken candidate before its
rollback) move a little with how the threads interleave.
"""

from __future__ import annotations

import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable

import numpy as np
import onnxruntime as ort
from _digits import MODEL, test_split

from inferkit import Canary, CanaryDecision, CanaryState, Guard, ModelError, Predictor, Router

THREADS = 4
USERS = 2000
STEPS = (0.05, 0.25, 1.0)
MIN_REQUESTS_PER_STEP = 100
MAX_ERROR_RATE = 0.01
MAX_REQUESTS_PER_THREAD = 3000  # bounds each part even if the canary never finishes
AFTER_ROLLBACK = 400  # requests sent once part 2's candidate is rolled back
CRASH_ONE_IN = 20  # the broken candidate crashes on inputs whose checksum is 0 mod this
SEED = 0

Labels = dict[str, np.ndarray]


def show(decision: CanaryDecision) -> None:
    """Print one canary decision as it happens."""
    numbers = ", ".join(
        f"{k}={v:.2%}" if k.endswith("rate") or k == "limit" else f"{k}={v:g}" for k, v in decision.numbers.items()
    )
    print(
        f"  canary {decision.action:<8} step {decision.step} -> weight {decision.weight:4.0%}"
        f"  ({decision.reason}{'; ' + numbers if numbers else ''})"
    )


def drive(
    router: Router,
    canary: Canary,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
) -> tuple[int, int]:
    """Send keyed requests from ``THREADS`` threads until the canary finishes; return (requests, errors).

    Users are split between threads, so each user's request and its recorded outcome happen in
    order on one thread. Failed requests (``ModelError``) are what the users would have seen.
    """
    counts = Counter[str]()
    lock = threading.Lock()

    def client(thread: int) -> None:
        rng = np.random.default_rng([seed, thread])
        users = np.arange(thread, USERS, THREADS)
        sent = errors = 0
        for _ in range(MAX_REQUESTS_PER_THREAD):
            if canary.state in (CanaryState.PROMOTED, CanaryState.ROLLED_BACK):
                break
            user = f"user-{int(rng.choice(users))}"
            row = int(rng.integers(len(x)))
            sent += 1
            try:
                out = router.predict(x[row : row + 1], key=user)
            except ModelError:
                errors += 1
                continue
            router.record(float(out["label"][0] == y[row]), key=user)
        with lock:
            counts.update(requests=sent, errors=errors)

    threads = [threading.Thread(target=client, args=(t,), name=f"user-thread-{t}") for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts["requests"], counts["errors"]


def make_canary() -> Canary:
    """The rollout plan both parts use; each decision is printed as it is taken."""
    return Canary(
        "v1",
        "v2",
        steps=STEPS,
        min_requests_per_step=MIN_REQUESTS_PER_STEP,
        guard=Guard(max_error_rate=MAX_ERROR_RATE),
        on_decision=show,
    )


def part1(x: np.ndarray, y: np.ndarray) -> CanaryState:
    """Roll a healthy candidate forward to PROMOTED and compare the versions' accuracy."""
    print(f"part 1: healthy candidate, steps {', '.join(f'{s:.0%}' for s in STEPS)}")
    canary = make_canary()
    v1 = Predictor.from_onnx(MODEL, name="v1")
    v2 = Predictor.from_onnx(MODEL, name="v2")
    began = time.perf_counter()
    with Router({"v1": v1, "v2": v2}, canary, name="digits") as router:
        requests, errors = drive(router, canary, x, y, seed=SEED)
        elapsed = time.perf_counter() - began
        routed = router.stats().routed
        report = router.report()
    print(
        f"  {requests} requests from {THREADS} threads in {elapsed:.2f} s, {errors} failed; "
        f"routed {dict(routed)}; canary ended {canary.state.name}"
    )
    print("  outcome = 1.0 when the predicted digit is right:")
    print("    " + str(report).replace("\n", "\n    "))
    return canary.state


def crashing_candidate(reference: Predictor) -> Callable[[np.ndarray], Labels]:
    """The digits model run by onnxruntime, with a bug that crashes on about 1 input in 20."""
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    outputs = [spec.name for spec in reference.signature.outputs] if reference.signature else None

    def run(batch: np.ndarray) -> Labels:
        for row in batch:
            if zlib.crc32(row.tobytes()) % CRASH_ONE_IN == 0:
                msg = "IndexError in the new feature pipeline"
                raise RuntimeError(msg)
        labels, probabilities = session.run(outputs, {"input": batch})
        return {"label": labels, "probabilities": probabilities}

    return run


def part2(x: np.ndarray, y: np.ndarray) -> tuple[CanaryState, Counter[str]]:
    """Roll a crashing candidate out; the guard rolls it back, then count where traffic goes."""
    print(f"\npart 2: broken candidate (crashes on ~1 input in {CRASH_ONE_IN}), same plan")
    canary = make_canary()
    v1 = Predictor.from_onnx(MODEL, name="v1")
    sig = v1.signature
    assert sig is not None
    v2 = Predictor.from_callable(crashing_candidate(v1), inputs=sig.inputs, outputs=sig.outputs, name="v2")
    with Router({"v1": v1, "v2": v2}, canary, name="digits") as router:
        requests, errors = drive(router, canary, x, y, seed=SEED + 1)
        routed = dict(router.stats().routed)
        print(
            f"  during the rollout: {requests} requests, v2 served {routed['v2']}; "
            f"users saw {errors} errors ({errors / max(requests, 1):.2%} of all requests)"
        )
        rng = np.random.default_rng([SEED, 99])
        rows = rng.integers(len(x), size=AFTER_ROLLBACK)
        futures = [router.submit(x[r : r + 1], key=f"user-{u}") for u, r in enumerate(rows)]
        after = Counter(f.arm for f in futures)
        correct = sum(int(f.result(timeout=30)["label"][0] == y[r]) for f, r in zip(futures, rows, strict=True))
    print(
        f"  after the rollback: {AFTER_ROLLBACK} requests from {AFTER_ROLLBACK} users went to {dict(after)}, "
        f"{correct} answered correctly"
    )
    return canary.state, after


def main() -> int:
    """Run both rollouts and return the process exit code."""
    x, y = test_split()
    promoted = part1(x, y)
    rolled_back, after = part2(x, y)
    failures = []
    if promoted is not CanaryState.PROMOTED:
        failures.append(f"part 1 ended {promoted.name}, expected PROMOTED")
    if rolled_back is not CanaryState.ROLLED_BACK:
        failures.append(f"part 2 ended {rolled_back.name}, expected ROLLED_BACK")
    if after["v2"]:
        failures.append(f"{after['v2']} requests reached the rolled-back candidate")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
