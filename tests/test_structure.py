"""The package's shape: modules a reader takes in at one sitting, classes with one job each.

The rule (issue 11): no module over ~400 lines, no class with more than ~12 attributes. Frozen
``attrs`` classes are values, not state, and two mutable records are exempt by name below.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import inferkit

PACKAGE = Path(__file__).resolve().parent.parent / "inferkit"
MAX_LINES = 420  # ~400
MAX_ATTRIBUTES = 12
RECORDS = {
    "Request": "one request's fields, slotted for the hot path",
    "Replica": "one replica's health and counters, mutated under the batcher's lock",
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _frozen(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        call = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = ast.unparse(call)
        if name in {"attrs.frozen", "attr.frozen"}:
            return True
        if isinstance(decorator, ast.Call) and any(
            k.arg == "frozen" and isinstance(k.value, ast.Constant) and k.value.value for k in decorator.keywords
        ):
            return True
    return False


def _attrs_class(node: ast.ClassDef) -> bool:
    return any(ast.unparse(d).startswith(("attrs.", "attr.")) for d in node.decorator_list)


def _own_attributes(node: ast.ClassDef) -> set[str]:
    """An ``attrs`` class's fields, ``__slots__``, and every ``self.x = ...`` in the methods.

    A plain class's annotations in its body are class constants or a mixin's word for what its
    host provides: not counted there.
    """
    names: set[str] = set()
    fields = _attrs_class(node)
    for item in node.body:
        if fields and isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
        elif isinstance(item, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__slots__" for t in item.targets
        ):
            if isinstance(item.value, ast.Tuple | ast.List):
                names |= {e.value for e in item.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        elif isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(item):
                targets = (
                    sub.targets
                    if isinstance(sub, ast.Assign)
                    else [sub.target]
                    if isinstance(sub, ast.AnnAssign | ast.AugAssign)
                    else []
                )
                for target in targets:
                    if (
                        isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name)
                        and target.value.id == "self"
                    ):
                        names.add(target.attr)
    return {n for n in names if not n.startswith("__")}


def _classes() -> dict[str, list[tuple[Path, ast.ClassDef]]]:
    found: dict[str, list[tuple[Path, ast.ClassDef]]] = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, []).append((path, node))
    return found


def _attributes(node: ast.ClassDef, classes: dict[str, list[tuple[Path, ast.ClassDef]]], seen: set[str]) -> set[str]:
    """A class's attributes with those of the package's own classes it is built from (its mixins)."""
    names = _own_attributes(node)
    for base in node.bases:
        name = ast.unparse(base).split(".")[-1]
        if name in classes and name not in seen and len(classes[name]) == 1:
            seen.add(name)
            names |= _attributes(classes[name][0][1], classes, seen)
    return names


def test_no_module_is_over_about_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE)): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_class_keeps_more_than_about_12_attributes() -> None:
    classes = _classes()
    wide = {}
    for name, defs in classes.items():
        for path, node in defs:
            if name in RECORDS or _frozen(node):
                continue
            attributes = _attributes(node, classes, {name})
            if len(attributes) > MAX_ATTRIBUTES:
                wide[f"{path.relative_to(PACKAGE)}:{name}"] = sorted(attributes)
    assert wide == {}


def test_the_measure_sees_mixins_slots_and_fields() -> None:
    # The rule would pass vacuously if the walk missed attributes.
    source = """
class Part:
    host: int  # what the host provides: not counted here
    def f(self):
        self.a = self.b = 1
class Host(Part):
    __slots__ = ("c",)
    def __init__(self):
        self.d: int = 0
        self.e += 1
@attrs.define
class Record:
    f: int
    g: int = 0
"""
    parsed = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)]
    classes = {n.name: [(PACKAGE, n)] for n in parsed}
    part, host, record = parsed
    assert _attributes(host, classes, {"Host"}) == {"a", "b", "c", "d", "e"}
    assert _own_attributes(part) == {"a", "b"}
    assert _own_attributes(record) == {"f", "g"}
    ((_, request),) = _classes()["Request"]
    assert len(_own_attributes(request)) > MAX_ATTRIBUTES  # why it is listed as a record


OUTSIDE_THE_TREE = {
    "inferkit.backends.base.ReplicaFault": "a backend raises it to inferkit, which retries elsewhere",
    "inferkit.backends.device.DeviceLost": "a ReplicaFault",
    "inferkit.server.repository.Failed": "carries an error and its arm between the server's own parts",
    "inferkit.cli.predict._Terminated": "the CLI's SIGTERM, turned into its exit status",
}


def test_every_error_inferkit_defines_is_in_the_inferkit_errors_tree() -> None:
    """``except inferkit.InferkitError`` catches whatever inferkit raises to a caller (issue 11)."""
    for module in pkgutil.walk_packages(inferkit.__path__, "inferkit."):
        try:
            importlib.import_module(module.name)
        except ImportError:  # an optional extra this machine lacks (cupy, ray, torch)
            continue
    found = set()
    pending: list[type[BaseException]] = [BaseException]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("inferkit") and not issubclass(cls, Warning):
            found.add(cls)
    outside = {f"{c.__module__}.{c.__qualname__}" for c in found if not issubclass(c, inferkit.InferkitError)}
    assert outside == set(OUTSIDE_THE_TREE)
    assert len(found) > 20  # the walk saw the tree itself


def test_the_tree_drawn_in_the_docs_lists_every_error() -> None:
    """``inferkit.errors``' docstring and docs/errors.md draw the same tree, every error in it."""
    errors = inferkit.errors
    drawn = (PACKAGE.parent / "docs" / "errors.md").read_text().split("```")[1]
    for tree in (drawn, errors.__doc__ or ""):
        names = {line.split("── ")[1].split()[0] for line in tree.splitlines() if "── " in line}
        assert names == set(errors.__all__) - {"InferkitError"}
