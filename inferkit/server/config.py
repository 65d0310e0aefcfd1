"""The server's TOML configuration: several models, versions, replicas, batching and splits.

::

    [server]
    host = "127.0.0.1"
    port = 8000
    grpc_port = 8001          # or false: REST only
    grace_s = 30              # shutdown drain bound (0 to 86400)
    repository_control = false  # true: load and unload models over REST and gRPC (with a token)
    admin_token = "..."       # the token they need (better: the INFERKIT_ADMIN_TOKEN variable)
    header_timeout_s = 10     # any ConnectionLimits field (docs/security.md)
    max_connections = 1000

    [[models]]
    name = "digits"
    path = "digits.onnx"      # relative to this file
    max_batch_size = 64
    max_delay_ms = 2
    replicas = 2
    execution_timeout = 5.0   # and eject_after, cooldown, max_cooldown, max_ejected_fraction

    [[models]]
    name = "clf"
    versions.1 = { path = "v1.onnx" }
    versions.2 = { path = "v2.onnx", replicas = 2 }
    split = { policy = "canary", baseline = "1", candidate = "2", steps = [0.05, 0.25, 1.0],
              state_path = "clf-canary.json" }   # or redis_url = "redis://host:6379/0"

    [[models]]
    name = "busy"
    path = "busy.onnx"
    autoscale = { min_replicas = 1, max_replicas = 8, target_in_flight = 8 }

    [[models]]
    name = "resnet"
    path = "resnet.onnx"
    device = "cuda"           # and strict = true: as Predictor.from_onnx
    [[models.pipeline.pre]]   # an inferkit.gpu.Pipeline: built-in steps by class name
    step = "ImageToTensor"
    size = [224, 224]
    [[models.pipeline.post]]
    step = "TopK"
    k = 5

A model has either ``path`` or ``versions``; with versions, ``split`` says how requests
without a version are divided: ``{policy = "fixed", version = "1"}``,
``{policy = "ab", weights = {"1" = 0.9, "2" = 0.1}}`` or ``{policy = "canary", ...}``
(``baseline``, ``candidate``, ``steps``, ``min_requests_per_step``, ``max_error_rate``,
``max_p99_ratio``, ``min_seconds_per_step``, and where its state lives: ``state_path``, a
JSON file relative to this file, written atomically at every decision so that a restart
resumes the same step; or ``redis_url`` (and ``redis_key``, default
``inferkit:canary:<model>``), one canary shared by every process on that Redis; see
docs/operations.md). Without ``split``, the highest version answers. A model (or a version)
takes :class:`~inferkit.PoolConfig`'s ejection settings under their own names
(``execution_timeout``, ``eject_after``, ``cooldown``, ``max_cooldown``,
``max_ejected_fraction``), and ``autoscale``, a table of
:class:`~inferkit.AutoscaleConfig` fields that resizes its pool on load (``replicas`` is then
the starting size); ``[server]`` takes ``grace_s`` and every :class:`ConnectionLimits`
field. ``pipeline`` (a model's or a version's) has ``pre`` and ``post``, arrays of tables
each with ``step`` (``ImageToTensor``; ``Softmax``, ``Sigmoid``, ``ArgMax``, ``TopK``,
``Threshold``, ``NMS``) and that step's arguments. Every error names the field it is about
(``models[1].versions.2.replicas``, ``models[0].pipeline.post[1]``).

With ``repository_control = true``, :class:`ModelLoader` rebuilds a model of this file on a
load request, with what the load's Triton model config changes: ``max_batch_size``,
``dynamic_batching.max_queue_delay_microseconds`` and ``.default_queue_policy.max_queue_size``,
``instance_group[0].count`` (replicas), and inferkit's ``parameters.path`` and
``parameters.version`` (``{"string_value": ...}``). A path must lie under this file's directory.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path

import attrs

from inferkit.errors import ConfigError  # defined in the one error tree; importable here too
from inferkit.routing import Predictive
from inferkit.server.config_models import ModelLoader, as_table, checked, refuse_unknown, served_model
from inferkit.server.control import TOKEN_ENV, TOKEN_RULE, RepositoryControl, usable_token
from inferkit.server.limits import ConnectionLimits
from inferkit.server.repository import Repository

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_GRACE_S",
    "ConfigError",
    "ConnectionLimits",
    "ModelLoader",
    "ServerConfig",
    "check_admin_token",
    "check_grace",
    "load",
    "read_small_file",
]

_SERVER_KEYS = {
    "host",
    "port",
    "grpc_port",
    "grace_s",
    "repository_control",
    "admin_token",
    *attrs.fields_dict(ConnectionLimits),
}


@attrs.frozen
class ServerConfig:
    """Where to listen, how to bound connections and shutdown, and the repository of models to serve."""

    host: str
    port: int
    grpc_port: int | None
    repository: Repository
    limits: ConnectionLimits = attrs.field(factory=ConnectionLimits)
    grace_s: float = 30.0
    control: RepositoryControl = attrs.field(factory=RepositoryControl)


def _unique(names: list[str]) -> None:
    if len(set(names)) != len(names):
        msg = f"models: names must be unique, got {names}"
        raise ConfigError(msg)


def load(path: str | Path, *, admin_token: str | None = None) -> ServerConfig:
    """Read and validate a configuration file and load its models; ``ConfigError`` names the bad field.

    ``admin_token`` (``inferkit serve --admin-token-file``) wins over ``INFERKIT_ADMIN_TOKEN`` and
    the file's ``admin_token``.
    """
    path = Path(path)
    text = read_small_file(path, MAX_CONFIG_BYTES)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        msg = f"{path}: {error}"
        raise ConfigError(msg) from error
    except RecursionError:  # arrays or inline tables nested some hundreds deep
        msg = f"{path}: values nested too deep"
        raise ConfigError(msg) from None
    refuse_unknown(data, {"server", "models"}, str(path))
    server = as_table(data.get("server", {}), "server")
    refuse_unknown(server, _SERVER_KEYS, "server")
    limits = checked(
        "server",
        lambda: ConnectionLimits(**{k: v for k, v in server.items() if k in attrs.fields_dict(ConnectionLimits)}),
    )
    grace_s = checked("server", lambda: check_grace(server.get("grace_s", 30.0)))
    host = server.get("host", "127.0.0.1")
    if not isinstance(host, str):  # str() made 5 the address 0.0.0.5
        msg = f"server.host must be a string (an address or a host name), got {host!r:.100}"
        raise ConfigError(msg)
    port = _port(server.get("port", 8000), "server.port")
    grpc_port = server.get("grpc_port", 8001)
    grpc_port = None if grpc_port is False else _port(grpc_port, "server.grpc_port", " (or false: REST only)")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        msg = "models must be a non-empty array of tables ([[models]])"
        raise ConfigError(msg)
    opened: list[Predictive] = []
    try:
        served = [
            served_model(as_table(m, f"models[{i}]"), f"models[{i}]", path.parent, opened) for i, m in enumerate(models)
        ]
        _unique([m.name for m in served])
    except ConfigError:
        for predictor in opened:
            predictor.close()
        raise
    specs = {str(m["name"]): m for m in models if isinstance(m, Mapping)}
    loader = ModelLoader(path.parent, specs)
    try:
        enabled = server.get("repository_control", False)
        control = repository_control(enabled, server.get("admin_token"), loader, admin_token)
    except ConfigError:
        for predictor in opened:
            predictor.close()
        raise
    return ServerConfig(
        host,
        port,
        grpc_port,
        Repository(served),
        limits,
        grace_s,
        control,
    )


def repository_control(
    enabled: object, token: object, loader: ModelLoader, override: str | None = None
) -> RepositoryControl:
    """The repository control of ``[server]``.

    Its token is ``override`` (checked already: from a file), else ``INFERKIT_ADMIN_TOKEN``, else ``admin_token``.
    """
    if not isinstance(enabled, bool):
        msg = f"server.repository_control must be true or false, got {enabled!r}"
        raise ConfigError(msg)
    if token is not None and not isinstance(token, str):
        msg = "server.admin_token must be a string"
        raise ConfigError(msg)
    token = os.environ.get(TOKEN_ENV) or token
    if token is not None:
        check_admin_token(token, f"server.admin_token (or {TOKEN_ENV})")
    token = override or token
    try:
        return RepositoryControl(enabled=enabled, token=token, loader=loader)
    except ValueError as error:
        msg = f"server.repository_control: {error}"
        raise ConfigError(msg) from None


MAX_CONFIG_BYTES = 4 * 2**20
"""The largest config file :func:`load` reads."""


def read_small_file(path: Path, limit: int) -> str:
    """The UTF-8 text of the regular file ``path``, of at most ``limit`` bytes; ``ConfigError`` otherwise.

    Anything else is refused before it is read: a FIFO blocked the read, and ``/dev/zero``
    read until memory ran out.
    """
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # not even opened: opening a FIFO blocks
            msg = f"{path} is not a regular file"
            raise ConfigError(msg)
        with path.open("rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):  # replaced since the check above
                msg = f"{path} is not a regular file"
                raise ConfigError(msg)
            data = file.read(limit + 1)
    except OSError as error:
        msg = f"{path}: {error.strerror or error}"
        raise ConfigError(msg) from error
    if len(data) > limit:
        msg = f"{path} is larger than {limit} bytes"
        raise ConfigError(msg)
    try:
        return data.decode()
    except UnicodeDecodeError as error:
        msg = f"{path} is not UTF-8 text: {error}"
        raise ConfigError(msg) from None


def check_admin_token(token: str, where: str) -> None:
    """``ConfigError`` unless ``token`` is printable ASCII, at least 16 characters (the value is never shown)."""
    if not usable_token(token):  # canary admin uses it too
        msg = f"{where} must be {TOKEN_RULE}"
        raise ConfigError(msg)


def _port(value: object, where: str, other: str = "") -> int:
    """A TCP port of the config (0: a free one); ``ConfigError`` naming ``where`` for anything else.

    ``int()`` would take ``true`` as 1, ``8123.9`` as 8123, and the socket wraps 70000 to 4464.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_PORT:
        msg = f"{where} must be a port number from 0 to {_MAX_PORT}{other}, got {value!r:.100}"
        raise ConfigError(msg)
    return value


_MAX_PORT = 65535


MAX_GRACE_S = 86400
"""The longest graceful shutdown, in seconds (a day): past about 9.2e9 s a thread join overflows."""


def check_grace(value: object, name: str = "grace_s") -> float:
    """``value`` as the seconds a shutdown may take; ``ValueError`` naming ``name`` unless a number from 0 to a day."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_GRACE_S:
        msg = f"{name} must be a number from 0 to {MAX_GRACE_S} (a day), got {value!r:.100}".lstrip()
        raise ValueError(msg)
    return float(value)
