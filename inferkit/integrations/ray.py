"""Ray: bulk inference on Ray Data and online serving on Ray Serve, with inferkit inside (the ``ray`` extra).

Nothing here is imported by ``import inferkit``; ``ray`` is imported when a deployment is built.

- :class:`BatchPredictor` is a callable class for ``Dataset.map_batches``: each Ray actor
  builds one :class:`~inferkit.Predictor` and runs every batch Ray hands it through
  :meth:`~inferkit.Predictor.map`.
- :func:`deployment` wraps a Predictor or Router in a Ray Serve deployment that answers the
  same Open Inference Protocol REST paths as ``inferkit serve``, through the server's own app
  (:func:`inferkit.server.rest.create_app`), so ``tritonclient.http`` works against it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from inferkit.errors import InvalidInput

if TYPE_CHECKING:
    from inferkit.predictor import Predictor

__all__ = ["BatchPredictor", "deployment"]


class BatchPredictor:
    """A Ray Data ``map_batches`` class: one Predictor per actor, built once.

    ``model`` is an ONNX path (or bytes) given to :meth:`Predictor.from_onnx` with
    ``options`` (``map_batch_size``, default 1024, is the batch size of its
    :meth:`~inferkit.Predictor.map`), or a callable returning a ready Predictor. Columns named
    after the model's inputs feed them; a one-input model with no such column takes every
    column stacked as features. Each output is added to the batch as a column of its name.

    Unless ``intra_op_threads`` or ``session_options`` is given, the sessions share as many
    threads as the CPUs Ray assigned the actor (``num_cpus``, 1 by default): the actors share
    the machine, so inferkit's defaults, which assume a process has every core to itself,
    would put several actors' threads on one core.
    """

    def __init__(self, model: str | os.PathLike[str] | bytes | Callable[[], Any], **options: Any) -> None:
        from inferkit.predictor import Predictor  # noqa: PLC0415

        self._batch_size = int(options.pop("map_batch_size", 1024))
        if not callable(model) and "intra_op_threads" not in options and "session_options" not in options:
            cpus = _assigned_cpus()
            if cpus is not None:
                options["intra_op_threads"] = max(1, cpus // int(options.get("replicas", 1)))
        self._predictor = model() if callable(model) else Predictor.from_onnx(model, **options)

    @property
    def predictor(self) -> Predictor:
        """The :class:`~inferkit.Predictor` this actor runs (for its ``stats()``)."""
        return self._predictor

    def __call__(self, batch: Mapping[str, np.ndarray[Any, Any]]) -> dict[str, Any]:
        """The batch's columns with the model's outputs added."""
        if not batch:
            msg = "the batch has no columns: give BatchPredictor the model's inputs (or feature columns)"
            raise InvalidInput(msg)
        signature = self._predictor.signature
        names = [s.name for s in signature.inputs] if signature is not None else []
        if names and all(n in batch for n in names):
            x: Any = {n: np.stack(list(batch[n])) if batch[n].dtype == object else batch[n] for n in names}
            x = x if len(x) > 1 else next(iter(x.values()))
        else:
            x = np.column_stack([batch[k] for k in batch])
        out = self._predictor.map(x, batch_size=self._batch_size)
        if not isinstance(out, Mapping):
            single = signature.outputs[0].name if signature is not None and len(signature.outputs) == 1 else "output"
            out = {single: out}
        return {**batch, **out}  # Ray Data keeps 2-D outputs as tensor columns


def _assigned_cpus() -> int | None:
    """Whole CPUs Ray assigned the current actor or task (at least 1), or None outside Ray."""
    try:
        import ray  # noqa: PLC0415  (the ray extra)
    except ImportError:  # built outside Ray, where the extra need not be installed
        return None
    if not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except AssertionError:  # Ray asserts it is called in a worker; the driver has no CPUs assigned
        return None
    return None if cpus is None else max(1, int(cpus))


async def _call_asgi(app: Any, request: Any) -> Any:
    """Run one Starlette request through ``app`` and return its response."""
    from starlette.responses import Response  # noqa: PLC0415

    status, headers, body = 500, [], bytearray()

    async def send(message: Mapping[str, Any]) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], message.get("headers", [])
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(request.scope, request.receive, send)
    response = Response(bytes(body), status_code=status)
    response.raw_headers = [(k, v) for k, v in headers if k.lower() != b"content-length"] + [
        (b"content-length", str(len(body)).encode())
    ]
    return response


def deployment(factory: Callable[[], Any], *, name: str | None = None, **options: Any) -> Any:
    """A Ray Serve application serving ``factory()`` (a Predictor or Router) over the Open Inference Protocol.

    ``factory`` runs once per Serve replica. ``name`` is the model's name on the wire (default:
    the predictor's). ``options`` go to ``serve.deployment`` as they are (``autoscaling_config``,
    ``num_replicas``, ``ray_actor_options``, ...). Run it with ``serve.run(app)``; the paths are
    ``/v2/models/<name>/infer`` and the rest of ``inferkit serve``'s REST face. Give Serve's
    proxy a fixed port (``serve.start(http_options={"port": 8000})``): it does not read 0 as
    "any free port".

    When Serve stops a replica (scale-down, redeploy, ``serve.delete``), its models are closed:
    their worker threads end and their sessions are released.
    """
    from ray import serve  # noqa: PLC0415  (the ray extra)

    @serve.deployment(**options)
    class InferkitDeployment:
        def __init__(self) -> None:
            from inferkit.server.repository import Repository  # noqa: PLC0415
            from inferkit.server.rest import create_app  # noqa: PLC0415

            target = factory()
            self._repository = Repository({name or getattr(target, "name", "model"): target})
            self._app = create_app(self._repository)

        async def __call__(self, request: Any) -> Any:
            return await _call_asgi(self._app, request)

        def __del__(self) -> None:
            # Serve calls this once at a graceful replica shutdown, after the replica's requests are answered.
            repository = getattr(self, "_repository", None)  # None: __init__ raised
            if repository is not None:
                repository.close()

    return InferkitDeployment.bind()  # type: ignore[attr-defined]
