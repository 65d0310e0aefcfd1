"""The server's TOML configuration: several models, versions, replicas, batching and splits.

::

    [server]
    host = "127.0.0.1"
    port = 8000
    grpc_port = 8001          # or false: REST only
    grace_s = 30              # shutdown drain bound
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
field. Every error names the field it is about (``models[1].versions.2.replicas``).

With ``repository_control = true``, :class:`ModelLoader` rebuilds a model of this file on a
load request, with what the load's Triton model config changes: ``max_batch_size``,
``dynamic_batching.max_queue_delay_microseconds`` and ``.default_queue_policy.max_queue_size``,
``instance_group[0].count`` (replicas), and inferkit's ``parameters.path`` and
``parameters.version`` (``{"string_value": ...}``). A path must lie under this file's directory.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from inferkit._validators import integer, number
from inferkit.autoscale import AutoscaleConfig, Autoscaler
from inferkit.batching import BatchConfig
from inferkit.errors import ConfigError  # defined in the one error tree; importable here too
from inferkit.policies import ABTest, Canary, CanaryStore, FileStore, Fixed, Guard, Policy, StoreUnavailable
from inferkit.pool import PoolConfig
from inferkit.predictor import Predictor
from inferkit.routing import Predictive, Router
from inferkit.server.control import TOKEN_ENV, LoadedVersion, LoadFailed, RepositoryControl
from inferkit.server.repository import Repository, ServedModel

__all__ = ["ConfigError", "ConnectionLimits", "ModelLoader", "ServerConfig", "check_admin_token", "load"]

T = TypeVar("T")
_POOL_KEYS = ("replicas", "execution_timeout", "eject_after", "cooldown", "max_cooldown", "max_ejected_fraction")
_BATCH_KEYS = tuple(attrs.fields_dict(BatchConfig))
_MODEL_KEYS = {
    "path",
    *_BATCH_KEYS,
    "intra_op_threads",
    "autoscale",
    *_POOL_KEYS,
}


def _optional_connections(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None:
        integer(1)(_, attribute, value)


@attrs.frozen
class ConnectionLimits:
    """What one client connection may hold, so that no client can lock others out.

    ==============================  ===========================================================
    ``header_timeout_s``            seconds a new connection, or a started request, has to send
                                    its whole request head (HTTP 408 and close after it)
    ``body_timeout_s``              seconds a request body may stall between two reads (408)
    ``keep_alive_s``                seconds an idle HTTP keep-alive connection stays open
    ``max_header_bytes``            bytes of an HTTP request head (URL and headers; 431 past
                                    it), and of a gRPC call's metadata
    ``max_connections``             open HTTP connections; past it the oldest idle one is
                                    closed, or the new one gets 503 when none is idle. ``None``:
                                    half the open-file limit, at most 10,000
    ``grpc_idle_s``                 seconds a gRPC connection without calls stays open
    ``grpc_max_concurrent_streams`` gRPC calls in progress on one connection
    ``max_request_bytes``           bytes of a REST body, also once decompressed (413 past it)
    ``max_json_bytes``              bytes of a REST body's JSON part (413: send binary data)
    ``max_decode_bytes``            estimated memory of the large REST bodies being decoded,
                                    answers being encoded and bodies being inflated at once
                                    (413 for one that never fits, 429/503 while busy)
    ``max_message_bytes``           bytes of a gRPC message, both ways (at most 2**31 - 1)
    ==============================  ===========================================================
    """

    header_timeout_s: float = attrs.field(default=10.0, validator=number(0, inclusive=False))
    body_timeout_s: float = attrs.field(default=30.0, validator=number(0, inclusive=False))
    keep_alive_s: float = attrs.field(default=5.0, validator=number(0, inclusive=False))
    max_header_bytes: int = attrs.field(default=32 * 2**10, validator=integer(1024))
    max_connections: int | None = attrs.field(default=None, validator=_optional_connections)
    grpc_idle_s: float = attrs.field(default=300.0, validator=number(0, inclusive=False))
    grpc_max_concurrent_streams: int = attrs.field(default=1024, validator=integer(1))
    max_request_bytes: int = attrs.field(default=64 * 2**20, validator=integer(1))
    max_json_bytes: int = attrs.field(default=16 * 2**20, validator=integer(1))
    max_decode_bytes: int = attrs.field(default=2**30, validator=integer(1))
    max_message_bytes: int = attrs.field(default=256 * 2**20, validator=integer(1, 2**31 - 1))


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


def _field(where: str, build: Callable[[], T]) -> T:
    try:
        return build()
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        msg = f"{where}: {error}"
        raise ConfigError(msg) from error


def _table(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        msg = f"{where} must be a table, got {type(value).__name__}"
        raise ConfigError(msg)
    return value


def _unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        msg = f"{where}: unknown field(s) {extra}; allowed: {sorted(allowed)}"
        raise ConfigError(msg)


def _predictor(spec: Mapping[str, Any], where: str, base: Path, name: str) -> Predictor:
    _unknown(spec, _MODEL_KEYS, where)
    if "path" not in spec:
        msg = f"{where}.path is required"
        raise ConfigError(msg)
    path = base / str(spec["path"])
    if not path.is_file():
        msg = f"{where}.path: no model file at {path}"
        raise ConfigError(msg)
    batching = _field(where, lambda: BatchConfig(**{k: spec[k] for k in _BATCH_KEYS if k in spec}))
    pool = _field(where, lambda: PoolConfig(**{k: spec[k] for k in _POOL_KEYS if k in spec}))
    autoscale = None
    if "autoscale" in spec:
        table = _table(spec["autoscale"], f"{where}.autoscale")
        autoscale = _field(f"{where}.autoscale", lambda: AutoscaleConfig(**table))
    predictor = _field(
        where,
        lambda: Predictor.from_onnx(
            path,
            batching=batching,
            pool=pool,
            intra_op_threads=spec.get("intra_op_threads"),
            name=name,
        ),
    )
    if autoscale is not None:
        Autoscaler(predictor, autoscale).start()  # its thread ends once the predictor is closed
    return predictor


def _store(split: Mapping[str, Any], where: str, base: Path, model: str) -> CanaryStore | None:
    """Where a canary's state lives: a file (``state_path``), Redis (``redis_url``), or nowhere."""
    if "state_path" in split and "redis_url" in split:
        msg = f"{where}: give state_path or redis_url, not both"
        raise ConfigError(msg)
    if "redis_key" in split and "redis_url" not in split:
        msg = f"{where}.redis_key needs redis_url"
        raise ConfigError(msg)
    if "state_path" in split:
        if not isinstance(split["state_path"], str) or not split["state_path"]:
            msg = f"{where}.state_path must be a non-empty string"
            raise ConfigError(msg)
        return FileStore(base / split["state_path"])
    if "redis_url" not in split:
        return None
    url, key = split["redis_url"], split.get("redis_key", f"inferkit:canary:{model}")
    if not isinstance(url, str) or not isinstance(key, str) or not key:
        msg = f"{where}.redis_url and redis_key must be strings"
        raise ConfigError(msg)
    try:
        from inferkit.integrations.redis import RedisStore  # noqa: PLC0415 (the redis extra)
    except ImportError as error:
        msg = f"{where}.redis_url needs the redis extra (pip install 'inferkit-serve[redis]'): {error}"
        raise ConfigError(msg) from None
    return _field(f"{where}.redis_url", lambda: RedisStore(url, key))


