"""VMX exit handling (arch/x86/kvm/vmx/vmx.c, vmx/common.h): the kvm_exit tracepoint with the exit
decoded, EPT violations (__vmx_handle_ept_violation: the page-fault error code from the exit
qualification), EPT misconfigurations, intercepted exceptions and the triple fault; I/O
instructions (handle_io), CPUID, RDMSR and WRMSR, and the VMX half of MSR access (vmx_get_msr(),
vmx_set_msr(): the segment bases and SYSENTER MSRs in the VMCS, the user-return MSRs, feature
control) with the MSR bitmap KVM gives the CPU (vmx_vcpu_create(), vmx_recalc_msr_intercepts()).
"""

from ..hw.ept import (
    decode_qualification,
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_GVA_IS_VALID,
    EPT_VIOLATION_GVA_TRANSLATED,
)
from ..hw.exits import (
    EXIT_REASON_EPT_VIOLATION,
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_EXCEPTION_NMI,
    VECTOR_NAMES,
    EXIT_REASON_IO_INSTRUCTION,
    EXIT_REASON_MSR_READ,
    EXIT_REASON_MSR_WRITE,
    decode_io_qualification,
)
from ..hw.msr import (
    MsrBitmap,
    MSR_TYPE_R,
    MSR_TYPE_W,
    MSR_TYPE_RW,
    MSR_IA32_TSC,
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_KERNEL_GS_BASE,
    MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_ESP,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_FEAT_CTL,
    MSR_EFER,
    MSR_STAR,
    MSR_LSTAR,
    MSR_CSTAR,
    MSR_SYSCALL_MASK,
    MSR_TSC_AUX,
    MSR_IA32_CR_PAT,
    EFER_SCE,
    EFER_LMA,
)
from .mmu import (
    PFERR_WRITE_MASK,
    PFERR_USER_MASK,
    PFERR_FETCH_MASK,
    PFERR_PRESENT_MASK,
    PFERR_GUEST_FINAL_MASK,
    PFERR_GUEST_PAGE_MASK,
    PFERR_PRIVATE_ACCESS,
    PFERR_RSVD_MASK,
)
from .uapi import KVM_EXIT_SHUTDOWN


