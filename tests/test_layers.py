"""The layers stay apart: inference never imports training, and no two modules import each other.

Imports are read from the source (module level and inside functions alike, since a lazy import
is still a dependency), so the test needs no import side effects and sees every path.
"""

from __future__ import annotations

import ast
from pathlib import Path

import itmatch

ROOT = Path(itmatch.__file__).resolve().parent
# What loads a model, scores it, searches with it or reads data: none of it may need training/.
INFERENCE = ("itmatch.evaluation", "itmatch.similarity", "itmatch.encoders", "itmatch.data", "itmatch.models",
             "itmatch.retrieval", "itmatch.checkpoint", "itmatch.device", "itmatch.files", "itmatch.config",
             "itmatch.errors")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """itmatch modules that `path` imports anywhere in its body (`from a import b` counts a.b
    where b is a module)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in modules and m != me}


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` depends on, with the module that first imported it (to name the path)."""
    seen, stack = {start: ""}, [start]
    while stack:
        node = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen[nxt] = node
                stack.append(nxt)
    return seen


def path_to(parents: dict[str, str], target: str) -> list[str]:
    chain = [target]
    while parents[chain[-1]]:
        chain.append(parents[chain[-1]])
    return chain[::-1]


def test_the_graph_sees_known_imports():
    graph = import_graph()
    assert "itmatch.evaluation.scores" in graph["itmatch.evaluation.ranking"]
    assert "itmatch.training.loop" in graph["itmatch.training.commands"]  # a lazy import inside a function


def test_inference_modules_never_import_training():
    graph = import_graph()
    offenders = []
    for name in graph:
        if not name.startswith(INFERENCE):
            continue
        parents = reachable(graph, name)
        bad = sorted(m for m in parents if m.startswith("itmatch.training"))
        if bad:
            offenders.append(" -> ".join(path_to(parents, bad[0])))
    assert not offenders, "inference reaches training/:\n" + "\n".join(offenders)


def test_no_import_cycles():
    graph = import_graph()
    # package __init__ files that only hold a docstring are not part of any cycle worth reporting
    cycles = []
    index, low, on_stack, stack, counter = {}, {}, set(), [], [0]

    def strongconnect(v):  # Tarjan's strongly connected components
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

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    assert not cycles, f"import cycles: {cycles}"
