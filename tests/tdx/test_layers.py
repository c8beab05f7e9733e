"""tdxmod's imports point one way: no circle among its modules, and never up into KVM, the VMM or
the checkers (the model's layers: emu.hw <- emu.kvm -> tdxmod)."""

import ast
from pathlib import Path

import tdxmod

ROOT = Path(tdxmod.__file__).resolve().parent


def _module_name(path):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path):
    """Every module ``path`` imports, at the top or inside a function (absolute names)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            # ``from . import sept``: the names may be modules themselves
            for a in node.names:
                out.add(f"{mod}.{a.name}")
    return out


def _graph():
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in _imports(path) if m in modules and m != name}
    return modules, graph


def test_tdxmod_never_imports_kvm_vmm_or_checkers():
    modules, _ = _graph()
    for name, path in modules.items():
        bad = {m for m in _imports(path) if m.split(".")[:2] in (["emu", "kvm"], ["emu", "userspace"],
                                                                    ["emu", "checkers"], ["emu", "host"])}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_no_import_circle_in_tdxmod():
    _, graph = _graph()
    state = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m] if m in stack else [n, m]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_one_handler_module_per_group_of_leaves():
    """The dispatcher's table is the union of the api_calls modules' LEAVES (no leaf twice), and
    each module's docstring names the TDX module source files it follows."""
    from tdxmod import vmm_dispatcher
    from tdxmod.api_calls import tdh_mem_page, tdh_mem_range, tdh_mem_sept, tdh_mng, tdh_mr, tdh_phymem, tdh_vp
    groups = (tdh_mem_page, tdh_mem_range, tdh_mem_sept, tdh_mng, tdh_mr, tdh_phymem, tdh_vp)
    seen = {}
    for g in groups:
        assert "src/vmm_dispatcher/api_calls/" in g.__doc__ and ".c" in g.__doc__, g.__name__
        for leaf, fn in g.LEAVES.items():
            assert leaf not in seen, f"leaf {leaf} in {seen.get(leaf)} and {g.__name__}"
            seen[leaf] = g.__name__
            assert fn.__module__ == g.__name__
    assert set(vmm_dispatcher.HANDLERS) == set(seen) | {tdxmod.abi.TDH_VP_ENTER}
