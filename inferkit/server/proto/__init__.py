"""The messages of the KServe v2 / Triton gRPC service, built in a private descriptor pool.

``inference.proto`` (beside this file) is the source: the part of Triton's ``grpc_service.proto``
and ``model_config.proto`` that inferkit serves, with Triton's package, service, message and field
names, numbers and types. ``inference.binpb`` is what protoc compiles from it (a
``FileDescriptorSet``), committed as a generated file. After editing the ``.proto``, regenerate
it in this directory with::

    python -m grpc_tools.protoc -I. --descriptor_set_out=inference.binpb inference.proto

(``tests/test_server_grpc.py`` fails while the two disagree.)

Why not protoc's ``inference_pb2.py``: generated Python code registers its messages in
protobuf's process-wide default pool, where Triton's client (``tritonclient.grpc``) and KServe's
register the very same names (``inference.ModelInferRequest``, ...); a process that imported both
would fail with "duplicate symbol". A private pool keeps the names and the wire format, lets any
process import both, and needs no generated-code runtime check (protoc 35.1's code demands
protobuf >= 7.35.1; this module needs only ``message_factory.GetMessageClass``).

Each message class is an attribute of this module, as in a ``_pb2`` module; nested messages are
attributes of their parent (``ModelInferRequest.InferInputTensor``).
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Final

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "POOL",
    "SERVICE",
    "InferParameter",
    "InferTensorContents",
    "ModelConfig",
    "ModelConfigRequest",
    "ModelConfigResponse",
    "ModelInferRequest",
    "ModelInferResponse",
    "ModelMetadataRequest",
    "ModelMetadataResponse",
    "ModelReadyRequest",
    "ModelReadyResponse",
    "ModelStatisticsRequest",
    "ModelStatisticsResponse",
    "RepositoryIndexRequest",
    "RepositoryIndexResponse",
    "RepositoryModelLoadRequest",
    "RepositoryModelLoadResponse",
    "RepositoryModelUnloadRequest",
    "RepositoryModelUnloadResponse",
    "ServerLiveRequest",
    "ServerLiveResponse",
    "ServerMetadataRequest",
    "ServerMetadataResponse",
    "ServerReadyRequest",
    "ServerReadyResponse",
]

SERVICE: Final = "inference.GRPCInferenceService"
"""The full name of the gRPC service, as Triton's clients call it."""

POOL: Any = descriptor_pool.DescriptorPool()
"""The private pool that holds ``inference.proto`` (and nothing else)."""

_files = descriptor_pb2.FileDescriptorSet.FromString(resources.files(__name__).joinpath("inference.binpb").read_bytes())
for _file in _files.file:
    POOL.Add(_file)


def _message(name: str) -> Any:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{name}"))


ServerLiveRequest: Any = _message("ServerLiveRequest")
ServerLiveResponse: Any = _message("ServerLiveResponse")
ServerReadyRequest: Any = _message("ServerReadyRequest")
ServerReadyResponse: Any = _message("ServerReadyResponse")
ModelReadyRequest: Any = _message("ModelReadyRequest")
ModelReadyResponse: Any = _message("ModelReadyResponse")
ServerMetadataRequest: Any = _message("ServerMetadataRequest")
ServerMetadataResponse: Any = _message("ServerMetadataResponse")
ModelMetadataRequest: Any = _message("ModelMetadataRequest")
ModelMetadataResponse: Any = _message("ModelMetadataResponse")
InferParameter: Any = _message("InferParameter")
InferTensorContents: Any = _message("InferTensorContents")
ModelInferRequest: Any = _message("ModelInferRequest")
ModelInferResponse: Any = _message("ModelInferResponse")
ModelConfigRequest: Any = _message("ModelConfigRequest")
ModelConfigResponse: Any = _message("ModelConfigResponse")
ModelConfig: Any = _message("ModelConfig")
ModelStatisticsRequest: Any = _message("ModelStatisticsRequest")
ModelStatisticsResponse: Any = _message("ModelStatisticsResponse")
RepositoryIndexRequest: Any = _message("RepositoryIndexRequest")
RepositoryIndexResponse: Any = _message("RepositoryIndexResponse")
RepositoryModelLoadRequest: Any = _message("RepositoryModelLoadRequest")
RepositoryModelLoadResponse: Any = _message("RepositoryModelLoadResponse")
RepositoryModelUnloadRequest: Any = _message("RepositoryModelUnloadRequest")
RepositoryModelUnloadResponse: Any = _message("RepositoryModelUnloadResponse")
