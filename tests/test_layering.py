"""The package's import graph: layers depend only downward, and no modules import each other in a circle.

Layers, bottom up: backbones (models, their sites and shapes) → control (the control interface, the method
registry, attach/merge/save/load) → methods (which register themselves into control) → subspace, inference,
theory, train (which may use one another, without cycles) → cli and experiments. ``tasks`` (data and templates)
uses nothing of the model side and sits beside methods. Every import counts, also one inside a function: a cycle
broken only by deferring an import is still a cycle in the design.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deltactl"

LAYER = {
    "backbones": 0, "shapes": 0,
    "control": 1,
    "methods": 2, "tasks": 2,
    "subspace": 3, "inference": 3, "theory": 3, "train": 3,
    "experiments": 4, "cli": 4,
}
ROOT_LAYER = 2  # ``import deltactl`` loads backbones, control and methods: a layer-2 dependency


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the deltactl modules it imports (``from a.b import c`` names a.b.c when that is a module)."""
    found = modules()

    def owner(name: str) -> str:
        while name not in found:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "deltactl"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against the importing package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] == "deltactl":
                    targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in found else owner(base) for a in node.names}
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return ROOT_LAYER if len(parts) == 1 else LAYER.get(parts[1])


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in modules() if layer(m) is None)
    assert not unplaced, f"place these modules in a layer of {__name__}.LAYER: {unplaced}"


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "modules importing each other in a circle: " + "; ".join(" ↔ ".join(c) for c in found)


def test_imports_point_down_the_layers():
    upward = [
        f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
        for m, targets in sorted(import_graph().items())
        if m != "deltactl"  # the package root gathers the public names of every layer
        for t in sorted(targets)
        if layer(t) > layer(m)
    ]
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def test_control_does_not_import_methods():
    graph = import_graph()
    wrong = sorted((m, t) for m, ts in graph.items() if m.startswith("deltactl.control") for t in ts
                   if t.startswith("deltactl.methods") or t == "deltactl")
    assert not wrong, f"the control interface reaches up into the methods: {wrong}"


# The checks themselves: each must fail on a graph with the fault it looks for.

def test_cycle_finder_sees_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_imports_inside_functions(tmp_path, monkeypatch):
    package = tmp_path / "deltactl"
    (package / "control").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "control" / "__init__.py").write_text("")
    (package / "control" / "attach.py").write_text("def f():\n    from deltactl.control.io import save\n")
    (package / "control" / "io.py").write_text("from .attach import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    graph = import_graph()
    assert graph["deltactl.control.attach"] == {"deltactl.control.io"}
    assert graph["deltactl.control.io"] == {"deltactl.control.attach"}
    assert cycles(graph) == [["deltactl.control.attach", "deltactl.control.io"]]


@pytest.mark.parametrize("importer, imported, upward", [
    ("deltactl.control.attach", "deltactl.methods.lora", True),
    ("deltactl.backbones.t5", "deltactl.control.sites", True),
    ("deltactl.control.attach", "deltactl", True),
    ("deltactl.methods.lora", "deltactl.control.registry", False),
    ("deltactl.theory.model", "deltactl", False),
])
def test_layer_rule_on_known_arrows(importer, imported, upward):
    assert (layer(imported) > layer(importer)) is upward
