"""``python -m inferkit.cli``: the ``inferkit`` command."""

from inferkit.cli import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
