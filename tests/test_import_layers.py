"""Imports flow one way: ops <- modeling <- (data, evaluation, inference API) <- training <- CLIs.

Walks every module of the package (and the top-level train.py / eval.py) with `ast`,
including imports inside functions, and fails on an import of a higher layer or on an
import cycle between modules.
"""

from __future__ import annotations

import ast
import pathlib

from conftest import REPO

PACKAGE = "frcnn_jax"

# Layer of each module, by longest matching name prefix. Lower layers never import higher ones.
LAYERS = {
    "frcnn_jax.ops": 0,
    "frcnn_jax.modeling": 1,
    # the library: data, evaluation and the inference API (Detector, serving export, formats)
    "frcnn_jax.data": 2,
    "frcnn_jax.evaluation": 2,
    "frcnn_jax.detector": 2,
    "frcnn_jax.export": 2,
    "frcnn_jax.model_checkpoint": 2,
    "frcnn_jax.run_checkpoint": 2,
    "frcnn_jax.categories": 2,
    "frcnn_jax.visualize": 2,
    "frcnn_jax.compilation_cache": 2,
    "frcnn_jax.testing": 2,
    "frcnn_jax.coco_format": 2,  # pure-Python helpers shared by data, evaluation and training
    "frcnn_jax.host_boxes": 2,
    "frcnn_jax.host_masks": 2,
    "frcnn_jax.io_utils": 2,
    "frcnn_jax.training": 3,
    # command-line tools
    "frcnn_jax.convert": 4,
    "frcnn_jax.predict": 4,
    "frcnn_jax.export.__main__": 4,
    "frcnn_jax.config_cli": 4,
    "train": 4,
    "eval": 4,
    "frcnn_jax": 4,  # the package's own __init__ (only; every module needs an entry above)
}
LAYER_NAMES = ["ops", "modeling", "data/evaluation/inference API", "training", "CLIs"]


def _module_files() -> dict[str, pathlib.Path]:
    files = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    for script in ("train", "eval"):
        files[script] = REPO / f"{script}.py"
    return files


def _imports(name: str, path: pathlib.Path, modules: set[str]) -> set[str]:
    """Package modules that module `name` imports (anywhere in the file)."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` where c is an attribute
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _layer(name: str) -> int:
    if name == PACKAGE:
        return LAYERS[PACKAGE]
    matches = [p for p in LAYERS if p != PACKAGE and (name == p or name.startswith(p + "."))]
    assert matches, f"module {name} has no layer: add it to LAYERS in {__file__}"
    return LAYERS[max(matches, key=len)]


def _graph() -> dict[str, set[str]]:
    files = _module_files()
    modules = set(files)
    return {name: _imports(name, path, modules) for name, path in files.items()}


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{src} ({LAYER_NAMES[_layer(src)]}) imports {dst} ({LAYER_NAMES[_layer(dst)]})"
        for src, dsts in sorted(graph.items())
        for dst in sorted(dsts)
        if _layer(dst) > _layer(src)
    ]


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_every_module_has_a_layer():
    for name in _graph():
        _layer(name)


def test_no_module_imports_a_higher_layer():
    upward = _upward(_graph())
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_catch_function_level_upward_imports_and_cycles(tmp_path):
    """Negative controls: the walker reads imports inside functions, relative ones and
    `from pkg import module`; the checks flag an upward edge and a cycle."""
    graph = _graph()
    assert "frcnn_jax.model_checkpoint" in graph["frcnn_jax.export.__main__"]  # inside main()
    assert "frcnn_jax.training.loop" in graph["train"]
    modules = set(graph) | {"frcnn_jax.ops.fake"}
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from ..training import loop\n    from frcnn_jax import detector\n")
    edges = _imports("frcnn_jax.ops.fake", fake, modules)
    assert edges == {"frcnn_jax.training.loop", "frcnn_jax.detector"}
    assert len(_upward({"frcnn_jax.ops.fake": edges})) == 2
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
