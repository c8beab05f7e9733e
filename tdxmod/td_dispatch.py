"""TDH.VP.ENTER and what the module does while the TD runs (the TD dispatcher).

The module enters the TD on the vCPU's CPU context with the secure EPTP (its
S-EPT) and the shared EPTP (KVM's direct root), and handles the TD's exits
itself where the ABI says so: TDCALLs other than TDG.VP.VMCALL, and private
EPT violations on PENDING pages.  Everything else is a TD exit to the VMM,
returned as TDH.VP.ENTER's output registers:

    RAX  exit reason (basic VMX exit reason in bits 15:0)
    RCX  exit qualification          RDX  extended exit qualification
    R8   guest-physical address      R9   interruption information
    and for TDG.VP.VMCALL: RCX = the guest's register bitmap and R10..R15,
    RBX, RSI, RDI as the guest exposed them.
"""

from emu.hw.exits import (EXIT_REASON_EPT_VIOLATION, EXIT_REASON_TDCALL, EXIT_REASON_HLT, EXIT_REASON_VMCALL,
                          EXIT_REASON_EXCEPTION_NMI, EXIT_REASON_EPT_MISCONFIG, EXIT_REASON_TRIPLE_FAULT)
from .abi import *  # noqa: F401,F403
from .module import Regs
from emu.hw.ept import make_eptp
from . import sept as S

# Bits of RCX in TDG.VP.VMCALL: which registers the guest passes to the VMM.
_VMCALL_REGS = (("rbx", 3), ("rsi", 6), ("rdi", 7), ("r8", 8), ("r9", 9), ("r10", 10), ("r11", 11),
                ("r12", 12), ("r13", 13), ("r14", 14), ("r15", 15))
TDCALL_LEN = 4
VE_VECTOR = 20


def _exit(reason, qual=0, ext=0, gpa=0, intr=0, **kw):
    # R8 carries the page-aligned GPA (the module does not report the offset).
    return Regs(reason, rcx=qual, rdx=ext, r8=gpa & ~0xFFF, r9=intr, **kw)


def vp_enter(mod, r, caller):
    from .handlers import _vcpu_operand
    v, st = _vcpu_operand(mod, r.rcx)
    if st:
        return Regs(st)
    td = v.td
    if td.op_state != OP_STATE_RUNNABLE:
        return Regs(TDX_OP_STATE_INCORRECT)
    if not v.initialized:
        return Regs(TDX_VCPU_STATE_INCORRECT)
    hw = v.hw
    if v.shared_eptp is None:
        return Regs(TDX_VCPU_STATE_INCORRECT)
    shared_eptp = make_eptp(v.shared_eptp, levels=td.pwl, ad=True)
    if hw.eptp != shared_eptp or hw.secure_eptp != td.secure_eptp:
        hw.load_eptp(shared_eptp, td.secure_eptp, td.shared_bit)
    if v.vmcall_pending is not None:
        # Complete the guest's TDG.VP.VMCALL with what the VMM answered.
        insn_len = v.vmcall_pending
        v.vmcall_pending = None
        if insn_len == TDCALL_LEN:
            hw.set_regs({"rax": 0, "r10": r.r10, "r11": r.r11})
        hw.set_reg("rip", hw.reg("rip") + insn_len)
    v.associated = True
    # TLB tracking: count this vCPU in the current epoch, and flush if the epoch moved.
    if v.epoch != td.epoch:
        if v.epoch is not None:
            hw.flush_tlb()
        v.epoch = td.epoch
    td.refcount[td.epoch & 1] += 1
    try:
        tracer = mod.tracer
        while True:
            ex = hw.run()
            out = _handle(mod, v, hw, ex)
            if tracer is not None and tracer.enabled:
                _trace(mod, tracer, caller, v, hw, ex, out)
            if out is not None:
                return out
    finally:
        td.refcount[v.epoch & 1] -= 1


