"""``inferkit serve``: its options, and serving the models until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import attrs

from inferkit.batching.config import BatchConfig
from inferkit.cli.args import (
    _at_least_one,
    _fraction,
    _grace,
    _grpc_listeners,
    _grpc_port,
    _pool_size,
    _port,
    _positive,
)
from inferkit.pool import PoolConfig

if TYPE_CHECKING:
    from inferkit.server.run import InferenceServer


_MAX_TOKEN_FILE_BYTES = 64 * 2**10  # a token, a line of text: /dev/zero read until memory ran out
_BATCHING = BatchConfig()  # the command's defaults are the library's, written once
_POOL = PoolConfig()


def _serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve models over REST and gRPC (KServe Open Inference Protocol v2)",
        description="Serve one ONNX model, or the models of a TOML config, until SIGTERM or SIGINT.",
    )
    serve.add_argument("model", nargs="?", type=Path, help="an .onnx file (served under its stem)")
    serve.add_argument("--config", type=Path, help="a TOML file with several models, versions and splits")
    serve.add_argument("--name", help="the model's name (default: the file's stem)")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=None, help="HTTP port (default 8000; 0: a free one)")
    serve.add_argument("--grpc-port", type=_grpc_port, default=None, help="gRPC port (default 8001; -1 disables gRPC)")
    serve.add_argument(
        "--max-batch-size",
        type=int,
        default=_BATCHING.max_batch_size,
        help="rows per batch and per model call (default: unset, batches of up to 64 rows, calls of up to 256)",
    )
    serve.add_argument("--max-delay-ms", type=float, default=_BATCHING.max_delay_ms)
    serve.add_argument("--max-queue-size", type=int, default=_BATCHING.max_queue_size)
    serve.add_argument(
        "--max-queue-bytes",
        type=int,
        default=_BATCHING.max_queue_bytes,
        help=f"bytes of inputs that may wait (default {_BATCHING.max_queue_bytes})",
    )
    serve.add_argument("--replicas", type=_pool_size, default=_POOL.replicas)
    serve.add_argument(
        "--intra-op-threads",
        type=int,
        default=None,
        help="ONNX Runtime threads per replica (0: its default; default: inferkit's for the replicas)",
    )
    ejection = serve.add_argument_group("replica health (a model file; a config sets them per model)")
    ejection.add_argument(
        "--execution-timeout", type=_positive, default=None, help="seconds a model call may take (default: no limit)"
    )
    ejection.add_argument(
        "--eject-after", type=_at_least_one, default=_POOL.eject_after, help="consecutive faults that eject a replica"
    )
    ejection.add_argument(
        "--eject-cooldown", type=_positive, default=_POOL.cooldown, help="seconds of a first ejection"
    )
    ejection.add_argument(
        "--eject-max-cooldown", type=_positive, default=_POOL.max_cooldown, help="seconds of the longest ejection"
    )
    ejection.add_argument(
        "--max-ejected-fraction",
        type=_fraction,
        default=_POOL.max_ejected_fraction,
        help="share of replicas ejected at once (at least one; never the last healthy one)",
    )
    serve.add_argument("--overload-status", type=int, choices=(429, 503), default=503)
    serve.add_argument(
        "--grace",
        type=_grace,
        default=None,
        help="seconds the shutdown may take, at most 86400: in-flight requests finish, then everything closes "
        "(default 30)",
    )
    limits = serve.add_argument_group("connection limits (docs/security.md; override a config's [server])")
    limits.add_argument("--header-timeout-s", type=_positive, help="seconds to send a request head (default 10)")
    limits.add_argument("--body-timeout-s", type=_positive, help="seconds a request body may stall (default 30)")
    limits.add_argument("--keep-alive-s", type=_positive, help="seconds an idle HTTP connection stays (default 5)")
    limits.add_argument(
        "--max-header-bytes", type=_at_least_one, help="bytes of a request head or gRPC metadata (default 32768)"
    )
    limits.add_argument(
        "--max-connections", type=_at_least_one, help="open HTTP connections (default: half the open-file limit)"
    )
    limits.add_argument(
        "--grpc-max-connections",
        type=_at_least_one,
        help="open gRPC connections (default: a quarter of the open-file limit)",
    )
    limits.add_argument("--grpc-idle-s", type=_positive, help="seconds a gRPC connection without calls stays (300)")
    limits.add_argument("--max-request-bytes", type=_at_least_one, help="bytes of a REST body (default 64 MiB)")
    limits.add_argument(
        "--max-json-bytes", type=_at_least_one, help="bytes of a REST body's JSON part (default 16 MiB)"
    )
    limits.add_argument(
        "--max-decode-bytes",
        type=_at_least_one,
        help="estimated bytes held by large REST bodies being decoded at once (default 1 GiB)",
    )
    limits.add_argument("--max-message-bytes", type=_at_least_one, help="bytes of a gRPC message (default 256 MiB)")
    limits.add_argument(
        "--grpc-max-concurrent-streams", type=_at_least_one, help="gRPC calls at once per connection (default 1024)"
    )
    limits.add_argument(
        "--grpc-message-timeout-s", type=_positive, help="seconds a gRPC call has to send its request (default 60)"
    )
    serve.add_argument(
        "--grpc-listeners",
        type=_grpc_listeners,
        default=None,
        help="gRPC servers sharing the port, each accepting calls: 1 to 64 (default 8 on Linux, else 1)",
    )
    serve.add_argument(
        "--repository-control",
        action="store_true",
        help="allow loading and unloading models over REST and gRPC, with the token in INFERKIT_ADMIN_TOKEN",
    )
    logs = serve.add_argument_group("logging")
    logs.add_argument(
        "--log-format",
        choices=("console", "json"),
        default=None,
        help="console (readable) or json (one object a line); default: console on a terminal, else json",
    )
    logs.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="warning")
    logs.add_argument("--access-log", action="store_true", help="one line per inference request")
    logs.add_argument(
        "--trace",
        choices=("off", "console", "otlp"),
        default="off",
        help="OpenTelemetry spans (the otel extra): to stderr, or over OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT "
        "(needs opentelemetry-exporter-otlp-proto-http); W3C traceparent is always honoured",
    )
    serve.add_argument(
        "--status-page",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="serve the status page at / (default: on when bound to a loopback address such as 127.0.0.1)",
    )
    serve.add_argument(
        "--admin-token-file",
        type=Path,
        help="a file holding the admin token (e.g. a mounted secret; a regular file of at most 64 KiB); "
        "default: INFERKIT_ADMIN_TOKEN",
    )
    scaling = serve.add_argument_group("autoscaling (a model file; a config sets autoscale per model)")
    scaling.add_argument(
        "--max-replicas", type=_pool_size, help="turn the autoscaler on, growing the pool up to this many"
    )
    scaling.add_argument("--min-replicas", type=_pool_size, default=1, help="the fewest replicas (default 1)")
    scaling.add_argument(
        "--target-in-flight", type=_positive, default=8.0, help="requests in flight per replica to aim for (8)"
    )
    scaling.add_argument(
        "--downscale-delay-s", type=float, default=30.0, help="seconds fewer replicas must be wanted (default 30)"
    )
    serve.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (default auto: uvloop when installed)",
    )


def _serve(args: argparse.Namespace) -> int:
    """``inferkit serve``: load the models, serve until SIGTERM or SIGINT, print the final counters."""
    try:
        from inferkit.server.config import (  # noqa: PLC0415 (the server extra)
            ConfigError,
            ConnectionLimits,
            ModelLoader,
            check_admin_token,
            load,
            read_small_file,
            repository_control,
        )
        from inferkit.server.grpc import DEFAULT_LISTENERS  # noqa: PLC0415
        from inferkit.server.repository import Repository  # noqa: PLC0415
        from inferkit.server.run import InferenceServer, raise_open_file_limit  # noqa: PLC0415
    except ImportError as error:
        print(f"inferkit serve needs the server extra (pip install 'inferkit-serve[server]'): {error}", file=sys.stderr)
        return 2
    from inferkit.autoscale import AutoscaleConfig, Autoscaler  # noqa: PLC0415
    from inferkit.pool import PoolConfig  # noqa: PLC0415
    from inferkit.predictor import Predictor  # noqa: PLC0415
    from inferkit.server.logs import configure  # noqa: PLC0415

    configure(args.log_format or "auto", args.log_level)

    if (args.model is None) == (args.config is None):
        print("inferkit serve: give a model file or --config, not both", file=sys.stderr)
        return 2
    raise_open_file_limit()  # before models open files and threads (InferenceServer.run checks it again)
    host, port = "127.0.0.1", 8000
    grpc_port: int | None = 8001  # None: REST only
    limits, grace = ConnectionLimits(), 30.0
    opened: Repository | None = None
    try:
        token = None  # read first: the file wins over INFERKIT_ADMIN_TOKEN and the config's admin_token
        if args.admin_token_file is not None:
            token = read_small_file(args.admin_token_file, _MAX_TOKEN_FILE_BYTES).strip()
            check_admin_token(token, f"--admin-token-file {args.admin_token_file}")
        if args.config is not None:
            config = load(args.config, admin_token=token)
            repository, host, port, grpc_port = config.repository, config.host, config.port, config.grpc_port
            opened = repository
            limits, grace, control = config.limits, config.grace_s, config.control
        elif not args.model.is_file():
            print(f"inferkit serve: no model file at {args.model}", file=sys.stderr)
            return 2
        else:
            try:
                predictor = Predictor.from_onnx(
                    args.model,
                    batching=BatchConfig(
                        max_batch_size=args.max_batch_size,
                        max_delay_ms=args.max_delay_ms,
                        max_queue_size=args.max_queue_size,
                        max_queue_bytes=args.max_queue_bytes,
                    ),
                    pool=PoolConfig(
                        replicas=args.replicas,
                        execution_timeout=args.execution_timeout,
                        eject_after=args.eject_after,
                        cooldown=args.eject_cooldown,
                        max_cooldown=args.eject_max_cooldown,
                        max_ejected_fraction=args.max_ejected_fraction,
                    ),
                    name=args.name,
                    intra_op_threads=args.intra_op_threads,
                )
            except (ValueError, OSError):
                raise
            except Exception as error:  # ONNX Runtime's own (InvalidProtobuf, Fail): a file that is no model it reads
                msg = f"{args.model} does not load: {type(error).__name__}: {error}"
                raise ConfigError(msg) from error
            repository = opened = Repository({predictor.name: predictor})
            if args.max_replicas is not None:
                scaling = AutoscaleConfig(
                    min_replicas=args.min_replicas,
                    max_replicas=args.max_replicas,
                    target_in_flight=args.target_in_flight,
                    downscale_delay_s=args.downscale_delay_s,
                )
                Autoscaler(predictor, scaling).start()  # its thread ends once the predictor is closed
            spec = {
                "path": args.model.name,
                "max_batch_size": args.max_batch_size,
                "max_delay_ms": args.max_delay_ms,
                "max_queue_size": args.max_queue_size,
                "max_queue_bytes": args.max_queue_bytes,
                "replicas": args.replicas,
                "intra_op_threads": args.intra_op_threads,
                "execution_timeout": args.execution_timeout,
                "eject_after": args.eject_after,
                "cooldown": args.eject_cooldown,
                "max_cooldown": args.eject_max_cooldown,
                "max_ejected_fraction": args.max_ejected_fraction,
            }
            loader = ModelLoader(args.model.parent, {predictor.name: {k: v for k, v in spec.items() if v is not None}})
            control = repository_control(args.repository_control, None, loader, token)
        if args.repository_control and not control.enabled:
            control = attrs.evolve(control, enabled=True)  # checks that there is a token
        overrides = {name: getattr(args, name) for name in attrs.fields_dict(ConnectionLimits)}
        limits = attrs.evolve(limits, **{k: v for k, v in overrides.items() if v is not None})
    except (ConfigError, OSError, ValueError) as error:
        print(f"inferkit serve: {error}", file=sys.stderr)
        if opened is not None:  # the models loaded before a later setting was refused
            opened.close()
        return 2
    host = args.host or host
    port = args.port if args.port is not None else port
    if args.grpc_port is not None:
        grpc_port = None if args.grpc_port < 0 else args.grpc_port
    server = InferenceServer(
        repository,
        host=host,
        port=port,
        grpc_port=grpc_port,
        overload_status=args.overload_status,
        grace=args.grace if args.grace is not None else grace,
        limits=limits,
        grpc_listeners=args.grpc_listeners if args.grpc_listeners is not None else DEFAULT_LISTENERS,
        loop=args.loop,
        control=control,
        access_log=args.access_log,
        status_page=args.status_page,
    )
    return _run(server, args.trace)


def _exit(code: int) -> NoReturn:
    """End the process now that the shutdown is done: servers stopped, models closed, spans exported.

    A normal exit would first wait for every thread still running (the decode of a request cut
    off at the end of the grace period, a model call that never returns), then collect the
    garbage of that dead work (seconds over millions of decoded objects), and finalize the
    interpreter under a model call still in ONNX Runtime, which aborts the process. Only the
    command does this: a host embedding :func:`~inferkit.server.run.serve` owns its process.
    """
    logging.shutdown()  # flushes the handler configure() installed
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
                stream.flush()
    os._exit(code)


def _run(server: InferenceServer, trace: str) -> int:
    """Serve until SIGTERM or SIGINT with ``--trace``'s instrumentation; print the final counters and exit.

    Returns only when it could not serve (exit status 2); after serving it ends the process (:func:`_exit`).
    """
    from inferkit.server.run import run_loop  # noqa: PLC0415 (the server extra)

    repository = server.repository
    try:
        flush = _tracing(trace)
    except ImportError as error:
        print(f"inferkit serve: --trace {trace} needs {error.name}: {error}", file=sys.stderr)
        repository.close()
        return 2
    try:
        run_loop(server.run(handle_signals=True, on_start=_announce), server.loop)
    except OSError as error:  # a port in use: nothing listens, nothing ran
        print(f"inferkit serve: {error}", file=sys.stderr)
        repository.close()
        return 2
    finally:
        flush()
    for name, stats in repository.predictor_stats().items():
        failed = sum(stats.failed.values())
        print(
            f"inferkit: stopped {name}: accepted={stats.accepted} completed={stats.completed} "
            f"failed={failed} cancelled={stats.cancelled} in_flight={stats.in_flight}",
            file=sys.stderr,
            flush=True,
        )
    _exit(0)


def _tracing(kind: str) -> Callable[[], None]:
    """Instrument this process for ``--trace``; return what exports the last spans at exit."""
    if kind == "off":
        return lambda: None
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 (the otel extra)
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter  # noqa: PLC0415

    from inferkit import tracing  # noqa: PLC0415

    exporter: SpanExporter
    if kind == "console":
        exporter = ConsoleSpanExporter(out=sys.stderr)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        exporter = OTLPSpanExporter()  # endpoint, headers, timeout: the standard OTEL_EXPORTER_OTLP_* variables
    provider = TracerProvider(resource=Resource.create({"service.name": "inferkit"}))  # OTEL_SERVICE_NAME wins
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracing.instrument(provider)
    return provider.shutdown


def _announce(server: InferenceServer) -> None:
    from inferkit.server.sockets import endpoint  # noqa: PLC0415 (the server extra, loaded by now)

    gc.freeze()  # models are loaded: full collections no longer walk them (tens of ms each otherwise)
    grpc = f", grpc {endpoint(server.host, server.grpc_port)}" if server.grpc_port is not None else ""
    names = server.repository.names()
    rest = endpoint(server.host, server.port)  # an IPv6 address bracketed, as a URL takes it
    print(f"inferkit: serving {names} on http://{rest}{grpc}", file=sys.stderr, flush=True)
