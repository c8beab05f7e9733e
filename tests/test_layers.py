"""The layers point one way, and no module imports itself through others.

emu.hw <- emu.kvm -> tdxmod; emu.host and emu.userspace above emu.kvm; emu.checkers above
everything, reaching into the model only through hooks the model exposes.  Every import
counts, also one inside a function (a lazy import is a dependency all the same)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("emu", "tdxmod")


def module_name(path):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules():
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            out[module_name(path)] = path
    return out


def imports_of(name, path, known):
    """The project modules ``name`` imports (absolute names), from every import statement."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            cands = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                stem = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            cands = [stem] + [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for c in cands:
            # the longest project module that the name starts with
            parts = c.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts:
                found.add(".".join(parts))
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph():
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_no_import_circles(graph):
    # Tarjan's strongly connected components: any component of more than one module is a circle.
    index, low, on, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    # Packages' __init__ re-export their modules: a package importing its own module is no circle
    # unless the module imports the package back, which the components show.
    assert out == [], f"import circles: {out}"


# (layer, what it must not import)
RULES = [
    ("emu.hw", ("emu.kvm", "emu.host", "emu.userspace", "emu.checkers", "emu.cli", "tdxmod")),
    ("emu.kvm", ("emu.userspace", "emu.checkers", "emu.cli")),
    ("tdxmod", ("emu.kvm", "emu.host", "emu.userspace", "emu.checkers", "emu.cli")),
    ("emu.host", ("emu.userspace", "emu.checkers", "emu.cli")),
]


@pytest.mark.parametrize("layer,forbidden", RULES)
def test_layers_point_one_way(graph, layer, forbidden):
    bad = sorted(
        (m, i)
        for m, deps in graph.items()
        if m == layer or m.startswith(layer + ".")
        for i in deps
        if any(i == f or i.startswith(f + ".") for f in forbidden)
    )
    assert bad == [], f"{layer} imports what sits above it: {bad}"
