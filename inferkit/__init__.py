"""inferkit: serve your own models from your own app.

Wrap a model in a :class:`Predictor` and call it from any number of threads; requests are
validated, batched with every other caller's and run on a pool of replicas.

:mod:`inferkit.gpu` (pre- and post-processing pipelines) is imported on first use of
``inferkit.gpu``, never by ``import inferkit``.
"""

import importlib as _importlib
from types import ModuleType as _ModuleType

from inferkit.autoscale import AutoscaleConfig, Autoscaler, AutoscalerStats, ScalingDecision, ScalingFailed
from inferkit.backends.base import Backend, BackendFactory, ReplicaFault
from inferkit.backends.callable import CallableBackend
from inferkit.backends.device import DeviceFallbackWarning, DeviceLost, DeviceOutOfMemory, DeviceUnavailable
from inferkit.batching import BatchConfig, RequestFuture
from inferkit.errors import (
    CanaryFinished,
    ClientDisconnected,
    Closed,
    ConfigError,
    DeadlineExceeded,
    DecodingBusy,
    ExecutionTimeout,
    Forbidden,
    InferkitError,
    InvalidInput,
    JobLocked,
    JobMismatch,
    LoadFailed,
    ModelError,
    ModelNotFound,
    NoCanary,
    NoHealthyReplica,
    Overloaded,
    PipelineMismatch,
    RequestTooLarge,
    StoreUnavailable,
    Unauthenticated,
    UnsupportedEncoding,
)
from inferkit.event_log import LogObserver
from inferkit.events import (
    BatchDone,
    Event,
    Observer,
    ReplicaEjected,
    ReplicaReplaced,
    RequestsExpired,
    StateChanged,
)
from inferkit.experiments import ArmReport, Comparison, Experiment, Report
from inferkit.policies import (
    ABTest,
    Canary,
    CanaryDecision,
    CanaryState,
    Feedback,
    Fixed,
    Guard,
    Match,
    Policy,
    Route,
    Shadow,
)
from inferkit.pool import Balancer, LeastOutstanding, PoolConfig, PowerOfTwoChoices, RoundRobin
from inferkit.predictor import Predictor, State
from inferkit.routing import Predictive, RoutedFuture, Router, RouterStats, ShadowStats
from inferkit.signature import Signature, TensorSpec
from inferkit.stats import ReplicaStats, Stats

__all__ = [
    "ABTest",
    "ArmReport",
    "AutoscaleConfig",
    "Autoscaler",
    "AutoscalerStats",
    "Backend",
    "BackendFactory",
    "Balancer",
    "BatchConfig",
    "BatchDone",
    "CallableBackend",
    "Canary",
    "CanaryDecision",
    "CanaryFinished",
    "CanaryState",
    "ClientDisconnected",
    "Closed",
    "Comparison",
    "ConfigError",
    "DeadlineExceeded",
    "DecodingBusy",
    "DeviceFallbackWarning",
    "DeviceLost",
    "DeviceOutOfMemory",
    "DeviceUnavailable",
    "Event",
    "ExecutionTimeout",
    "Experiment",
    "Feedback",
    "Fixed",
    "Forbidden",
    "Guard",
    "InferkitError",
    "InvalidInput",
    "JobLocked",
    "JobMismatch",
    "LeastOutstanding",
    "LoadFailed",
    "LogObserver",
    "Match",
    "ModelError",
    "ModelNotFound",
    "NoCanary",
    "NoHealthyReplica",
    "Observer",
    "Overloaded",
    "PipelineMismatch",
    "Policy",
    "PoolConfig",
    "PowerOfTwoChoices",
    "Predictive",
    "Predictor",
    "ReplicaEjected",
    "ReplicaFault",
    "ReplicaReplaced",
    "ReplicaStats",
    "Report",
    "RequestFuture",
    "RequestTooLarge",
    "RequestsExpired",
    "RoundRobin",
    "Route",
    "RoutedFuture",
    "Router",
    "RouterStats",
    "ScalingDecision",
    "ScalingFailed",
    "Shadow",
    "ShadowStats",
    "Signature",
    "State",
    "StateChanged",
    "Stats",
    "StoreUnavailable",
    "TensorSpec",
    "Unauthenticated",
    "UnsupportedEncoding",
]


def __getattr__(name: str) -> _ModuleType:
    # inferkit.gpu loads on first use, so `import inferkit` stays light.
    if name == "gpu":
        return _importlib.import_module("inferkit.gpu")
    msg = f"module 'inferkit' has no attribute {name!r}"
    raise AttributeError(msg)
