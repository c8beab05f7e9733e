"""Blocking and TLB tracking: TDH.MEM.RANGE.BLOCK, TDH.MEM.RANGE.UNBLOCK, TDH.MEM.TRACK.

Follows src/vmm_dispatcher/api_calls/tdh_mem_range_block.c, tdh_mem_range_unblock.c and
tdh_mem_track.c of the TDX module (tdx_1.5).
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..helpers import begin, host_lock, sept_unlock, op_state_ok, tlb_tracking_required, RUN_STATES
from .. import sept as S


def tdh_mem_range_block(mod, r, caller):
    got, err = begin(mod, r, caller, lambda td: range(0, td.pwl), True)
    if err:
        return err
    td, gpa, level = got
    ptr = None
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
        if not S.seamcall_allowed(TDH_MEM_RANGE_BLOCK, state):
            rcx, rdx = mod.sept_details(e, level)
            if state in S.BLOCKED_STATES:
                return Regs(TDX_GPA_RANGE_ALREADY_BLOCKED | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
            return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        new = {S.SEPT_NL_MAPPED: S.SEPT_NL_BLOCKED, S.SEPT_MAPPED: S.SEPT_BLOCKED,
               S.SEPT_PENDING: S.SEPT_PENDING_BLOCKED}[state]
        mod.mem.q[ptr >> 3] = S.set_state(e, new)          # still locked: released below
        mod.pamt.set_bepoch(e & S.SEPT_HPA, td.epoch)
        return Regs(TDX_SUCCESS)
    finally:
        if ptr is not None:
            mod.unlock_entry(ptr)
        sept_unlock(td, True)


def tdh_mem_range_unblock(mod, r, caller):
    got, err = begin(mod, r, caller, lambda td: range(0, td.pwl), True)
    if err:
        return err
    td, gpa, level = got
    ptr = None
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
        if not S.seamcall_allowed(TDH_MEM_RANGE_UNBLOCK, state):
            rcx, rdx = mod.sept_details(e, level)
            return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        if tlb_tracking_required(td) and not mod.is_tlb_tracked(td, mod.pamt.bepoch(e & S.SEPT_HPA)):
            return Regs(TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_SEPT)    # the source's operand id: 0x92
        new = {S.SEPT_NL_BLOCKED: S.SEPT_NL_MAPPED, S.SEPT_BLOCKED: S.SEPT_MAPPED,
               S.SEPT_PENDING_BLOCKED: S.SEPT_PENDING}[state]
        mod.mem.q[ptr >> 3] = S.set_state(e, new) & ~S.SEPT_TDEL
        ptr = None
        return Regs(TDX_SUCCESS)
    finally:
        if ptr is not None:
            mod.unlock_entry(ptr)
        sept_unlock(td, True)


def tdh_mem_track(mod, r, caller):
    td, st = mod.td_operand(r.rcx)
    if st:
        return Regs(st)
    if not op_state_ok(td, RUN_STATES):
        return Regs(TDX_OP_STATE_INCORRECT)
    if td.epoch_locked:
        return Regs(TDX_OPERAND_BUSY | OPERAND_ID_TD_EPOCH)
    td.epoch_locked = True
    try:
        mod.point(caller, "epoch_locked")
        if td.refcount[1 - (td.epoch & 1)]:
            return Regs(TDX_PREVIOUS_TLB_EPOCH_BUSY)
        td.epoch += 1
        return Regs(TDX_SUCCESS)
    finally:
        td.epoch_locked = False



# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {
    TDH_MEM_RANGE_BLOCK: tdh_mem_range_block,
    TDH_MEM_RANGE_UNBLOCK: tdh_mem_range_unblock,
    TDH_MEM_TRACK: tdh_mem_track,
}