def _canary(split: Mapping[str, Any], where: str, base: Path, model: str) -> Canary:
    guard = _field(where, lambda: Guard(split.get("max_error_rate", 0.01), max_p99_ratio=split.get("max_p99_ratio")))
    store = _store(split, where, base, model)
    try:
        return _field(
            where,
            lambda: Canary(
                str(split["baseline"]),
                str(split["candidate"]),
                tuple(split.get("steps", (0.01, 0.05, 0.25, 1.0))),
                min_requests_per_step=split.get("min_requests_per_step", 500),
                min_seconds_per_step=split.get("min_seconds_per_step", 0.0),
                guard=guard,
                store=store,
            ),
        )
    except StoreUnavailable as error:  # a new process has no last known weights to hold
        if store is not None:
            store.close()
        msg = f"{where}: the canary's state cannot be read: {error}"
        raise ConfigError(msg) from None
    except ConfigError:
        if store is not None:
            store.close()
        raise


def _policy(
    split: Mapping[str, Any], versions: list[str], where: str, base: Path = Path(), model: str = "model"
) -> Policy:
    kind = split.get("policy")
    if kind == "fixed":
        _unknown(split, {"policy", "version"}, where)
        return Fixed(str(split.get("version", versions[-1])))
    if kind == "ab":
        _unknown(split, {"policy", "weights"}, where)
        weights = _table(split.get("weights"), f"{where}.weights")
        return _field(f"{where}.weights", lambda: ABTest({str(k): float(v) for k, v in weights.items()}))
    if kind == "canary":
        allowed = {
            "policy",
            "baseline",
            "candidate",
            "steps",
            "min_requests_per_step",
            "min_seconds_per_step",
            "max_error_rate",
            "max_p99_ratio",
            "state_path",
            "redis_url",
            "redis_key",
        }
        _unknown(split, allowed, where)
        return _canary(split, where, base, model)
    msg = f"{where}.policy must be 'fixed', 'ab' or 'canary', got {kind!r}"
    raise ConfigError(msg)


