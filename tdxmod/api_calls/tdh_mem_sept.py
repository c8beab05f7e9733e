"""S-EPT page leaves: TDH.MEM.SEPT.ADD, TDH.MEM.SEPT.REMOVE.

Follows src/vmm_dispatcher/api_calls/tdh_mem_sept_add.c and tdh_mem_sept_remove.c of the TDX module (tdx_1.5).
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import PAGE
from ..helpers import begin, host_lock, sept_unlock, check_blocked_and_tracked
from .. import sept as S


def tdh_mem_sept_add(mod, r, caller):
    if r.rdx & 0xFFE:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    allow_existing = r.rdx & 1
    new = r.r8
    got, err = begin(mod, r, caller, lambda td: range(1, td.pwl), False, tdr=r.rdx & ~0xFFF)
    if err:
        return err
    td, gpa, level = got
    ptr = None
    try:
        ptr, e, lvl = mod.sept_walk(td, gpa, level)
        if lvl != level:
            ptr = None
            return mod.walk_failed(e, lvl)
        e, busy = host_lock(mod, ptr, e, lvl, caller, "sept_entry_locked")
        if busy:
            ptr = None
            return busy
        state = S.sept_state(e)
        if not S.seamcall_allowed(TDH_MEM_SEPT_ADD, state):
            return mod.state_incorrect(e, lvl)
        # process_l1_page()
        if not new:
            return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R8)    # version 0: R8 must name the new page
        if state != S.SEPT_FREE:
            if allow_existing:
                return Regs(TDX_SUCCESS)
            return mod.state_incorrect(e, lvl)
        st = mod.hpa_operand(new, OPERAND_ID_R8)
        if st:
            return Regs(st)
        if not mod.pamt.try_lock(new):
            return Regs(TDX_OPERAND_BUSY | OPERAND_ID_R8)
        mod.mem.buf[new:new + PAGE] = S.SEPT_FREE_ENTRY.to_bytes(8, "little") * 512
        mod.give_to_module(new, PT_EPT, td.tdr)
        mod.pamt.unlock(new)
        td.chldcnt += 1
        mod.mem.q[ptr >> 3] = S.make_nl_mapped(new)      # written unlocked
        ptr = None
        return Regs(TDX_SUCCESS)
    finally:
        if ptr is not None:
            mod.unlock_entry(ptr)
        sept_unlock(td, False)


def tdh_mem_sept_remove(mod, r, caller):
    got, err = begin(mod, r, caller, lambda td: range(1, td.pwl), True)
    if err:
        return err
    td, gpa, level = got
    ptr = None
    child = None
    try:
        ptr, e, lvl = mod.sept_walk(td, gpa, level)
        if lvl != level:
            ptr = None
            return mod.walk_failed(e, lvl)
        e, busy = host_lock(mod, ptr, e, lvl, caller, "sept_locked_exclusive")
        if busy:
            ptr = None
            return busy
        state = S.sept_state(e)
        if not S.seamcall_allowed(TDH_MEM_SEPT_REMOVE, state):
            rcx, rdx = mod.sept_details(e, level)
            return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        if not mod.pamt.try_lock(e & S.SEPT_HPA):
            return Regs(TDX_OPERAND_BUSY | OPERAND_ID_RCX)
        child = e & S.SEPT_HPA
        bad = check_blocked_and_tracked(mod, td, e, state, level, child)
        if bad:
            return bad
        q = mod.mem.q
        if any(S.sept_state(q[(child >> 3) + i]) != S.SEPT_FREE for i in range(512)):
            rcx, rdx = mod.sept_details(e, level)
            return Regs(TDX_EPT_PAGE_NOT_FREE | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        q[ptr >> 3] = S.SEPT_FREE_ENTRY
        ptr = None
        mod.release(child)
        td.chldcnt -= 1
        return Regs(TDX_SUCCESS, rcx=child)
    finally:
        if child is not None:
            mod.pamt.unlock(child)
        if ptr is not None:
            mod.unlock_entry(ptr)
        sept_unlock(td, True)



# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {
    TDH_MEM_SEPT_ADD: tdh_mem_sept_add,
    TDH_MEM_SEPT_REMOVE: tdh_mem_sept_remove,
}
