"""The package's structure: no import cycles, no module reaching into another's private
names, one job per file (at most 500 lines).  Upstream private APIs are the fence's business
(tests/unit/test_fence.py)."""
import ast
import os

import pytest

from dsrun import ROOT

PKG = os.path.join(ROOT, "spectrum_callback")


def _modules():
    """``{dotted module name: parsed AST}`` of the package."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                with open(path) as fh:
                    out[name] = (path, ast.parse(fh.read()))
    return out


def _resolve(module, node):
    """The package modules an import statement of ``module`` names (relative ones resolved)."""
    is_pkg = module.endswith("__init__") or os.path.isdir(os.path.join(ROOT, *module.split(".")))
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = module.split(".")
    if node.level:
        base = base[: len(base) - node.level + (1 if is_pkg else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def _graph(mods):
    edges = {m: set() for m in mods}
    for m, (_, tree) in mods.items():
        for node in ast.walk(tree):  # imports inside functions too: a lazy import still closes a cycle
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _resolve(m, node):
                    if t in mods and t != m:
                        edges[m].add(t)
    return edges


def _cycles(edges):
    seen, stack, on, found = set(), [], set(), []

    def visit(n):
        seen.add(n)
        stack.append(n)
        on.add(n)
        for t in sorted(edges[n]):
            if t in on:
                found.append(stack[stack.index(t):] + [t])
            elif t not in seen:
                visit(t)
        stack.pop()
        on.discard(n)

    for n in sorted(edges):
        if n not in seen:
            visit(n)
    return found


def test_no_import_cycles():
    mods = _modules()
    edges = _graph(mods)
    # the graph is read right: known arrows are there (relative imports of modules and names)
    assert {"spectrum_callback.backends", "spectrum_callback._dist", "spectrum_callback.config"} <= \
        edges["spectrum_callback.session"]
    assert "spectrum_callback.backends.deepspeed.backend" in edges["spectrum_callback.backends.deepspeed.resume"]
    assert _cycles(edges) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def _private_uses(mods):
    out = []
    for m, (path, tree) in mods.items():
        if ".\u005ffence" in m or m.split(".")[-1] == "_fence":
            continue  # the fence touches upstream private APIs by design
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(m, node)[0]
                src = "." * node.level + (node.module or "")
                out += [f"{m}: from {src} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                        and f"{target}.{a.name}" not in mods]  # a private helper module is the package's own
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    out.append(f"{m}:{node.lineno}: {ast.unparse(node)}")
    return out


def test_no_module_uses_another_modules_private_names():
    """The callback, the Trainer hooks, the axolotl plugin, the CLI, the session and the rest
    use only public names of each other (private helper modules such as ``_dist`` are the
    package's own, used through their public functions)."""
    assert _private_uses(_modules()) == []


def test_the_private_name_check_finds_a_side_door(tmp_path):
    tree = ast.parse("from .session import _OWNER\n"
                     "def f(session):\n    session._rebind(None)\n    self_ok = 1\n")
    found = _private_uses({"spectrum_callback.x": ("x.py", tree)})
    assert found == ["spectrum_callback.x: from .session import _OWNER", "spectrum_callback.x:3: session._rebind"]


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_library_file_over_500_lines(name):
    path, _ = _modules()[name]
    with open(path) as fh:
        assert sum(1 for _ in fh) <= 500, path