def _handle(mod, v, hw, ex):
    """Handle one exit inside the module; the TD exit Regs for the VMM, or None to resume."""
    td = v.td
    reason = ex.reason
    if reason == EXIT_REASON_TDCALL:
        leaf = hw.reg("rax")
        v.last_tdcall_leaf, v.last_tdcall_rcx = leaf, hw.reg("rcx")
        if leaf == TDG_VP_VMCALL:
            regs = {name: hw.reg(name) for name, bit in _VMCALL_REGS if hw.reg("rcx") >> bit & 1}
            v.vmcall_pending = TDCALL_LEN
            return Regs(EXIT_REASON_TDCALL, rcx=hw.reg("rcx"), **regs)
        if leaf == TDG_MEM_PAGE_ACCEPT:
            return tdg_mem_page_accept(mod, v, hw)
        if leaf == TDG_VP_INFO:
            hw.set_regs({"rax": TDX_SUCCESS, "rcx": 48 if not td.gpaw else 52, "rdx": td.attributes,
                         "r8": len(td.vcpus) | (td.max_vcpus << 32), "r9": 0})
        else:
            hw.set_reg("rax", TDX_OPERAND_INVALID | OPERAND_ID_RCX)
        hw.set_reg("rip", ex.rip + TDCALL_LEN)
        return None
    if reason == EXIT_REASON_HLT:
        # A TD halts with TDG.VP.VMCALL<Instruction.HLT>; a bare HLT is taken as that request
        # (the real module would inject #VE for the guest's handler to make the call).
        v.vmcall_pending = 1
        hw.set_reg("rip", ex.rip)
        return Regs(EXIT_REASON_TDCALL, rcx=0x1C00, r10=0, r11=EXIT_REASON_HLT, r12=0)
    if reason == EXIT_REASON_EPT_VIOLATION:
        gpa = ex.gpa
        if not gpa & td.shared_bit:
            ptr, e, lvl = mod.sept_walk(td, gpa & ~0xFFF, 0)
            state = S.sept_state(e)
            if state in (S.SEPT_PENDING, S.SEPT_PENDING_BLOCKED):
                if not td.attributes & TD_ATTR_SEPT_VE_DISABLE:
                    # #VE to the guest; with no IDT to deliver it through, a triple fault.
                    return _exit(EXIT_REASON_TRIPLE_FAULT, intr=VE_VECTOR | (3 << 8) | (1 << 31), gpa=gpa,
                                 r12=ex.rip)
                return _exit(EXIT_REASON_EPT_VIOLATION, ex.qualification,
                             TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION, gpa)
        return _exit(EXIT_REASON_EPT_VIOLATION, ex.qualification, TDX_EXT_EXIT_QUAL_TYPE_NONE, ex.gpa,
                     r10=ex.gla or 0)
    if reason == EXIT_REASON_EPT_MISCONFIG:
        return _exit(EXIT_REASON_EPT_MISCONFIG, gpa=ex.gpa)
    if reason == EXIT_REASON_VMCALL:
        # VMCALL in a TD: #UD, and with no IDT a triple fault.
        return _exit(EXIT_REASON_TRIPLE_FAULT, intr=6 | (3 << 8) | (1 << 31), r12=ex.rip)
    if reason == EXIT_REASON_EXCEPTION_NMI:
        intr = ex.vector | (3 << 8) | (1 << 31) | ((1 << 11) if ex.error_code is not None else 0)
        return _exit(EXIT_REASON_TRIPLE_FAULT, intr=intr, r10=ex.error_code or 0, r11=ex.cr2 or 0, r12=ex.rip)
    return _exit(reason, ex.qualification, 0, ex.gpa or 0)


def _trace(mod, tracer, caller, v, hw, ex, out):
    """tdcall for a TDCALL the module completed; tdx_exit for what goes to the VMM."""
    from emu.disasm import disassemble_one
    from .abi import TDCALL_NAMES, status_name
    if ex.reason == EXIT_REASON_TDCALL and out is None:
        tracer.emit("tdcall", caller, leaf=TDCALL_NAMES.get(v.last_tdcall_leaf, "TDCALL"), rcx=v.last_tdcall_rcx,
                    status=status_name(hw.reg("rax")))
        return
    if out is None:
        return
    rip = ex.rip
    sym = tracer.symbolize(rip) if tracer.symbolize else None
    insn = disassemble_one(hw.read_guest(rip, 15), rip) or "?"
    from emu.hw.exits import REASON_NAMES
    tracer.emit("tdx_exit", caller, reason=REASON_NAMES.get(out.rax & 0xFFFF, str(out.rax & 0xFFFF)), rip=rip, where=sym or f"{rip:#x}", insn=insn,
                qualification=out.rcx, ext_qualification=out.rdx, gpa=out.r8)


def tdg_mem_page_accept(mod, v, hw):
    """TDG.MEM.PAGE.ACCEPT: a PENDING page becomes MAPPED and zeroed; a missing one exits to the VMM."""
    td = v.td
    rcx = hw.reg("rcx")
    rip = hw.reg("rip")
    level = rcx & 7
    gpa = rcx & ~0xFFF & ((1 << 52) - 1)

    def done(status):
        hw.set_reg("rax", status)
        hw.set_reg("rip", rip + TDCALL_LEN)
        return None

    if rcx & 0xFF8 or level not in (0, 1) or gpa & ((0x1000 << (9 * level)) - 1) or not mod.private_gpa_ok(td, gpa):
        return done(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    ptr, e, lvl = mod.sept_walk(td, gpa, level)
    state = S.sept_state(e)
    if S.is_leaf_state(state) and state == S.SEPT_MAPPED and lvl >= level:
        return done(TDX_PAGE_ALREADY_ACCEPTED | lvl)
    if lvl == level and state in S.NL_STATES:
        return done(TDX_PAGE_SIZE_MISMATCH | OPERAND_ID_RCX)
    if lvl != level or state != S.SEPT_PENDING:
        # Not there yet (or not pending): an EPT violation to the VMM, which maps the page
        # (SEPT.ADD..., PAGE.AUG); the guest's TDCALL runs again after the VMM resumes it.
        qual = 2 | ((e & S.SEPT_RWX) << 3)
        # tdaccept_vmx_eeq_info: requested level 2:0, error level 5:3, public state 13:6, PS 14
        info = level | (lvl << 3) | (S.PUBLIC_STATE.get(state, 0) << 6) | (((e >> 7) & 1) << 14)
        return _exit(EXIT_REASON_EPT_VIOLATION, qual, TDX_EXT_EXIT_QUAL_TYPE_ACCEPT | (info << 32), gpa)
    if not mod.lock_entry(ptr):
        return done(TDX_OPERAND_BUSY_HOST_PRIORITY if e & S.SEPT_TDHP else TDX_OPERAND_BUSY | OPERAND_ID_RCX)
    hpa = e & S.SEPT_HPA
    size = 0x1000 << (9 * level)
    mod.mem.zero(hpa, size)
    mod.mem.q[ptr >> 3] = S.set_state(e, S.SEPT_MAPPED) | S.SEPT_TDEL
    mod.unlock_entry(ptr)
    return done(TDX_SUCCESS)
