"""VMX exit handling (arch/x86/kvm/vmx/vmx.c, vmx/common.h): the kvm_exit tracepoint with the exit
decoded, EPT violations (__vmx_handle_ept_violation: the page-fault error code from the exit
qualification), EPT misconfigurations, intercepted exceptions and the triple fault.
"""

from ..hw.ept import (decode_qualification, EPT_VIOLATION_ACC_READ, EPT_VIOLATION_ACC_WRITE,
                      EPT_VIOLATION_ACC_INSTR, EPT_VIOLATION_GVA_IS_VALID, EPT_VIOLATION_GVA_TRANSLATED)
from ..hw.exits import EXIT_REASON_EPT_VIOLATION, EXIT_REASON_EPT_MISCONFIG, EXIT_REASON_EXCEPTION_NMI, VECTOR_NAMES
from .mmu import (PFERR_WRITE_MASK, PFERR_USER_MASK, PFERR_FETCH_MASK, PFERR_PRESENT_MASK, PFERR_GUEST_FINAL_MASK,
                  PFERR_GUEST_PAGE_MASK, PFERR_PRIVATE_ACCESS, PFERR_RSVD_MASK)
from .uapi import KVM_EXIT_SHUTDOWN


class KvmVcpuVmx:
    """The VMX exit handlers of struct kvm_vcpu (vmx_handle_exit's table)."""

    def trace_exit(self, exit):
        """kvm_exit, with the exit decoded: GPA, GLA, the qualification in words, and the
        faulting instruction disassembled and symbolized from the guest's ELF."""
        fields = {"vcpu_id": self.vcpu_id, "reason": exit.name, "rip": exit.rip, "info1": exit.qualification,
                  "info2": 0, "error_code": exit.error_code or 0}
        detail = ""
        if exit.reason in (EXIT_REASON_EPT_VIOLATION, EXIT_REASON_EPT_MISCONFIG):
            fields["gpa"] = exit.gpa
            if exit.gla is not None:
                fields["gla"] = exit.gla
            if exit.reason == EXIT_REASON_EPT_VIOLATION:
                fields["qualification"] = decode_qualification(exit.qualification)
                detail = f" gpa {exit.gpa:#x}" + (f" gla {exit.gla:#x}" if exit.gla is not None else "") + \
                    f" [{fields['qualification']}]"
            else:
                fields["misconfig"] = exit.misconfig
                detail = f" gpa {exit.gpa:#x} ({exit.misconfig})"
        elif exit.reason == EXIT_REASON_EXCEPTION_NMI:
            fields["vector"] = VECTOR_NAMES.get(exit.vector, exit.vector)
            detail = f" {fields['vector']}"
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
        if q & 0x38:                                   # EPT_VIOLATION_PROT_MASK: the entry was present
            error_code |= PFERR_PRESENT_MASK
        if q & EPT_VIOLATION_GVA_IS_VALID:
            error_code |= PFERR_GUEST_FINAL_MASK if q & EPT_VIOLATION_GVA_TRANSLATED else PFERR_GUEST_PAGE_MASK
        if not self.kvm.is_addr_direct(gpa):
            error_code |= PFERR_PRIVATE_ACCESS
        if self.kvm.tracer.enabled:
            self.kvm.trace_emit("kvm_page_fault", self.vcpu_id, vcpu_id=self.vcpu_id, rip=rip, address=gpa,
                                error_code=error_code)
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
        self.exit_to_user(KVM_EXIT_SHUTDOWN, vector=exit.vector, error_code=exit.error_code, cr2=exit.cr2,
                          rip=exit.rip, insn=insn, why=exit.misconfig,
                          no_idt=self.hw.uc.reg_read(X.UC_X86_REG_IDTR)[2] == 0)
        return 0

