"""vCPU management leaves: TDH.VP.CREATE, TDH.VP.ADDCX, TDH.VP.INIT, TDH.VP.RD, TDH.VP.WR, TDH.VP.FLUSH.

Follows src/vmm_dispatcher/api_calls/tdh_vp_create.c, tdh_vp_addcx.c, tdh_vp_init.c,
tdh_vp_rd_wr.c (with src/common/metadata_handlers/metadata_vp.c) and tdh_vp_flush.c of the TDX
module (tdx_1.5).  TDH.VP.ENTER is in td_dispatch.py (src/td_transitions/tdh_vp_enter.c).
"""

from ..td_msr import td_msr_bitmap
from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import (
    TdVcpu,
    TDVPX_PAGES,
    MD_TDVPS_VMCS_SHARED_EPTP,
    MD_TDVPS_GPR_BASE,
    MD_TDVPS_RIP,
    MD_TDVPS_CR3,
    GPR_ORDER,
)
from ..helpers import (
    seamcall_leaf,
    check_and_lock_private_hpa,
    check_lock_tdr,
    check_state_and_lock_op_state,
    lock_tdvpr,
    map_tdvps,
    check_and_associate_vcpu,
    shared_hpa_check,
)
from ..locks import TDX_LOCK_EXCLUSIVE, TDX_LOCK_SHARED


