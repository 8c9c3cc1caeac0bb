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


def package(module: str) -> str:
    """ensemble.training.trainer -> ensemble.training; top-level modules are their own."""
    parts = module.split(".")
    return ".".join(parts[:2])


def crossings(graph: dict[str, set[str]], src: str, banned: tuple[str, ...]) -> list[str]:
    """Each import by which a module of `src` (a package or module) reaches one of `banned`,
    named as the chain of imports that gets there: [] when the layer keeps to itself."""
    found = []
    for start in sorted(m for m in graph if m == src or m.startswith(src + ".")):
        seen, todo = {start: [start]}, [start]
        while todo:
            m = todo.pop()
            for d in sorted(graph[m]):
                if d in seen:
                    continue
                seen[d] = seen[m] + [d]
                if any(d == b or d.startswith(b + ".") for b in banned):
                    found.append(" -> ".join(seen[d]))
                else:
                    todo.append(d)
    return found


LAYERS = [  # (who, what it must never import, even through another module)
    ("ensemble.training", ("ensemble.coordination", "ensemble.runtime")),
    ("ensemble.coordination", ("ensemble.runtime",)),
    ("ensemble.data", ("ensemble.coordination", "ensemble.runtime", "ensemble.outputs")),
    ("ensemble.protocol", ("ensemble.training", "ensemble.coordination", "ensemble.runtime")),
    ("ensemble.runtime.job", ("ensemble.runtime.service", "ensemble.runtime.driver")),  # no Ray
    # config stores names only: it imports no registry
    ("ensemble.config", ("ensemble.data", "ensemble.coordination", "ensemble.training")),
]


def test_layers_keep_to_themselves():
    g = import_graph()
    for src, banned in LAYERS:
        assert crossings(g, src, banned) == [], f"{src} must not import {banned}"


def test_the_history_imports_nothing_of_ours_but_the_error_types():
    g = import_graph()
    ours = {package(m) for m in g} - {"ensemble", "ensemble.history", "ensemble.errors"}
    ours = tuple(sorted(ours))
    assert crossings(g, "ensemble.history", ours) == []


def test_a_crossing_is_named_by_its_chain_of_imports():
    g = {
        "ensemble.training.trainer": {"ensemble.outputs.score"},
        "ensemble.outputs.score": {"ensemble.runtime.job"},
        "ensemble.runtime.job": set(),
    }
    assert crossings(g, "ensemble.training", ("ensemble.runtime",)) == [
        "ensemble.training.trainer -> ensemble.outputs.score -> ensemble.runtime.job"
    ]
    assert crossings(g, "ensemble.training", ("ensemble.coordination",)) == []


def test_every_module_is_in_a_layer_package():
    """Besides the package's entry points (api, config, errors, protocol), every module sits
    in a subpackage: the folder tree shows the layers."""
    top = {
        m for m in import_graph() if m.count(".") == 1 and not (ROOT / m.replace(".", "/")).is_dir()
    }
    assert top <= {
        "ensemble.api",
        "ensemble.config",
        "ensemble.errors",
        "ensemble.protocol",
        "ensemble.__main__",
    }, top


def test_one_trainer_class():
    trainers = [
        n.name
        for p in (ROOT / "ensemble").rglob("*.py")
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.ClassDef) and n.name.endswith("Trainer")
    ]
    assert trainers == ["Trainer"]


def test_the_readme_imports_still_work():
    from ensemble import Ensemble, History, Job
    from ensemble.api import History as ApiHistory
    from ensemble.api import Job as ApiJob
    from ensemble.outputs.inference import Ensemble as Loaded

    assert (Job, History, Ensemble) == (ApiJob, ApiHistory, Loaded)
