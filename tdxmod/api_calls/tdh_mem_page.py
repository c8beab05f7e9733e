"""TD private page leaves: TDH.MEM.PAGE.AUG, TDH.MEM.PAGE.ADD, TDH.MEM.PAGE.REMOVE.

Follows src/vmm_dispatcher/api_calls/tdh_mem_page_aug.c, tdh_mem_page_add.c and tdh_mem_page_remove.c
of the TDX module (tdx_1.5).
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import PAGE
from ..helpers import begin, host_lock, sept_unlock, page_info, check_blocked_and_tracked
from .. import sept as S


def tdh_mem_page_aug(mod, r, caller):
    got, err = begin(mod, r, caller, lambda td: (0, 1), False)
    if err:
        return err
    td, gpa, level = got
    page = r.r8
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
        if not S.seamcall_allowed(TDH_MEM_PAGE_AUG, S.sept_state(e)):
            return mod.state_incorrect(e, lvl)
        # check_and_lock_free_range_hpa()
        npages = 512 ** level
        if page & ((PAGE << (9 * level)) - 1):
            return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R8)
        for k in range(npages):
            st = mod.hpa_operand(page + k * PAGE, OPERAND_ID_R8)
            if st:
                return Regs(st)
        if not mod.pamt.try_lock(page):
            return Regs(TDX_OPERAND_BUSY | OPERAND_ID_R8)
        mod.give_to_td(page, td.tdr, npages)
        mod.pamt.set_bepoch(page, 0)
        mod.pamt.unlock(page)
        td.chldcnt += npages
        mod.mem.q[ptr >> 3] = S.make_pending(page)       # sept_set_leaf_and_release_locks()
        ptr = None
        return Regs(TDX_SUCCESS)
    finally:
        if ptr is not None:
            mod.unlock_entry(ptr)
        sept_unlock(td, False)


def tdh_mem_page_add(mod, r, caller):
    """No S-EPT tree or entry lock: PAGE.ADD holds the TDR exclusively instead (tdh_mem_page_add.c)."""
    td, st = mod.td_operand(r.rdx, OPERAND_ID_RDX)
    if st:
        return Regs(st)
    if td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    pi, st = page_info(mod, td, r.rcx, (0,))
    if st:
        return Regs(st)
    gpa, level = pi
    target, source = r.r8, r.r9
    ptr, e, lvl = mod.sept_walk(td, gpa, 0)
    if lvl != 0:
        return mod.walk_failed(e, lvl)
    if not S.seamcall_allowed(TDH_MEM_PAGE_ADD, S.sept_state(e)):
        return mod.state_incorrect(e, lvl)
    if source & 0xFFF or source + PAGE > mod.mem.size:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R9)
    if mod.pamt.covers(source) and mod.pamt.page_type(source) != PT_NDA:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R9)          # the source must be shared memory
    st = mod.hpa_operand(target, OPERAND_ID_R8)
    if st:
        return Regs(st)
    mod.mem.write(target, mod.mem.read(source, PAGE))
    mod.mem.td_write(target)                    # copied in with the TD's key
    mod.give_to_td(target, td.tdr)
    td.chldcnt += 1
    mod.mem.q[ptr >> 3] = S.make_mapped(target)
    td.mrtd.update(b"MEM.PAGE.ADD" + gpa.to_bytes(8, "little"))
    return Regs(TDX_SUCCESS)


def tdh_mem_page_remove(mod, r, caller):
    got, err = begin(mod, r, caller, lambda td: (0, 1, 2), False)
    if err:
        return err
    td, gpa, level = got
    ptr = None
    hpa = None
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
        if not S.is_leaf_state(state) or not S.seamcall_allowed(TDH_MEM_PAGE_REMOVE, state):
            rcx, rdx = mod.sept_details(e, level)
            return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        if not mod.pamt.try_lock(e & S.SEPT_HPA):
            return Regs(TDX_OPERAND_BUSY | OPERAND_ID_RCX)
        hpa = e & S.SEPT_HPA
        bad = check_blocked_and_tracked(mod, td, e, state, level, hpa)
        if bad:
            return bad
        npages = 512 ** level
        mod.mem.q[ptr >> 3] = S.SEPT_FREE_ENTRY              # septe_set_free_or_removed_and_release_locks()
        ptr = None
        mod.release(hpa, npages)
        td.chldcnt -= npages
        return Regs(TDX_SUCCESS, rcx=hpa)
    finally:
        if hpa is not None:
            mod.pamt.unlock(hpa)
        if ptr is not None:
            mod.unlock_entry(ptr)
        sept_unlock(td, False)



# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {
    TDH_MEM_PAGE_AUG: tdh_mem_page_aug,
    TDH_MEM_PAGE_ADD: tdh_mem_page_add,
    TDH_MEM_PAGE_REMOVE: tdh_mem_page_remove,
}
