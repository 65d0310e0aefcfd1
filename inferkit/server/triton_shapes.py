"""Triton-shaped descriptions of a served model: its tensors, batching, instance groups and statistics entries.

:meth:`Repository.config <inferkit.server.Repository.config>` and :meth:`Repository.stats
<inferkit.server.Repository.stats>` assemble them; both faces serve what those return.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from inferkit.batching import BatchConfig
from inferkit.policies import find_canary, split_weights
from inferkit.pool import PoolConfig
from inferkit.predictor import Predictor
from inferkit.routing import Predictive, Router
from inferkit.server.protocol import datatype_of

__all__ = [
    "dynamic_batching",
    "instance_groups",
    "pool_config",
    "predictors_behind",
    "split_stats",
    "triton_stats",
    "triton_tensor",
]


def predictors_behind(target: Predictive) -> list[Predictive]:
    """The predictors behind ``target``: a Router's arms (nested ones too), else ``target``."""
    if isinstance(target, Router):
        return [p for arm in target.arms.values() for p in predictors_behind(arm)]
    return [target]


def _triton_type(spec_dtype: np.dtype[Any]) -> str:
    datatype = datatype_of(spec_dtype)
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def triton_tensor(spec: Any) -> dict[str, Any]:
    """A tensor of Triton's model config (``dims`` without the batch axis; -1: any size)."""
    dims = [-1 if d is None else d for d in spec.shape[1:]]  # the batch axis is max_batch_size's
    return {"name": spec.name, "data_type": _triton_type(spec.dtype), "dims": dims}


def dynamic_batching(batching: BatchConfig) -> dict[str, Any]:
    """Triton's ``dynamic_batching`` of a model config, from a BatchConfig."""
    return {  # held to the fields' ranges: a Predictor built in Python has none
        "max_queue_delay_microseconds": min(round(batching.max_delay_ms * 1000), 2**64 - 1),
        "default_queue_policy": {"max_queue_size": min(batching.max_queue_size, 2**32 - 1)},
    }


def triton_stats(name: str, version: str, target: Predictive) -> dict[str, Any]:
    """One entry of Triton's ``model_stats``: the predictors behind ``target`` added up."""
    predictors = predictors_behind(target)
    success = fail = execution = inference = 0
    request_ns = compute_ns = 0
    batch_sizes: dict[int, int] = {}
    for predictor in predictors:
        if not isinstance(predictor, Predictor):
            continue
        s = predictor.stats()
        success += s.completed
        fail += sum(s.failed.values()) + sum(s.rejected.values())  # refused at the door too, as Triton counts
        execution += s.batches
        inference += s.rows
        request_ns += int(s.request_seconds * 1e9)
        compute_ns += int(s.compute_seconds * 1e9)
        for size, count in s.batch_sizes.items():
            batch_sizes[size] = batch_sizes.get(size, 0) + count
    return {
        "name": name,
        "version": version,
        "last_inference": 0,
        "inference_count": inference,
        "execution_count": execution,
        "inference_stats": {
            "success": {"count": success, "ns": request_ns},
            "fail": {"count": fail, "ns": 0},
            "queue": {"count": 0, "ns": 0},  # not tracked apart from the request time (see Repository.stats)
            "compute_input": {"count": 0, "ns": 0},
            "compute_infer": {"count": execution, "ns": compute_ns},
            "compute_output": {"count": 0, "ns": 0},
        },
        "batch_stats": [
            {"batch_size": size, "compute_infer": {"count": count, "ns": 0}}
            for size, count in sorted(batch_sizes.items())
        ],
    }


def split_stats(router: Router) -> dict[str, Any]:
    """Additions to Triton's stats of a routed model: each arm's share now, and the canary's state."""
    extra: dict[str, Any] = {"split": split_weights(router.policy)}
    canary = find_canary(router.policy)
    if canary is not None:
        extra["canary"] = {"state": canary.state.value, "step": canary.step, "weight": canary.weight}
    return extra


def pool_config(predictor: Predictor) -> PoolConfig:
    """The pool settings ``predictor`` was built with (the default for a stand-in without ``pool``)."""
    pool = getattr(predictor, "pool", None)
    return pool if isinstance(pool, PoolConfig) else PoolConfig()


def instance_groups(name: str, predictor: Predictor) -> list[dict[str, Any]]:
    """One group per device the replicas run on (``cuda:N`` is KIND_GPU on GPU N, else KIND_CPU)."""
    devices = [r.device for r in predictor.stats().replicas] or [predictor.device]
    if len(devices) < pool_config(predictor).replicas:  # replicas still loading run where the first does
        devices += [devices[0]] * (pool_config(predictor).replicas - len(devices))
    counts: dict[str, int] = {}
    for device in devices:
        counts[device] = counts.get(device, 0) + 1
    groups = []
    for i, (device, count) in enumerate(sorted(counts.items())):
        group: dict[str, Any] = {"name": f"{name}_{i}", "count": count}
        kind, _, index = device.partition(":")
        if kind == "cuda":
            group.update(kind="KIND_GPU", gpus=[int(index or 0)])
        else:
            group.update(kind="KIND_CPU", gpus=[])
        groups.append(group)
    return groups
