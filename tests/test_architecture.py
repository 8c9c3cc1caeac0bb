"""The shape of the code: modules import one way, and the layers keep to themselves."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    """module -> the project's modules it imports (imports inside functions count)."""
    files = [p for d in ("ensemble", "workers") for p in (ROOT / d).rglob("*.py")]
    name = lambda p: ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")  # noqa: E731
    known = {name(p) for p in files}
    graph = {}
    for p in files:
        deps = set()
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                subs = {f"{n.module}.{a.name}" for a in n.names}
                deps |= subs if subs <= known else {n.module}
            elif isinstance(n, ast.Import):
                deps |= {a.name for a in n.names}
        graph[name(p)] = {d for d in deps if d in known and d != name(p)}
    return graph


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back():
    assert circles(import_graph()) == []


def test_the_finder_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_layers_keep_to_themselves():
    g = import_graph()

    def reach(m, seen=None):
        seen = set() if seen is None else seen
        for d in g[m]:
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    history = {m for m in g if m.startswith("ensemble.history")}
    for m in history:  # the history is a leaf: no Ray, no training, no coordinator
        assert reach(m) <= history | {"ensemble.errors"}, m
    for registry in (
        "ensemble.data",
        "ensemble.coordination.policies",
        "ensemble.coordination.compat",
        "ensemble.training.model",
    ):
        assert registry not in reach("ensemble.config")  # config stores names only
    for core in (
        "ensemble.coordination.coordinator",
        "ensemble.training.trainer",
        "ensemble.runtime.job",
        "ensemble.protocol",
    ):
        assert not any(
            d in ("ensemble.runtime.service", "ensemble.runtime.driver") for d in reach(core)
        ), core
    trainer_side = reach("ensemble.training.trainer") | {"ensemble.training.trainer"}
    assert (
        "ensemble.coordination.coordinator" not in trainer_side
    )  # workers never import the coordinator


def test_one_trainer_class():
    trainers = [
        n.name
        for p in (ROOT / "ensemble").rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.ClassDef) and n.name.endswith("Trainer")
    ]
    assert trainers == ["Trainer"]
