"""The import contract (README "Layout"): which package of danceopd_jax may import which, read
from every module's import statements (lazy imports included). RULES is the one table; the
test prints the package-level edges it finds and fails on any edge RULES forbids and on any
package-level cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "danceopd_jax"
BELOW_JOBS = {"worlds", "train", "eval", "data", "interop", "models", "core", "config"}
# package -> the packages it may import. "cli" is every top-level module but config.py (the
# settings schema and its validation, beside every layer). The errors a user can fix
# (core/errors.py, package "errors" here) import nothing, and every layer may raise them.
RULES: dict[str, set[str]] = {
    "core": set(),
    "models": set(),
    "config": {"core"},
    "interop": {"models"},
    "data": {"core"},
    "train": {"data", "models", "core", "config"},
    "eval": {"data", "models", "core", "config"},
    "worlds": {"train", "eval", "data", "interop", "models", "core", "config"},
    "jobs": BELOW_JOBS,
    "cli": {"jobs", "config"},
}
NO_TORCH = {"core", "models", "train"}  # the JAX training path
TORCH = ("torch", "diffusers")


def package_of(module: str) -> str:
    """danceopd_jax.<first part>...: its folder's name, or "config" / "cli" for top-level
    modules."""
    parts = module.split(".")
    if len(parts) == 1:
        return "cli"
    if parts[1:3] == ["core", "errors"]:
        return "errors"
    if (PACKAGE / parts[1]).is_dir():
        return parts[1]
    return "config" if parts[1] == "config" else "cli"


def imports_of(path: Path) -> set[str]:
    """Every module an import statement in the file names, at any depth (lazy ones too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_edges() -> dict[tuple[str, str], set[str]]:
    """{(importer, imported): the importing files} between different packages."""
    edges: dict[tuple[str, str], set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = package_of(module_name(path))
        for target in imports_of(path):
            if target.split(".")[0] == "danceopd_jax" and "." in target:
                dst = package_of(target)
                if dst not in (src, "errors"):
                    edges.setdefault((src, dst), set()).add(str(path.relative_to(ROOT)))
    return edges


def cycles(edges) -> list[list[str]]:
    """The package graph's strongly connected components of more than one package."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
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


def test_package_imports_follow_the_layering():
    edges = package_edges()
    print("package-level import edges:")
    for (a, b), files in sorted(edges.items()):
        mark = "" if b in RULES[a] else "   <- forbidden"
        print(f"  {a} -> {b}{mark}   ({len(files)} file(s))")
    print("cycles:", cycles(edges) or "none")
    forbidden = {e: sorted(f) for e, f in edges.items() if e[1] not in RULES[e[0]]}
    assert not forbidden, f"imports that break the layering (RULES): {forbidden}"
    assert cycles(edges) == []


def test_the_training_path_never_imports_torch():
    for package in NO_TORCH:
        for path in (PACKAGE / package).rglob("*.py"):
            bad = {m for m in imports_of(path) if m.split(".")[0] in TORCH}
            assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_contract_checker_sees_a_forbidden_edge(tmp_path):
    """The checker itself: a cycle is found, and lazy imports count."""
    assert cycles({("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")}) == [["a", "b", "c"]]
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from danceopd_jax.jobs import distill\n    import torch\n")
    assert imports_of(module) >= {"danceopd_jax.jobs", "danceopd_jax.jobs.distill", "torch"}
    assert package_of("danceopd_jax.jobs.distill") == "jobs"
    assert package_of("danceopd_jax.config") == "config"
    assert package_of("danceopd_jax.main") == "cli"
