"""inferkit: serve your own models from your own app.

Wrap a model in a :class:`Predictor` and call it from any number of threads; requests are
validated, batched with every other caller's and run on a pool of replicas.
"""

from inferkit.backends.base import Backend, BackendFactory
from inferkit.backends.callable import CallableBackend
from inferkit.batching import BatchConfig, RequestFuture
from inferkit.errors import (
    Closed,
    DeadlineExceeded,
    ExecutionTimeout,
    InferkitError,
    InvalidInput,
    ModelError,
    NoHealthyReplica,
    Overloaded,
)
from inferkit.events import (
    BatchDone,
    Event,
    LogObserver,
    Observer,
    ReplicaEjected,
    ReplicaReplaced,
    RequestsExpired,
    StateChanged,
)
from inferkit.pool import Balancer, LeastOutstanding, PoolConfig, PowerOfTwoChoices, RoundRobin
from inferkit.predictor import Predictor, State
from inferkit.signature import Signature, TensorSpec
from inferkit.stats import ReplicaStats, Stats

__all__ = [
    "Backend",
    "BackendFactory",
    "Balancer",
    "BatchConfig",
    "BatchDone",
    "CallableBackend",
    "Closed",
    "DeadlineExceeded",
    "Event",
    "ExecutionTimeout",
    "InferkitError",
    "InvalidInput",
    "LeastOutstanding",
    "LogObserver",
    "ModelError",
    "NoHealthyReplica",
    "Observer",
    "Overloaded",
    "PoolConfig",
    "PowerOfTwoChoices",
    "Predictor",
    "ReplicaEjected",
    "ReplicaReplaced",
    "ReplicaStats",
    "RequestFuture",
    "RequestsExpired",
    "RoundRobin",
    "Signature",
    "State",
    "StateChanged",
    "Stats",
    "TensorSpec",
]
