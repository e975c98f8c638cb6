"""The direction of imports (docs/architecture.md), read from the source with ``ast``.

``ops`` <- ``cp`` <- ``layers`` <- ``runtime`` <- examples, and ``layers`` <- ``models``: ``ops`` and
``cp`` import nothing from ``layers``, ``runtime`` or Megatron; ``layers`` and ``models`` nothing
from ``runtime``; nothing in the package or in ``benchmarks`` imports ``tests``.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "megatron_dsv"


def imports_of(path: pathlib.Path):
    """Every module name a file imports (absolute, including function-level imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno


def _files(folder: pathlib.Path):
    return sorted(folder.rglob("*.py"))


FORBIDDEN = {
    "ops": ("megatron_dsv.cp", "megatron_dsv.layers", "megatron_dsv.runtime", "megatron_dsv.models", "megatron.", "megatron"),
    "cp": ("megatron_dsv.layers", "megatron_dsv.runtime", "megatron_dsv.models", "megatron.", "megatron"),
    "layers": ("megatron_dsv.runtime", "megatron_dsv.models"),
    "models": ("megatron_dsv.runtime",),
}


def _violates(name: str, banned) -> bool:
    return any(name == b or (b.endswith(".") and name.startswith(b)) or name.startswith(b + ".") for b in banned)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for path in _files(PKG / package)
        for name, line in imports_of(path)
        if _violates(name, FORBIDDEN[package])
    ]
    assert not bad, "\n".join(bad)


def test_nothing_imports_tests():
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for folder in (PKG, ROOT / "benchmarks", ROOT / "examples")
        for path in _files(folder)
        for name, line in imports_of(path)
        if name == "tests" or name.startswith("tests.")
    ]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path):
    """The reader finds function-level imports too (a checker that cannot fail is no test)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from megatron_dsv.runtime.controller import DSVController\n")
    assert [n for n, _ in imports_of(f)] == ["megatron_dsv.runtime.controller"]
    assert _violates("megatron_dsv.runtime.controller", FORBIDDEN["layers"])
    assert _violates("megatron.core", FORBIDDEN["cp"]) and not _violates("megatron_dsv.ops", FORBIDDEN["cp"])