@seamcall_leaf
def tdh_vp_create(mod, r, caller, held):
    """tdh_vp_create.c: the TDR shared, the TD's state (op_state lock shared), then the new
    TDVPR page (PT_NDA, locked exclusively)."""
    td, st = check_lock_tdr(mod, held, r.rdx, OPERAND_ID_RDX, TDX_LOCK_SHARED)
    if st:
        return Regs(st)
    st = check_state_and_lock_op_state(mod, held, td, TDH_VP_CREATE, TDX_LOCK_SHARED)
    if st:
        return Regs(st)
    st = check_and_lock_private_hpa(mod, held, r.rcx, OPERAND_ID_RCX, TDX_LOCK_EXCLUSIVE, PT_NDA)
    if st:
        return Regs(st)
    mod.mem.zero(r.rcx)
    mod.give_to_module(r.rcx, PT_TDVPR, td.tdr)
    v = TdVcpu(td, r.rcx)
    td.vcpus[r.rcx] = v
    mod.vcpus[r.rcx] = v
    td.chldcnt += 1
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_vp_addcx(mod, r, caller, held):
    """tdh_vp_addcx.c: the TDVPR exclusively, its TDR shared, the TD's state, the vCPU
    uninitialized, the page count, then the new page (PT_NDA, locked exclusively)."""
    v, st = lock_tdvpr(mod, held, r.rdx, OPERAND_ID_RDX, TDX_LOCK_EXCLUSIVE, TDH_VP_ADDCX, caller=caller)
    if st:
        return Regs(st)
    if v.initialized:
        return Regs(TDX_VCPU_STATE_INCORRECT)
    if len(v.tdvpx) >= TDVPX_PAGES:
        return Regs(TDX_TDCX_NUM_INCORRECT)
    st = check_and_lock_private_hpa(mod, held, r.rcx, OPERAND_ID_RCX, TDX_LOCK_EXCLUSIVE, PT_NDA)
    if st:
        return Regs(st)
    mod.mem.zero(r.rcx)
    mod.give_to_module(r.rcx, PT_TDCX, v.td.tdr)
    v.tdvpx.append(r.rcx)
    v.td.chldcnt += 1
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_vp_init(mod, r, caller, held):
    """tdh_vp_init.c: the TDVPR exclusively, its TDR shared, the TD's state, map_tdvps(), the vCPU
    uninitialized, the vCPU count; then the vCPU is READY and associated with this CPU
    (associate_vcpu_initial()).  Version 0 is the 1.5.01 leaf (RCX, RDX); version 1 (later 1.5
    builds, what Linux 6.16 calls) adds the x2APIC id in R8."""
    version = (r.rax >> 16) & 0xFF
    if version > 1:
        return Regs(TDX_OPERAND_INVALID)  # operand id 0: RAX
    v, st = lock_tdvpr(mod, held, r.rcx, OPERAND_ID_RCX, TDX_LOCK_EXCLUSIVE, TDH_VP_INIT, caller=caller)
    if st:
        return Regs(st)
    if not map_tdvps(v):
        return Regs(TDX_TDCX_NUM_INCORRECT)
    if v.initialized:
        return Regs(TDX_VCPU_STATE_INCORRECT)
    if v.td.num_vcpus >= v.td.max_vcpus:
        return Regs(TDX_MAX_VCPUS_EXCEEDED)
    if version == 1:
        if r.r8 >> 32:
            return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R8)
        if any(x.initialized and x.x2apic_id == r.r8 for x in v.td.vcpus.values()):
            return Regs(TDX_X2APIC_ID_NOT_UNIQUE | r.r8)
        v.x2apic_id = r.r8
    index = v.td.num_vcpus
    v.td.num_vcpus += 1
    v.vcpu_index = index
    v.hw = mod.make_cpu(index)
    # The TD VMCS intercepts no exception the guest could raise (only #MC): every other one is
    # delivered through the TD's own IDT.
    v.hw.exception_bitmap = 1 << 18
    # The "EPT-violation #VE" control is 1 for every TD (PROCBASED_CTLS2_INIT has bit 18, whatever
    # the attributes: SEPT_VE_DISABLE is about PENDING pages only), and the VE information area
    # is TDVPS.VE_INFO (init_guest_td_address_fields()).  The S-EPT's entries all suppress #VE,
    # so only a shared-EPT entry of KVM's with bit 63 clear (its MMIO SPTE) is ever converted.
    v.hw.ve_info = v.ve_info
    # The TD VMCS's MSR bitmap: only the MSRs the module lets through do not exit (tdxmod.td_msr).
    # CPUID exits unconditionally: the module answers or makes it a #VE (tdxmod.td_cpuid).
    v.hw.msr_bitmap = td_msr_bitmap()
    # init_vcpu_gprs_and_registers(): RCX = R8 = the initial RCX, RSI = the vCPU index.
    v.hw.set_regs({"rcx": r.rdx, "r8": r.rdx, "rsi": index, "rbx": 48 if not v.td.gpaw else 52})
    v.state = VCPU_READY
    # associate_vcpu_initial(): associated with this CPU until TDH.VP.FLUSH
    v.assoc_lpid = mod.current_lp(caller)
    v.td.num_assoc_vcpus += 1
    return Regs(TDX_SUCCESS)


# The writable bits of SHARED_EPT_POINTER (td_vmcs_fields_lookup.c: prod_wr_mask): the root's
# HPA; the module supplies WB, the walk length and A/D when it loads the EPTP.
SHARED_EPTP_WR_MASK = 0x000FFFFFFFFFF000


def _vp_field(v, field, write=None):
    """Read (or write) one TDVPS field; None for a field this model does not have."""
    hw = v.hw
    if field == MD_TDVPS_VMCS_SHARED_EPTP:
        if write is not None:
            v.shared_eptp = write & SHARED_EPTP_WR_MASK
        return v.shared_eptp or 0
    debug = v.td.attributes & TD_ATTR_DEBUG
    if not debug or hw is None:
        return None
    if MD_TDVPS_GPR_BASE <= field < MD_TDVPS_GPR_BASE + 16:
        name = GPR_ORDER[field - MD_TDVPS_GPR_BASE]
    elif field == MD_TDVPS_RIP:
        name = "rip"
    elif field == MD_TDVPS_CR3:
        name = "cr3"
    else:
        return None
    if write is not None:
        hw.set_reg(name, write)
    return hw.reg(name)


