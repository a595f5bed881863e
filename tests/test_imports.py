"""Imports inside the package run one way: no cycle between its modules, and no module of the
package imported inside a function (where it would hide a cycle). Read from the source (ast),
so nothing is imported."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mae_jax"
# `mae_jax.load` is imported on first use (PEP 562 `__getattr__`), so that `import mae_jax`
# stays light; it is the one function-level import of the package's own modules.
LAZY = {("mae_jax", "__getattr__", "mae_jax.loader")}


def modules(root: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
    """`{dotted module name: file}` of every module of the package under `root`."""
    out = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = file
    return out


def imports(name: str, file: pathlib.Path, known) -> list[tuple[str, str | None, int]]:
    """`(imported module, enclosing function or None, line)` of every import of a module in
    `known` that `file` (module `name`) makes: at module level and inside functions."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = (
                child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else None
            )
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names
                ]
            else:
                visit(child, inner or function)
                continue
            for target in targets:
                while target and target not in known:  # `import a.b.c` of a name in a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.append((target, function, child.lineno))

    visit(ast.parse(file.read_text(), str(file)), None)
    return found


def graph(root: pathlib.Path = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    """The module-level import graph `{module: modules it imports}` of the package, and the
    function-level imports of its own modules (`file:line: function imports module`)."""
    known = modules(root)
    edges, inside = {}, []
    for name, file in known.items():
        edges[name] = set()
        for target, function, line in imports(name, file, known):
            edges[name].add(target)
            if function is not None and (name, function, target) not in LAZY:
                inside.append(f"{file}:{line}: {function}() imports {target}")
    return edges, inside


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle `[a, b, ..., a]` per strongly connected group of modules that import each
    other (directly or through others)."""
    found, done = [], set()
    for start in sorted(edges):
        if start in done:
            continue
        stack, path, on_path = [(start, iter(sorted(edges[start])))], [start], {start}
        while stack:
            node, todo = stack[-1]
            nxt = next(todo, None)
            if nxt is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif nxt in on_path:
                cycle = path[path.index(nxt) :] + [nxt]
                if not any(set(cycle) == set(c) for c in found):
                    found.append(cycle)
            elif nxt not in done:
                stack.append((nxt, iter(sorted(edges.get(nxt, ())))))
                path.append(nxt)
                on_path.add(nxt)
    return found


def test_the_package_has_no_import_cycle():
    edges, _ = graph()
    assert "mae_jax.workdir.paths" in edges["mae_jax.workdir.checkpoints"]
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_no_module_of_the_package_is_imported_inside_a_function():
    _, inside = graph()
    assert not inside, "function-level imports of mae_jax modules:\n" + "\n".join(inside)


def test_the_checks_catch_a_planted_cycle_and_a_hidden_import(tmp_path):
    pkg = tmp_path / "mae_jax"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import low\n")
    (pkg / "sub" / "low.py").write_text("def f():\n    from mae_jax import top\n")
    (pkg / "top.py").write_text("import mae_jax.sub.low\nimport numpy\n")
    edges, inside = graph(pkg)
    assert edges["mae_jax.top"] == {"mae_jax.sub.low"}
    assert cycles(edges) == [["mae_jax.sub.low", "mae_jax.top", "mae_jax.sub.low"]]
    assert inside == [f"{pkg / 'sub' / 'low.py'}:2: f() imports mae_jax.top"]
