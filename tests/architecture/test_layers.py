"""The package's layers: every import points down, no module imports itself back, imports sit at module top.

The import graph is read from the source (ast), not by importing: every `import deltafleet...` and
`from deltafleet... import ...` anywhere in a module, resolved to the module it names (a submodule when the name
is one, else the package's __init__). README's Architecture section draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "deltafleet"

# Bottom first. A module may import its own stage and the stages listed before it, never one after it.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("dtypes", "registry"),
    ("store",),
    ("native",),  # C kernels and their loader: no model knowledge
    ("tasks",),  # tenant tasks and the text sources: data, no model code (quant calibrates on its text)
    ("models",),
    ("adapters",),
    ("quant",),
    ("train",),
    ("compress",),
    ("serve",),
    ("eval",),
    ("bench",),  # benchmarks and the demo: drive the stages, print figures
    ("cli",),  # typer commands only
]
RANK = {stage: i for i, names in enumerate(LAYERS) for stage in names}
# Stages whose command functions import the stages lazily: importing them costs ~1.9 s (torch 1.6 s), which
# `deltafleet --help`, option errors and the torch-free HTTP layer must not pay.
LAZY_OK = ("cli", "bench")
# Function-level imports elsewhere, each with its reason.
LAZY_ALLOWED: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def _resolve(base: str, names: list[str]) -> list[str]:
    out = []
    for n in names:
        sub = f"{base}.{n}"
        out.append(sub if sub in MODULES else base)
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(module: str) -> list[tuple[str, int, bool, bool]]:
    """(imported module, line, inside a function, type-checking only) for every deltafleet import of `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: list[tuple[str, int, bool, bool]] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            tc = type_only or (isinstance(child, ast.If) and _type_checking(child))
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1])
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module or ""
                if target.split(".")[0] == "deltafleet":
                    for t in _resolve(target, [a.name for a in child.names]):
                        found.append((t, child.lineno, fn, tc))
            elif isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "deltafleet":
                        found.append((a.name, child.lineno, fn, tc))
            visit(child, fn, tc)

    visit(tree, False, False)
    return found


def test_every_stage_is_placed():
    stages = {stage(m) for m in MODULES} - {"<root>"}
    assert stages <= set(RANK), f"stages missing from LAYERS: {sorted(stages - set(RANK))}"


def test_imports_point_down():
    upward = []
    for m in MODULES:
        if stage(m) == "<root>":
            continue
        for target, line, _, _ in imports(m):
            if stage(target) != "<root>" and RANK[stage(target)] > RANK[stage(m)]:
                upward.append(f"{MODULES[m].relative_to(SRC.parent)}:{line}: {stage(m)} imports {target}")
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_no_import_circles():
    """Strongly connected components of the runtime import graph (type-checking-only imports excluded)."""
    graph = {m: sorted({t for t, _, _, tc in imports(m) if not tc and t in MODULES and t != m}) for m in MODULES}
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def strongconnect(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_imports_at_module_top():
    lazy = []
    for m in MODULES:
        if stage(m) in LAZY_OK:
            continue
        for target, line, in_function, _ in imports(m):
            if in_function and (m, target) not in LAZY_ALLOWED:
                lazy.append(f"{MODULES[m].relative_to(SRC.parent)}:{line}: {target}")
    assert not lazy, "deltafleet imports inside functions (move to the top, or allow-list with a reason):\n" + \
        "\n".join(lazy)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if stage(m) in ("serve",) and ".http" in m))
def test_http_layer_names_no_torch(module):
    """The HTTP package translates; only engine_gateway (the bridge to the engine) may import torch."""
    if module.endswith("engine_gateway"):
        return
    tree = ast.parse(MODULES[module].read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" not in names
