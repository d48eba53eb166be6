"""Imports run one way: config at the bottom, the model free of communication, no cycle anywhere.

Every module of the package (the folders installed under ``hai.``) is parsed, and every import it makes, at module
level or inside a function, is an edge; importing ``a.b.c`` also runs the ``__init__`` of ``a.b`` (unless the
importer is inside it). A cycle among these edges fails the test, naming the modules and the edges: a
function-level import that only hides a cycle is still a cycle.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"hai": "hai", "hai.parallel": "parallel", "hai.pipeline": "pipeline", "hai.kernels": "kernels",
           "hai.launch": "launch"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
    return mods


def _imported_names(mod: str, path: Path, mods: dict) -> set[str]:
    base = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            src = node.module or ""
            if node.level:
                b = base
                for _ in range(node.level - 1):
                    b = b.rpartition(".")[0]
                src = f"{b}.{src}" if src else b
            names |= {f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        edges = set()
        for name in _imported_names(mod, path, mods):
            while name and name not in mods:
                name = name.rpartition(".")[0]
            parts = name.split(".") if name else []
            for i in range(1, len(parts) + 1):  # the target and the packages it runs on the way
                t = ".".join(parts[:i])
                if t in mods and t != mod and not mod.startswith(t + "."):
                    edges.add(t)
        graph[mod] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_function_level_imports():
    # the premise: a lazy import inside a function body is an edge (compose resolves init_from through hf lazily)
    assert "hai.model.hf" in import_graph()["hai.config.compose"]


def test_no_import_cycle():
    graph = import_graph()
    cycles = _cycles(graph)
    detail = ["  " + ", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_config_schema_is_the_bottom():
    graph = import_graph()
    for mod in ("hai.config", "hai.config.schema"):
        assert graph[mod] <= {"hai", "hai.config.schema"}, (mod, graph[mod])


def test_model_has_no_communication():
    """The model is single-device: no torch.distributed and nothing of the parallel layer (tensor parallelism
    reaches it through hai.model.regions, expert parallelism through the Dispatcher)."""
    mods = _modules()
    for mod, path in mods.items():
        if not mod.startswith("hai.model"):
            continue
        names = _imported_names(mod, path, mods)
        bad = sorted(n for n in names if n.startswith(("torch.distributed", "hai.parallel", "hai.pipeline")))
        assert not bad, f"{mod} imports {bad}"
        assert "dist." not in path.read_text().replace("_dist.", ""), f"{mod} calls torch.distributed"


def test_library_lines_fit_in_120_columns():
    long = [f"{path.relative_to(ROOT)}:{i} ({len(line)})" for path in _modules().values()
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, "lines over 120 characters: " + ", ".join(long)
