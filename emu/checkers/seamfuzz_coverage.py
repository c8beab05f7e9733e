"""What the TDX module's handlers can return, from their source, and what the fuzzer counts
(emu.checkers.seamfuzz): a call's (leaf, status) pair.

``can_return()`` reads each handler of the dispatcher's table (tdxmod.vmm_dispatcher) and of the TDCALL
table (tdxmod.td_dispatch.TDCALL_HANDLERS) with ``ast``, follows every tdxmod function it calls (by
name in its module, on a tdxmod module, on the module object ``mod``, the PAMT, a Held), and
collects the status constants they name.  It over-approximates; ``unreachable()`` lists the pairs no
call can reach, with the reason.
"""

import ast
import inspect
import textwrap

from tdxmod import abi as A
from tdxmod.module import TdxModule

# -- the status a call "returned" ------------------------------------------------------------------------
_STATUS = {v: k for k, v in A.STATUS_NAMES.items()}


def status_of(leaf, rax):
    """A status name for the coverage table: the status without its operand id; for TDH.VP.ENTER,
    a TD exit is ``exit:<reason>`` (its RAX has no status, only the exit reason)."""
    base = rax & A.TDX_STATUS_MASK
    if leaf == A.TDH_VP_ENTER and base == 0:
        from emu.hw.exits import REASON_NAMES

        return "exit:" + REASON_NAMES.get(rax & 0xFFFF, str(rax & 0xFFFF)).upper().replace(" ", "_")
    return A.STATUS_NAMES.get(base, f"{base:#x}") if base else "TDX_SUCCESS"


def leaf_name(leaf):
    return A.seamcall_name(leaf)


def tdcall_name(leaf):
    return A.TDCALL_NAMES.get(leaf, "TDG_UNKNOWN")


# ==================================================================================================
# What each handler can return, from its source
# ==================================================================================================
def _functions_called(fn, cls=None):
    """The functions ``fn``'s source calls that can be resolved: by name in its module, as an
    attribute of a tdxmod module, as a method of the module (``mod.``), of the PAMT (``pamt.``,
    ``mod.pamt.``), of a Held (``held.``) or of ``self``'s class."""
    from tdxmod.pamt import Pamt
    from tdxmod.helpers import Held

    try:
        tree = ast.parse(_dedent(fn))
    except (OSError, TypeError):
        return []
    g = inspect.unwrap(fn).__globals__
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        target = None
        if isinstance(f, ast.Name):
            target = g.get(f.id)
        elif isinstance(f, ast.Attribute):
            base = f.value
            if isinstance(base, ast.Name):
                if base.id == "mod":
                    target = getattr(TdxModule, f.attr, None)
                elif base.id == "pamt":
                    target = getattr(Pamt, f.attr, None)
                elif base.id == "held":
                    target = getattr(Held, f.attr, None)
                elif base.id == "self" and cls is not None:
                    target = getattr(cls, f.attr, None)
                elif inspect.ismodule(g.get(base.id)):
                    target = getattr(g[base.id], f.attr, None)
            elif (
                isinstance(base, ast.Attribute)
                and base.attr == "pamt"
                and isinstance(base.value, ast.Name)
                and base.value.id == "mod"
            ):
                target = getattr(Pamt, f.attr, None)
        if inspect.isfunction(target) and target.__module__.startswith("tdxmod"):
            out.append(target)
    return out


def _dedent(fn):
    return textwrap.dedent(inspect.getsource(inspect.unwrap(fn)))


def _names(fn):
    try:
        tree = ast.parse(_dedent(fn))
    except (OSError, TypeError):
        return set(), set()
    statuses, exits = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in A.STATUS_NAMES.values():
            statuses.add(node.id)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("Regs", "_exit")
            and node.args
        ):
            for n in ast.walk(node.args[0]):
                if isinstance(n, ast.Name) and n.id.startswith("EXIT_REASON_"):
                    exits.add(n.id)
    return statuses, exits


def _reach(fn, skip=()):
    """Every tdxmod function ``fn`` may call (itself included), not following ``skip``."""
    from tdxmod.pamt import Pamt

    seen, todo = {}, [fn]
    while todo:
        f = inspect.unwrap(todo.pop())
        if f in seen or f in skip:
            continue
        cls = (
            Pamt
            if f.__qualname__.startswith("Pamt.")
            else (TdxModule if f.__qualname__.startswith("TdxModule.") else None)
        )
        seen[f] = True
        todo.extend(_functions_called(f, cls))
    return list(seen)