def _vp_rd_wr(mod, r, caller, held, write):
    """tdh_vp_rd_wr.c's common part: the TDVPR shared, its TDR shared, the TD's state (op_state
    lock shared), map_tdvps(), then the vCPU associated with this CPU (check_and_associate_vcpu():
    a vCPU running in the TD elsewhere is VCPU_STATE_INCORRECT, one associated with another CPU
    VCPU_ASSOCIATED; a read may see a DISABLED vCPU).  (v, None) or (None, status)."""
    v, st = lock_tdvpr(mod, held, r.rcx, OPERAND_ID_RCX, TDX_LOCK_SHARED, TDH_VP_WR if write else TDH_VP_RD)
    if st:
        return None, st
    if not map_tdvps(v):
        return None, TDX_TDCX_NUM_INCORRECT
    st, _ = check_and_associate_vcpu(mod, v, mod.current_lp(caller), not write)
    if st:
        return None, st
    return v, None


@seamcall_leaf
def tdh_vp_rd(mod, r, caller, held):
    v, st = _vp_rd_wr(mod, r, caller, held, False)
    if st:
        return Regs(st)
    value = _vp_field(v, r.rdx)
    if value is None:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    return Regs(TDX_SUCCESS, rdx=r.rdx, r8=value)


@seamcall_leaf
def tdh_vp_wr(mod, r, caller, held):
    """md_vp_write_element(): the value is the old one with the bits of the caller's mask (R9)
    that the field lets the VMM write replaced; a field holding a shared HPA (SHARED_EPT_POINTER)
    must then pass shared_hpa_check() (md_vp_handle_field_attribute_on_wr()), else
    TDX_METADATA_FIELD_VALUE_NOT_VALID and nothing is written."""
    v, st = _vp_rd_wr(mod, r, caller, held, True)
    if st:
        return Regs(st)
    old = _vp_field(v, r.rdx)
    if old is None:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    mask = r.r9
    new = (old & ~mask) | (r.r8 & mask)
    if r.rdx == MD_TDVPS_VMCS_SHARED_EPTP:
        combined = mask & SHARED_EPTP_WR_MASK
        new = (old & ~combined) | (r.r8 & combined)
        if not shared_hpa_check(mod, new):
            return Regs(TDX_METADATA_FIELD_VALUE_NOT_VALID)
    _vp_field(v, r.rdx, new)
    return Regs(TDX_SUCCESS, r8=old)


@seamcall_leaf
def tdh_vp_flush(mod, r, caller, held):
    """tdh_vp_flush.c: the TDVPR exclusively (BUSY|RCX while the vCPU runs in the TD, which holds
    it shared), its TDR shared (no TD_FATAL check: a fatal TD is torn down), keys configured,
    map_tdvps(), then the vCPU associated with this CPU (TDX_VCPU_NOT_ASSOCIATED otherwise):
    flush its TLB context and dissociate it."""
    v, st = lock_tdvpr(mod, held, r.rcx, OPERAND_ID_RCX, TDX_LOCK_EXCLUSIVE, None, caller=caller)
    if st:
        return Regs(st)
    if v.td.lifecycle != TD_KEYS_CONFIGURED:
        return Regs(TDX_TD_KEYS_NOT_CONFIGURED)
    if not map_tdvps(v):
        return Regs(TDX_TDCX_NUM_INCORRECT)
    mod.touch(("tdvpr", v.tdvpr), True)
    if v.assoc_lpid is None or v.assoc_lpid != mod.current_lp(caller):
        return Regs(TDX_VCPU_NOT_ASSOCIATED)
    if v.hw is not None:
        v.hw.flush_tlb()
    v.assoc_lpid = None
    v.td.num_assoc_vcpus -= 1
    return Regs(TDX_SUCCESS)


# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {
    TDH_VP_CREATE: tdh_vp_create,
    TDH_VP_ADDCX: tdh_vp_addcx,
    TDH_VP_INIT: tdh_vp_init,
    TDH_VP_RD: tdh_vp_rd,
    TDH_VP_WR: tdh_vp_wr,
    TDH_VP_FLUSH: tdh_vp_flush,
}
