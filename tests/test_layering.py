"""The engine's layering, read from its import graph (function-level imports included):
no import cycles anywhere in ``engine/``; data never imports models (what both need lives in data,
below models); nothing under ``engine/parallel`` or ``engine/models`` imports the step, the trainer
or post-training; models never import parallel."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, "engine")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """engine module -> the engine modules it imports (anywhere in the file)."""
    mods = modules()

    def resolve(name: str):
        parts = name.split(".")
        while parts and ".".join(parts) not in mods:
            parts.pop()
        return ".".join(parts) or None

    graph = {}
    for mod, path in mods.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                for a in node.names:  # "from pkg import module" imports the module
                    deps.add(resolve(f"{base}.{a.name}") if f"{base}.{a.name}" in mods else resolve(base))
        deps.discard(None)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def under(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


FORBIDDEN = [  # (importer package, imported package or module, why)
    ("engine.data", "engine.models", "data is below models"),
    ("engine.data", "engine.parallel", "data is below parallel"),
    ("engine.models", "engine.parallel", "models are single-device; parallelism is applied from above"),
    ("engine.models", "engine.step", "models are below the runners"),
    ("engine.parallel", "engine.step", "parallel is below the runners"),
    ("engine.parallel", "engine.trainer", "parallel is below the trainer"),
    ("engine.models", "engine.trainer", "models are below the trainer"),
    ("engine.parallel", "engine.posttrain", "post-training builds on parallel, not the reverse"),
    ("engine.data", "engine.posttrain", "post-training builds on data, not the reverse"),
]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles: {found}"


def test_layers_import_only_downwards():
    bad = [f"{m} imports {d}: {why}" for m, deps in sorted(import_graph().items()) for d in sorted(deps)
           for src, dst, why in FORBIDDEN if under(m, src) and under(d, dst)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_what_it_checks():
    g = import_graph()
    assert "engine.data.batch" in g["engine.models.loss"]  # a module-level import
    assert "engine.parallel.runner" in g["engine.trainer"]  # a function-level import
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
