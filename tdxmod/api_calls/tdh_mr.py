"""Measurement leaves: TDH.MR.EXTEND, TDH.MR.FINALIZE.

Follows src/vmm_dispatcher/api_calls/tdh_mr_extend.c and tdh_mr_finalize.c of the TDX module (tdx_1.5).
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import PAGE
from .. import sept as S


def tdh_mr_extend(mod, r, caller):
    td, st = mod.td_operand(r.rdx, OPERAND_ID_RDX)
    if st:
        return Regs(st)
    if td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
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
    hpa = (e & S.SEPT_HPA) + (gpa & ((PAGE << (9 * lvl)) - 1))    # leaf_ept_entry_to_hpa()
    td.mrtd.update(b"MR.EXTEND" + gpa.to_bytes(8, "little") + mod.mem.read(hpa, 256))
    return Regs(TDX_SUCCESS)


def tdh_mr_finalize(mod, r, caller):
    td, st = mod.td_operand(r.rcx)
    if st:
        return Regs(st)
    if td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    if td.num_vcpus == 0:
        return Regs(TDX_NO_VCPUS)
    td.finalized_mrtd = td.mrtd.hexdigest()
    td.op_state = OP_STATE_RUNNABLE
    return Regs(TDX_SUCCESS)



# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {
    TDH_MR_EXTEND: tdh_mr_extend,
    TDH_MR_FINALIZE: tdh_mr_finalize,
}
