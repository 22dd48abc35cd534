"""The package's layers, read from its import statements (parsed, not executed): no cycle, nothing imports the
package root, each module imports only its own layer and those below, and the numerical core needs no framework.

Every import counts, those inside functions included (a lazy import is still a dependency), except those under
``if TYPE_CHECKING:``, which only name a type for the annotations and never run.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = "hf_sbp"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE

LAYERS = [
    ("core", ["hf_sbp._utils", "hf_sbp._version", "hf_sbp.core"]),
    (
        "building blocks",
        ["hf_sbp.head", "hf_sbp.labels", "hf_sbp.example_cache", "hf_sbp.subset_loss", "hf_sbp.selection_metrics"],
    ),
    ("strategies", ["hf_sbp.strategies"]),
    (
        "trainer",
        [
            "hf_sbp.config",
            "hf_sbp.checkpoint_state",
            "hf_sbp.epoch_pruning",
            "hf_sbp.irreducible_loss",
            "hf_sbp.setup_checks",
            "hf_sbp.batch_selection",
            "hf_sbp.card_sections",
            "hf_sbp.model_card",
            "hf_sbp.trainer",
        ],
    ),
    ("example task", ["hf_sbp.glue"]),
    ("benchmark", ["hf_sbp.benchmark"]),
]
"""Bottom to top; a name stands for the module and everything under it."""

FRAMEWORKS = ("transformers", "accelerate", "datasets", "evaluate", "huggingface_hub", "peft")
"""What the numerical core never imports."""


def _module_names() -> dict[str, pathlib.Path]:
    names = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(tree: ast.AST):
    """Every import statement of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if not _is_type_checking_block(child):
                stack.append(child)


def _package_module(name: str) -> str:
    """The longest prefix of the dotted ``name`` that is a module of the package."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """``(modules of the package, top-level names of other packages)`` that ``module`` imports."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    inside, outside = set(), set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from package import name` imports the submodule when there is one, else the package itself.
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                       for alias in node.names]  # fmt: skip
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                inside.add(_package_module(target))
            else:
                outside.add(target.split(".")[0])
    inside.discard(module)
    return inside, outside


GRAPH = {module: imports_of(module)[0] for module in MODULES}


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of ``module`` (its longest listed prefix); the root counts as the trainer's."""
    if module == PACKAGE:
        return next(i for i, (name, _) in enumerate(LAYERS) if name == "trainer")
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS")
    return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set(), "g": {"g"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["d", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_resolves_relative_and_lazy_imports(tmp_path):
    assert "hf_sbp.core.selection" in GRAPH["hf_sbp.strategies.base"]  # from ..core.selection import ...
    assert "hf_sbp.trainer" not in GRAPH["hf_sbp.setup_checks"]  # under TYPE_CHECKING only
    assert "hf_sbp.glue.metric" in GRAPH["hf_sbp.glue.run_glue"]  # imported inside a function


def test_no_import_cycle():
    assert cycles(GRAPH) == []


def test_nothing_imports_the_package_root():
    importers = sorted(module for module, targets in GRAPH.items() if PACKAGE in targets)
    assert importers == [], f"these import {PACKAGE} itself; import the module that defines the name instead"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    mine = layer_of(module)
    upward = sorted(target for target in GRAPH[module] if layer_of(target) > mine and target != PACKAGE)
    assert upward == [], (
        f"{module} (layer {LAYERS[mine][0]!r}) imports {upward}, of a layer above it: "
        f"{[LAYERS[layer_of(target)][0] for target in upward]}"
    )


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer_of(m) == 0))
def test_the_core_needs_no_framework(module):
    frameworks = sorted(imports_of(module)[1] & set(FRAMEWORKS))
    assert frameworks == [], f"{module} imports {frameworks}; the core is plain functions on tensors"
