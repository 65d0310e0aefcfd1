"""The ``inferkit`` command: ``inferkit serve model.onnx`` or ``inferkit serve --config models.toml``."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inferkit.server.run import InferenceServer

__all__ = ["main"]


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        msg = f"must be >= 1, got {value}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferkit", description="Serve models with dynamic batching.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve models over REST and gRPC (KServe Open Inference Protocol v2)",
        description="Serve one ONNX model, or the models of a TOML config, until SIGTERM or SIGINT.",
    )
    serve.add_argument("model", nargs="?", type=Path, help="an .onnx file (served under its stem)")
    serve.add_argument("--config", type=Path, help="a TOML file with several models, versions and splits")
    serve.add_argument("--name", help="the model's name (default: the file's stem)")
    serve.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    serve.add_argument("--grpc-port", type=int, default=None, help="gRPC port (default 8001; -1 disables gRPC)")
    serve.add_argument("--max-batch-size", type=int, default=64)
    serve.add_argument("--max-delay-ms", type=float, default=2.0)
    serve.add_argument("--max-queue-size", type=int, default=4096)
    serve.add_argument("--replicas", type=int, default=1)
    serve.add_argument("--overload-status", type=int, choices=(429, 503), default=503)
    serve.add_argument("--grace", type=float, default=30.0, help="seconds to finish in-flight requests on shutdown")
    serve.add_argument(
        "--grpc-listeners",
        type=_at_least_one,
        default=None,
        help="gRPC servers sharing the port, each accepting calls (default 8 on Linux, else 1)",
    )
    serve.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="event loop (default auto: uvloop when installed)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        from inferkit.server.config import ConfigError, load  # noqa: PLC0415 (the server extra)
        from inferkit.server.grpc import DEFAULT_LISTENERS  # noqa: PLC0415
        from inferkit.server.repository import Repository  # noqa: PLC0415
        from inferkit.server.run import InferenceServer, run_loop  # noqa: PLC0415
    except ImportError as error:
        print(f"inferkit serve needs the server extra (pip install 'inferkit[server]'): {error}", file=sys.stderr)
        return 2
    from inferkit.predictor import Predictor  # noqa: PLC0415

    if (args.model is None) == (args.config is None):
        print("inferkit serve: give a model file or --config, not both", file=sys.stderr)
        return 2
    host, port = "127.0.0.1", 8000
    grpc_port: int | None = 8001  # None: REST only
    try:
        if args.config is not None:
            config = load(args.config)
            repository, host, port, grpc_port = config.repository, config.host, config.port, config.grpc_port
        elif not args.model.is_file():
            print(f"inferkit serve: no model file at {args.model}", file=sys.stderr)
            return 2
        else:
            predictor = Predictor.from_onnx(
                args.model,
                max_batch_size=args.max_batch_size,
                max_delay_ms=args.max_delay_ms,
                max_queue_size=args.max_queue_size,
                replicas=args.replicas,
                name=args.name,
            )
            repository = Repository({predictor.name: predictor})
    except (ConfigError, OSError, ValueError) as error:
        print(f"inferkit serve: {error}", file=sys.stderr)
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
        grace=args.grace,
        grpc_listeners=args.grpc_listeners if args.grpc_listeners is not None else DEFAULT_LISTENERS,
        loop=args.loop,
    )
    run_loop(server.run(handle_signals=True, on_start=_announce), server.loop)
    for name, stats in repository.predictor_stats().items():
        failed = sum(stats.failed.values())
        print(
            f"inferkit: stopped {name}: accepted={stats.accepted} completed={stats.completed} "
            f"failed={failed} cancelled={stats.cancelled} in_flight={stats.in_flight}",
            file=sys.stderr,
            flush=True,
        )
    return 0


def _announce(server: InferenceServer) -> None:
    gc.freeze()  # models are loaded: full collections no longer walk them (tens of ms each otherwise)
    grpc = f", grpc {server.host}:{server.grpc_port}" if server.grpc_port is not None else ""
    names = server.repository.names()
    print(f"inferkit: serving {names} on http://{server.host}:{server.port}{grpc}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
