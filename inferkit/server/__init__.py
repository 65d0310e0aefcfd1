"""Real-time serving over REST and gRPC in the KServe Open Inference Protocol v2 (the ``server`` extra).

:class:`Repository` holds the served models; ``inferkit.server.rest.create_app`` makes an ASGI
app of it, ``inferkit.server.grpc.create_server`` a ``grpc.aio`` server, and
``inferkit.server.run.serve`` runs both.
"""

from inferkit.server.repository import InferResult, Repository, ServedModel

__all__ = ["InferResult", "Repository", "ServedModel"]
