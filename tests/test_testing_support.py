"""Shared test/benchmark support lives in frcnn_jax.testing: benchmarks never import tests/, torch stays optional."""

from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
TORCH_ALLOWED = {"frcnn_jax/convert.py"}  # reads .pth files; frcnn_jax/testing/ is the other place


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_benchmarks_do_not_import_tests():
    test_modules = {p.stem for p in (REPO / "tests").glob("*.py")}
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        text = path.read_text()
        assert '"tests"' not in text and "'tests'" not in text, f"{path.name} puts tests/ on sys.path"
        top = {name.partition(".")[0] for name in _imports(path)}
        assert not top & (test_modules | {"tests"}), f"{path.name} imports {sorted(top & test_modules)} from tests/"


def test_torch_is_imported_only_by_the_testing_package_and_the_converter():
    for path in sorted((REPO / "frcnn_jax").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("frcnn_jax/testing/") or rel in TORCH_ALLOWED:
            continue
        torch = {name for name in _imports(path) if name.partition(".")[0] in ("torch", "torchvision")}
        assert not torch, f"{rel} imports {sorted(torch)} (the torch extra is optional)"
