"""struct kvm_x86_ops: the vendor hooks the common MMU and run loop call.

VmxX86Ops is plain VMX with EPT.  The TDX backend (emu/kvm/tdx.py) overrides
the vCPU run/exit hooks and plugs the seed patch's reflect_* hooks into the
mirror root (upstream names: link_external_spt, set_external_spte,
free_external_spt, remove_external_spte).
"""

from ..hw.ept import make_eptp
from ..hw.exits import (
    EXIT_REASON_EPT_VIOLATION,
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_HLT,
    EXIT_REASON_VMCALL,
    EXIT_REASON_TDCALL,
    EXIT_REASON_EXCEPTION_NMI,
    EXIT_REASON_EXTERNAL_INTERRUPT,
    EXIT_REASON_IO_INSTRUCTION,
    EXIT_REASON_CPUID,
    EXIT_REASON_MSR_READ,
    EXIT_REASON_MSR_WRITE,
)
from ..hw.msr import MSR_EFER
from .spte import PG_LEVEL_4K
from .uapi import KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR
from ..hw.exits import EXIT_REASON_TRIPLE_FAULT


# x86_emulate_instruction()'s results (arch/x86/kvm/kvm_emulate.h)
X86EMUL_CONTINUE = 0
X86EMUL_RETRY_INSTR = 3