def _model(spec: Mapping[str, Any], where: str, base: Path, opened: list[Predictive]) -> ServedModel:
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        msg = f"{where}.name must be a non-empty string, got {name!r}"
        raise ConfigError(msg)
    if "versions" not in spec:
        predictor = _predictor({k: v for k, v in spec.items() if k != "name"}, where, base, name)
        opened.append(predictor)
        return ServedModel(name, predictor)
    _unknown(spec, {"name", "versions", "split"}, where)
    table = _table(spec["versions"], f"{where}.versions")
    if not table:
        msg = f"{where}.versions must name at least one version"
        raise ConfigError(msg)
    versions: dict[str, Predictive] = {}
    for label, version in table.items():
        vwhere = f"{where}.versions.{label}"
        versions[str(label)] = _predictor(_table(version, vwhere), vwhere, base, f"{name}-{label}")
        opened.append(versions[str(label)])
    order = sorted(versions, key=lambda v: (len(v), v))
    split = spec.get("split")
    policy = (
        _policy(_table(split, f"{where}.split"), order, f"{where}.split", base, name) if split else Fixed(order[-1])
    )
    router = _field(f"{where}.split", lambda: Router(versions, policy, name=name))
    return ServedModel(name, router, versions)


def _unique(names: list[str]) -> None:
    if len(set(names)) != len(names):
        msg = f"models: names must be unique, got {names}"
        raise ConfigError(msg)


