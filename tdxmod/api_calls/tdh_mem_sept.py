"""S-EPT page leaves: TDH.MEM.SEPT.ADD, TDH.MEM.SEPT.REMOVE.

Follows src/vmm_dispatcher/api_calls/tdh_mem_sept_add.c and tdh_mem_sept_remove.c of the TDX module (tdx_1.5).
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import PAGE
from ..helpers import walk_and_host_lock, seamcall_leaf, begin, check_blocked_and_tracked, check_and_lock_private_hpa
from ..locks import TDX_LOCK_EXCLUSIVE, TDX_LOCK_SHARED
from .. import sept as S


@seamcall_leaf
def tdh_mem_sept_add(mod, r, caller, held):
    """tdh_mem_sept_add.c: the TDR shared, the TD's state, the GPA, the S-EPT tree shared, the
    walk, the entry lock, the state; then process_l1_page(): the new page (PT_NDA, its PAMT entry
    locked exclusively until the end)."""
    if r.rdx & 0xFFE:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    allow_existing = r.rdx & 1
    new = r.r8
    got, err = begin(
        mod, held, r, caller, TDH_MEM_SEPT_ADD, lambda td: range(1, td.pwl), TDX_LOCK_SHARED, tdr=r.rdx & ~0xFFF
    )
    if err:
        return err
    td, gpa, level = got
    ptr, e, entry = walk_and_host_lock(mod, held, td, gpa, level, caller, "sept_entry_locked")
    if ptr is None:
        return e
    state = S.sept_state(e)
    if not S.seamcall_allowed(TDH_MEM_SEPT_ADD, state):
        return mod.state_incorrect(e, level)
    # process_l1_page()
    if not new:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R8)  # version 0: R8 must name the new page
    if state != S.SEPT_FREE:
        if allow_existing:
            return Regs(TDX_SUCCESS)
        return mod.state_incorrect(e, level)
    st = check_and_lock_private_hpa(
        mod, held, new, OPERAND_ID_R8, TDX_LOCK_EXCLUSIVE, PT_NDA, caller=caller, point="pamt_locked"
    )
    if st:
        return Regs(st)
    mod.mem.buf[new : new + PAGE] = S.SEPT_FREE_ENTRY.to_bytes(8, "little") * 512
    mod.give_to_module(new, PT_EPT, td.tdr)
    td.chldcnt += 1
    mod.mem.q[ptr >> 3] = S.make_nl_mapped(new)  # written unlocked
    held.drop(entry)
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mem_sept_remove(mod, r, caller, held):
    """tdh_mem_sept_remove.c: the TDR shared, the TD's state, the GPA, the S-EPT tree exclusively,
    the walk, the entry lock, the state, the child page's PAMT entry locked exclusively
    (pamt_implicit_get_and_lock(): BUSY|RCX), blocked and tracked, the child table empty."""
    got, err = begin(mod, held, r, caller, TDH_MEM_SEPT_REMOVE, lambda td: range(1, td.pwl), TDX_LOCK_EXCLUSIVE)
    if err:
        return err
    td, gpa, level = got
    ptr, e, entry = walk_and_host_lock(mod, held, td, gpa, level, caller, "sept_locked_exclusive")
    if ptr is None:
        return e
    state = S.sept_state(e)
    if not S.seamcall_allowed(TDH_MEM_SEPT_REMOVE, state):
        rcx, rdx = mod.sept_details(e, level)
        return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    child = e & S.SEPT_HPA
    pamt = mod.pamt
    st = pamt.implicit_lock(child, 0, TDX_LOCK_EXCLUSIVE)
    if st:
        return Regs(st | OPERAND_ID_RCX)
    held.push(lambda: pamt.implicit_unlock(child, 0, TDX_LOCK_EXCLUSIVE))
    mod.point(caller, "pamt_locked")
    bad = check_blocked_and_tracked(mod, td, e, state, level, child)
    if bad:
        return bad
    q = mod.mem.q
    if any(S.sept_state(q[(child >> 3) + i]) != S.SEPT_FREE for i in range(512)):
        rcx, rdx = mod.sept_details(e, level)
        return Regs(TDX_EPT_PAGE_NOT_FREE | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    q[ptr >> 3] = S.SEPT_FREE_ENTRY
    held.drop(entry)
    mod.release(child)
    td.chldcnt -= 1
    return Regs(TDX_SUCCESS, rcx=child)


# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {TDH_MEM_SEPT_ADD: tdh_mem_sept_add, TDH_MEM_SEPT_REMOVE: tdh_mem_sept_remove}
