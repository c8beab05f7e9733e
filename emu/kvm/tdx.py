"""KVM's TDX backend (arch/x86/kvm/vmx/tdx.c): TD lifecycle, TD exits, and the mirror hooks.

The seed patch's hooks, bound here (upstream names in brackets):
  reflect_link_spt    [link_external_spt   -> tdx_sept_link_private_spt]   TDH.MEM.SEPT.ADD
  reflect_set_spte    [set_external_spte   -> tdx_sept_set_private_spte]   TDH.MEM.PAGE.AUG
  reflect_remove_spte [remove_external_spte-> tdx_sept_remove_private_spte] BLOCK, TRACK, REMOVE, WBINVD
  reflect_free_spt    [free_external_spt   -> tdx_sept_free_private_spt]   TDH.PHYMEM.PAGE.RECLAIM

The 7.2 hooks (--mirror-hooks 7.2; the shape TDX private huge pages build on):
  set_external_spte(old, new) -> tdx_sept_set_private_spte(): link (SEPT.ADD), map (PAGE.AUG at 4K
                                 or 2M), split (BLOCK, TRACK, DEMOTE), zap (BLOCK, TRACK, REMOVE, WBINVD)
  reclaim_external_sp        -> tdx_sept_reclaim_private_sp(): TDH.PHYMEM.PAGE.RECLAIM, or a leak
and the series' huge-page logic (RFC v5, "TDX: Dynamic PAMT + S-EPT Hugepage"): the
tdx_huge_page parameter, tdx_gmem_max_mapping_level(), tdx_handle_mismatched_accept() with
GUEST_INHIBIT, tdx_gmem_convert(), and the split caches.
"""

import operator

from tdxmod import abi as A
from tdxmod.module import (
    TDCS_PAGES,
    TDVPX_PAGES,
    TD_PARAMS_ATTRIBUTES,
    TD_PARAMS_MAX_VCPUS,
    TD_PARAMS_EPTP_CONTROLS,
    TD_PARAMS_CONFIG_FLAGS,
    MD_TDVPS_VMCS_SHARED_EPTP,
    MD_TDVPS_GPR_BASE,
    MD_TDVPS_RIP,
    MD_TDVPS_CR3,
    GPR_ORDER,
)
from ..hw.ept import (
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_PROT_READ,
    EPT_VIOLATION_PROT_WRITE,
    EPT_VIOLATION_PROT_EXEC,
    EPT_VIOLATION_EXEC_FOR_RING3_LIN,
)
from ..hw.exits import (
    EXIT_REASON_EPT_VIOLATION,
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_TDCALL,
    EXIT_REASON_TRIPLE_FAULT,
    EXIT_REASON_EXTERNAL_INTERRUPT,
    VmExit,
)
from .spte import (
    PG_LEVEL_4K,
    PG_LEVEL_2M,
    MT_MASK_TDX_VM,
    KVM_PAGES_PER_HPAGE,
    gfn_round_for_level,
    is_shadow_present_pte,
    is_last_spte,
    spte_to_pfn,
)
from .tdp_mmu import RET_PF_RETRY, EBUSY, EIO, EINVAL, KVM_MIRROR_ROOTS
from .tdp_iter import spte_to_child_pt
from .locking import Mutex
from .mmu import hugepage_set_guest_inhibit, hugepage_test_guest_inhibit, hugepage_clear_guest_inhibit
from .x86_ops import VmxX86Ops
from .uapi import (
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_HLT,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_MMIO,
)
from .uapi import (
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    KVM_MAP_GPA_RANGE_ENCRYPTED,  # noqa: F401
    KVM_MAP_GPA_RANGE_DECRYPTED,
)
from .x86_ops import X86EMUL_RETRY_INSTR
from .kvm_host import KvmIoctlError
from .x86_msr import MSR_IA32_APICBASE_BSP, X2APIC_ENABLE, MSR_IA32_APICBASE_ENABLE, APIC_DEFAULT_PHYS_BASE
from ..hw.msr import (
    MSR_IA32_UCODE_REV,
    MSR_IA32_ARCH_CAPABILITIES,
    MSR_IA32_CR_PAT,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_APICBASE,
    MSR_EFER,
    MSR_IA32_FEAT_CTL,
    EFER_SCE,
    EFER_LME,
    EFER_LMA,
    EFER_NX,
)
from ..hw.exits import EXIT_REASON_CPUID, EXIT_REASON_IO_INSTRUCTION, EXIT_REASON_MSR_READ, EXIT_REASON_MSR_WRITE

KVM_SYSTEM_EVENT_TDX_FATAL = 7

