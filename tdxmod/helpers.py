"""Checks and locks the SEAMCALL handlers share (src/common/helpers/helpers.c of the TDX module).

Each takes the module (tdxmod.module.TdxModule) as its first argument; none imports it.
"""

from .abi import *  # noqa: F401,F403
from .regs import Regs
from .td_structures import PAGE
from . import sept as S

# The op_states in which the S-EPT leaves run.
RUN_STATES = (OP_STATE_INITIALIZED, OP_STATE_RUNNABLE)


def page_info(mod, td, rcx, levels):
    """(gpa, level) of a page-info operand, or (None, status)."""
    level = rcx & 7
    gpa = rcx & ~0xFFF & ((1 << 52) - 1)
    if rcx & 0xFF8 or rcx >> 52 or level not in levels or gpa & ((PAGE << (9 * level)) - 1):
        return None, TDX_OPERAND_INVALID | OPERAND_ID_RCX
    if not mod.private_gpa_ok(td, gpa):
        return None, TDX_OPERAND_INVALID | OPERAND_ID_RCX
    return (gpa, level), None


def op_state_ok(td, allowed):
    return td.op_state in allowed


def sept_lock(mod, td, exclusive, caller):
    """Take the S-EPT tree lock; False (-> BUSY|SEPT) when another holder conflicts."""
    if exclusive:
        if td.sept_writer or td.sept_readers:
            return False
        td.sept_writer = True
    else:
        if td.sept_writer:
            return False
        td.sept_readers += 1
    return True


def sept_unlock(td, exclusive):
    if exclusive:
        td.sept_writer = False
    else:
        td.sept_readers -= 1


def begin(mod, r, caller, levels, exclusive, tdr=None):
    """The prologue the S-EPT leaves share, in the module's order: the TDR operand, op_state,
    the page-info operand, then the S-EPT tree lock.  Returns ((td, gpa, level), None) with
    the lock held (the caller releases it), or (None, the error Regs)."""
    td, st = mod.td_operand(r.rdx if tdr is None else tdr, OPERAND_ID_RDX)
    if st:
        return None, Regs(st)
    if not op_state_ok(td, RUN_STATES):
        return None, Regs(TDX_OP_STATE_INCORRECT)
    pi, st = page_info(mod, td, r.rcx, levels(td))
    if st:
        return None, Regs(st)
    if not sept_lock(mod, td, exclusive, caller):
        return None, Regs(TDX_OPERAND_BUSY | OPERAND_ID_SEPT)
    return (td,) + pi, None


def vcpu_operand(mod, tdvpr, op=OPERAND_ID_RCX):
    if tdvpr & 0xFFF or tdvpr >> mod.x86_phys_bits:
        return None, TDX_OPERAND_INVALID | op
    if not mod.pamt.covers(tdvpr):
        return None, TDX_OPERAND_ADDR_RANGE_ERROR | op
    if mod.pamt.page_type(tdvpr) != PT_TDVPR:
        return None, TDX_PAGE_METADATA_INCORRECT | op
    v = mod.vcpus[tdvpr]
    if v.td.fatal:
        return None, TDX_TD_FATAL
    if v.td.lifecycle != TD_KEYS_CONFIGURED:
        return None, TDX_TD_KEYS_NOT_CONFIGURED
    return v, None


def tlb_tracking_required(td):
    return td.op_state == OP_STATE_RUNNABLE


def host_lock(mod, ptr, e, lvl, caller, what):
    """sept_lock_acquire_host() on the walked entry, the copy re-read under the lock, then a
    scheduling point while the lock is held (another CPU may meet it there) before the caller
    checks the state.  Returns (the copy, None), or (None, BUSY|RCX with the walked entry's
    details in RCX/RDX)."""
    if not mod.lock_entry(ptr):
        rcx, rdx = mod.sept_details(e, lvl)
        return None, Regs(TDX_OPERAND_BUSY | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    e = mod.mem.q[ptr >> 3]
    mod.point(caller, what)
    return e, None


def check_blocked_and_tracked(mod, td, e, state, level, child_hpa):
    """The TLB-tracking checks of PAGE.REMOVE / SEPT.REMOVE (a status Regs, or None)."""
    if not tlb_tracking_required(td):
        return None
    if state not in S.BLOCKED_STATES:
        rcx, rdx = mod.sept_details(e, level)
        return Regs(TDX_GPA_RANGE_NOT_BLOCKED | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    if not mod.is_tlb_tracked(td, mod.pamt.bepoch(child_hpa)):
        return Regs(TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_RCX)
    return None

