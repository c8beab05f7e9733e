"""vCPU management leaves: TDH.VP.CREATE, TDH.VP.ADDCX, TDH.VP.INIT, TDH.VP.RD, TDH.VP.WR, TDH.VP.FLUSH.

Follows src/vmm_dispatcher/api_calls/tdh_vp_create.c, tdh_vp_addcx.c, tdh_vp_init.c,
tdh_vp_rd_wr.c (with src/common/metadata_handlers/metadata_vp.c) and tdh_vp_flush.c of the TDX
module (tdx_1.5).  TDH.VP.ENTER is in td_dispatch.py (src/td_transitions/tdh_vp_enter.c).
"""

from ..td_msr import td_msr_bitmap
from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import (TdVcpu, TDVPX_PAGES, MD_TDVPS_VMCS_SHARED_EPTP, MD_TDVPS_GPR_BASE, MD_TDVPS_RIP,
                            MD_TDVPS_CR3, GPR_ORDER)
from ..helpers import vcpu_operand


def tdh_vp_create(mod, r, caller):
    td, st = mod.td_operand(r.rdx, OPERAND_ID_RDX)
    if st:
        return Regs(st)
    if td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    st = mod.hpa_operand(r.rcx, OPERAND_ID_RCX)
    if st:
        return Regs(st)
    mod.mem.zero(r.rcx)
    mod.give_to_module(r.rcx, PT_TDVPR, td.tdr)
    v = TdVcpu(td, r.rcx)
    td.vcpus[r.rcx] = v
    mod.vcpus[r.rcx] = v
    td.chldcnt += 1
    return Regs(TDX_SUCCESS)


def tdh_vp_addcx(mod, r, caller):
    v, st = vcpu_operand(mod, r.rdx, OPERAND_ID_RDX)
    if st:
        return Regs(st)
    if v.td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    if v.initialized:
        return Regs(TDX_VCPU_STATE_INCORRECT)
    if len(v.tdvpx) >= TDVPX_PAGES:
        return Regs(TDX_TDCX_NUM_INCORRECT)
    st = mod.hpa_operand(r.rcx, OPERAND_ID_RCX)
    if st:
        return Regs(st)
    mod.mem.zero(r.rcx)
    mod.give_to_module(r.rcx, PT_TDCX, v.td.tdr)
    v.tdvpx.append(r.rcx)
    v.td.chldcnt += 1
    return Regs(TDX_SUCCESS)


def tdh_vp_init(mod, r, caller):
    """tdh_vp_init.c.  Version 0 is the 1.5.01 leaf (RCX, RDX); version 1 (later 1.5 builds, what
    Linux 6.16 calls) adds the x2APIC id in R8.  The vCPU count is enforced here, not at VP.CREATE."""
    version = (r.rax >> 16) & 0xFF
    if version > 1:
        return Regs(TDX_OPERAND_INVALID)                    # operand id 0: RAX
    v, st = vcpu_operand(mod, r.rcx)
    if st:
        return Regs(st)
    if v.td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    if len(v.tdvpx) != TDVPX_PAGES:
        return Regs(TDX_TDCX_NUM_INCORRECT)                 # map_tdvps() fails
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
    v.initialized = True
    v.associated = True          # associated with this CPU until TDH.VP.FLUSH
    return Regs(TDX_SUCCESS)


def _vp_field(v, field, write=None):
    """Read (or write) one TDVPS field; None for a field this model does not have."""
    hw = v.hw
    if field == MD_TDVPS_VMCS_SHARED_EPTP:
        # Only bits 51:12 (the root HPA) are the VMM's; the module supplies WB, the walk
        # length and A/D when it loads the EPTP.
        if write is not None:
            v.shared_eptp = write & 0x000FFFFFFFFFF000
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


def tdh_vp_rd(mod, r, caller):
    v, st = vcpu_operand(mod, r.rcx)
    if st:
        return Regs(st)
    value = _vp_field(v, r.rdx)
    if value is None:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    return Regs(TDX_SUCCESS, rdx=r.rdx, r8=value)


def tdh_vp_wr(mod, r, caller):
    v, st = vcpu_operand(mod, r.rcx)
    if st:
        return Regs(st)
    old = _vp_field(v, r.rdx)
    if old is None:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    mask = r.r9                      # the caller's mask (ANDed with the field's writable bits)
    _vp_field(v, r.rdx, (old & ~mask) | (r.r8 & mask))
    return Regs(TDX_SUCCESS, r8=old)


def tdh_vp_flush(mod, r, caller):
    v, st = vcpu_operand(mod, r.rcx)
    if st:
        return Regs(st)
    if v.hw is not None:
        v.hw.flush_tlb()
    v.associated = False
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
