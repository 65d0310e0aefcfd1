"""What a tree of policies shows: the :class:`~inferkit.policies.Canary` in it and the split it makes now."""

from __future__ import annotations

from typing import Any

from inferkit.policies.canary import Canary
from inferkit.policies.protocol import Policy, children_of
from inferkit.policies.shadow import Shadow
from inferkit.policies.split import ABTest, Fixed, Match


def find_canary(policy: Policy | None) -> Canary | None:
    """The first :class:`Canary` in a tree of policies, depth first through each policy's ``children()``."""
    pending = [] if policy is None else [policy]
    seen: set[int] = set()  # a policy tree that loops back on itself still ends
    while pending:
        policy = pending.pop()
        if isinstance(policy, Canary):
            return policy
        if id(policy) not in seen:
            seen.add(id(policy))
            pending.extend(reversed(children_of(policy)))
    return None


def split_weights(policy: Any) -> dict[str, float]:
    """The share of traffic each arm gets now under ``policy`` (a mirror is not a share); ``{}`` if unknown.

    A :class:`Match` shows what ``otherwise`` splits (matched requests are not a share of it).
    """
    while isinstance(policy, Shadow | Match):
        policy = policy.policy if isinstance(policy, Shadow) else policy.otherwise  # what it splits, not its children
    if isinstance(policy, Canary):
        weight = policy.weight
        return {policy.baseline: 1.0 - weight, policy.candidate: weight}
    if isinstance(policy, ABTest):
        return dict(policy.weights)
    if isinstance(policy, Fixed):
        return {policy.arm: 1.0}
    return {}
