"""Tests that every example script runs to completion as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
TIMEOUT_S = 300


def run_example(script: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` from the examples folder with this interpreter."""
    return subprocess.run(
        [sys.executable, script.name],
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


class TestExamples:
    def test_there_are_examples(self) -> None:
        """The examples folder holds the quickstart (so the run below is not vacuous)."""
        assert "quickstart.py" in [p.name for p in SCRIPTS]

    @pytest.mark.slow
    @pytest.mark.timeout(TIMEOUT_S + 30)
    @pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
    def test_example_runs(self, script: Path) -> None:
        """The example exits with status 0; the quickstart reports its accuracy check."""
        proc = run_example(script)
        assert proc.returncode == 0, f"{script.name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        if script.name == "quickstart.py":
            assert "accuracy" in proc.stdout
