"""Building the models of a config file: a ``[[models]]`` table into a Predictor, or a Router over versions.

:class:`ModelLoader` builds them again for a load request (see :mod:`inferkit.server.config`
for the fields, and :mod:`inferkit.server.control` for loading).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from inferkit.autoscale import AutoscaleConfig, Autoscaler
from inferkit.batching import BatchConfig
from inferkit.errors import ConfigError
from inferkit.policies import ABTest, Canary, CanaryStore, FileStore, Fixed, Guard, Policy, StoreUnavailable
from inferkit.pool import MAX_REPLICAS, PoolConfig
from inferkit.predictor import Predictor
from inferkit.routing import Predictive, Router
from inferkit.server.control import LoadedVersion, LoadFailed
from inferkit.server.served_model import ServedModel, check_name

if TYPE_CHECKING:
    from inferkit.gpu import Pipeline

__all__ = ["ModelLoader", "as_table", "checked", "refuse_unknown", "served_model"]

T = TypeVar("T")
_POOL_KEYS = ("replicas", "execution_timeout", "eject_after", "cooldown", "max_cooldown", "max_ejected_fraction")
_BATCH_KEYS = tuple(f.name for f in attrs.fields(BatchConfig) if f.init)
_MODEL_KEYS = {
    "path",
    *_BATCH_KEYS,
    "intra_op_threads",
    "autoscale",
    "pipeline",
    "device",
    "strict",
    *_POOL_KEYS,
}
_PRE_STEPS = ("ImageToTensor",)  # the built-ins only: a config file names no code to import
_POST_STEPS = ("ArgMax", "NMS", "Sigmoid", "Softmax", "Threshold", "TopK")


def checked(where: str, build: Callable[[], T]) -> T:
    """``build()``; a ``ConfigError`` naming ``where`` for the ValueError, TypeError or KeyError it raises."""
    try:
        return build()
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        msg = f"{where}: {error}"
        raise ConfigError(msg) from error


def as_table(value: object, where: str) -> Mapping[str, Any]:
    """``value`` as a TOML table; ``ConfigError`` naming ``where`` otherwise."""
    if not isinstance(value, Mapping):
        msg = f"{where} must be a table, got {type(value).__name__}"
        raise ConfigError(msg)
    return value


def refuse_unknown(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    """``ConfigError`` naming ``where`` when ``table`` has a field not in ``allowed``."""
    extra = sorted(set(table) - allowed)
    if extra:
        msg = f"{where}: unknown field(s) {extra}; allowed: {sorted(allowed)}"
        raise ConfigError(msg)


def _predictor(spec: Mapping[str, Any], where: str, base: Path, name: str) -> Predictor:
    refuse_unknown(spec, _MODEL_KEYS, where)
    if "path" not in spec:
        msg = f"{where}.path is required"
        raise ConfigError(msg)
    path = base / str(spec["path"])
    if not path.is_file():
        msg = f"{where}.path: no model file at {path}"
        raise ConfigError(msg)
    batching = checked(where, lambda: BatchConfig(**{k: spec[k] for k in _BATCH_KEYS if k in spec}))
    pool = checked(where, lambda: PoolConfig(**{k: spec[k] for k in _POOL_KEYS if k in spec}))
    autoscale = None
    if "autoscale" in spec:
        table = as_table(spec["autoscale"], f"{where}.autoscale")
        autoscale = checked(f"{where}.autoscale", lambda: AutoscaleConfig(**table))
    _within_limits(where, batching, pool, autoscale)
    pipeline = _pipeline(spec["pipeline"], f"{where}.pipeline") if "pipeline" in spec else None
    device = _device(spec.get("device"), f"{where}.device")
    strict = spec.get("strict", False)
    if not isinstance(strict, bool):
        msg = f"{where}.strict must be true or false, got {strict!r}"
        raise ConfigError(msg)
    try:
        predictor = checked(
            where,
            lambda: Predictor.from_onnx(
                path,
                batching=batching,
                pool=pool,
                intra_op_threads=spec.get("intra_op_threads"),
                name=name,
                pipeline=pipeline,
                device=device,
                strict=strict,
            ),
        )
    except ConfigError as error:
        step = getattr(error.__cause__, "step", None)  # a PipelineMismatch: name the step that does not fit
        if step is None:
            raise
        msg = f"{where}.pipeline.{step}: {error.__cause__}"
        raise ConfigError(msg) from error.__cause__
    except Exception as error:  # ONNX Runtime's own (InvalidProtobuf, Fail): a file that is no model it reads
        msg = f"{where}: {path} does not load: {type(error).__name__}: {error}"
        raise ConfigError(msg) from error
    if autoscale is not None:
        Autoscaler(predictor, autoscale).start()  # its thread ends once the predictor is closed
    return predictor


def _device(value: object, where: str) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(d, str) for d in value):
        return value
    msg = f'{where} must be a device string ("cpu", "cuda", "cuda:N") or a non-empty array of them, got {value!r}'
    raise ConfigError(msg)


def _pipeline(value: object, where: str) -> Pipeline:
    """The :class:`inferkit.gpu.Pipeline` of a model's ``pipeline`` table: built-in steps by name."""
    from inferkit import gpu  # noqa: PLC0415  (only a model with a pipeline needs it)

    table = as_table(value, where)
    refuse_unknown(table, {"pre", "post"}, where)
    sides = {}
    for side, names in (("pre", _PRE_STEPS), ("post", _POST_STEPS)):
        steps = table.get(side, [])
        if not isinstance(steps, list):
            msg = f'{where}.{side} must be an array of tables ({{ step = "...", ... }}), got {type(steps).__name__}'
            raise ConfigError(msg)
        sides[side] = [
            _step(gpu, as_table(s, f"{where}.{side}[{i}]"), names, f"{where}.{side}[{i}]") for i, s in enumerate(steps)
        ]
    return gpu.Pipeline(pre=sides["pre"], post=sides["post"])


