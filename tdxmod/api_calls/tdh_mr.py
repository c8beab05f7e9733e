"""Measurement leaves: TDH.MR.EXTEND, TDH.MR.FINALIZE.

Follows src/vmm_dispatcher/api_calls/tdh_mr_extend.c and tdh_mr_finalize.c of the TDX module (tdx_1.5).
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import PAGE
from ..helpers import seamcall_leaf, check_lock_tdr, check_state_and_lock_op_state
from ..locks import TDX_LOCK_EXCLUSIVE, TDX_LOCK_NO_LOCK
from .. import sept as S


@seamcall_leaf
def tdh_mr_extend(mod, r, caller, held):
    """tdh_mr_extend.c: the TDR exclusively (so the S-EPT too), the TD's state, the GPA, the walk
    to a present leaf, then the 256 bytes measured."""
    td, st = check_lock_tdr(mod, held, r.rdx, OPERAND_ID_RDX, TDX_LOCK_EXCLUSIVE, caller)
    if st:
        return Regs(st)
    st = check_state_and_lock_op_state(mod, held, td, TDH_MR_EXTEND, TDX_LOCK_NO_LOCK)
    if st:
        return Regs(st)
    gpa = r.rcx
    if gpa & 0xFF or not mod.private_gpa_ok(td, gpa):
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    # check_and_walk_private_gpa_to_leaf(): the walk must end at a leaf with RWX != 0.
    ptr, e, lvl = mod.sept_walk(td, gpa, 0)
    if not S.is_leaf_state(S.sept_state(e)) or not e & S.SEPT_RWX:
        rcx, rdx = mod.sept_details(e, lvl)
        return Regs(TDX_EPT_ENTRY_NOT_PRESENT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    if not S.seamcall_allowed(TDH_MR_EXTEND, S.sept_state(e)):
        return Regs(TDX_EPT_ENTRY_NOT_PRESENT)
    hpa = (e & S.SEPT_HPA) + (gpa & ((PAGE << (9 * lvl)) - 1))  # leaf_ept_entry_to_hpa()
    td.mrtd.update(b"MR.EXTEND" + gpa.to_bytes(8, "little") + mod.mem.read(hpa, 256))
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mr_finalize(mod, r, caller, held):
    """tdh_mr_finalize.c: the TDR exclusively, the TD's state, at least one vCPU initialized."""
    td, st = check_lock_tdr(mod, held, r.rcx, OPERAND_ID_RCX, TDX_LOCK_EXCLUSIVE, caller)
    if st:
        return Regs(st)
    st = check_state_and_lock_op_state(mod, held, td, TDH_MR_FINALIZE, TDX_LOCK_NO_LOCK)
    if st:
        return Regs(st)
    if td.num_vcpus == 0:
        return Regs(TDX_NO_VCPUS)
    td.finalized_mrtd = td.mrtd.hexdigest()
    td.op_state = OP_STATE_RUNNABLE
    return Regs(TDX_SUCCESS)


# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {TDH_MR_EXTEND: tdh_mr_extend, TDH_MR_FINALIZE: tdh_mr_finalize}
