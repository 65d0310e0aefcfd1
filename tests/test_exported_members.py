"""Tests for inferkit's public surface: what ``import inferkit`` exports, documents and costs."""

from __future__ import annotations

import ast
import inspect
import itertools
import json
import subprocess
import sys
import textwrap
from types import ModuleType

import pytest

import inferkit

HEAVY = ("onnxruntime", "cupy", "torch", "grpc", "ray")


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter and return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def attribute_docstring(name: str) -> str | None:
    """The string literal right after ``name = ...`` in the module that defines it, if any."""
    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("inferkit") or getattr(module, name, None) is None:
            continue
        body = ast.parse(inspect.getsource(module)).body
        for stmt, after in itertools.pairwise(body):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
            assigned = any(isinstance(t, ast.Name) and t.id == name for t in targets)
            if assigned and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                return str(after.value.value)
    return None


class TestExportedMembers:
    def test_all_is_every_public_name(self) -> None:
        """``__all__`` lists exactly the public non-module names of the package, sorted."""
        public = sorted(
            name
            for name, value in vars(inferkit).items()
            if not name.startswith("_") and not isinstance(value, ModuleType)
        )
        assert inferkit.__all__ == public

    def test_every_name_resolves(self) -> None:
        """Every name in ``__all__`` is an attribute of the package."""
        missing = [name for name in inferkit.__all__ if not hasattr(inferkit, name)]
        assert missing == []

    @pytest.mark.parametrize("name", inferkit.__all__)
    def test_every_name_is_documented(self, name: str) -> None:
        """Every exported class and function has a docstring (an alias, one after its assignment)."""
        member = getattr(inferkit, name)
        # A class's or function's own docstring, not one inherited; an alias's from its source.
        doc = member.__doc__ if inspect.isclass(member) or inspect.isfunction(member) else attribute_docstring(name)
        assert doc, f"inferkit.{name} has no docstring"


class TestImportCost:
    def test_heavy_libraries_are_not_imported(self) -> None:
        """``import inferkit`` loads no runtime or framework: they load when a backend needs them."""
        out = run_python(
            f"""
            import json, sys
            import inferkit
            heavy = {HEAVY!r}
            print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
            """
        )
        assert json.loads(out) == []

    def test_root_logger_is_left_alone(self) -> None:
        """``import inferkit`` adds no handler to the root logger and changes no level."""
        out = run_python(
            """
            import json, logging
            root = logging.getLogger()
            before = (list(root.handlers), root.level)
            import inferkit
            own = [type(h).__name__ for h in logging.getLogger("inferkit").handlers]
            print(json.dumps([(list(root.handlers), root.level) == before, own]))
            """
        )
        unchanged, own = json.loads(out)
        assert unchanged
        assert own == ["NullHandler"]
