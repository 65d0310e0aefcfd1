"""``inferkit predict``: a model over a file of rows, resumable (:func:`inferkit.bulk.run_job`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inferkit.cli.args import _at_least_one


def _predict_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    predict = commands.add_parser(
        "predict",
        help="run a model over a file of rows (bulk, offline), resumable",
        description=(
            "Run an ONNX model over every row of a .npy, .parquet or .csv file and write the results "
            "to a .npy or .parquet file. Interrupted (SIGINT, SIGTERM, a crash), the same command resumes "
            "after the last finished chunk; the output only appears once it is whole. Exit status: 0 done, "
            "2 refused before or while reading (bad input or settings, another job on the output), "
            "1 the model failed while running (run again to resume), 130/143 interrupted."
        ),
    )
    predict.add_argument("model", type=Path, help="an .onnx file")
    predict.add_argument("--input", type=Path, required=True, help="a .npy, .parquet or .csv file")
    predict.add_argument("--output", type=Path, required=True, help="a .npy or .parquet file")
    predict.add_argument("--batch-size", type=_at_least_one, default=256, help="rows per request (default 256)")
    predict.add_argument(
        "--chunk-rows", type=_at_least_one, default=65536, help="rows per resumable chunk (default 65536)"
    )
    predict.add_argument("--in-flight", type=_at_least_one, default=8, help="batches queued or running at once")
    predict.add_argument("--replicas", type=_at_least_one, default=1)
    predict.add_argument("--max-batch-size", type=_at_least_one, default=None, help="default: --batch-size")
    predict.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress line (default: when stderr is a terminal)",
    )


class _Terminated(Exception):
    """SIGTERM, raised in the main thread so the job stops between chunks like on Ctrl-C."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise _Terminated


def _predict(args: argparse.Namespace) -> int:
    import signal  # noqa: PLC0415

    from inferkit.bulk import JobLocked, JobMismatch, run_job  # noqa: PLC0415
    from inferkit.errors import InferkitError, InvalidInput  # noqa: PLC0415
    from inferkit.predictor import Predictor  # noqa: PLC0415

    for what, path in (("model", args.model), ("input", args.input)):
        if not path.is_file():
            print(f"inferkit predict: no {what} file at {path}", file=sys.stderr)
            return 2
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    signal.signal(signal.SIGTERM, _on_sigterm)  # the CLI owns its process; the library never does this
    try:
        with Predictor.from_onnx(
            args.model, max_batch_size=args.max_batch_size or args.batch_size, replicas=args.replicas
        ) as predictor:
            rows = run_job(
                predictor,
                args.input,
                args.output,
                batch_size=args.batch_size,
                chunk_rows=args.chunk_rows,
                in_flight=args.in_flight,
                progress=progress,
                model=args.model,
            )
    except (KeyboardInterrupt, _Terminated) as stop:
        print(
            "inferkit predict: interrupted; run the same command again to resume after the last finished chunk",
            file=sys.stderr,
        )
        return 130 if isinstance(stop, KeyboardInterrupt) else 143
    except (JobMismatch, JobLocked, InvalidInput, ImportError, OSError, ValueError) as error:
        print(f"inferkit predict: {error}", file=sys.stderr)
        return 2
    except InferkitError as error:  # ModelError, NoHealthyReplica...: the finished chunks stay, to resume
        print(f"inferkit predict: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(f"inferkit predict: wrote {rows} rows to {args.output}", file=sys.stderr)
    return 0
