"""The package's import structure (issue 14): no import circle between modules, and the layering the code
promises: library jobs never import the command line, kernels never import the jobs built on them, library
pruning never imports evaluation (its caller passes the accuracy metric in) and evaluation never imports
pruning. Imports inside functions count too: they are the ones that hide circles."""
from __future__ import annotations

import ast
import os

import megatron_minitron

ROOT = os.path.dirname(megatron_minitron.__file__)
PACKAGE = "megatron_minitron"


def _modules() -> dict:
    """module name -> set of megatron_minitron modules it imports (anywhere in the file)."""
    names = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                names[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    graph = {}
    for mod, path in names.items():
        is_pkg = path.endswith("__init__.py")
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith(PACKAGE):
                    prefix = node.module
                else:
                    continue
                for alias in node.names:  # `from . import x` may name a submodule
                    sub = f"{prefix}.{alias.name}"
                    targets.add(sub if sub in names else prefix)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith(PACKAGE))
        graph[mod] = {t for t in targets if t in names and t != mod}
    return graph


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_of(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_checker_sees_imports_and_circles():
    graph = _modules()
    assert "megatron_minitron.prune.job" in graph["megatron_minitron.prune.cli"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle():
    # package __init__ files re-export their package's modules; a submodule importing its own package's
    # __init__ is the usual Python shape, not a circle between concerns
    graph = {m: {t for t in ts if not (m.startswith(t + ".") and t.count(".") >= 1)}
             for m, ts in _modules().items()}
    assert _cycles(graph) == []


def test_layering():
    graph = _modules()
    bad = []
    for mod, targets in graph.items():
        pkg = _package_of(mod)
        for t in targets:
            tpkg = _package_of(t)
            if tpkg in ("cli", "demo") and pkg not in ("cli", "demo", "") and not mod.endswith(".cli"):
                bad.append(f"{mod} -> {t} (library code importing the command line)")
            if pkg not in ("cli", "") and tpkg == "cli" and t == "megatron_minitron.cli":
                bad.append(f"{mod} -> {t} (only the entry point assembles the subcommands)")
            if pkg == "kernels" and tpkg not in ("kernels", "runtime", "errors"):
                bad.append(f"{mod} -> {t} (kernels sit below the jobs)")
            if pkg == "prune" and tpkg == "eval" and mod != "megatron_minitron.prune.cli":
                bad.append(f"{mod} -> {t} (library pruning takes depth metrics from its caller)")
            if pkg == "eval" and tpkg in ("prune", "search", "distill", "train"):
                bad.append(f"{mod} -> {t} (evaluation sits below the jobs that use it)")
            if pkg == "model" and t not in ("megatron_minitron.config",) and tpkg not in ("model", "runtime",
                                                                                          "kernels"):
                bad.append(f"{mod} -> {t} (the model is built from config, the runtime and kernels alone)")
            if mod == "megatron_minitron.model.params" or mod == "megatron_minitron.runtime.files":
                bad.append(f"{mod} -> {t} (a leaf: it imports nothing of the package)")
    assert bad == []
