"""The ``inferkit`` command: ``inferkit serve model.onnx`` or ``inferkit serve --config models.toml``.

``inferkit canary status|promote|rollback|pause|resume --url URL MODEL`` steers a served canary
with the operator's token from ``INFERKIT_ADMIN_TOKEN``.

The package, one module per command: ``serve``, ``predict``, ``bench`` and ``canary``, each with
its options; ``args`` holds the option value types they share.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from inferkit.cli.bench import _bench, _bench_parser
from inferkit.cli.canary import _canary, _canary_parser
from inferkit.cli.predict import _predict, _predict_parser
from inferkit.cli.serve import _serve, _serve_parser

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferkit", description="Serve models with dynamic batching.")
    commands = parser.add_subparsers(dest="command", required=True)
    _serve_parser(commands)
    _predict_parser(commands)
    _bench_parser(commands)
    _canary_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    ``serve`` returns only when it cannot serve: once it has served and shut down, it ends the
    process itself (``os._exit``), so that no thread still running holds up the exit.
    """
    args = _parser().parse_args(argv)
    return _COMMANDS[args.command](args)


_COMMANDS = {"serve": _serve, "predict": _predict, "bench": _bench, "canary": _canary}
