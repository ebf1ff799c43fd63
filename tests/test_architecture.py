"""The layout keeps its promises: layers import one way, no cycles, no click off the CLI, small modules.

ARCHITECTURE.md describes these rules; this test is what keeps that page true.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "dslaunch"
MAX_LINES = 400

# What each subpackage may import from dslaunch (besides itself). `wire` and `errors` are shared.
ALLOWED = {
    "wire": set(),
    "node": {"wire"},
    "transport": {"wire"},
    "launch": {"wire", "transport"},
    "engine": {"wire"},
    "serving": {"wire", "engine"},
    "rank": {"wire", "serving", "engine"},
    "client": {"wire", "transport"},
    "cli": {"wire", "transport", "launch", "client", "engine"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = p
    return out


def _imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dslaunch"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dslaunch"))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_one_way() -> None:
    mods = _modules()
    bad = []
    for name, path in mods.items():
        layer = _layer(name)
        if layer not in ALLOWED:
            continue
        for imp in _imports(path, top_level_only=False):
            if imp not in mods:
                continue  # `from pkg import name` of a non-module name
            target = _layer(imp)
            if target and target != layer and target not in ALLOWED[layer] | {"errors", ""}:
                bad.append(f"{name} imports {imp}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles() -> None:
    mods = _modules()
    graph = {n: {i for i in _imports(p, top_level_only=True) if i in mods and i != n} for n, p in mods.items()}
    # a package's __init__ importing its own submodules (the CLI registering commands) is not a cycle
    graph = {n: {i for i in deps if not i.startswith(n + ".")} for n, deps in graph.items()}
    seen: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        seen[n] = 1
        for m in graph[n]:
            if seen.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(m) :], m]))
            if m not in seen:
                visit(m, [*stack, m])
        seen[n] = 2

    for n in graph:
        if n not in seen:
            visit(n, [n])


def test_node_and_rank_processes_never_import_click() -> None:
    code = (
        "import sys\n"
        "import dslaunch.node.ctl, dslaunch.rank.worker, dslaunch.rank.session, dslaunch.serving.front\n"
        "import dslaunch.engine.loader, dslaunch.engine.causal, dslaunch.client\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('click', 'rich', 'paramiko')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_modules_stay_small() -> None:
    big = {n: len(p.read_text().splitlines()) for n, p in _modules().items()}
    assert not {n: k for n, k in big.items() if k > MAX_LINES}