class KvmVcpuVmx:
    """The VMX exit handlers of struct kvm_vcpu (vmx_handle_exit's table)."""

    def trace_exit(self, exit):
        """kvm_exit, with the exit decoded: GPA, GLA, the qualification in words, and the
        faulting instruction disassembled and symbolized from the guest's ELF."""
        fields = {
            "vcpu_id": self.vcpu_id,
            "reason": exit.name,
            "rip": exit.rip,
            "info1": exit.qualification,
            "info2": 0,
            "error_code": exit.error_code or 0,
        }
        detail = ""
        if exit.reason in (EXIT_REASON_EPT_VIOLATION, EXIT_REASON_EPT_MISCONFIG):
            fields["gpa"] = exit.gpa
            if exit.gla is not None:
                fields["gla"] = exit.gla
            if exit.reason == EXIT_REASON_EPT_VIOLATION:
                fields["qualification"] = decode_qualification(exit.qualification)
                detail = (
                    f" gpa {exit.gpa:#x}"
                    + (f" gla {exit.gla:#x}" if exit.gla is not None else "")
                    + f" [{fields['qualification']}]"
                )
            else:
                fields["misconfig"] = exit.misconfig
                detail = f" gpa {exit.gpa:#x} ({exit.misconfig})"
        elif exit.reason == EXIT_REASON_EXCEPTION_NMI:
            fields["vector"] = VECTOR_NAMES.get(exit.vector, exit.vector)
            detail = f" {fields['vector']}"
        elif exit.reason == EXIT_REASON_IO_INSTRUCTION:
            fields["port"] = exit.qualification >> 16 & 0xFFFF
            detail = f" [{decode_io_qualification(exit.qualification)}]"
        elif exit.reason in (EXIT_REASON_MSR_READ, EXIT_REASON_MSR_WRITE) and self.hw is not None:
            fields["msr"] = self.hw.reg("rcx") & 0xFFFFFFFF
            detail = f" msr {fields['msr']:#x}"
        if self.hw is not None and not self.kvm.has_mirrored_tdp and exit.reason >= 0:
            insn = self.disassemble(exit.rip)
            sym = self.kvm.tracer.symbolize(exit.rip) if self.kvm.tracer.symbolize else None
            fields["insn"] = insn
            fields["where"] = sym or f"{exit.rip:#x}"
            detail += f" {fields['where']}: {insn}"
        fields["detail"] = detail
        self.kvm.trace_emit("kvm_exit", self.vcpu_id, **fields)

    # -- VMX exit handlers ----------------------------------------------------------------------------------
    def handle_ept_violation(self, exit):
        self.stat["ept_violations"] += 1
        return self.vmx_handle_ept_violation(exit.gpa, exit.qualification, exit.rip)

    def vmx_handle_ept_violation(self, gpa, q, rip):
        """__vmx_handle_ept_violation(): the page-fault error code from the qualification."""
        error_code = PFERR_USER_MASK if q & EPT_VIOLATION_ACC_READ else 0
        if q & EPT_VIOLATION_ACC_WRITE:
            error_code |= PFERR_WRITE_MASK
        if q & EPT_VIOLATION_ACC_INSTR:
            error_code |= PFERR_FETCH_MASK
        if q & 0x38:  # EPT_VIOLATION_PROT_MASK: the entry was present
            error_code |= PFERR_PRESENT_MASK
        if q & EPT_VIOLATION_GVA_IS_VALID:
            error_code |= PFERR_GUEST_FINAL_MASK if q & EPT_VIOLATION_GVA_TRANSLATED else PFERR_GUEST_PAGE_MASK
        if not self.kvm.is_addr_direct(gpa):
            error_code |= PFERR_PRIVATE_ACCESS
        if self.kvm.tracer.enabled:
            self.kvm.trace_emit(
                "kvm_page_fault", self.vcpu_id, vcpu_id=self.vcpu_id, rip=rip, address=gpa, error_code=error_code
            )
        return self.kvm_mmu_page_fault(gpa, error_code)

    def handle_ept_misconfig(self, exit):
        self.stat["ept_misconfigs"] += 1
        return self.kvm_mmu_page_fault(exit.gpa, PFERR_RSVD_MASK)

    def handle_exception_nmi(self, exit):
        """handle_exception_nmi(): an exception the exception bitmap intercepts (#UD: handle_ud(),
        #DB, #AC, #MC) is queued back to the guest (kvm_queue_exception()), to be delivered
        through its IDT at the next entry.  An emulator failure (no vector to give the guest)
        shuts the vCPU down."""
        if exit.misconfig is not None:
            return self.handle_triple_fault(exit)
        self.hw.inject_event(exit.vector, exit.error_code)
        return 1

    def handle_triple_fault(self, exit):
        """handle_triple_fault(): KVM_EXIT_SHUTDOWN.  The model keeps the exception that started
        it (vector, error code, CR2, RIP, instruction) and why delivery failed, for the report."""
        from unicorn import x86_const as X

        insn = self.disassemble(exit.rip)
        self.exit_to_user(
            KVM_EXIT_SHUTDOWN,
            vector=exit.vector,
            error_code=exit.error_code,
            cr2=exit.cr2,
            rip=exit.rip,
            insn=insn,
            why=exit.misconfig,
            no_idt=self.hw.uc.reg_read(X.UC_X86_REG_IDTR)[2] == 0,
        )
        return 0

    # -- I/O, CPUID, MSRs ---------------------------------------------------------------------------------
    def handle_io(self, exit):
        """handle_io(): string I/O goes to the emulator, IN/OUT to kvm_fast_pio()."""
        self.stat["io_exits"] += 1
        q = exit.qualification
        if q & 16:
            return self.emulate_string_io(exit)
        return self.kvm_fast_pio(exit, (q & 7) + 1, q >> 16 & 0xFFFF, bool(q & 8))

    def handle_cpuid(self, exit):
        return self.kvm_emulate_cpuid(exit)

    def handle_rdmsr(self, exit):
        return self.kvm_emulate_rdmsr(exit)

    def handle_wrmsr(self, exit):
        return self.kvm_emulate_wrmsr(exit)

    # -- vmx_get_msr() / vmx_set_msr() ----------------------------------------------------------------------
    def vmx_get_msr(self, index, host_initiated):
        """(ret, data): the VMCS guest fields (the CPU's state here), the user-return MSRs, feature
        control; the rest is kvm_get_msr_common()."""
        hw = self.hw
        if (
            index
            in (
                MSR_FS_BASE,
                MSR_GS_BASE,
                MSR_KERNEL_GS_BASE,
                MSR_IA32_SYSENTER_CS,
                MSR_IA32_SYSENTER_EIP,
                MSR_IA32_SYSENTER_ESP,
            )
            or index in VMX_URET_MSRS
        ):
            return 0, hw.uc.msr_read(index)
        if index == MSR_IA32_FEAT_CTL:
            return 0, self.msrs.feature_control
        return self.kvm_get_msr_common(index, host_initiated)

    def vmx_set_msr(self, index, data, host_initiated):
        hw = self.hw
        if index == MSR_EFER:
            return self.kvm_set_msr_common(index, data, host_initiated)
        if index in (MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP):
            hw.uc.msr_write(index, data)
            return 0
        if index == MSR_IA32_SYSENTER_CS:
            hw.uc.msr_write(index, data & 0xFFFFFFFF)
            return 0
        if index == MSR_IA32_CR_PAT:
            ret = self.kvm_set_msr_common(index, data, host_initiated)
            if not ret:
                hw.uc.msr_write(index, data)  # VM_ENTRY_LOAD_IA32_PAT: GUEST_IA32_PAT
            return ret
        if index == MSR_IA32_FEAT_CTL:
            m = self.msrs
            if not host_initiated and m.feature_control & 1:
                return 1  # locked
            valid = 1 if not host_initiated else KVM_SUPPORTED_FEATURE_CONTROL
            if data & ~valid:
                return 1
            m.feature_control = data
            return 0
        if index in VMX_URET_MSRS:
            return self.vmx_set_guest_uret_msr(index, data)
        return self.kvm_set_msr_common(index, data, host_initiated)

    def vmx_set_guest_uret_msr(self, index, data):
        """vmx_set_guest_uret_msr(): a user-return MSR loaded into the hardware now (STAR, LSTAR
        and SYSCALL_MASK only for a long-mode guest with EFER.SCE: vmx_setup_uret_msrs()) goes
        through the hardware's WRMSR, which refuses reserved bits (SYSCALL_MASK 63:32) with
        #GP: the write fails.  The model's CPU (Unicorn) keeps them either way: it runs SYSCALL
        with them."""
        efer = self.hw.uc.msr_read(MSR_EFER)
        loaded = index == MSR_TSC_AUX or (efer & EFER_LMA and efer & EFER_SCE)
        if loaded and index == MSR_SYSCALL_MASK and data >> 32:
            return 1
        self.hw.uc.msr_write(index, data)
        return 0

    def vmx_recalc_msr_intercepts(self):
        """The MSR bitmap vmx_vcpu_create() sets up: every MSR intercepted but reads of IA32_TSC
        (TSC offsetting does it) and the segment-base and SYSENTER MSRs (VMCS fields the CPU
        switches), in both directions.  An MSR the userspace filter denies stays intercepted
        (vmx_disable_intercept_for_msr() checks kvm_msr_allowed())."""
        bm = self.hw.msr_bitmap = MsrBitmap()
        passthrough = [(MSR_IA32_TSC, MSR_TYPE_R)] + [
            (m, MSR_TYPE_RW)
            for m in (
                MSR_FS_BASE,
                MSR_GS_BASE,
                MSR_KERNEL_GS_BASE,
                MSR_IA32_SYSENTER_CS,
                MSR_IA32_SYSENTER_ESP,
                MSR_IA32_SYSENTER_EIP,
            )
        ]
        for index, types in passthrough:
            for t in (MSR_TYPE_R, MSR_TYPE_W):
                if types & t:
                    bm.set_intercept(index, t, not self.kvm_msr_allowed(index, t))


# vmx_uret_msrs_list (user-return MSRs, arch/x86/kvm/vmx/vmx.c): their guest values live in KVM and
# are loaded into the CPU while the guest runs.  (EFER is one too, but KVM handles it apart.)
VMX_URET_MSRS = frozenset((MSR_SYSCALL_MASK, MSR_LSTAR, MSR_CSTAR, MSR_TSC_AUX, MSR_STAR))
KVM_SUPPORTED_FEATURE_CONTROL = 1 | (1 << 1) | (1 << 2) | (1 << 20)  # locked, VMX in/out SMX, LMCE