def load(path: str | Path) -> ServerConfig:
    """Read and validate a configuration file and load its models; ``ConfigError`` names the bad field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        msg = f"{path}: {error}"
        raise ConfigError(msg) from error
    _unknown(data, {"server", "models"}, str(path))
    server = _table(data.get("server", {}), "server")
    _unknown(server, _SERVER_KEYS, "server")
    limits = _field(
        "server",
        lambda: ConnectionLimits(**{k: v for k, v in server.items() if k in attrs.fields_dict(ConnectionLimits)}),
    )
    grace_s = _field("server", lambda: _grace(server.get("grace_s", 30.0)))
    models = data.get("models")
    if not isinstance(models, list) or not models:
        msg = "models must be a non-empty array of tables ([[models]])"
        raise ConfigError(msg)
    opened: list[Predictive] = []
    try:
        served = [_model(_table(m, f"models[{i}]"), f"models[{i}]", path.parent, opened) for i, m in enumerate(models)]
        _unique([m.name for m in served])
    except ConfigError:
        for predictor in opened:
            predictor.close()
        raise
    grpc_port = server.get("grpc_port", 8001)
    specs = {str(m["name"]): m for m in models if isinstance(m, Mapping)}
    loader = ModelLoader(path.parent, specs)
    try:
        control = repository_control(server.get("repository_control", False), server.get("admin_token"), loader)
    except ConfigError:
        for predictor in opened:
            predictor.close()
        raise
    return ServerConfig(
        str(server.get("host", "127.0.0.1")),
        int(server.get("port", 8000)),
        None if grpc_port is False else int(grpc_port),
        Repository(served),
        limits,
        grace_s,
        control,
    )


def repository_control(enabled: object, token: object, loader: ModelLoader) -> RepositoryControl:
    """The repository control of ``[server]``: the token comes from ``INFERKIT_ADMIN_TOKEN``, else ``admin_token``."""
    if not isinstance(enabled, bool):
        msg = f"server.repository_control must be true or false, got {enabled!r}"
        raise ConfigError(msg)
    if token is not None and not isinstance(token, str):
        msg = "server.admin_token must be a string"
        raise ConfigError(msg)
    token = os.environ.get(TOKEN_ENV) or token
    if token is not None:
        check_admin_token(token, f"server.admin_token (or {TOKEN_ENV})")
    try:
        return RepositoryControl(enabled=enabled, token=token, loader=loader)
    except ValueError as error:
        msg = f"server.repository_control: {error}"
        raise ConfigError(msg) from None


_MIN_TOKEN_CHARS = 16  # as repository control's


def check_admin_token(token: str, where: str) -> None:
    """``ConfigError`` unless ``token`` is printable and at least 16 characters (the value is never shown)."""
    if len(token) < _MIN_TOKEN_CHARS or not token.isprintable():  # canary admin uses it too
        msg = f"{where} must be a printable string of at least {_MIN_TOKEN_CHARS} characters"
        raise ConfigError(msg)


_LOAD_FIELDS = "max_batch_size, dynamic_batching, instance_group[0].count, parameters.path, parameters.version"


class ModelLoader:
    """Builds models of a config file (or a model file) again, for a load request.

    ``specs`` are the ``[[models]]`` tables by name; ``base`` is the directory their paths are
    relative to, and the only one a load may name a path under (resolved: no ``..`` or
    symbolic link leads out of it). Loading a model without a spec needs ``parameters.path``.
    """

    def __init__(self, base: Path, specs: Mapping[str, Mapping[str, Any]]) -> None:
        self.base = base.resolve()
        self.specs = dict(specs)

    def __call__(self, name: str, config: Mapping[str, Any]) -> ServedModel | LoadedVersion:
        """The model ``name`` as its spec says, changed by ``config`` (Triton's model config JSON)."""
        try:
            return self._build(name, config)
        except Exception as error:  # noqa: BLE001 (a model file that does not load: ONNX Runtime's errors too)
            msg = f"failed to load {name!r}, {error}"  # Triton's prefix
            raise LoadFailed(msg) from None

    def _build(self, name: str, config: Mapping[str, Any]) -> ServedModel | LoadedVersion:
        spec = {k: v for k, v in self.specs.get(name, {}).items() if k != "name"}
        overrides, path, version = _load_overrides(config)
        if path is not None:
            overrides["path"] = self._checked(path)
        if version is not None:
            versions = spec.get("versions")
            if not isinstance(versions, Mapping) or version not in versions:
                msg = f"the config has no version {version!r} of {name!r} (a new version needs a restart)"
                raise ConfigError(msg)
            where = f"{name}.versions.{version}"
            predictor = _predictor({**versions[version], **overrides}, where, self.base, f"{name}-{version}")
            return LoadedVersion(version, predictor)
        if "versions" in spec:
            if "path" in overrides:
                msg = "parameters.path needs parameters.version for a model with versions"
                raise ConfigError(msg)
            versions = {str(k): {**v, **overrides} for k, v in _table(spec["versions"], f"{name}.versions").items()}
            opened: list[Predictive] = []
            try:
                return _model({**spec, "name": name, "versions": versions}, name, self.base, opened)
            except ConfigError:
                for target in opened:
                    target.close()
                raise
        if "path" not in spec and "path" not in overrides:
            msg = f"failed to poll from model repository: the config has no model {name!r}; give parameters.path"
            raise ConfigError(msg)
        return ServedModel(name, _predictor({**spec, **overrides}, name, self.base, name))

    def _checked(self, path: str) -> str:
        resolved = (self.base / path).resolve()
        if not resolved.is_relative_to(self.base):
            msg = f"parameters.path must lie under {self.base}, got {path!r:.200}"
            raise ConfigError(msg)
        return str(resolved.relative_to(self.base))


def _load_overrides(config: Mapping[str, Any]) -> tuple[dict[str, Any], str | None, str | None]:
    """``(model spec fields, path, version)`` from a load's Triton model config; other fields are ignored."""
    try:
        overrides: dict[str, Any] = {}
        if "max_batch_size" in config:
            overrides["max_batch_size"] = config["max_batch_size"]
        batching = config.get("dynamic_batching") or {}
        if "max_queue_delay_microseconds" in batching:
            overrides["max_delay_ms"] = int(batching["max_queue_delay_microseconds"]) / 1000
        queue = batching.get("default_queue_policy") or {}
        if "max_queue_size" in queue:
            overrides["max_queue_size"] = int(queue["max_queue_size"])
        groups = config.get("instance_group") or []
        if groups and "count" in groups[0]:
            overrides["replicas"] = groups[0]["count"]
        params = config.get("parameters") or {}
        path, version = (params.get(key, {}).get("string_value") for key in ("path", "version"))
    except (AttributeError, TypeError, ValueError, IndexError, KeyError) as error:
        msg = f"the load's model config does not have the shape of Triton's ({_LOAD_FIELDS}): {error}"
        raise ConfigError(msg) from None
    for what, value in (("parameters.path", path), ("parameters.version", version)):
        if value is not None and not isinstance(value, str):
            msg = f"{what}.string_value must be a string"
            raise ConfigError(msg)
    return overrides, path, version


def _grace(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
        msg = f"grace_s must be a finite number >= 0, got {value!r}"
        raise ValueError(msg)
    return float(value)
