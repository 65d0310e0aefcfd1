"""The dynamic batcher: bounded queues, batch formation, and running batches on replicas.

Requests wait in a priority queue (a *lane*). With the default shared balancing there is one
lane and every free replica pulls its next batch from it, the way Triton, TorchServe and TF
Serving schedule in-process; with a :class:`~inferkit.pool.Balancer` each replica has a lane
of its own and the balancer picks one per request.

A free replica takes a batch at once when it is full, when the oldest queued request has
waited ``max_delay_ms``, or when waiting could not grow it: no other replica of the lane is
busy (so nothing is in flight that could come back as new requests), or requests have stopped
arriving. ``max_delay_ms`` is the longest a request waits for companions, never a fixed wait.
On a replica that computes on the CPU, such a batch takes at most the mean of the rows queued
and the last batch's rows: even batches let one batch's callers come back while the next runs.

Thread hand-offs cost far more than the work of batching, so a synchronous caller that finds
a replica idle runs its batch on its own thread (:meth:`Batcher.call`), and a replica's worker
that finishes a batch forms and runs the next one itself.

The pieces, each in its own module::

    batcher    Batcher: the lock, admission, the worker loop, accounting for a finished batch
    deadlines  requests that leave the queue unrun: cancelled, or past their deadline
    failures   what a failed batch means: retry elsewhere, health verdicts, salvage
    reporting  events out; stats(), backends(), healthy(), lanes
    lifecycle  replicas retired, replaced after a hang, resized; closing
    lane       Lane: a priority queue and the rule that forms a batch from it
    assembly   requests too big for one batch: cut into parts as batches form, joined back
    execute    one batch through a backend, bisected on failure
    replicas   ReplicaSet: the replicas, their lanes and threads
    counters   Counters: what stats() reports
    request    Request, RequestFuture and the request's state
    config     BatchConfig
"""

from inferkit.batching.batcher import Batcher
from inferkit.batching.config import BatchConfig
from inferkit.batching.request import Request, RequestFuture, RequestState, notify_cancelled

__all__ = ["BatchConfig", "Batcher", "Request", "RequestFuture", "RequestState", "notify_cancelled"]
