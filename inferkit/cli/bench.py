"""``inferkit bench``: throughput and latency over a grid of settings (:mod:`inferkit.tune`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inferkit.cli.args import _float_list, _int_list, _positive


def _bench_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser(
        "bench",
        help="measure throughput and latency, and recommend settings under a p99 target",
        description=(
            "Load an ONNX model under a grid of batching settings, at each concurrency and request size, "
            "and print throughput, p50/p99 and the settings that give the most throughput under --p99-ms."
        ),
    )
    bench.add_argument("model", type=Path, help="an .onnx file")
    bench.add_argument("--concurrency", type=_int_list, default=(1, 8, 32), help="callers at once (default 1,8,32)")
    bench.add_argument("--rows", type=_int_list, default=(1, 8, 64), help="rows per request (default 1,8,64)")
    bench.add_argument("--p99-ms", type=_positive, default=10.0, help="the p99 latency target (default 10)")
    bench.add_argument("--max-batch-size", type=_int_list, default=None, help="to try (default 64,256)")
    bench.add_argument("--max-delay-ms", type=_float_list, default=None, help="to try (default 0.5,2)")
    bench.add_argument("--replicas", type=_int_list, default=None, help="to try (default 1,2)")
    bench.add_argument("--intra-op-threads", type=_int_list, default=None, help="to try (default: inferkit's)")
    bench.add_argument("--duration-s", type=_positive, default=0.25, help="seconds per measurement (default 0.25)")


def _bench(args: argparse.Namespace) -> int:
    from inferkit.tune import BenchConfig, bench, render  # noqa: PLC0415

    if not args.model.is_file():
        print(f"inferkit bench: no model file at {args.model}", file=sys.stderr)
        return 2
    options = {
        "max_batch_sizes": args.max_batch_size,
        "max_delays_ms": args.max_delay_ms,
        "replicas": args.replicas,
        "intra_op_threads": args.intra_op_threads,
    }
    try:
        config = BenchConfig(
            concurrency=args.concurrency,
            rows=args.rows,
            p99_ms=args.p99_ms,
            duration_s=args.duration_s,
            **{k: v for k, v in options.items() if v is not None},
        )
        report = bench(args.model, config)
    except ValueError as error:  # a bad option, or a model inferkit cannot serve (from_onnx says why)
        print(f"inferkit bench: {' '.join(str(error).split())}", file=sys.stderr)  # one line (ORT's run on)
        return 2
    print(render(report, config))
    return 0
