"""Blocking and TLB tracking: TDH.MEM.RANGE.BLOCK, TDH.MEM.RANGE.UNBLOCK, TDH.MEM.TRACK.

Follows src/vmm_dispatcher/api_calls/tdh_mem_range_block.c, tdh_mem_range_unblock.c and
tdh_mem_track.c of the TDX module (tdx_1.5).
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..helpers import (
    walk_and_host_lock,
    seamcall_leaf,
    begin,
    tlb_tracking_required,
    check_lock_tdr,
    check_state_and_lock_op_state,
)
from .. import locks as L
from .. import sept as S


@seamcall_leaf
def tdh_mem_range_block(mod, r, caller, held):
    """tdh_mem_range_block.c: the TDR shared, the TD's state, the GPA, the S-EPT tree exclusively,
    the walk, the entry lock, the state; then the entry blocked and the page's BEPOCH set."""
    got, err = begin(mod, held, r, caller, TDH_MEM_RANGE_BLOCK, lambda td: range(0, td.pwl), L.TDX_LOCK_EXCLUSIVE)
    if err:
        return err
    td, gpa, level = got
    ptr, e, entry = walk_and_host_lock(mod, held, td, gpa, level, caller, "sept_locked_exclusive")
    if ptr is None:
        return e
    state = S.sept_state(e)
    if not S.seamcall_allowed(TDH_MEM_RANGE_BLOCK, state):
        rcx, rdx = mod.sept_details(e, level)
        if state in S.BLOCKED_STATES:
            return Regs(TDX_GPA_RANGE_ALREADY_BLOCKED | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    new = {S.SEPT_NL_MAPPED: S.SEPT_NL_BLOCKED, S.SEPT_MAPPED: S.SEPT_BLOCKED, S.SEPT_PENDING: S.SEPT_PENDING_BLOCKED}[
        state
    ]
    e = S.cleanup_if_pending(e, level)  # block_sept_entry(): a 2M ACCEPT starts over
    mod.mem.q[ptr >> 3] = S.set_state(e, new)  # still locked: released on the way out
    mod.pamt.set_bepoch(e & S.SEPT_HPA, td.epoch)
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mem_range_unblock(mod, r, caller, held):
    """tdh_mem_range_unblock.c: as BLOCK, then the page TLB-tracked since its BEPOCH."""
    got, err = begin(mod, held, r, caller, TDH_MEM_RANGE_UNBLOCK, lambda td: range(0, td.pwl), L.TDX_LOCK_EXCLUSIVE)
    if err:
        return err
    td, gpa, level = got
    ptr, e, entry = walk_and_host_lock(mod, held, td, gpa, level, caller, "sept_locked_exclusive")
    if ptr is None:
        return e
    state = S.sept_state(e)
    if not S.seamcall_allowed(TDH_MEM_RANGE_UNBLOCK, state):
        rcx, rdx = mod.sept_details(e, level)
        return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    if tlb_tracking_required(td) and not mod.is_tlb_tracked(td, mod.pamt.bepoch(e & S.SEPT_HPA)):
        return Regs(TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_SEPT)  # the source's operand id: 0x92
    new = {S.SEPT_NL_BLOCKED: S.SEPT_NL_MAPPED, S.SEPT_BLOCKED: S.SEPT_MAPPED, S.SEPT_PENDING_BLOCKED: S.SEPT_PENDING}[
        state
    ]
    mod.mem.q[ptr >> 3] = S.set_state(e, new) & ~S.SEPT_TDEL
    held.drop(entry)
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mem_track(mod, r, caller, held):
    """tdh_mem_track.c: the TDR shared, the TD's state, the epoch lock exclusively
    (BUSY|TD_EPOCH), no vCPU left in the previous epoch, then the next epoch."""
    td, st = check_lock_tdr(mod, held, r.rcx, OPERAND_ID_RCX, L.TDX_LOCK_SHARED)
    if st:
        return Regs(st)
    st = check_state_and_lock_op_state(mod, held, td, TDH_MEM_TRACK, L.TDX_LOCK_SHARED)
    if st:
        return Regs(st)
    td.epoch_lock, ok = L.sharex_acquire(td.epoch_lock, L.TDX_LOCK_EXCLUSIVE)
    mod.touch("td_epoch", True)
    if not ok:
        return Regs(TDX_OPERAND_BUSY | OPERAND_ID_TD_EPOCH)

    def release():
        td.epoch_lock = L.sharex_release(td.epoch_lock, L.TDX_LOCK_EXCLUSIVE)
        mod.touch("td_epoch", True)

    held.push(release)
    mod.point(caller, "epoch_locked")
    if td.refcount[1 - (td.epoch & 1)]:
        return Regs(TDX_PREVIOUS_TLB_EPOCH_BUSY)
    td.epoch += 1
    return Regs(TDX_SUCCESS)


# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {
    TDH_MEM_RANGE_BLOCK: tdh_mem_range_block,
    TDH_MEM_RANGE_UNBLOCK: tdh_mem_range_unblock,
    TDH_MEM_TRACK: tdh_mem_track,
}
