"""A virtual CPU: one Unicorn instance whose MMU is ours.

Unicorn runs in UC_TLB_VIRTUAL mode, so it never walks page tables itself:
every TLB miss calls ``_tlb_fill``, which runs the guest walk and the EPT walk
(``paging.translate``) and either fills the TLB entry (host frame + rights) or
records a VM exit and refuses the fill, which makes emu_start stop with RIP at
the faulting instruction.  Once the exit is handled, ``run()`` restarts there.

VMCALL and TDCALL are invalid instructions to Unicorn; the invalid-instruction
hook decodes them into exits.  HLT ends emu_start by itself.  Exceptions Unicorn
raises (#DE, #UD, INT n, ...) arrive through the interrupt hook and end the run
as an exception exit: guests have no IDT, so a real CPU would triple-fault.
"""

from unicorn import Uc, UcError, UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, UC_HOOK_TLB_FILL, \
    UC_HOOK_INSN_INVALID, UC_HOOK_INTR, UC_HOOK_INSN, UC_TLB_VIRTUAL, UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE
from unicorn import x86_const as X

from . import ept as ept_mod
from .ept import EptTranslation, EptViolation, EptMisconfig, decode_eptp
from .exits import (VmExit, EXIT_REASON_EPT_VIOLATION, EXIT_REASON_EPT_MISCONFIG, EXIT_REASON_EXCEPTION_NMI,
                    EXIT_REASON_HLT, EXIT_REASON_VMCALL, EXIT_REASON_TDCALL)
from .memory import PAGE_MASK
from .paging import Translation, PageFault, GeneralProtection, translate, probe, PAGING, X86_CR0_WP, \
    X86_CR0_PG, X86_CR4_PAE, EFER_NXE

MSR_EFER = 0xC0000080
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
BOOT_CR0 = X86_CR0_PG | X86_CR0_WP | 0x33          # PG WP NE ET MP PE
BOOT_EFER = EFER_LME | EFER_LMA | EFER_NXE

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
CTRL = ("cr0", "cr2", "cr3", "cr4")
_UC_REG = {name: getattr(X, "UC_X86_REG_" + name.upper()) for name in GPRS + CTRL}
_UC_GPRS = [_UC_REG[n] for n in GPRS]

_VMCALL = b"\x0f\x01\xc1"
_TDCALL = b"\x66\x0f\x01\xcc"
_ACCESS = {16: 1, 17: 2, 18: 4}         # UC_MEM_READ/WRITE/FETCH -> R/W/X (the UC_PROT_* bits too)