class VmxX86Ops:
    name = "vmx"

    # -- VM lifetime --------------------------------------------------------------------------------
    def vm_init(self, kvm):
        pass

    def vcpu_create(self, vcpu):
        """vmx_vcpu_create(): the MSR bitmap (vmx.py)."""
        vcpu.vmx_recalc_msr_intercepts()

    def recalc_msr_intercepts(self, vcpu):
        vcpu.vmx_recalc_msr_intercepts()

    def vm_destroy_begin(self, kvm):
        pass

    def vm_free(self, kvm):
        pass

    def get_regs(self, vcpu):
        return vcpu.hw.get_regs()

    def set_regs(self, vcpu, regs):
        vcpu.hw.set_regs(regs)

    # -- MSRs and the registers the common code reads (kvm_x86_ops.get_msr/set_msr, ...) --------------
    def get_msr(self, vcpu, index, host_initiated):
        return vcpu.vmx_get_msr(index, host_initiated)

    def set_msr(self, vcpu, index, data, host_initiated):
        return vcpu.vmx_set_msr(index, data, host_initiated)

    def complete_emulated_msr(self, vcpu, exit, err):
        """kvm_complete_insn_gp()"""
        return vcpu.kvm_complete_insn_gp(exit, err)

    def get_efer(self, vcpu):
        return vcpu.hw.uc.msr_read(MSR_EFER)

    def set_efer(self, vcpu, efer):
        """vmx_set_efer(): the VMCS guest EFER (Unicorn's, which it uses for long mode and NX)."""
        vcpu.hw.uc.msr_write(MSR_EFER, efer)

    def is_paging(self, vcpu):
        return bool(vcpu.hw.reg("cr0") & (1 << 31))

    def get_cr4(self, vcpu):
        return vcpu.hw.reg("cr4")

    def write_edx_eax(self, vcpu, data):
        vcpu.hw.set_regs({"rax": data & 0xFFFFFFFF, "rdx": data >> 32 & 0xFFFFFFFF})

    def flush_tlb(self, vcpu):
        """vmx_flush_tlb_all(): INVEPT on the vCPU's CPU."""
        vcpu.hw.flush_tlb()

    # -- MMU --------------------------------------------------------------------------------------------
    def load_mmu_pgd(self, vcpu, root_hpa, root_level):
        """vmx_load_mmu_pgd(): construct_eptp() with WB, the walk length and A/D (enable_ept_ad_bits)."""
        vcpu.hw.load_eptp(make_eptp(root_hpa, levels=root_level, ad=True))

    def gmem_max_mapping_level(self, kvm, gfn):
        """kvm_x86_ops.gmem_max_mapping_level (6.16's private_max_mapping_level)."""
        return PG_LEVEL_4K

    # The mirror hooks: a VMX VM has no mirror root, so the TDP MMU never calls them.
    def reflect_link_spt(self, kvm, gfn, level, external_spt, vcpu=None):
        raise AssertionError("reflect_link_spt on a VM without a mirror root")

    def reflect_set_spte(self, kvm, gfn, level, pfn, vcpu=None):
        raise AssertionError("reflect_set_spte on a VM without a mirror root")

    def reflect_remove_spte(self, kvm, gfn, level, pfn):
        raise AssertionError("reflect_remove_spte on a VM without a mirror root")

    def reflect_free_spt(self, kvm, gfn, level, external_spt):
        raise AssertionError("reflect_free_spt on a VM without a mirror root")

    # The 7.2 shape of the same hooks (--mirror-hooks 7.2).
    def set_external_spte(self, kvm, gfn, old_spte, new_spte, level, vcpu=None):
        raise AssertionError("set_external_spte on a VM without a mirror root")

    def reclaim_external_sp(self, kvm, gfn, sp):
        raise AssertionError("reclaim_external_sp on a VM without a mirror root")

    def topup_external_cache(self, kvm, vcpu, min_objs):
        return 0  # KVM_X86_OP_OPTIONAL_RET0

    def gmem_convert(self, kvm, start, end, to_private):
        return 0  # KVM_X86_OP_OPTIONAL_RET0

    def check_emulate_instruction(self, vcpu):
        """vmx_check_emulate_instruction(): VMX can emulate (the model's KVM_EXIT_MMIO stands in)."""
        return X86EMUL_CONTINUE

    # -- running ---------------------------------------------------------------------------------------
    def vcpu_run(self, vcpu):
        vcpu.has_run = True  # kvm_vcpu_has_run(): last_vmentry_cpu set
        return vcpu.hw.run()

    def handle_exit(self, vcpu, exit):
        """vmx_handle_exit(): 1 = resume the guest, 0 = exit to userspace."""
        r = exit.reason
        if r == EXIT_REASON_EXTERNAL_INTERRUPT:
            return 1  # a kick: the requests are processed before re-entry
        if r == EXIT_REASON_EPT_VIOLATION:
            return vcpu.handle_ept_violation(exit)
        if r == EXIT_REASON_EPT_MISCONFIG:
            return vcpu.handle_ept_misconfig(exit)
        if r == EXIT_REASON_VMCALL:
            hw = vcpu.hw
            return vcpu.handle_hypercall(
                exit, hw.reg("rax"), (hw.reg("rbx"), hw.reg("rcx"), hw.reg("rdx"), hw.reg("rsi"))
            )
        if r == EXIT_REASON_IO_INSTRUCTION:
            return vcpu.handle_io(exit)
        if r == EXIT_REASON_CPUID:
            return vcpu.handle_cpuid(exit)
        if r == EXIT_REASON_MSR_READ:
            return vcpu.handle_rdmsr(exit)
        if r == EXIT_REASON_MSR_WRITE:
            return vcpu.handle_wrmsr(exit)
        if r == EXIT_REASON_HLT:
            # kvm_emulate_halt() without an in-kernel LAPIC: skip the HLT and tell userspace.
            vcpu.stat["halt_exits"] += 1
            vcpu.skip_emulated_instruction(exit)
            vcpu.exit_to_user(KVM_EXIT_HLT)
            return 0
        if r == EXIT_REASON_TDCALL:
            exit.reason, exit.vector = EXIT_REASON_EXCEPTION_NMI, 6  # TDCALL outside a TD: #UD
            return vcpu.handle_exception_nmi(exit)
        if r == EXIT_REASON_EXCEPTION_NMI:
            return vcpu.handle_exception_nmi(exit)
        if r == EXIT_REASON_TRIPLE_FAULT:
            return vcpu.handle_triple_fault(exit)
        vcpu.exit_to_user(KVM_EXIT_INTERNAL_ERROR, suberror="unexpected_exit", reason=f"exit reason {exit.name}")
        return 0
