"""Split policies: which arm of a :class:`~inferkit.Router` serves a request.

Every policy maps a point ``u`` in ``[0, 1)`` to an arm. The router derives ``u`` from the
caller's key by hashing (so one key always lands at the same point: sticky) or draws it from a
seeded RNG. Weighted policies lay their arms out as consecutive intervals of ``[0, 1)`` in a
fixed order, so raising a canary from 5% to 25% only moves the keys between 0.05 and 0.25,
into the candidate; no other key changes arm.

The package, one module per thing a policy owns, in the order a request meets them:
``protocol`` (the :class:`Policy` protocol, :class:`Route`, :class:`Feedback`), ``split``
(:class:`Fixed`, :class:`ABTest`, :class:`Match`), ``shadow`` (:class:`Shadow`), ``canary``
(:class:`Canary`), ``guard`` (:class:`Guard`), ``state`` (:class:`CanaryState`,
:class:`CanaryDecision`, :class:`CanaryStore`, :class:`FileStore`) and ``tree`` (what a tree of
policies shows: :func:`find_canary`, :func:`split_weights`).
"""

from __future__ import annotations

from inferkit.errors import (
    StoreUnavailable,  # defined in the one error tree; importable here too
)
from inferkit.policies.canary import Canary
from inferkit.policies.guard import Guard
from inferkit.policies.protocol import Feedback, Policy, Route, children_of, observes_of
from inferkit.policies.shadow import Shadow
from inferkit.policies.split import ABTest, Fixed, Match
from inferkit.policies.state import CanaryDecision, CanaryState, CanaryStore, FileStore
from inferkit.policies.tree import find_canary, split_weights

__all__ = [
    "ABTest",
    "Canary",
    "CanaryDecision",
    "CanaryState",
    "CanaryStore",
    "Feedback",
    "FileStore",
    "Fixed",
    "Guard",
    "Match",
    "Policy",
    "Route",
    "Shadow",
    "StoreUnavailable",
    "children_of",
    "find_canary",
    "observes_of",
    "split_weights",
]
