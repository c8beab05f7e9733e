"""TD private page leaves: TDH.MEM.PAGE.AUG, TDH.MEM.PAGE.ADD, TDH.MEM.PAGE.REMOVE.

Follows src/vmm_dispatcher/api_calls/tdh_mem_page_aug.c, tdh_mem_page_add.c and tdh_mem_page_remove.c
of the TDX module (tdx_1.5).
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import PAGE
from ..helpers import (seamcall_leaf, begin, host_lock, page_info, check_blocked_and_tracked, check_lock_tdr,
                       check_state_and_lock_op_state, check_and_lock_private_hpa, shared_hpa_check, hpa_check)
from ..locks import TDX_LOCK_EXCLUSIVE, TDX_LOCK_SHARED, TDX_LOCK_NO_LOCK
from .. import sept as S


def check_and_lock_free_range_hpa(mod, held, hpa, op, level, caller):
    """check_and_lock_free_range_hpa(): a free (PT_NDA) 4K or 2M range, its PAMT entry (4K or 2M)
    locked exclusively; a status or TDX_SUCCESS.  Once held, a scheduling point ("pamt_locked")."""
    size = PAGE << (9 * level)
    if not hpa_check(mod, hpa, size):
        return TDX_OPERAND_INVALID | op
    if not mod.pamt.covers(hpa + size - 1):
        return TDX_OPERAND_ADDR_RANGE_ERROR | op          # (a range that leaves the TDMR)
    st = check_and_lock_private_hpa(mod, held, hpa, op, TDX_LOCK_EXCLUSIVE, PT_NDA, level)
    if st:
        return st
    if level == 1 and not mod.pamt.is_2mb_range_free(hpa):
        return TDX_PAGE_METADATA_INCORRECT | op
    mod.point(caller, "pamt_locked")
    return TDX_SUCCESS


@seamcall_leaf
def tdh_mem_page_aug(mod, r, caller, held):
    """tdh_mem_page_aug.c: the TDR shared, the TD's state, the GPA, the S-EPT tree shared, the
    walk, the entry lock, the state, then the new page (check_and_lock_free_range_hpa()), whose
    PAMT entry stays locked until the entry is written (sept_set_leaf_and_release_locks())."""
    got, err = begin(mod, held, r, caller, TDH_MEM_PAGE_AUG, lambda td: (0, 1), TDX_LOCK_SHARED)
    if err:
        return err
    td, gpa, level = got
    page = r.r8
    ptr, e, lvl = mod.sept_walk(td, gpa, level)
    if lvl != level:
        return mod.walk_failed(e, lvl)
    e, entry = host_lock(mod, held, ptr, e, lvl, caller, "sept_entry_locked")
    if e is None:
        return entry
    if not S.seamcall_allowed(TDH_MEM_PAGE_AUG, S.sept_state(e)):
        return mod.state_incorrect(e, lvl)
    st = check_and_lock_free_range_hpa(mod, held, page, OPERAND_ID_R8, level, caller)
    if st:
        return Regs(st)
    npages = 512 ** level
    mod.mem.q[ptr >> 3] = S.make_pending(page)       # sept_set_leaf_and_release_locks()
    held.drop(entry)
    td.chldcnt += npages
    mod.give_to_td(page, td.tdr, npages)
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mem_page_add(mod, r, caller, held):
    """tdh_mem_page_add.c: the TDR exclusively (so no S-EPT tree or entry lock: nobody else is in
    this TD's S-EPT), the TD's state, the GPA, the walk, the state, the source (a shared page:
    shared_hpa_check(), so never the module's own memory), then the target page (PT_NDA, locked
    exclusively).  (Model: a source page the PAMT gives to a TD or the module is refused too;
    the CPU would read zeros through the shared key.)"""
    td, st = check_lock_tdr(mod, held, r.rdx, OPERAND_ID_RDX, TDX_LOCK_EXCLUSIVE, caller)
    if st:
        return Regs(st)
    st = check_state_and_lock_op_state(mod, held, td, TDH_MEM_PAGE_ADD, TDX_LOCK_NO_LOCK)
    if st:
        return Regs(st)
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
    if not shared_hpa_check(mod, source, read=True):
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R9)
    if mod.pamt.covers(source) and mod.pamt.page_type(source) != PT_NDA:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R9)          # model-defined: must be shared memory
    st = check_and_lock_private_hpa(mod, held, target, OPERAND_ID_R8, TDX_LOCK_EXCLUSIVE, PT_NDA, caller=caller,
                                    point="pamt_locked")
    if st:
        return Regs(st)
    mod.mem.write(target, mod.mem.read(source, PAGE))
    mod.mem.td_write(target)                    # copied in with the TD's key
    mod.mem.q[ptr >> 3] = S.make_mapped(target)       # sept_set_leaf_unlocked_entry()
    td.mrtd.update(b"MEM.PAGE.ADD" + gpa.to_bytes(8, "little"))
    td.chldcnt += 1
    mod.give_to_td(target, td.tdr)
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mem_page_remove(mod, r, caller, held):
    """tdh_mem_page_remove.c: the TDR shared, the TD's state, the GPA, the S-EPT tree shared, the
    walk, the entry lock, a leaf in a legal state, the page's PAMT entry (of the leaf's size)
    locked exclusively (pamt_implicit_get_and_lock(): BUSY|RCX), blocked and tracked."""
    got, err = begin(mod, held, r, caller, TDH_MEM_PAGE_REMOVE, lambda td: (0, 1, 2), TDX_LOCK_SHARED)
    if err:
        return err
    td, gpa, level = got
    ptr, e, lvl = mod.sept_walk(td, gpa, level)
    if lvl != level:
        return mod.walk_failed(e, lvl)
    e, entry = host_lock(mod, held, ptr, e, lvl, caller, "sept_entry_locked")
    if e is None:
        return entry
    state = S.sept_state(e)
    if not S.is_leaf_state(state) or not S.seamcall_allowed(TDH_MEM_PAGE_REMOVE, state):
        rcx, rdx = mod.sept_details(e, level)
        return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    hpa = e & S.SEPT_HPA
    pamt = mod.pamt
    st = pamt.implicit_lock(hpa, level, TDX_LOCK_EXCLUSIVE)
    if st:
        return Regs(st | OPERAND_ID_RCX)
    held.push(lambda: pamt.implicit_unlock(hpa, level, TDX_LOCK_EXCLUSIVE))
    mod.point(caller, "pamt_locked")
    bad = check_blocked_and_tracked(mod, td, e, state, level, hpa)
    if bad:
        return bad
    npages = 512 ** level
    mod.mem.q[ptr >> 3] = S.SEPT_FREE_ENTRY              # septe_set_free_or_removed_and_release_locks()
    held.drop(entry)
    td.chldcnt -= npages
    mod.release(hpa, npages)
    return Regs(TDX_SUCCESS, rcx=hpa)


# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {
    TDH_MEM_PAGE_AUG: tdh_mem_page_aug,
    TDH_MEM_PAGE_ADD: tdh_mem_page_add,
    TDH_MEM_PAGE_REMOVE: tdh_mem_page_remove,
}