TD_STATE_UNINITIALIZED, TD_STATE_INITIALIZED, TD_STATE_RUNNABLE = 0, 1, 2
TDX_MAP_GPA_MAX_LEN = 2 << 20  # KVM handles MapGPA in 2M steps, asking the guest to retry
LOCAL_RETRY_MAX = 1000  # then back to the guest (which faults again): the watchdog's turn
EPT_VIOLATION_PROT_MASK = EPT_VIOLATION_PROT_READ | EPT_VIOLATION_PROT_WRITE | EPT_VIOLATION_PROT_EXEC
TDX_EXT_EXIT_QUAL_TYPE_MASK = 0xF
TDX_EXT_EXIT_QUAL_INFO_SHIFT = 32
# How many times KVM may spin on TDX_INTERRUPTED_RESTARTABLE before the host's soft-lockup detector
# speaks (kernel/watchdog.c reports a CPU that did not schedule for 2 * watchdog_thresh = 20 s; the
# model counts SEAMCALLs, as it has no time).
SOFTLOCKUP_RETRIES = 1000
KVM_REQ_OUTSIDE_GUEST_MODE = 1 << 1  # as emu/kvm/kvm.py numbers it
# struct tdx_module_args members TDH.VP.ENTER passes in and out besides RCX (the TDVPR)
VP_ENTER_ARGS = ("rdx", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rbx", "rdi", "rsi")
_vp_enter_args_of = operator.attrgetter(*VP_ENTER_ARGS)  # a TD exit's Regs -> their values, in order


def tdx_operand_busy(err):
    return (err & A.TDX_STATUS_MASK) == A.TDX_OPERAND_BUSY


class KvmTdx:
    """struct kvm_tdx"""

    def __init__(self):
        self.tdr_pa = None
        self.tdcs_pa = []
        self.hkid = None
        self.state = TD_STATE_UNINITIALIZED
        self.nr_premapped = 0
        self.attributes = 0
        self.wait_for_sept_zap = False
        # The per-VM split cache and its mutex (v5 44/45, Sean's rework): pages for splits that run
        # without a vCPU (a conversion), topped up under the mutex.  The mutex is taken before
        # mmu_lock.  (Without Dynamic PAMT the cache has nothing to hold: see docs/huge-pages.md.)
        self.pamt_cache = []
        self.pamt_cache_lock = None


class VcpuTdx:
    """struct vcpu_tdx"""

    def __init__(self):
        self.tdvpr_pa = None
        self.tdvpx_pa = []
        # vp_enter_args: the registers the last TD exit returned, passed back (as KVM changed
        # them) to the next TDH.VP.ENTER; a TDG.VP.VMCALL's answer is R10/R11 here.
        self.vp_enter_args = dict.fromkeys(VP_ENTER_ARGS, 0)
        self.map_gpa_next = None
        self.map_gpa_end = None
        self.regs = {}  # vcpu->arch.regs: KVM's copy (kvm_rax_write() and co.)
        self.exit_reason = None  # the exit the TDVMCALL stands for (tdcall_to_vmx_exit_reason())
        self.efer = 0  # vcpu->arch.efer (the TD's own is the module's)
        self.pamt_cache = []  # the per-vCPU split cache (struct tdx_pamt_cache)
        self.ext_exit_qualification = 0  # RDX of the last TD exit

    # tdvmcall_set_return_code() / tdvmcall_set_return_val()
    @property
    def ret_r10(self):
        return self.vp_enter_args["r10"]

    @ret_r10.setter
    def ret_r10(self, value):
        self.vp_enter_args["r10"] = value

    @property
    def ret_r11(self):
        return self.vp_enter_args["r11"]

    @ret_r11.setter
    def ret_r11(self, value):
        self.vp_enter_args["r11"] = value


class TdxX86Ops(VmxX86Ops):
    name = "tdx"

    def __init__(self, module, attributes=A.TD_ATTR_SEPT_VE_DISABLE | A.TD_ATTR_DEBUG, tdx_huge_page=False):
        self.module = module
        self.td_attributes = attributes
        self.seamcall_counts = {}
        # kvm_intel.tdx_huge_page (v3 24/24, v5 45/45): 2M private mappings once the TD runs.  KVM
        # turns it off when the module does not enumerate ENHANCED_DEMOTE_INTERRUPTIBILITY.
        self.tdx_huge_page = tdx_huge_page

    # -- SEAMCALL -------------------------------------------------------------------------------------
    def seamcall(self, kvm, leaf, caller=None, **regs):
        name = A.seamcall_name(leaf)
        self.seamcall_counts[name] = self.seamcall_counts.get(name, 0) + 1
        return self.module.seamcall(leaf, caller=caller, **regs)

    # -- VM lifetime ------------------------------------------------------------------------------------
    def vm_init(self, kvm):
        """KVM_CREATE_VM + KVM_TDX_INIT_VM: TDR, HKID, key, TDCS pages, TD_PARAMS."""
        tdx = kvm.tdx = KvmTdx()
        kvm.gfn_direct_bits = (1 << 47) >> 12
        kvm.mt_mask = MT_MASK_TDX_VM
        # kvm_mmu_set_mmio_spte_value(kvm, 0): a TD's MMIO SPTE has RWX = 0 (an EPT violation,
        # not a misconfig) and suppress-#VE clear, so the CPU gives the TD a #VE for it and the
        # TD asks for the MMIO with TDG.VP.VMCALL<#VE.RequestMMIO> (KVM cannot read its code).
        kvm.shadow_mmio_value = 0
        tdx.pamt_cache_lock = Mutex(kvm, "pamt_cache_lock")
        if self.tdx_huge_page and not self.module.features0 & A.TDX_FEATURES0_ENHANCED_DEMOTE_INTERRUPTIBILITY:
            kvm.trace_emit(
                "kvm_tdx_huge_page",
                msg="tdx_huge_page=N: the TDX module does not enumerate TDX_FEATURES0.ENHANCED_DEMOTE_INTERRUPTIBILITY",
            )
        host = kvm.host
        tdx.attributes = self.td_attributes
        tdx.hkid = self._alloc_hkid()
        tdx.tdr_pa = host.alloc_kernel_page()
        self._check(kvm, self.seamcall(kvm, A.TDH_MNG_CREATE, rcx=tdx.tdr_pa, rdx=tdx.hkid), "TDH.MNG.CREATE")
        self._check(kvm, self.seamcall(kvm, A.TDH_MNG_KEY_CONFIG, rcx=tdx.tdr_pa), "TDH.MNG.KEY.CONFIG")
        for _ in range(TDCS_PAGES):
            page = host.alloc_kernel_page()
            tdx.tdcs_pa.append(page)
            self._check(kvm, self.seamcall(kvm, A.TDH_MNG_ADDCX, rcx=page, rdx=tdx.tdr_pa), "TDH.MNG.ADDCX")
        params = host.alloc_kernel_page()
        mem = kvm.mem
        mem.write64(params + TD_PARAMS_ATTRIBUTES, tdx.attributes)
        mem.write64(params + TD_PARAMS_MAX_VCPUS, 64)
        mem.write64(params + TD_PARAMS_EPTP_CONTROLS, 6 | (3 << 3))  # WB, 4-level
        mem.write64(params + TD_PARAMS_CONFIG_FLAGS, 0)  # GPAW 48: shared bit 47
        self._check(kvm, self.seamcall(kvm, A.TDH_MNG_INIT, rcx=tdx.tdr_pa, rdx=params), "TDH.MNG.INIT")
        host.free_kernel_page(params)
        tdx.state = TD_STATE_INITIALIZED

    _next_hkid = [1]

    def _alloc_hkid(self):
        used = self.module.hkids
        for h in range(1, 64):
            if h not in used:
                return h
        raise RuntimeError("no free HKID")

    def _check(self, kvm, out, what):
        if out.rax != A.TDX_SUCCESS:
            kvm.kvm_bug(f"{what} failed: {A.status_name(out.rax)}")
        return out.rax

    def vcpu_create(self, vcpu):
        """KVM_TDX_INIT_VCPU: TDVPR, TDVPX, TDH.VP.INIT."""
        kvm = vcpu.kvm
        host = kvm.host
        t = vcpu.arch = VcpuTdx()
        t.tdvpr_pa = host.alloc_kernel_page()
        self._check(kvm, self.seamcall(kvm, A.TDH_VP_CREATE, rcx=t.tdvpr_pa, rdx=kvm.tdx.tdr_pa), "TDH.VP.CREATE")
        for _ in range(TDVPX_PAGES):
            page = host.alloc_kernel_page()
            t.tdvpx_pa.append(page)
            self._check(kvm, self.seamcall(kvm, A.TDH_VP_ADDCX, rcx=page, rdx=t.tdvpr_pa), "TDH.VP.ADDCX")
        # Version 1: R8 = the x2APIC id.  On the vCPU's CPU (the KVM_TDX_INIT_VCPU ioctl runs
        # with the vCPU loaded): the module associates the vCPU with it.
        self._check(
            kvm,
            self.seamcall(kvm, A.TDH_VP_INIT | (1 << 16), caller=vcpu.vcpu_id, rcx=t.tdvpr_pa, rdx=0, r8=vcpu.vcpu_id),
            "TDH.VP.INIT",
        )
        # The CPU the TD vCPU runs on: KVM uses it only to INVEPT (its state is the module's).
        vcpu.hw = self.module.vcpus[t.tdvpr_pa].hw
        # tdx_vcpu_init(): the local APIC in x2APIC mode, BSP on vCPU 0 (userspace may not write
        # it: tdx_is_read_only_msr()); EFER as the TD runs (tdx_vcpu_create()).
        vcpu.msrs.apic_base = (
            APIC_DEFAULT_PHYS_BASE
            | MSR_IA32_APICBASE_ENABLE
            | X2APIC_ENABLE
            | (MSR_IA32_APICBASE_BSP if vcpu.vcpu_id == 0 else 0)
        )
        t.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NX

    # -- MSRs (tdx_get_msr(), tdx_set_msr(), tdx_has_emulated_msr()) ---------------------------------------
    def get_msr(self, vcpu, index, host_initiated):
        if index == MSR_IA32_FEAT_CTL:
            return 0, 1  # FEAT_CTL_LOCKED (no LMCE: MCG_CAP has no LMCE_P)
        if not tdx_has_emulated_msr(index):
            return 1, 0
        return vcpu.kvm_get_msr_common(index, host_initiated)

    def set_msr(self, vcpu, index, data, host_initiated):
        if index in (MSR_IA32_APICBASE, MSR_EFER, MSR_IA32_FEAT_CTL):
            return 1  # tdx_is_read_only_msr()
        if not tdx_has_emulated_msr(index):
            return 1
        return vcpu.kvm_set_msr_common(index, data, host_initiated)

    def complete_emulated_msr(self, vcpu, exit, err):
        """tdx_complete_emulated_msr(): a failure is TDVMCALL_STATUS_INVALID_OPERAND (the guest's
        #VE handler raises #GP); an RDMSR's EDX:EAX is the TDVMCALL's R11."""
        t = vcpu.arch
        if err:
            t.ret_r10 = A.TDVMCALL_STATUS_INVALID_OPERAND
            return 1
        if t.exit_reason == EXIT_REASON_MSR_READ:
            t.ret_r11 = (t.regs.get("rdx", 0) & 0xFFFFFFFF) << 32 | t.regs.get("rax", 0) & 0xFFFFFFFF
        return 1

    def write_edx_eax(self, vcpu, data):
        vcpu.arch.regs.update(rax=data & 0xFFFFFFFF, rdx=data >> 32 & 0xFFFFFFFF)

    def get_efer(self, vcpu):
        return vcpu.arch.efer

    def set_efer(self, vcpu, efer):
        vcpu.arch.efer = efer

    def is_paging(self, vcpu):
        return True

    def get_cr4(self, vcpu):
        return 0  # the TD's CR4 is the module's: KVM sees none of its bits

    def recalc_msr_intercepts(self, vcpu):
        pass  # the TD VMCS's MSR bitmap is the module's

    def vp_wr(self, vcpu, field, value):
        # td_vmcs_write*(): on the vCPU's CPU (TDH.VP.WR associates the vCPU with the CPU it runs on)
        return self.seamcall(
            vcpu.kvm, A.TDH_VP_WR, caller=vcpu.vcpu_id, rcx=vcpu.arch.tdvpr_pa, rdx=field, r8=value, r9=(1 << 64) - 1
        )

    def vp_rd(self, vcpu, field):
        out = self.seamcall(vcpu.kvm, A.TDH_VP_RD, caller=vcpu.vcpu_id, rcx=vcpu.arch.tdvpr_pa, rdx=field)
        return out.r8 if out.rax == A.TDX_SUCCESS else None

    def set_regs(self, vcpu, regs):
        """A debug TD's registers through TDH.VP.WR (how the VMM sets the boot state in this model)."""
        for name, value in regs.items():
            if name == "rip":
                field = MD_TDVPS_RIP
            elif name == "cr3":
                field = MD_TDVPS_CR3
            else:
                field = MD_TDVPS_GPR_BASE + GPR_ORDER.index(name)
            self._check(vcpu.kvm, self.vp_wr(vcpu, field, value), f"TDH.VP.WR {name}")

    def get_regs(self, vcpu):
        regs = {name: self.vp_rd(vcpu, MD_TDVPS_GPR_BASE + i) for i, name in enumerate(GPR_ORDER)}
        regs["rip"] = self.vp_rd(vcpu, MD_TDVPS_RIP)
        regs["cr3"] = self.vp_rd(vcpu, MD_TDVPS_CR3)
        return regs

    def check_emulate_instruction(self, vcpu):
        """vt_check_emulate_instruction(): a TD's instructions cannot be emulated; the only way
        here is MMIO, so let the guest run the access again over the MMIO SPTE (suppress-#VE
        clear): a #VE, and the guest's TDG.VP.VMCALL<#VE.RequestMMIO>."""
        return X86EMUL_RETRY_INSTR

    def load_mmu_pgd(self, vcpu, root_hpa, root_level):
        """tdx_load_mmu_pgd(): KVM's direct root is the TD's shared EPT pointer."""
        self._check(vcpu.kvm, self.vp_wr(vcpu, MD_TDVPS_VMCS_SHARED_EPTP, root_hpa), "TDH.VP.WR SHARED_EPTP")

    def flush_tlb(self, vcpu):
        """tdx_flush_tlb_current(): a global INVEPT on the vCPU's CPU."""
        vcpu.hw.flush_tlb()

    def huge_pages_enabled(self, kvm):
        """tdx_huge_page as tdx_bringup() leaves it: asked for, and the module can DEMOTE without
        being interrupted (the two demote-interrupted-* bug switches keep it on regardless)."""
        if not self.tdx_huge_page:
            return False
        bugs = kvm.bugs
        return bool(
            self.module.features0 & A.TDX_FEATURES0_ENHANCED_DEMOTE_INTERRUPTIBILITY
            or bugs.demote_interrupted_is_error
            or bugs.demote_interrupted_retried_forever
        )

    def gmem_max_mapping_level(self, kvm, gfn):
        """tdx_gmem_max_mapping_level() (v5 45/45 "Turn on PG_LEVEL_2M"): 4K while the TD is built
        (TDH.MEM.PAGE.ADD adds 4K pages only), then 2M when tdx_huge_page is on."""
        if not self.huge_pages_enabled(kvm) or kvm.tdx.state != TD_STATE_RUNNABLE:
            return PG_LEVEL_4K
        return PG_LEVEL_2M

    # -- building the TD image (before TDH.MR.FINALIZE) ---------------------------------------------------
    def init_mem_region(self, vcpu, gpa, source_hpa, measure=True):
        """KVM_TDX_INIT_MEM_REGION for one page: map the mirror (SEPT.ADDs), then TDH.MEM.PAGE.ADD."""
        kvm = vcpu.kvm
        tdx = kvm.tdx
        r = vcpu.kvm_tdp_map_page(gpa, private=True)
        if r:
            return r
        slot = kvm.gfn_to_memslot(gpa >> 12)
        target = kvm.kvm_gmem_get_pfn(slot, gpa >> 12) << 12
        out = self.seamcall(kvm, A.TDH_MEM_PAGE_ADD, rcx=gpa, rdx=tdx.tdr_pa, r8=target, r9=source_hpa)
        if out.rax != A.TDX_SUCCESS:
            return -EBUSY if tdx_operand_busy(out.rax) else -EIO
        tdx.nr_premapped -= 1
        if measure:
            for chunk in range(0, 4096, 256):
                out = self.seamcall(kvm, A.TDH_MR_EXTEND, rcx=gpa + chunk, rdx=tdx.tdr_pa)
                if out.rax != A.TDX_SUCCESS:
                    return -EIO
        return 0

    def finalize(self, kvm):
        """KVM_TDX_FINALIZE_VM"""
        tdx = kvm.tdx
        if tdx.nr_premapped:
            return -EINVAL
        out = self.seamcall(kvm, A.TDH_MR_FINALIZE, rcx=tdx.tdr_pa)
        if out.rax != A.TDX_SUCCESS:
            return -EIO
        tdx.state = TD_STATE_RUNNABLE
        return 0

    # -- the mirror hooks -----------------------------------------------------------------------------------
    def reflect_link_spt(self, kvm, gfn, level, external_spt, vcpu=None):
        """tdx_sept_link_private_spt(): TDH.MEM.SEPT.ADD for the entry at KVM ``level``."""
        gpa = gfn << 12
        out = self.seamcall(
            kvm, A.TDH_MEM_SEPT_ADD, caller=vcpu, rcx=gpa | (level - 1), rdx=kvm.tdx.tdr_pa, r8=external_spt
        )
        if tdx_operand_busy(out.rax) and not kvm.bugs.busy_is_fatal:
            return -EBUSY
        if out.rax != A.TDX_SUCCESS:
            kvm.kvm_bug(
                f"TDH.MEM.SEPT.ADD gpa {gpa:#x} level {level - 1} failed: {A.status_name(out.rax)} "
                f"entry {out.rcx:#x} info {out.rdx:#x}"
            )
            return -EIO
        return 0

    def reflect_set_spte(self, kvm, gfn, level, pfn, vcpu=None):
        """tdx_sept_set_private_spte(): TDH.MEM.PAGE.AUG once the TD runs; before, count it premapped."""
        tdx = kvm.tdx
        if kvm.KVM_BUG_ON(level != PG_LEVEL_4K, f"private mapping at level {level}"):
            return -EINVAL
        if tdx.state != TD_STATE_RUNNABLE:
            tdx.nr_premapped += 1
            return 0
        gpa = gfn << 12
        out = self.seamcall(kvm, A.TDH_MEM_PAGE_AUG, caller=vcpu, rcx=gpa, rdx=tdx.tdr_pa, r8=pfn << 12)
        if tdx_operand_busy(out.rax) and not kvm.bugs.busy_is_fatal:
            return -EBUSY
        if out.rax != A.TDX_SUCCESS:
            kvm.kvm_bug(
                f"TDH.MEM.PAGE.AUG gpa {gpa:#x} failed: {A.status_name(out.rax)} entry {out.rcx:#x} info {out.rdx:#x}"
            )
            return -EIO
        return 0

    # -- tdx_no_vcpus_enter_start() / _stop(): a retry that no TD entry can disturb ----------------------
    def _kick_all(self, kvm):
        """kvm_make_all_cpus_request(kvm, KVM_REQ_OUTSIDE_GUEST_MODE): every vCPU out of the TD.
        The request waits for each vCPU's acknowledgement, i.e. until it has left guest mode."""
        kvm.kvm_make_all_cpus_request(KVM_REQ_OUTSIDE_GUEST_MODE)

    def _no_vcpus_enter_start(self, kvm):
        kvm.tdx.wait_for_sept_zap = True
        self._kick_all(kvm)

    def _no_vcpus_enter_stop(self, kvm):
        kvm.tdx.wait_for_sept_zap = False

    def tdh_do_no_vcpus(self, kvm, leaf, caller=None, **regs):
        """tdh_do_no_vcpus() (Sean's TDX cleanup, 6.19): one SEAMCALL that removes, blocks or splits
        S-EPT entries; on BUSY, once more with every vCPU out of the TD and none entering
        (wait_for_sept_zap).  mmu_lock must be held for write (asserted with the 7.2 hooks, as
        the macro does): every such flow is then exclusive with the others, and the retry is
        guaranteed to succeed absent KVM or TDX-module bugs."""
        if kvm.tdp_mmu.mirror_hooks_72 and not kvm.bugs.split_under_shared_lock:
            kvm.lockdep_assert_held_write()
        out = self.seamcall(kvm, leaf, caller=caller, **regs)
        if tdx_operand_busy(out.rax):
            self._no_vcpus_enter_start(kvm)
            out = self.seamcall(kvm, leaf, caller=caller, **regs)
            self._no_vcpus_enter_stop(kvm)
        return out

    _busy_retry = tdh_do_no_vcpus  # (the 6.16 name of the same retry)

    def _track(self, kvm, caller=None):
        """tdx_track(): TDH.MEM.TRACK (a BUSY retried once with no vCPU entering), then every vCPU
        out of the guest."""
        tdx = kvm.tdx
        if tdx.state != TD_STATE_RUNNABLE:
            return
        if kvm.bugs.no_track:
            return  # bug switch: neither TRACK nor the kick
        out = self._busy_retry(kvm, A.TDH_MEM_TRACK, caller=caller, rcx=tdx.tdr_pa)
        kvm.KVM_BUG_ON(out.rax != A.TDX_SUCCESS, f"TDH.MEM.TRACK failed: {A.status_name(out.rax)}")
        if kvm.bugs.no_kick_after_track:
            return  # bug switch: vCPUs stay in the TD with the old epoch
        self._kick_all(kvm)

    def reflect_remove_spte(self, kvm, gfn, level, pfn):
        """tdx_sept_remove_private_spte(): BLOCK (tdx_sept_zap_private_spte), TRACK, then REMOVE,
        WBINVD and clearing the page (tdx_sept_drop_private_spte)."""
        return self._remove_private_spte(kvm, gfn, level, pfn)

    def _remove_private_spte(self, kvm, gfn, level, pfn):
        tdx = kvm.tdx
        gpa = gfn << 12
        if kvm.KVM_BUG_ON(tdx.hkid is None, "removing a private page after the HKID was freed"):
            return -EINVAL
        out = self.tdh_do_no_vcpus(kvm, A.TDH_MEM_RANGE_BLOCK, rcx=gpa | (level - 1), rdx=tdx.tdr_pa)
        if (
            tdx.state != TD_STATE_RUNNABLE
            and out.rax == (A.TDX_EPT_ENTRY_STATE_INCORRECT | A.OPERAND_ID_RCX)
            and not out.rcx & 7
        ):
            # tdx_is_sept_zap_err_due_to_premap(): mapped in the mirror but never PAGE.ADDed.
            tdx.nr_premapped -= 1
            return 0
        if out.rax != A.TDX_SUCCESS:
            kvm.kvm_bug(
                f"TDH.MEM.RANGE.BLOCK gpa {gpa:#x} failed: {A.status_name(out.rax)} "
                f"entry {out.rcx:#x} info {out.rdx:#x}"
            )
            return -EIO
        self._track(kvm)
        out = self.tdh_do_no_vcpus(kvm, A.TDH_MEM_PAGE_REMOVE, rcx=gpa | (level - 1), rdx=tdx.tdr_pa)
        if out.rax != A.TDX_SUCCESS:
            kvm.kvm_bug(
                f"TDH.MEM.PAGE.REMOVE gpa {gpa:#x} failed: {A.status_name(out.rax)} "
                f"entry {out.rcx:#x} info {out.rdx:#x}"
            )
            return -EIO
        hpa = pfn << 12
        # tdh_phymem_page_wbinvd_hkid() (v5: every 4K page of a huge page), then tdx_clear_page()
        # (the "reset page" quirk, extended to huge pages: MOVDIR64B with the host key).
        for k in range(KVM_PAGES_PER_HPAGE(level)):
            out = self.seamcall(
                kvm, A.TDH_PHYMEM_PAGE_WBINVD, rcx=(hpa + (k << 12)) | (tdx.hkid << self.module.x86_phys_bits)
            )
            if out.rax != A.TDX_SUCCESS:
                kvm.kvm_bug(f"TDH.PHYMEM.PAGE.WBINVD {hpa + (k << 12):#x} failed: {A.status_name(out.rax)}")
                return -EIO
        for k in range(KVM_PAGES_PER_HPAGE(level)):
            self.tdx_clear_page(kvm, hpa + (k << 12))
        return 0

    def tdx_clear_page(self, kvm, hpa):
        """tdx_clear_page(): MOVDIR64B of zeros with the host key over the page KVM took back from
        the TD, which drops the lines' TD bit (and any poison) so the host may use it again."""
        if kvm.bugs.no_clear_page:
            return  # bug switch: the page keeps the TD's integrity bits
        kvm.mem.movdir64b(hpa)

    def reflect_free_spt(self, kvm, gfn, level, external_spt):
        """tdx_sept_free_private_spt(): only once the HKID is freed; RECLAIM, then clear."""
        tdx = kvm.tdx
        if kvm.KVM_BUG_ON(tdx.hkid is not None, "freeing an S-EPT page while the HKID is assigned"):
            return -EINVAL
        out = self.seamcall(kvm, A.TDH_PHYMEM_PAGE_RECLAIM, rcx=external_spt)
        if out.rax != A.TDX_SUCCESS:
            kvm.warn(f"TDH.PHYMEM.PAGE.RECLAIM of S-EPT page {external_spt:#x}: {A.status_name(out.rax)}")
            return -EIO
        self.tdx_clear_page(kvm, external_spt)
        return 0

    # -- the 7.2 mirror hooks: one set_external_spte(old, new) (v5 05/45, 32/45, 34/45, 39/45) -----------
    def set_external_spte(self, kvm, gfn, old_spte, new_spte, level, vcpu=None):
        """kvm_x86_ops.set_external_spte = tdx_sept_set_private_spte()."""
        return self.tdx_sept_set_private_spte(kvm, gfn, old_spte, new_spte, level, vcpu)

    def tdx_sept_set_private_spte(self, kvm, gfn, old_spte, new_spte, level, vcpu=None):
        """Every change of a mirror SPTE but a table's removal: present to present is a split,
        present to not present a zap; a new SPTE links a table or maps a leaf."""
        if is_shadow_present_pte(old_spte) and is_shadow_present_pte(new_spte):
            return self.tdx_sept_split_private_spte(kvm, gfn, old_spte, new_spte, level, vcpu)
        if is_shadow_present_pte(old_spte):
            return self.tdx_sept_remove_private_spte(kvm, gfn, level, old_spte)
        if kvm.KVM_BUG_ON(not is_shadow_present_pte(new_spte), f"set_external_spte gfn {gfn:#x}: nothing to set"):
            return -EIO
        if not is_last_spte(new_spte, level):
            return self.tdx_sept_link_private_spt(kvm, gfn, new_spte, level, vcpu)
        return self.tdx_sept_map_leaf_spte(kvm, gfn, new_spte, level, vcpu)

    def tdx_spte_to_external_spt(self, kvm, gfn, new_spte, level):
        """The S-EPT page of the table a non-leaf mirror SPTE points to (sp->external_spt)."""
        sp = kvm.tdp_mmu.sp_of.get(spte_to_child_pt(new_spte, level))
        if (
            kvm.KVM_BUG_ON(sp is None or sp.external_spt is None, f"gfn {gfn:#x}: a mirror table without an S-EPT page")
            or kvm.KVM_BUG_ON(sp.role_level + 1 != level, f"gfn {gfn:#x}: child level {sp.role_level}")
            or kvm.KVM_BUG_ON(sp.gfn != gfn, f"gfn {gfn:#x}: child gfn {sp.gfn:#x}")
        ):
            return None
        return sp.external_spt

    def tdx_sept_link_private_spt(self, kvm, gfn, new_spte, level, vcpu=None):
        """TDH.MEM.SEPT.ADD for the table ``new_spte`` points to."""
        external_spt = self.tdx_spte_to_external_spt(kvm, gfn, new_spte, level)
        if external_spt is None:
            return -EIO
        return self.reflect_link_spt(kvm, gfn, level, external_spt, vcpu)

    def tdx_sept_map_leaf_spte(self, kvm, gfn, new_spte, level, vcpu=None):
        """tdx_sept_map_leaf_spte() (v5 35/45): TDH.MEM.PAGE.AUG at the leaf's level once the TD
        runs (before, the page is counted premapped for TDH.MEM.PAGE.ADD).  A 2M leaf only with
        tdx_huge_page: tdx_gmem_max_mapping_level() allows nothing else."""
        tdx = kvm.tdx
        if kvm.KVM_BUG_ON(
            level > PG_LEVEL_2M
            or level == PG_LEVEL_2M
            and not (self.huge_pages_enabled(kvm) and tdx.state == TD_STATE_RUNNABLE),
            f"private mapping at level {level}",
        ):
            return -EIO
        if tdx.state != TD_STATE_RUNNABLE:
            tdx.nr_premapped += 1
            return 0
        gpa = gfn << 12
        out = self.seamcall(
            kvm, A.TDH_MEM_PAGE_AUG, caller=vcpu, rcx=gpa | (level - 1), rdx=tdx.tdr_pa, r8=spte_to_pfn(new_spte) << 12
        )
        if tdx_operand_busy(out.rax) and not kvm.bugs.busy_is_fatal:
            return -EBUSY
        if out.rax != A.TDX_SUCCESS:
            kvm.kvm_bug(
                f"TDH.MEM.PAGE.AUG gpa {gpa:#x} level {level - 1} failed: {A.status_name(out.rax)} "
                f"entry {out.rcx:#x} info {out.rdx:#x}"
            )
            return -EIO
        return 0

    def tdx_sept_remove_private_spte(self, kvm, gfn, level, old_spte):
        """v5 34/45: the removal of a leaf, through set_external_spte()."""
        return self._remove_private_spte(kvm, gfn, level, spte_to_pfn(old_spte))

    def tdx_sept_split_private_spte(self, kvm, gfn, old_spte, new_spte, level, vcpu=None):
        """tdx_sept_split_private_spte() (v5 39/45, with 44/45's split cache): under mmu_lock held
        for write, BLOCK the huge entry, TRACK and kick every vCPU out of the TD, then
        TDH.MEM.PAGE.DEMOTE into the new table's S-EPT page.  BLOCK and DEMOTE each go through
        tdh_do_no_vcpus() (BUSY: every vCPU kicked out and kept out, then once more); any other
        error bugs the VM.  No UNBLOCK: a successful DEMOTE leaves the small entries unblocked."""
        tdx = kvm.tdx
        gpa = gfn << 12
        if not kvm.bugs.split_under_shared_lock:
            kvm.lockdep_assert_held_write()
        if kvm.KVM_BUG_ON(
            tdx.state != TD_STATE_RUNNABLE or level != PG_LEVEL_2M,
            f"split of gfn {gfn:#x} at level {level} (TD state {tdx.state})",
        ):
            return -EIO
        external_spt = self.tdx_spte_to_external_spt(kvm, gfn, new_spte, level)
        if external_spt is None:
            return -EIO
        if self.tdx_get_pamt_cache(kvm, vcpu) is None:
            return -EIO
        out = self.tdh_do_no_vcpus(kvm, A.TDH_MEM_RANGE_BLOCK, caller=vcpu, rcx=gpa | (level - 1), rdx=tdx.tdr_pa)
        if out.rax != A.TDX_SUCCESS:
            kvm.kvm_bug(
                f"TDH.MEM.RANGE.BLOCK gpa {gpa:#x} failed: {A.status_name(out.rax)} "
                f"entry {out.rcx:#x} info {out.rdx:#x}"
            )
            return -EIO
        self._track(kvm, vcpu)
        out = self.tdh_do_no_vcpus(
            kvm, A.TDH_MEM_PAGE_DEMOTE, caller=vcpu, rcx=gpa | (level - 1), rdx=tdx.tdr_pa, r8=external_spt
        )
        if kvm.bugs.demote_interrupted_retried_forever:
            # Bug switch: RFC v1's "do { DEMOTE } while (err == TDX_INTERRUPTED_RESTARTABLE)", with
            # mmu_lock held for write and nothing bounding it but the host's soft-lockup detector.
            tries = 1
            while out.rax == A.TDX_INTERRUPTED_RESTARTABLE:
                if tries >= SOFTLOCKUP_RETRIES:
                    kvm.soft_lockup(
                        f"tdx_sept_split_private_spte(): TDH.MEM.PAGE.DEMOTE gpa {gpa:#x} "
                        f"returned TDX_INTERRUPTED_RESTARTABLE {tries} times in a row with "
                        f"mmu_lock held for write"
                    )
                    return -EIO
                out = self.tdh_do_no_vcpus(
                    kvm, A.TDH_MEM_PAGE_DEMOTE, caller=vcpu, rcx=gpa | (level - 1), rdx=tdx.tdr_pa, r8=external_spt
                )
                tries += 1
        if out.rax != A.TDX_SUCCESS:
            kvm.kvm_bug(
                f"TDH.MEM.PAGE.DEMOTE gpa {gpa:#x} failed: {A.status_name(out.rax)} "
                f"entry {out.rcx:#x} info {out.rdx:#x}"
            )
            return -EIO
        return 0

    def reclaim_external_sp(self, kvm, gfn, sp):
        """kvm_x86_ops.reclaim_external_sp = tdx_sept_reclaim_private_sp() (v5 09/45): S-EPT
        pages are reclaimed only once the HKID is freed; if that fails, sp->external_spt is
        cleared and the page leaked, so the kernel never touches an encrypted page."""
        external_spt = sp.external_spt
        if kvm.KVM_BUG_ON(
            kvm.tdx.hkid is not None, "freeing an S-EPT page while the HKID is assigned"
        ) or self.reflect_free_spt(kvm, gfn, sp.role_level, external_spt):
            kvm.leak_page(external_spt, f"S-EPT page of gfn {gfn:#x} level {sp.role_level}")
            sp.external_spt = None

    # -- the split caches (v5 38/45, 44/45) ---------------------------------------------------------------
    def tdx_get_pamt_cache(self, kvm, vcpu):
        """The vCPU's cache when a vCPU splits (a mismatched ACCEPT), else the VM's, whose mutex
        the caller must hold (a conversion)."""
        if vcpu is not None:
            v = next((x for x in kvm.vcpus if x.vcpu_id == vcpu), None)
            if kvm.KVM_BUG_ON(v is None, f"vCPU {vcpu} is not this VM's"):
                return None
            return v.arch.pamt_cache
        kvm.tdx.pamt_cache_lock.lockdep_assert_held()
        return kvm.tdx.pamt_cache

    def topup_external_cache(self, kvm, vcpu, min_objs):
        """tdx_topup_external_pamt_cache(): with Dynamic PAMT, PAMT pages for the 4K entries a
        split creates.  The model's module has a static PAMT (as the tdx_1.5 source), so, as
        upstream on such a module (!tdx_supports_dynamic_pamt()), there is nothing to add."""
        if self.tdx_get_pamt_cache(kvm, vcpu) is None:
            return -EIO
        return 0

    # -- GUEST_INHIBIT: honoring the guest's ACCEPT level (v5 40/45, 41/45 with Sean's fixes) ----------
    def tdx_handle_mismatched_accept(self, vcpu, gfn):
        """tdx_handle_mismatched_accept(): an EPT violation the module synthesized for a failed
        TDG.MEM.PAGE.ACCEPT (extended type ACCEPT) carries the guest's ACCEPT level.  KVM then
        splits any mapping above that level and inhibits mapping above it for good
        (GUEST_INHIBIT in lpage_info: set after the split, never cleared).  The inhibit is
        checked first without mmu_lock, so vCPUs accepting one region are not serialized;
        the split itself holds mmu_lock for write (no UNBLOCK can fail then).  Returns 0 or a
        negative errno (KVM_RUN fails with it)."""
        kvm = vcpu.kvm
        t = vcpu.arch
        slot = kvm.gfn_to_memslot(gfn)
        eeq = t.ext_exit_qualification
        if slot is None or (eeq & TDX_EXT_EXIT_QUAL_TYPE_MASK) != A.TDX_EXT_EXIT_QUAL_TYPE_ACCEPT:
            return 0
        level = ((eeq >> TDX_EXT_EXIT_QUAL_INFO_SHIFT) & 7) + 1
        if level > PG_LEVEL_2M:
            return 0
        if hugepage_test_guest_inhibit(kvm, slot, gfn, level + 1, vcpu.vcpu_id):
            return 0
        bugs = kvm.bugs
        if bugs.guest_inhibit_cleared:
            self._set_guest_inhibit(kvm, slot, gfn, level, vcpu.vcpu_id)  # bug switch: before the split
        start = gfn_round_for_level(gfn, level)
        end = start + KVM_PAGES_PER_HPAGE(level)
        shared = bugs.split_under_shared_lock
        lock = kvm.mmu_lock
        lock.read_lock() if shared else lock.write_lock()
        try:
            if bugs.inhibit_on_shared_root:
                # Bug switch (v5 41/45 as posted): kvm_tdp_mmu_split_huge_pages(vcpu, ...) split the
                # vCPU's root, vcpu->arch.mmu->root: the shared (direct) root, not the mirror.
                r = kvm.tdp_mmu.tdp_mmu_split_huge_pages_root(vcpu.root, start, end, level, shared, vcpu.vcpu_id)
            else:
                r = kvm.tdp_mmu.kvm_tdp_mmu_mirrors_split_huge_pages(start, end, level, shared, vcpu.vcpu_id)
            if r:
                return r
            # No TLB flush: the BLOCK + TRACK + kick of the split flushed.
            if bugs.guest_inhibit_cleared:
                hugepage_clear_guest_inhibit(kvm, slot, gfn, level + 1, vcpu.vcpu_id)
                if level == PG_LEVEL_4K:
                    hugepage_clear_guest_inhibit(kvm, slot, gfn, level + 2, vcpu.vcpu_id)
            else:
                self._set_guest_inhibit(kvm, slot, gfn, level, vcpu.vcpu_id)
        finally:
            lock.read_unlock() if shared else lock.write_unlock()
        return 0

    @staticmethod
    def _set_guest_inhibit(kvm, slot, gfn, level, who):
        hugepage_set_guest_inhibit(kvm, slot, gfn, level + 1, who)
        if level == PG_LEVEL_4K:
            hugepage_set_guest_inhibit(kvm, slot, gfn, level + 2, who)

    # -- conversion: split the head and tail huge pages before the zap (v5 44/45, Sean's rework) -------
    def tdx_sept_split_huge_pages(self, kvm, start, end, target_level):
        """Split only the huge pages a range cuts: the one around ``start`` and the one around
        ``end`` (KVM must zap exactly [start, end) of a TD's private memory)."""
        head = gfn_round_for_level(start, target_level + 1)
        tail = gfn_round_for_level(end, target_level + 1)
        span = KVM_PAGES_PER_HPAGE(target_level + 1)
        if head != start:
            r = kvm.tdp_mmu.kvm_tdp_mmu_mirrors_split_huge_pages(head, head + span, target_level, False, None)
            if r:
                return r
        if tail != end and (head != tail or head == start):
            r = kvm.tdp_mmu.kvm_tdp_mmu_mirrors_split_huge_pages(tail, tail + span, target_level, False, None)
            if r:
                return r
        return 0

    def gmem_convert(self, kvm, start, end, to_private):
        """tdx_gmem_convert() (kvm_arch_gmem_convert()): before private memory is converted to
        shared (or punched out of guest_memfd), split the huge pages the range cuts, under the
        per-VM split cache's mutex and mmu_lock for write, so that the zap removes exactly the
        range and the rest of each huge page keeps its data."""
        if to_private or not kvm.has_mirrored_tdp or not self.huge_pages_enabled(kvm):
            return 0
        tdx = kvm.tdx
        tdx.pamt_cache_lock.lock()
        kvm.mmu_lock.write_lock()
        try:
            return self.tdx_sept_split_huge_pages(kvm, start, end, PG_LEVEL_4K)
        finally:
            kvm.mmu_lock.write_unlock()
            tdx.pamt_cache_lock.unlock()

    # -- teardown ---------------------------------------------------------------------------------------------
    def vm_destroy_begin(self, kvm):
        """Unmap private memory while the HKID lives, then release the HKID (tdx_mmu_release_hkid).

        As upstream: a failed VPFLUSHDONE skips the rest, and a failed FREEID keeps the HKID; in
        both cases (a KVM_BUG_ON) the HKID is leaked, so nothing of the TD can be reclaimed after
        (tdx_vm_free() and tdx_sept_free_private_spt() leak its pages, accounted)."""
        tdx = kvm.tdx
        kvm.zap_gfn_range(0, kvm.max_gfn_exclusive, KVM_MIRROR_ROOTS)
        for v in kvm.vcpus:
            # tdx_flush_vp_on_cpu(): on the CPU the vCPU last ran on; one never associated is fine.
            out = self.seamcall(kvm, A.TDH_VP_FLUSH, caller=v.vcpu_id, rcx=v.arch.tdvpr_pa)
            kvm.KVM_BUG_ON(
                out.rax not in (A.TDX_SUCCESS, A.TDX_VCPU_NOT_ASSOCIATED), f"TDH.VP.FLUSH: {A.status_name(out.rax)}"
            )
        out = self.seamcall(kvm, A.TDH_MNG_VPFLUSHDONE, rcx=tdx.tdr_pa)
        if out.rax == A.TDX_FLUSHVP_NOT_DONE:
            return
        if kvm.KVM_BUG_ON(
            out.rax != A.TDX_SUCCESS, f"TDH.MNG.VPFLUSHDONE: {A.status_name(out.rax)}; HKID {tdx.hkid} is leaked"
        ):
            return
        self.seamcall(kvm, A.TDH_PHYMEM_CACHE_WB)  # an error here makes FREEID fail
        out = self.seamcall(kvm, A.TDH_MNG_KEY_FREEID, rcx=tdx.tdr_pa)
        if kvm.KVM_BUG_ON(
            out.rax != A.TDX_SUCCESS, f"TDH.MNG.KEY.FREEID: {A.status_name(out.rax)}; HKID {tdx.hkid} is leaked"
        ):
            return
        tdx.hkid = None

    def vm_free(self, kvm):
        """Reclaim the control pages: vCPUs' TDVPX and TDVPR, the TDCS, then the TDR.  With the
        HKID still assigned (its release failed) nothing can be reclaimed: every page is leaked."""
        tdx = kvm.tdx
        pages = []
        for v in kvm.vcpus:
            pages += v.arch.tdvpx_pa + [v.arch.tdvpr_pa]
        pages += tdx.tdcs_pa + [tdx.tdr_pa]
        if tdx.hkid is not None:
            for page in pages:
                kvm.leak_page(page, f"the TD's HKID {tdx.hkid} was not released")
            return
        for page in pages:
            out = self.seamcall(kvm, A.TDH_PHYMEM_PAGE_RECLAIM, rcx=page)
            if out.rax != A.TDX_SUCCESS:
                kvm.leak_page(page, f"TDH.PHYMEM.PAGE.RECLAIM failed: {A.status_name(out.rax)}")
                continue
            self.tdx_clear_page(kvm, page)
            kvm.check_td_page_freed(
                page,
                "tdx_reclaim_td_control_pages() frees a control page "
                "(TDR, TDCS, TDVPR or TDVPX) after TDH.PHYMEM.PAGE.RECLAIM",
            )
            kvm.host.free_kernel_page(page)

    # -- running --------------------------------------------------------------------------------------------
    def vcpu_run(self, vcpu):
        """tdx_vcpu_run(): TDH.VP.ENTER with vp_enter_args; the exit comes back in registers."""
        t = vcpu.arch
        kvm = vcpu.kvm
        if kvm.tdx.wait_for_sept_zap:
            # A zap is retrying a SEAMCALL with no vCPU entering: EXIT_FASTPATH_EXIT_HANDLED, no
            # TDH.VP.ENTER; KVM_RUN loops and tries again (here: once the zap is done).
            # (It waits in handle_exit, outside guest mode: the zap's kick waits for this vCPU to
            # take its IPI, which it does only once it is out of vcpu_enter_guest.)
            vcpu.tdx_exit = None
            return VmExit(-3, 0)
        out = self.seamcall(kvm, A.TDH_VP_ENTER, caller=vcpu.vcpu_id, rcx=t.tdvpr_pa, **t.vp_enter_args)
        vcpu.tdx_exit = out
        if tdx_operand_busy(out.rax):
            # The module was busy (the epoch lock, or the S-EPT tree lock of the zero-step
            # mitigation): EXIT_FASTPATH_EXIT_HANDLED, KVM enters again without userspace.
            if kvm.sched is not None:
                kvm.sched.point(vcpu.vcpu_id, "lock_wait")
            return VmExit(-2, 0)
        t.vp_enter_args.update(zip(VP_ENTER_ARGS, _vp_enter_args_of(out)))
        t.ext_exit_qualification = out.rdx
        if out.rax & A.TDX_ERROR:
            kvm.kvm_bug(f"TDH.VP.ENTER failed: {A.status_name(out.rax)}")
            return VmExit(-1, 0)
        reason = out.rax & 0xFFFF
        ex = VmExit(reason, 0, qualification=out.rcx, gpa=out.r8, vcpu=vcpu.vcpu_id)
        ex.error_code = out.rdx  # the extended exit qualification rides here
        return ex

    def handle_exit(self, vcpu, exit):
        out = vcpu.tdx_exit
        kvm = vcpu.kvm
        if exit.reason == -1:
            return 0
        if exit.reason == -3:
            # No TD entry while a zap retries with no vCPU entering: wait for it, then enter again.
            if kvm.sched is not None and kvm.sched.current is not None:
                kvm.sched.wait_until(lambda: not kvm.tdx.wait_for_sept_zap, vcpu.vcpu_id, "sept_zap_wait")
            return 1
        if exit.reason == -2 or exit.reason == EXIT_REASON_EXTERNAL_INTERRUPT:
            return 1  # BUSY entry, or a kick: enter again
        if exit.reason == EXIT_REASON_EPT_VIOLATION:
            return self.handle_ept_violation(vcpu, out)
        if exit.reason == EXIT_REASON_TDCALL:
            return self.handle_vmcall(vcpu, out)
        if exit.reason == EXIT_REASON_TRIPLE_FAULT:
            intr = out.r9
            vector = intr & 0xFF
            vcpu.exit_to_user(
                KVM_EXIT_SHUTDOWN,
                vector=vector,
                error_code=out.r10 if intr & (1 << 11) else None,
                cr2=out.r11 if vector == 14 else None,
                rip=out.r12,
                insn=None,
                why=None if out.r13 else "delivery through the TD's IDT failed",
                no_idt=bool(out.r13),
                ve_exit_reason=out.r14 & 0xFFFFFFFF if out.r14 >> 32 else None,
            )
            return 0
        if exit.reason == EXIT_REASON_EPT_MISCONFIG:
            kvm.kvm_bug(f"EPT misconfiguration in a TD at gpa {out.r8:#x}")
            return 0
        vcpu.exit_to_user(KVM_EXIT_INTERNAL_ERROR, suberror="unexpected_exit", reason=f"TD exit {exit.name}")
        return 0

    def handle_ept_violation(self, vcpu, out):
        """tdx_handle_ept_violation()"""
        kvm = vcpu.kvm
        gpa = out.r8
        qual = out.rcx
        vcpu.stat["ept_violations"] += 1
        local_retry = False
        if not kvm.is_addr_direct(gpa):
            if self.is_sept_violation_unexpected_pending(out):
                kvm.kvm_vm_dead(f"Guest access before accepting {gpa:#x} on vCPU {vcpu.vcpu_id}")
                return 0
            # Private pages are always RWX: treat the fault as a write, which avoids COW aliasing.
            qual = EPT_VIOLATION_ACC_WRITE
            if self.tdx_huge_page:
                r = self.tdx_handle_mismatched_accept(vcpu, (gpa >> 12) & ~kvm.gfn_direct_bits)
                if r:
                    raise KvmIoctlError(-r, f"splitting gpa {gpa:#x} to the guest's ACCEPT level failed ({r})")
                if kvm.vm_dead:
                    return 0
            local_retry = True  # only private GPAs trigger the zero-step mitigation
        elif qual & EPT_VIOLATION_ACC_INSTR:
            kvm.kvm_bug(f"instruction fetch from shared GPA {gpa:#x}")
            return 0
        # Retry locally while the fault says RETRY (BUSY from the module, a frozen SPTE): each
        # TD entry counts against the zero-step mitigation.
        for _ in range(LOCAL_RETRY_MAX):
            r = vcpu.vmx_handle_ept_violation(gpa, qual, rip=0)
            if r <= 0 or vcpu.last_pf_ret != RET_PF_RETRY or not local_retry:
                return r
            if vcpu.signal_pending:
                return r
            if kvm.vm_dead:  # kvm_check_request(KVM_REQ_VM_DEAD)
                return -EIO
            vcpu.tick()
            if kvm.sched is not None:
                kvm.sched.point(vcpu.vcpu_id, "fault_local_retry")
        return 1

    @staticmethod
    def is_sept_violation_unexpected_pending(out):
        """tdx_is_sept_violation_unexpected_pending(): extended type PENDING_EPT_VIOLATION, and the
        exit qualification has no PROT bits and no EXEC_FOR_RING3_LIN."""
        if (out.rdx & TDX_EXT_EXIT_QUAL_TYPE_MASK) != A.TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION:
            return False
        return not out.rcx & EPT_VIOLATION_PROT_MASK and not out.rcx & EPT_VIOLATION_EXEC_FOR_RING3_LIN

    def handle_vmcall(self, vcpu, out):
        """tdx_handle_vmcall(): R10 != 0 is a KVM hypercall (R10 = nr), else a GHCI sub-function in R11."""
        t = vcpu.arch
        kvm = vcpu.kvm
        if out.r10:
            # tdx_emulate_vmcall(): a KVM hypercall, nr = R10, a0..a3 = R11..R14, the result in R10.
            nr = out.r10
            args = (out.r11, out.r12, out.r13, out.r14)
            vcpu.stat["hypercalls"] += 1
            kvm.trace_emit("kvm_hypercall", vcpu.vcpu_id, msg=f"nr {nr:#x} a0 {args[0]:#x} (TDG.VP.VMCALL)")
            ret = vcpu.kvm_emulate_hypercall(nr, args, self.complete_hypercall_exit)
            if ret is None:
                t.ret_r10 = 0
                return 0
            t.ret_r10 = ret & ((1 << 64) - 1)
            return 1
        sub = out.r11
        # tdcall_to_vmx_exit_reason(): these sub-functions are the exit they stand for
        t.exit_reason = (
            sub
            if sub
            in (
                EXIT_REASON_CPUID,
                A.EXIT_REASON_HLT,
                EXIT_REASON_IO_INSTRUCTION,
                EXIT_REASON_MSR_READ,
                EXIT_REASON_MSR_WRITE,
            )
            else None
        )
        if sub == EXIT_REASON_CPUID:
            return self.emulate_cpuid(vcpu, out)
        if sub == EXIT_REASON_IO_INSTRUCTION:
            return self.emulate_io(vcpu, out)
        if sub == EXIT_REASON_MSR_READ:
            # kvm_rcx_write(R12), kvm_emulate_rdmsr(); the answer in R11 (tdx_complete_emulated_msr())
            return vcpu.kvm_emulate_rdmsr(None, ecx=out.r12)
        if sub == EXIT_REASON_MSR_WRITE:
            return vcpu.kvm_emulate_wrmsr(None, ecx=out.r12, data=out.r13)
        if sub == A.EXIT_REASON_HLT:
            vcpu.stat["halt_exits"] += 1
            vcpu.exit_to_user(KVM_EXIT_HLT)
            return 0
        if sub == A.TDVMCALL_REPORT_FATAL_ERROR:
            vcpu.exit_to_user(
                KVM_EXIT_SYSTEM_EVENT, type=KVM_SYSTEM_EVENT_TDX_FATAL, data=[out.r12, out.r13, out.r14, out.r15]
            )
            return 0
        if sub == A.TDVMCALL_VE_REQUEST_MMIO:
            # tdcall_to_vmx_exit_reason() makes it EXIT_REASON_EPT_MISCONFIG: tdx_emulate_mmio().
            return self.emulate_mmio(vcpu, out)
        if sub == A.TDVMCALL_MAP_GPA:
            return self.map_gpa(vcpu, out.r12, out.r13)
        t.ret_r10 = A.TDVMCALL_STATUS_INVALID_OPERAND
        return 1

    @staticmethod
    def complete_hypercall_exit(vcpu, run):
        """complete_hypercall_exit() for a TD: the TDVMCALL's return code (R10) =
        kvm_run.hypercall.ret."""
        vcpu.arch.ret_r10 = run.ret & ((1 << 64) - 1)
        return 1

    def emulate_cpuid(self, vcpu, out):
        """tdx_emulate_cpuid(): EAX and ECX in R12 and R13; kvm_cpuid() from the VMM's table;
        EAX, EBX, ECX, EDX back in R12..R15."""
        t = vcpu.arch
        eax, ebx, ecx, edx, _ = vcpu.kvm_cpuid(out.r12 & 0xFFFFFFFF, out.r13 & 0xFFFFFFFF)
        t.vp_enter_args.update(r12=eax, r13=ebx, r14=ecx, r15=edx)
        return 1

    def emulate_io(self, vcpu, out):
        """tdx_emulate_io(): R12 size (1, 2, 4), R13 direction (0 in, 1 out), R14 port, R15 the
        value to write; anything else is TDVMCALL_STATUS_INVALID_OPERAND.  No device in the
        kernel: KVM_EXIT_IO (count 1), completed by tdx_complete_pio_in() (R11 = the value
        userspace left in kvm_run) or tdx_complete_pio_out()."""
        t = vcpu.arch
        vcpu.stat["io_exits"] += 1
        size, write, port = out.r12, out.r13, out.r14 & 0xFFFF
        if write not in (0, 1) or size not in (1, 2, 4):
            t.ret_r10 = A.TDVMCALL_STATUS_INVALID_OPERAND
            return 1
        if write:
            vcpu.emulator_pio_out(size, port, (out.r15 & 0xFFFFFFFF).to_bytes(4, "little"), 1)
            vcpu.complete_userspace_io = _tdx_complete_pio_out
        else:
            vcpu.emulator_pio_in(size, port, 1)
            vcpu.complete_userspace_io = _tdx_complete_pio_in
        return 0

    def emulate_mmio(self, vcpu, out):
        """tdx_emulate_mmio(): TDG.VP.VMCALL<#VE.RequestMMIO> with R12 = size (1, 2, 4, 8), R13 =
        direction (0 read, 1 write), R14 = the GPA (shared: with the shared bit), R15 = the value
        to write.  A bad size or direction, or a private GPA (either end): R10 =
        TDVMCALL_STATUS_INVALID_OPERAND.  Else the shared bit is stripped and, with no in-kernel
        device on the MMIO bus (kvm_io_bus_read/write() fail: this model has none), the access
        goes to userspace as KVM_EXIT_MMIO (phys_addr, len, is_write, data); a read completes
        with tdx_complete_mmio_read(): R11 = the data userspace put in kvm_run.  R10 is left as
        the guest passed it (0: success)."""
        t = vcpu.arch
        kvm = vcpu.kvm
        size, write, gpa = out.r12, out.r13, out.r14
        val = out.r15 if write else 0
        shared = kvm.gfn_direct_bits << 12
        if size not in (1, 2, 4, 8) or write not in (0, 1) or not gpa & shared or not (gpa + size - 1) & shared:
            t.ret_r10 = A.TDVMCALL_STATUS_INVALID_OPERAND
            return 1
        gpa &= ~shared
        data = (val & ((1 << (8 * size)) - 1)).to_bytes(size, "little")  # memcpy(data, &val, size)
        if write:
            kvm.trace_emit("kvm_mmio", vcpu.vcpu_id, type="write", len=size, gpa=gpa, val=val)
            vcpu.exit_to_user(KVM_EXIT_MMIO, phys_addr=gpa, len=size, is_write=True, data=data)
        else:
            kvm.trace_emit("kvm_mmio", vcpu.vcpu_id, type="read_unsatisfied", len=size, gpa=gpa, val=0)
            vcpu.exit_to_user(KVM_EXIT_MMIO, phys_addr=gpa, len=size, is_write=False, data=bytes(size))
            vcpu.complete_userspace_io = self.complete_mmio_read
        return 0

    def complete_mmio_read(self, vcpu, run):
        """tdx_complete_mmio_read(): the first len bytes userspace left in kvm_run's data, as
        the TDVMCALL's R11."""
        val = int.from_bytes(bytes(run.data[: run.len]), "little")
        vcpu.arch.ret_r11 = val
        vcpu.kvm.trace_emit("kvm_mmio", vcpu.vcpu_id, type="read", len=run.len, gpa=run.phys_addr, val=val)
        return 1

    def map_gpa(self, vcpu, gpa, size):
        """tdx_map_gpa(): convert [gpa, gpa+size) in 2M steps, each a KVM_HC_MAP_GPA_RANGE exit."""
        kvm = vcpu.kvm
        t = vcpu.arch
        shared = kvm.gfn_direct_bits << 12
        end = gpa + size
        if (gpa | size) & 0xFFF or not size or (gpa & shared) != ((end - 1) & shared) or end > (shared << 1):
            t.ret_r10 = A.TDVMCALL_STATUS_INVALID_OPERAND
            t.ret_r11 = gpa
            return 1
        t.map_gpa_next = gpa
        t.map_gpa_end = end
        return self._map_gpa_step(vcpu)

    def _map_gpa_step(self, vcpu):
        t = vcpu.arch
        shared = vcpu.kvm.gfn_direct_bits << 12
        gpa = t.map_gpa_next
        step = min(t.map_gpa_end - gpa, TDX_MAP_GPA_MAX_LEN)
        t.map_gpa_next = gpa + step
        attrs = (
            KVM_MAP_GPA_RANGE_DECRYPTED if gpa & shared else KVM_MAP_GPA_RANGE_ENCRYPTED
        ) | KVM_MAP_GPA_RANGE_PAGE_SZ_4K
        vcpu.exit_to_user(
            KVM_EXIT_HYPERCALL, nr=KVM_HC_MAP_GPA_RANGE, args=[gpa & ~shared, step >> 12, attrs, 0], ret=0
        )
        vcpu.complete_userspace_io = self.map_gpa_complete
        return 0

    def map_gpa_complete(self, vcpu, run):
        """Userspace converted one step: on to the next (straight back to userspace), or done."""
        t = vcpu.arch
        if run.ret:
            t.ret_r10, t.ret_r11 = A.TDVMCALL_STATUS_INVALID_OPERAND, t.map_gpa_next
            return 1
        if t.map_gpa_next < t.map_gpa_end:
            return self._map_gpa_step(vcpu)
        t.ret_r10, t.ret_r11 = A.TDVMCALL_STATUS_SUCCESS, 0
        return 1


def _tdx_complete_pio_out(vcpu, run):
    vcpu.pio.count = 0
    return 1


def _tdx_complete_pio_in(vcpu, run):
    """tdx_complete_pio_in(): the value read is the TDVMCALL's R11."""
    data = vcpu.complete_emulator_pio_in(run)
    vcpu.arch.ret_r11 = int.from_bytes(data, "little")
    return 1


def tdx_has_emulated_msr(index):
    """tdx_has_emulated_msr(): the MSRs KVM may emulate for a TD (the rest is INVALID_OPERAND).
    Of these the model's kvm_{get,set}_msr_common() has UCODE_REV, ARCH_CAPABILITIES, PAT,
    MISC_ENABLE, APIC_BASE, EFER, POWER_CTL; MTRRs, MCE banks, TSC deadline, PLATFORM_INFO and
    the x2APIC registers are KVM_MSR_RET_UNSUPPORTED there."""
    if index in (
        MSR_IA32_UCODE_REV,
        MSR_IA32_ARCH_CAPABILITIES,
        0x1FC,
        MSR_IA32_CR_PAT,
        0xFE,
        0x2FF,
        0x6E0,
        MSR_IA32_MISC_ENABLE,
        0xCE,
        0x140,
        MSR_IA32_APICBASE,
        MSR_EFER,
        MSR_IA32_FEAT_CTL,
        0x179,
        0x17A,
        0x17B,
        0x4D0,
        0x4B564D05,
    ):
        return True  # ...POWER_CTL, MTRRcap, MTRRdefType, TSC_DEADLINE, PLATFORM_INFO,
        # MISC_FEATURES_ENABLES, MCG_CAP/STATUS/CTL, MCG_EXT_CTL, POLL_CONTROL
    if 0x200 <= index <= 0x26F:  # MTRRphysBase0 .. MTRRfix4K_F8000
        return True
    if 0x400 <= index < 0x400 + 4 * 32 or 0x280 <= index < 0x280 + 32:
        return True  # MCx_{CTL,STATUS,ADDR,MISC}, MCx_CTL2
    if 0x800 <= index <= 0x8FF:
        # x2APIC registers the CPU virtualizes (TPR, PPR, EOI, ISR, TMR, IRR) are not KVM's
        return not (index in (0x808, 0x80A, 0x80B) or 0x810 <= index <= 0x827)
    return False