class Vcpu:
    """vCPU ``index`` over host memory ``mem``.

    The hypervisor loads the EPT pointers with ``load_eptp`` (for a TD: the shared
    EPTP plus the secure EPTP and the shared-GPA bit), sets registers, and calls
    ``run()`` until it returns an exit it cannot handle.
    """

    def __init__(self, mem, index=0):
        self.mem = mem
        self.index = index
        self.cpuid = {}                      # leaf -> (eax, ebx, ecx, edx), as the hypervisor sets it
        self.pending = None                  # the exit recorded by a hook during emu_start
        self.eptp = None
        self.secure_eptp = None
        self.shared_mask = 0
        self.stats_fills = 0
        self.walk_observer = None            # called with each Translation or exit (tracing)
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map_ptr(0, mem.size, UC_PROT_ALL, mem.address())
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        # No stop address: with exits enabled and an empty list, emu_start runs until an exit.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        uc.hook_add(UC_HOOK_TLB_FILL, self._tlb_fill)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._insn_invalid)
        uc.hook_add(UC_HOOK_INTR, self._interrupt)
        uc.hook_add(UC_HOOK_INSN, self._cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | X86_CR4_PAE)
        uc.msr_write(MSR_EFER, BOOT_EFER)
        uc.reg_write(X.UC_X86_REG_CR0, BOOT_CR0)
        self._ept = None
        self._ept_ad = (False, False)

    # -- VMCS-like state ------------------------------------------------------------------------------
    def load_eptp(self, eptp, secure_eptp=None, shared_mask=0):
        """Load the EPT pointer(s); the VM-entry checks on them raise InvalidEptp.

        For a TD: GPAs with ``shared_mask`` set translate through ``eptp`` (KVM's
        shared EPT), all others through ``secure_eptp`` (the TDX module's S-EPT).
        """
        decode_eptp(eptp)
        if secure_eptp is not None:
            decode_eptp(secure_eptp)
        self.eptp, self.secure_eptp, self.shared_mask = eptp, secure_eptp, shared_mask
        self._ept = self._make_ept()
        self.flush_tlb()

    def _make_ept(self):
        mem, walk = self.mem, ept_mod.walk
        eptp, secure, shared = self.eptp, self.secure_eptp, self.shared_mask
        ad_shared = decode_eptp(eptp)[2]
        pt_shared = 3 if ad_shared else 1

        if secure is None:
            def ept(gpa, access):
                if access == PAGING:
                    access = pt_shared
                return walk(mem, eptp, gpa, access)
            return ept

        pt_secure = 3 if decode_eptp(secure)[2] else 1

        def ept(gpa, access):
            if gpa & shared:
                return walk(mem, eptp, gpa, pt_shared if access == PAGING else access)
            return walk(mem, secure, gpa, pt_secure if access == PAGING else access)
        return ept

    def flush_tlb(self):
        """INVEPT (all contexts) for this vCPU: no cached translation survives it."""
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    # -- registers ------------------------------------------------------------------------------------
    def get_regs(self):
        uc = self.uc
        vals = uc.reg_read_batch(_UC_GPRS)
        regs = dict(zip(GPRS, vals))
        for n in CTRL:
            regs[n] = uc.reg_read(_UC_REG[n])
        regs["efer"] = uc.msr_read(MSR_EFER)
        return regs

    def set_regs(self, regs):
        for name, value in regs.items():
            if name == "efer":
                self.uc.msr_write(MSR_EFER, value)
            else:
                self.uc.reg_write(_UC_REG[name], value)

    def reg(self, name):
        return self.uc.reg_read(_UC_REG[name])

    def set_reg(self, name, value):
        self.uc.reg_write(_UC_REG[name], value)

    # -- guest memory as this vCPU sees it (no side effects) -------------------------------------------
    def gva_to_hpa(self, gva):
        """The HPA a linear address reaches now, without setting A/D or exiting; None if unmapped."""
        mem = self.mem

        def ept(gpa, access=None):
            if self.secure_eptp is not None and not gpa & self.shared_mask:
                t = ept_mod.walk(mem, self.secure_eptp, gpa, 1, set_ad=False)
                if t.__class__ is not EptTranslation:
                    t = ept_mod.walk(mem, self.secure_eptp, gpa, 4, set_ad=False)
            else:
                t = ept_mod.walk(mem, self.eptp, gpa, 1, set_ad=False)
                if t.__class__ is not EptTranslation:
                    t = ept_mod.walk(mem, self.eptp, gpa, 4, set_ad=False)
            return t.hpa if t.__class__ is EptTranslation else None
        gpa = probe(mem.q, ept, self.reg("cr3"), gva)
        return None if gpa is None else ept(gpa)

    def read_guest(self, gva, n):
        out = bytearray()
        while n > 0:
            hpa = self.gva_to_hpa(gva)
            chunk = min(n, 0x1000 - (gva & 0xFFF))
            if hpa is None:
                break
            out += self.mem.read(hpa, chunk)
            gva += chunk
            n -= chunk
        return bytes(out)

    # -- running ---------------------------------------------------------------------------------------
    def run(self):
        """Run the guest until the next VM exit and return it (a VmExit)."""
        self.pending = None
        uc = self.uc
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        try:
            uc.emu_start(rip, 0)
        except UcError as e:
            if self.pending is None:
                rip = uc.reg_read(X.UC_X86_REG_RIP)
                return VmExit(EXIT_REASON_EXCEPTION_NMI, rip, vector=6, vcpu=self.index,
                              misconfig=f"unicorn: {e}")
        p = self.pending
        if p is None:
            # HLT returns from emu_start with RIP just past it; report the HLT itself.
            return VmExit(EXIT_REASON_HLT, uc.reg_read(X.UC_X86_REG_RIP) - 1, 1, vcpu=self.index)
        if p.__class__ is VmExit:
            return p
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        gla = self._fault_gla
        if p.__class__ is EptViolation:
            return VmExit(EXIT_REASON_EPT_VIOLATION, rip, qualification=p.qualification, gpa=p.gpa, gla=gla,
                          vcpu=self.index)
        if p.__class__ is EptMisconfig:
            return VmExit(EXIT_REASON_EPT_MISCONFIG, rip, gpa=p.gpa, gla=gla, misconfig=p.reason, vcpu=self.index)
        if p.__class__ is PageFault:
            uc.reg_write(X.UC_X86_REG_CR2, p.gva)
            return VmExit(EXIT_REASON_EXCEPTION_NMI, rip, vector=14, error_code=p.error_code, cr2=p.gva,
                          gla=p.gva, vcpu=self.index)
        if p.__class__ is GeneralProtection:
            return VmExit(EXIT_REASON_EXCEPTION_NMI, rip, vector=13, error_code=0, gla=p.gva, vcpu=self.index)
        raise AssertionError(p)

    # -- hooks (run inside emu_start) ------------------------------------------------------------------
    def _tlb_fill(self, uc, vaddr, access, entry, _data):
        if self.pending is not None:
            return False                     # already exiting: refuse whatever Unicorn tries next
        self.stats_fills += 1
        cr0 = uc.reg_read(X.UC_X86_REG_CR0)
        r = translate(self.mem.q, self._ept, uc.reg_read(X.UC_X86_REG_CR3), vaddr, _ACCESS[access],
                      wp=cr0 & X86_CR0_WP)
        if self.walk_observer is not None:
            self.walk_observer(self, vaddr, _ACCESS[access], r)
        if r.__class__ is Translation:
            entry.paddr = r.hpa & PAGE_MASK
            entry.perms = r.perms
            return True
        self.pending = r
        self._fault_gla = vaddr
        return False

    def _insn_invalid(self, uc, _data):
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        code = self.read_guest(rip, 4)
        if code[:3] == _VMCALL:
            self.pending = VmExit(EXIT_REASON_VMCALL, rip, 3, vcpu=self.index)
        elif code[:4] == _TDCALL:
            self.pending = VmExit(EXIT_REASON_TDCALL, rip, 4, vcpu=self.index)
        else:
            self.pending = VmExit(EXIT_REASON_EXCEPTION_NMI, rip, vector=6, vcpu=self.index)
        uc.emu_stop()
        return True

    def _interrupt(self, uc, intno, _data):
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        self.pending = VmExit(EXIT_REASON_EXCEPTION_NMI, rip, vector=intno, vcpu=self.index)
        uc.emu_stop()

    def _cpuid(self, uc, _data):
        leaf = uc.reg_read(X.UC_X86_REG_EAX)
        regs = self.cpuid.get(leaf)
        if regs is None:
            return 0                          # Unicorn's own CPUID model answers
        for r, v in zip((X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX), regs):
            uc.reg_write(r, v)
        return 1                              # handled: skip Unicorn's CPUID
