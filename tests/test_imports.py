"""The package rules of docs/architecture.md, checked on the source: every `import` of
every tilec module (read with ast, nothing is imported; imports inside functions and
under TYPE_CHECKING count too, as they are dependencies all the same) goes down the
table, and no modules import each other in a circle. A package's `__init__` that
Python runs on the way to a module is not counted as an import of it."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Modules at the bottom that every package but `ir` may import: they import only each
# other (and nothing of tilec is below them).
BASE = ("errors", "version", "limits", "signals", "gcpause", "childenv", "paths")
# What each package (or top-level module) may import besides itself: the table in
# docs/architecture.md, "imports" column (test_the_table_in_the_docs_is_this_one).
RULES: dict[str, tuple[str, ...]] = {
    "ir": (),
    "base": ("base",),
    "passes": ("ir", "base"),
    "codegen": ("ir", "base"),
    "runtime": ("ir", "codegen", "base"),
    "models": ("ir", "runtime", "base"),
    "viz": ("ir", "passes", "base"),
    "compiler": ("ir", "passes", "codegen", "runtime", "models", "base"),
    "inspect": ("ir", "passes", "codegen", "runtime", "viz", "base"),
    "api": ("ir", "passes", "codegen", "runtime", "models", "compiler", "inspect", "base"),
    "verify_engine": ("ir", "passes", "runtime", "api", "base"),
    "serve": ("ir", "runtime", "api", "base"),
    "cli": ("*",),
    "__main__": ("cli",),
    "tilec": ("api", "runtime", "base"),   # tilec/__init__.py: the public names, lazily
}
# Circles left on purpose, each with its reason; the test fails when one changes or
# goes (then delete its entry), so the list cannot hide a new one.
KNOWN_CIRCLES: set[frozenset[str]] = set()   # none; a circle added later needs its reason here


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at root/tilec."""
    out = {}
    for path in sorted((root / "tilec").rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(root: Path) -> dict[str, dict[str, int]]:
    """Module -> {tilec module it imports: line of the first such import}."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                # `from tilec.codegen import aot` imports the module tilec.codegen.aot
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target) if target.split(".")[0] == "tilec" else None
                if found and found != name:
                    edges.setdefault(found, node.lineno)
        graph[name] = edges
    return graph


def unit(module: str) -> str:
    """The row of the table a module falls under."""
    parts = module.split(".")
    if len(parts) == 1:
        return "tilec"
    return "base" if parts[1] in BASE else parts[1]


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return found


def circle_problems(graph: dict[str, dict[str, int]], known=frozenset()) -> list[str]:
    problems = []
    seen = set()
    for component in circles(graph):
        seen.add(frozenset(component))
        if frozenset(component) in known:
            continue
        links = [f"{a} imports {b} (line {graph[a][b]})" for a in component
                 for b in graph[a] if b in component]
        problems.append("import circle: " + "; ".join(links))
    problems += [f"the known circle {sorted(c)} is gone or changed: update KNOWN_CIRCLES"
                 for c in known if c not in seen]
    return problems


def rule_problems(graph: dict[str, dict[str, int]], root: Path) -> list[str]:
    problems = []
    for a, edges in graph.items():
        allowed = RULES.get(unit(a))
        if allowed is None:
            problems.append(f"{a}: package {unit(a)!r} has no row in the rules table")
            continue
        for b, line in edges.items():
            if unit(b) != unit(a) and "*" not in allowed and unit(b) not in allowed:
                path = modules(root)[a].relative_to(root)
                problems.append(f"{path}:{line}: {a} imports {b}, but {unit(a)} may import "
                                f"only {', '.join(allowed) or 'nothing of tilec'}")
    return problems


def test_no_import_circles():
    problems = circle_problems(imports(ROOT), KNOWN_CIRCLES)
    assert not problems, "\n".join(problems)


def test_packages_import_only_what_the_rules_allow():
    problems = rule_problems(imports(ROOT), ROOT)
    assert not problems, "\n".join(problems)


def test_the_checks_find_a_circle_and_an_upward_import(tmp_path):
    """The walker itself: a made-up tree with ir importing passes (relative import
    included) and two codegen modules in a circle, one of them inside a function."""
    files = {
        "tilec/__init__.py": "",
        "tilec/ir/__init__.py": "",
        "tilec/ir/graph.py": "from ..passes import fuse\n",
        "tilec/passes/__init__.py": "",
        "tilec/passes/fuse.py": "from tilec.ir.graph import Graph\n",
        "tilec/codegen/__init__.py": "",
        "tilec/codegen/emit.py": "from tilec.codegen import topk\n",
        "tilec/codegen/topk.py": "def f():\n    from tilec.codegen.emit import g\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = imports(tmp_path)
    assert rule_problems(graph, tmp_path) == [
        "tilec/ir/graph.py:1: tilec.ir.graph imports tilec.passes.fuse, but ir may import "
        "only nothing of tilec"]
    assert sorted(circle_problems(graph)) == [
        "import circle: tilec.codegen.emit imports tilec.codegen.topk (line 1); "
        "tilec.codegen.topk imports tilec.codegen.emit (line 2)",
        "import circle: tilec.ir.graph imports tilec.passes.fuse (line 1); "
        "tilec.passes.fuse imports tilec.ir.graph (line 1)"]


def test_the_table_in_the_docs_is_this_one():
    """docs/architecture.md's package table, "imports" column, says what RULES says."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("| package | owns | imports | must not |"):]
    rows = {}
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`tilec/([\w]+)(?:/|\.py)`", cells[0])
        allowed = tuple(sorted(re.findall(r"`(\w+|\*)`", cells[2])))
        for name in names:
            rows["base" if name in BASE else name] = allowed
    rows["tilec"] = rows.pop("__init__")
    assert rows == {k: tuple(sorted(v)) for k, v in RULES.items()}