def _step(gpu: Any, table: Mapping[str, Any], names: tuple[str, ...], where: str) -> Any:
    kind = table.get("step")
    if kind not in names:
        msg = f"{where}.step must be one of {list(names)}, got {kind!r}"
        raise ConfigError(msg)
    cls = getattr(gpu, kind)
    refuse_unknown(table, {"step", *attrs.fields_dict(cls)}, where)
    fields = {k: v for k, v in table.items() if k != "step"}
    return checked(f"{where} ({kind})", lambda: cls(**fields))


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
    return checked(f"{where}.redis_url", lambda: RedisStore(url, key))


def _canary(split: Mapping[str, Any], where: str, base: Path, model: str) -> Canary:
    steps = split.get("steps", [0.01, 0.05, 0.25, 1.0])
    if not isinstance(steps, list):  # tuple("abc") made steps of characters
        msg = f"{where}.steps must be a list of weights, e.g. [0.05, 0.25, 1.0], got {steps!r:.100}"
        raise ConfigError(msg)
    guard = checked(where, lambda: Guard(split.get("max_error_rate", 0.01), max_p99_ratio=split.get("max_p99_ratio")))
    store = _store(split, where, base, model)
    try:
        return checked(
            where,
            lambda: Canary(
                str(split["baseline"]),
                str(split["candidate"]),
                tuple(steps),
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
    except OSError as error:  # state_path names a directory, or a file this process may not write
        if store is not None:
            store.close()
        msg = f"{where}.state_path: the canary's state cannot be kept at {error.filename}: {error.strerror or error}"
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
        refuse_unknown(split, {"policy", "version"}, where)
        return Fixed(str(split.get("version", versions[-1])))
    if kind == "ab":
        refuse_unknown(split, {"policy", "weights"}, where)
        weights = as_table(split.get("weights"), f"{where}.weights")
        for arm, weight in weights.items():  # float() took true as 1 and "0.5" as 0.5
            if isinstance(weight, bool) or not isinstance(weight, int | float):
                msg = f"{where}.weights.{arm} must be a number, got {weight!r:.100}"
                raise ConfigError(msg)
        return checked(f"{where}.weights", lambda: ABTest({str(k): float(v) for k, v in weights.items()}))
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
        refuse_unknown(split, allowed, where)
        return _canary(split, where, base, model)
    msg = f"{where}.policy must be 'fixed', 'ab' or 'canary', got {kind!r}"
    raise ConfigError(msg)


def served_model(spec: Mapping[str, Any], where: str, base: Path, opened: list[Predictive]) -> ServedModel:
    """The model of one ``[[models]]`` table; each predictor built is appended to ``opened``."""
    name = checked(f"{where}.name", lambda: check_name(spec.get("name")))
    if "versions" not in spec:
        predictor = _predictor({k: v for k, v in spec.items() if k != "name"}, where, base, name)
        opened.append(predictor)
        return ServedModel(name, predictor)
    refuse_unknown(spec, {"name", "versions", "split"}, where)
    table = as_table(spec["versions"], f"{where}.versions")
    if not table:
        msg = f"{where}.versions must name at least one version"
        raise ConfigError(msg)
    versions: dict[str, Predictive] = {}
    for label, version in table.items():
        vwhere = f"{where}.versions.{label}"
        checked(vwhere, functools.partial(check_name, label, "a version label"))
        versions[str(label)] = _predictor(as_table(version, vwhere), vwhere, base, f"{name}-{label}")
        opened.append(versions[str(label)])
    order = sorted(versions, key=lambda v: (len(v), v))
    split = spec.get("split")  # present but empty or false is a mistake, not "no split"
    policy = (
        Fixed(order[-1])
        if split is None
        else _policy(as_table(split, f"{where}.split"), order, f"{where}.split", base, name)
    )
    router = checked(f"{where}.split", lambda: Router(versions, policy, name=name))
    return ServedModel(name, router, versions)


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
            versions = {str(k): {**v, **overrides} for k, v in as_table(spec["versions"], f"{name}.versions").items()}
            opened: list[Predictive] = []
            try:
                return served_model({**spec, "name": name, "versions": versions}, name, self.base, opened)
            except Exception:  # a version that does not load: close the ones that did
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


_INT32, _UINT32, _UINT64 = 2**31 - 1, 2**32 - 1, 2**64 - 1  # Triton's model config fields


def _within_limits(where: str, batching: BatchConfig, pool: PoolConfig, autoscale: AutoscaleConfig | None) -> None:
    """``ConfigError`` for a pool past :data:`MAX_REPLICAS`, or a field past the range of Triton's model config."""
    for key, value, most in (
        ("replicas", pool.replicas, MAX_REPLICAS),
        ("autoscale.max_replicas", 0 if autoscale is None else autoscale.max_replicas, MAX_REPLICAS),
        ("max_batch_size", batching.max_batch_size or 0, _INT32),
        ("max_queue_size", batching.max_queue_size, _UINT32),
        ("max_delay_ms", batching.max_delay_ms, _UINT64 // 1000),
    ):
        if value > most:
            msg = f"{where}.{key} must be at most {most}, got {value}"
            raise ConfigError(msg)


def _whole(value: object, where: str) -> int:
    """A uint64 field of a Triton model config: an int, or its decimal string (protobuf's JSON); ``ConfigError`` else.

    ``int()`` would take ``2.7`` as 2 and ``1e30`` as a delay of 10**24 ms.
    """
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= _UINT64_DIGITS:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64:
        msg = f"{where} must be a whole number in [0, 2**64), got {value!r:.100}"
        raise ConfigError(msg)
    return value


_UINT64_DIGITS = 20


def _load_overrides(config: Mapping[str, Any]) -> tuple[dict[str, Any], str | None, str | None]:
    """``(model spec fields, path, version)`` from a load's Triton model config; other fields are ignored."""
    try:
        overrides: dict[str, Any] = {}
        if "max_batch_size" in config:
            overrides["max_batch_size"] = config["max_batch_size"]
        batching = config.get("dynamic_batching") or {}
        if "max_queue_delay_microseconds" in batching:
            delay = _whole(batching["max_queue_delay_microseconds"], "dynamic_batching.max_queue_delay_microseconds")
            overrides["max_delay_ms"] = delay / 1000
        queue = batching.get("default_queue_policy") or {}
        if "max_queue_size" in queue:
            overrides["max_queue_size"] = _whole(queue["max_queue_size"], "default_queue_policy.max_queue_size")
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
