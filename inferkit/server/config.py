"""The server's TOML configuration: several models, versions, replicas, batching and splits.

::

    [server]
    host = "127.0.0.1"
    port = 8000
    grpc_port = 8001          # or false: REST only

    [[models]]
    name = "digits"
    path = "digits.onnx"      # relative to this file
    max_batch_size = 64
    max_delay_ms = 2
    replicas = 2

    [[models]]
    name = "clf"
    versions.1 = { path = "v1.onnx" }
    versions.2 = { path = "v2.onnx", replicas = 2 }
    split = { policy = "canary", baseline = "1", candidate = "2", steps = [0.05, 0.25, 1.0] }

A model has either ``path`` or ``versions``; with versions, ``split`` says how requests
without a version are divided: ``{policy = "fixed", version = "1"}``,
``{policy = "ab", weights = {"1" = 0.9, "2" = 0.1}}`` or ``{policy = "canary", ...}``
(``baseline``, ``candidate``, ``steps``, ``min_requests_per_step``, ``max_error_rate``,
``max_p99_ratio``). Without ``split``, the highest version answers. Every error names the
field it is about (``models[1].versions.2.replicas``).
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs

from inferkit.batching import BatchConfig
from inferkit.policies import ABTest, Canary, Fixed, Guard, Policy
from inferkit.pool import PoolConfig
from inferkit.predictor import Predictor
from inferkit.routing import Predictive, Router
from inferkit.server.repository import Repository, ServedModel

__all__ = ["ConfigError", "ServerConfig", "load"]

T = TypeVar("T")
_MODEL_KEYS = {"path", "max_batch_size", "max_delay_ms", "max_queue_size", "replicas", "intra_op_threads"}


class ConfigError(ValueError):
    """The configuration file is invalid; the message names the field."""


@attrs.frozen
class ServerConfig:
    """Where to listen, and the repository of models to serve."""

    host: str
    port: int
    grpc_port: int | None
    repository: Repository


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
    batching = _field(
        where,
        lambda: BatchConfig(
            spec.get("max_batch_size", 64), spec.get("max_delay_ms", 2.0), spec.get("max_queue_size", 4096)
        ),
    )
    pool = _field(where, lambda: PoolConfig(spec.get("replicas", 1)))
    return _field(
        where,
        lambda: Predictor.from_onnx(
            path,
            max_batch_size=batching.max_batch_size,
            max_delay_ms=batching.max_delay_ms,
            max_queue_size=batching.max_queue_size,
            replicas=pool.replicas,
            intra_op_threads=spec.get("intra_op_threads"),
            name=name,
        ),
    )


def _policy(split: Mapping[str, Any], versions: list[str], where: str) -> Policy:
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
            "max_error_rate",
            "max_p99_ratio",
        }
        _unknown(split, allowed, where)
        guard = _field(
            where, lambda: Guard(split.get("max_error_rate", 0.01), max_p99_ratio=split.get("max_p99_ratio"))
        )
        return _field(
            where,
            lambda: Canary(
                str(split["baseline"]),
                str(split["candidate"]),
                tuple(split.get("steps", (0.01, 0.05, 0.25, 1.0))),
                min_requests_per_step=split.get("min_requests_per_step", 500),
                guard=guard,
            ),
        )
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
    policy = _policy(_table(split, f"{where}.split"), order, f"{where}.split") if split else Fixed(order[-1])
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
    _unknown(server, {"host", "port", "grpc_port"}, "server")
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
    return ServerConfig(
        str(server.get("host", "127.0.0.1")),
        int(server.get("port", 8000)),
        None if grpc_port is False else int(grpc_port),
        Repository(served),
    )