_CAN_RETURN = None


def can_return():
    """{leaf name: status names} for every SEAMCALL leaf of the dispatcher and every TDCALL leaf
    (``TDG_*``, and TDG_UNKNOWN for the others), from the handlers' source: the status constants
    a handler and the functions it calls name.  TDH.VP.ENTER's TD exits are ``exit:<REASON>``
    for the exit reasons its exit handling names, and exit:EXTERNAL_INTERRUPT (the CPU's other
    exit, which the module passes through by its reason)."""
    global _CAN_RETURN
    if _CAN_RETURN is not None:
        return _CAN_RETURN
    from tdxmod.vmm_dispatcher import HANDLERS
    from tdxmod import td_dispatch
    from emu.hw.exits import REASON_NAMES

    tdcall_fns = set(td_dispatch.TDCALL_HANDLERS.values()) | {td_dispatch.tdg_unknown}
    out = {}
    for leaf, fn in sorted(HANDLERS.items()):
        skip = tdcall_fns if leaf == A.TDH_VP_ENTER else ()
        statuses, exits = set(), set()
        for f in _reach(fn, skip):
            s, e = _names(f)
            statuses |= s
            exits |= e
        statuses.discard("TDX_SUCCESS") if leaf == A.TDH_VP_ENTER else None
        names = set(statuses)
        if leaf == A.TDH_VP_ENTER:
            exits.add("EXIT_REASON_EXTERNAL_INTERRUPT")
            import emu.hw.exits as X

            for e in exits:
                names.add("exit:" + REASON_NAMES.get(getattr(X, e), e).upper().replace(" ", "_"))
        else:
            names.add("TDX_SUCCESS")
        out[leaf_name(leaf)] = names
    out["SEAMCALL_UNKNOWN"] = _names(TdxModule.seamcall)[0]  # the dispatcher's own answer
    for leaf, fn in list(td_dispatch.TDCALL_HANDLERS.items()) + [(None, td_dispatch.tdg_unknown)]:
        statuses = set()
        for f in _reach(fn):
            statuses |= _names(f)[0]
        out[tdcall_name(leaf)] = statuses
    _CAN_RETURN = out
    return out


def unreachable():
    """{(leaf, status): why}: the pairs ``can_return()`` derives that no call can reach in this
    model (the derivation follows every function a handler may call, so it over-approximates)."""
    out = {}
    vcpu_leaves = ("TDH_VP_ADDCX", "TDH_VP_INIT", "TDH_VP_RD", "TDH_VP_WR", "TDH_VP_FLUSH", "TDH_VP_ENTER")
    for leaf, statuses in can_return().items():
        if leaf.startswith("TDH_") and "TDX_OPERAND_BUSY_HOST_PRIORITY" in statuses:
            out[(leaf, "TDX_OPERAND_BUSY_HOST_PRIORITY")] = (
                "a host never gets it: acquire_sharex_lock_hp() and sept_lock_acquire_host() give BUSY to "
                "a host (only a guest backs off with host priority)"
            )
    for leaf in vcpu_leaves:
        out[(leaf, "TDX_TDCS_NOT_ALLOCATED")] = (
            "a vCPU exists only after TDH.VP.CREATE, which needs TDH.MNG.INIT, which needs every TDCS page"
        )
    for leaf in ("TDH_VP_RD", "TDH_VP_WR", "TDH_VP_FLUSH"):
        out[(leaf, "TDX_OP_STATE_INCORRECT")] = (
            "a vCPU exists only in INITIALIZED or RUNNABLE, where the leaf is allowed (TDH.VP.FLUSH does not "
            "look at the op_state: derived through lock_tdvpr()'s optional state check)"
        )
    out[("TDH_VP_FLUSH", "TDX_TD_FATAL")] = "tdh_vp_flush() does not check TD_FATAL (derived through lock_tdvpr())"
    out[("TDH_VP_ENTER", "exit:TRIPLE_FAULT")] = (
        "a triple fault is async_tdexit_to_vmm(TDX_NON_RECOVERABLE_VCPU): counted as that status"
    )
    return {k: v for k, v in out.items() if k[1] in can_return().get(k[0], ())}
