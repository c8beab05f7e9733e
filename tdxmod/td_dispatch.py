"""TDH.VP.ENTER and what the module does while the TD runs (the TD dispatcher).

Follows src/td_transitions/tdh_vp_enter.c, td_exit.c and td_exit_stepping.c,
src/td_dispatcher/tdx_td_dispatcher.c and vm_exits/ (td_ept_violation.c, td_other_exits.c,
tdg_mem_page_accept.c, tdg_vp_veinfo_get.c, tdg_vp_info.c, tdg_vp_vmcall.c) of the TDX module (tdx_1.5).

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

from emu.hw.exits import (
    EXIT_REASON_EPT_VIOLATION,
    EXIT_REASON_TDCALL,
    EXIT_REASON_HLT,
    EXIT_REASON_VMCALL,
    EXIT_REASON_EXCEPTION_NMI,
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_TRIPLE_FAULT,
    EXIT_REASON_CPUID,
    EXIT_REASON_IO_INSTRUCTION,
    EXIT_REASON_MSR_READ,
    EXIT_REASON_MSR_WRITE,
)
from .td_cpuid import td_cpuid_exit
from .td_msr import td_rdmsr_exit, td_wrmsr_exit, TD_MSR_ACCESS_SUCCESS, TD_MSR_ACCESS_GP
from .abi import *  # noqa: F401,F403
from .regs import Regs
from .helpers import Held, lock_tdvpr, map_tdvps, check_and_associate_vcpu, sept_tree_lock
from . import locks as L
from emu.hw.ept import make_eptp, EPT_VIOLATION_ACC_WRITE
from . import sept as S

# Bits of RCX in TDG.VP.VMCALL: which registers the guest passes to the VMM (and gets back).
_VMCALL_REGS = (
    ("rdx", 2),
    ("rbx", 3),
    ("rsi", 6),
    ("rdi", 7),
    ("r8", 8),
    ("r9", 9),
    ("r10", 10),
    ("r11", 11),
    ("r12", 12),
    ("r13", 13),
    ("r14", 14),
    ("r15", 15),
)
TDCALL_LEN = 4
VE_VECTOR = 20
# EPT-violation exit qualification bits the module clears (tdx_ept_violation_exit_to_vmm():
# GLA valid, final translation, the advanced information bits, NMI unblocking).
_EPT_QUAL_CLEARED = 0x1F80


def _exit(reason, qual=0, ext=0, gpa=0, intr=0, **kw):
    # R8 carries the page-aligned GPA (the module does not report the offset).
    return Regs(reason, rcx=qual, rdx=ext, r8=gpa & ~0xFFF, r9=intr, **kw)


def _epf_expected(mod, td, gpa):
    """is_epf_expected(): a walk of the S-EPT for ``gpa`` with all rights would fault (no MAPPED leaf)."""
    ptr, e, lvl = mod.sept_walk(td, gpa & ~0xFFF, 0)
    return not (S.is_leaf_state(S.sept_state(e)) and (e & S.SEPT_RWX) == S.SEPT_RWX)


def _stepping_filter(mod, v, td, caller, held):
    """td_entry_stepping_filter() and handle_stepping_filter(): None to enter the TD, or the
    Regs TDH.VP.ENTER returns instead (BUSY on the S-EPT tree lock, or an emulated EPT-violation
    TD exit for a recorded GPA that would still fault).  The TLB-tracking count taken at entry
    is given back in both cases (revert_tlb_tracking_state()).  Entering, the tree lock is
    still held (the caller releases it right before the entry)."""
    if not v.last_epf_gpa_list:
        return None
    if not sept_tree_lock(mod, held, td, L.TDX_LOCK_EXCLUSIVE):
        _revert_tlb_tracking_state(td, v)
        return Regs(TDX_OPERAND_BUSY | OPERAND_ID_SEPT)
    mod.point(caller, "sept_locked_exclusive")
    for gpa in v.last_epf_gpa_list:
        for key in mod.sept_keys(gpa, -1)[0]:
            mod.touch(key, False)  # (emu.checkers.dpor) the walk reads them
        if _epf_expected(mod, td, gpa):
            _revert_tlb_tracking_state(td, v)
            # emulate_ept_violation_td_exit(): a write, no extended qualification, GPRs 0; the
            # vCPU stays READY, as after an asynchronous TD exit.
            v.last_td_exit = LAST_EXIT_ASYNC_FAULT
            return Regs(EXIT_REASON_EPT_VIOLATION, rcx=EPT_VIOLATION_ACC_WRITE, rdx=0, r8=gpa & ~0xFFF, r9=0)
    return None


def _revert_tlb_tracking_state(td, v):
    """revert_tlb_tracking_state(): give back the count adjust_tlb_tracking_state() took."""
    td.refcount[v.epoch & 1] -= 1


def _stepping_log(v, rip, gpa):
    """td_exit_epf_stepping_log(): count EPT violations on private GPAs at one RIP; past the
    threshold, record their GPAs (up to EPF_GPA_LIST_SIZE)."""
    if rip != v.rip_on_tdentry:
        v.last_epf_gpa_list = []
        v.possibly_epf_stepping = 0
    if v.possibly_epf_stepping < STEPPING_EPF_THRESHOLD:
        v.possibly_epf_stepping += 1
    elif len(v.last_epf_gpa_list) < EPF_GPA_LIST_SIZE and gpa not in v.last_epf_gpa_list:
        v.last_epf_gpa_list.append(gpa)


def tdx_inject_ve(v, hw, exit_reason, qualification, gpa=0, gla=0, insn_len=0, insn_info=0):
    """tdx_inject_ve(): with VE_INFO free (valid 0), fill it (exit reason, qualification, GLA,
    GPA, instruction length and information) and inject #VE (vector 20, no error code);
    with VE_INFO still unread, inject #DF(0) instead.  Guest RFLAGS.RF is set either way."""
    ve = v.ve_info
    if ve.valid == 0:
        ve.exit_reason, ve.qualification, ve.gla, ve.gpa = exit_reason & 0xFFFFFFFF, qualification, gla, gpa
        ve.eptp_index = 0
        ve.insn_len_info = insn_len | (insn_info << 32)
        ve.valid = VE_INFO_CONTENTS_VALID
        hw.inject_event(VE_VECTOR)
    else:
        hw.inject_event(8, 0)
    hw.set_reg("rflags", hw.reg("rflags") | (1 << 16))


def tdg_vp_veinfo_get(v, hw):
    """TDG.VP.VEINFO.GET (tdg_vp_veinfo_get.c): RCX, RDX, R8, R9, R10 zeroed; with no valid
    VE_INFO TDX_NO_VALID_VE_INFO; else RCX = exit reason, RDX = exit qualification, R8 = GLA,
    R9 = GPA, R10 = instruction length | information << 32, and VE_INFO is free again.  After
    the CPU's own #VE (a convertible EPT violation) R10 is whatever the module last stored
    there: the CPU does not write that non-architectural field (Linux decodes the
    instruction itself for an EPT-violation #VE)."""
    hw.set_regs({"rcx": 0, "rdx": 0, "r8": 0, "r9": 0, "r10": 0})
    ve = v.ve_info
    if ve.valid == 0:
        return TDX_NO_VALID_VE_INFO
    hw.set_regs({"rcx": ve.exit_reason, "rdx": ve.qualification, "r8": ve.gla, "r9": ve.gpa, "r10": ve.insn_len_info})
    ve.valid = 0
    return TDX_SUCCESS


def _no_idt(hw):
    from unicorn import x86_const as X

    return hw.uc.reg_read(X.UC_X86_REG_IDTR)[2] == 0


def _triple_fault(v, ex, hw):
    """A TD exit for the CPU's triple fault: async_tdexit_to_vmm(TDX_NON_RECOVERABLE_VCPU), RAX =
    0x4000000100000000 | 2, and the vCPU DISABLED (TDH.VP.ENTER: VCPU_STATE_INCORRECT; TDH.VP.RD
    still reads it).  (Model-only registers, for the report: R9 the first exception's
    interruption information, R10 its error code, R11 CR2, R12 RIP, R13 1 when the TD had no
    IDT loaded, R14 for a #VE the exit reason it stood for | 1 << 32.)"""
    from unicorn import x86_const as X

    v.exit_state = VCPU_DISABLED
    intr = ex.vector | (3 << 8) | (1 << 31) | ((1 << 11) if ex.error_code is not None else 0)
    no_idt = 1 if hw.uc.reg_read(X.UC_X86_REG_IDTR)[2] == 0 else 0
    ve = v.ve_info.exit_reason | 1 << 32 if v is not None and ex.vector == VE_VECTOR and v.ve_info.valid else 0
    return _exit(
        TDX_NON_RECOVERABLE_VCPU | EXIT_REASON_TRIPLE_FAULT,
        intr=intr,
        r10=ex.error_code or 0,
        r11=ex.cr2 or 0,
        r12=ex.rip,
        r13=no_idt,
        r14=ve,
    )


# TDH.VP.ENTER's RCX (vcpu_and_flags_t): bit 0 the host-recoverability hint, bit 1 RESUME_L1,
# bits 11:2 and 63:52 reserved, bits 51:12 the TDVPR.
_VP_ENTER_RESERVED = 0xFFC | (0xFFF << 52)


def vp_enter(mod, r, caller):
    """tdh_vp_enter.c: the TDVPR shared, its TDR shared, the TD's state (op_state lock shared),
    map_tdvps(), the vCPU associated with this CPU (check_and_associate_vcpu(): a vCPU running in
    the TD elsewhere is VCPU_STATE_INCORRECT, one associated with another CPU VCPU_ASSOCIATED), the
    flags, the TLB-tracking state (the epoch lock shared: BUSY|TD_EPOCH), the stepping filter;
    then the vCPU is ACTIVE in the TD, the op_state (and any S-EPT tree) lock released, the TDR
    and the TDVPR held shared until the TD exit (td_vmexit_to_vmm())."""
    held = Held()
    try:
        return _vp_enter(mod, r, caller, held)
    finally:
        held.release()


def _vp_enter(mod, r, caller, held):
    if r.rcx & _VP_ENTER_RESERVED:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    v, st = lock_tdvpr(mod, held, r.rcx & ~0xFFF, OPERAND_ID_RCX, L.TDX_LOCK_SHARED, TDH_VP_ENTER)
    if st:
        return Regs(st)
    op_state_lock = held.stack[-1]  # released before the TD entry
    td = v.td
    if not map_tdvps(v):
        return Regs(TDX_TDCX_NUM_INCORRECT)
    st, new_association = check_and_associate_vcpu(mod, v, mod.current_lp(caller), False)
    if st:
        return Regs(st)
    if r.rcx & 1 and v.last_td_exit != LAST_EXIT_ASYNC_TRAP:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)  # the host-recoverability hint
    if r.rcx & 2:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)  # RESUME_L1: the TD has no L2 VM
    hw = v.hw
    if v.shared_eptp is None:
        return Regs(TDX_VCPU_STATE_INCORRECT)  # (model: the VMM never wrote SHARED_EPTP)
    # adjust_tlb_tracking_state(): the epoch lock (shared; BUSY while TRACK holds it), count
    # this vCPU in the current epoch, and flush if the epoch moved since its last entry on
    # this CPU.
    lock, ok = L.sharex_acquire(td.epoch_lock, L.TDX_LOCK_SHARED)
    if mod.sched is not None:  # (emu.checkers.dpor: only a scheduler records footprints)
        mod.touch("td_epoch", not ok)
    if not ok:
        td.epoch_lock = lock
        return Regs(TDX_OPERAND_BUSY | OPERAND_ID_TD_EPOCH)
    td.refcount[td.epoch & 1] += 1
    td.epoch_lock = L.sharex_release(lock, L.TDX_LOCK_SHARED)
    if v.epoch != td.epoch:
        if not new_association:
            hw.flush_tlb()
        v.epoch = td.epoch
    tree_locks = len(held.stack)
    out = _stepping_filter(mod, v, td, caller, held)
    if out is not None:
        return out
    # ALL CHECKS PASSED: the op_state lock and the stepping filter's S-EPT tree lock go.
    while len(held.stack) > tree_locks:
        held.stack.pop()()
    held.stack.remove(op_state_lock)
    op_state_lock()
    v.state = VCPU_ACTIVE
    # td_vmexit_to_vmm(): however the TD exits (even by an exception of the emulated CPU), the
    # vCPU's state is stored and its count in the epoch given back (not after a fatal exit that
    # found the TD dead: that vCPU stays ACTIVE, counted, and the TD can only be torn down).
    v.exit_state = VCPU_READY
    try:
        shared_eptp = make_eptp(v.shared_eptp, levels=td.pwl, ad=True)
        if hw.eptp != shared_eptp or hw.secure_eptp != td.secure_eptp:
            hw.load_eptp(shared_eptp, td.secure_eptp, td.shared_bit)
        if v.vmcall_pending is not None:
            # Complete the guest's TDG.VP.VMCALL (save_regs_after_tdvmcall()): every GPR the guest
            # exposed gets the VMM's value, RAX = 0, RCX = the guest's selection.
            insn_len = v.vmcall_pending
            v.vmcall_pending = None
            if insn_len == TDCALL_LEN:
                ctl = v.vmcall_control
                regs = {name: getattr(r, name) for name, bit in _VMCALL_REGS if ctl >> bit & 1}
                regs["rax"] = TDX_SUCCESS
                regs["rcx"] = ctl
                hw.set_regs(regs)
            hw.set_reg("rip", hw.reg("rip") + insn_len)
        v.rip_on_tdentry = hw.reg("rip")
        tracer = mod.tracer
        while True:
            ex = hw.run()
            out = _handle(mod, v, hw, ex, caller)
            if tracer is not None and tracer.enabled:
                _trace(mod, tracer, caller, v, hw, ex, out)
            if out is not None:
                return out
    finally:
        if v.exit_state is not None:
            v.state = v.exit_state
            _revert_tlb_tracking_state(td, v)
        v.exit_state = None


def _handle(mod, v, hw, ex, caller=None):
    """Handle one exit inside the module; the TD exit Regs for the VMM, or None to resume."""
    td = v.td
    reason = ex.reason
    if getattr(mod.sched, "record", False):
        # (emu.checkers.dpor) what the module's handling of this exit touches
        if reason == EXIT_REASON_TDCALL:
            mod.sched.module_call(mod.tdcall_footprint(hw.reg("rax"), hw.reg("rcx"), caller))
        elif reason == EXIT_REASON_EPT_VIOLATION:
            for key in mod.sept_keys(ex.gpa, -1)[0]:
                mod.sched.touch(key, False)
    if td.fatal:
        # tdx_td_dispatcher(): a TD made fatal on another CPU (a #MC there): this exit is a TD
        # exit that touches nothing of the TD (is_td_dead: the vCPU stays ACTIVE and counted).
        return _fatal_exit(mod, v, ex)
    if ex.rip != v.rip_on_tdentry:
        # vmexit_stepping_filter(): forward progress since the TD entry resets EPF tracking.
        v.last_epf_gpa_list = []
        v.possibly_epf_stepping = 0
    if reason == EXIT_REASON_TDCALL:
        # td_call(): the guest's TDCALL, leaf in RAX (tdx_td_dispatcher.c)
        leaf = hw.reg("rax")
        v.last_tdcall_leaf, v.last_tdcall_rcx = leaf, hw.reg("rcx")
        handler = TDCALL_HANDLERS.get(leaf, tdg_unknown)
        return handler(mod, v, hw, ex, caller)
    if reason == EXIT_REASON_HLT and _no_idt(hw):
        # (model) A guest that loaded no IDT runs on its firmware's, and TDVF's #VE handler
        # (CcExitHandleVe) turns a HLT's #VE into TDG.VP.VMCALL<Instruction.HLT>: the bare HLT
        # is taken as that request, so a guest without the runtime ends with HLT, as the guest
        # ABI says.  Any other #VE with no IDT cannot be delivered: a triple fault, below.
        v.vmcall_pending = 1
        v.last_td_exit = LAST_EXIT_TDVMCALL
        hw.set_reg("rip", ex.rip)
        return Regs(EXIT_REASON_TDCALL, rcx=0x1C00, r10=0, r11=EXIT_REASON_HLT, r12=0)
    if reason == EXIT_REASON_HLT or reason == EXIT_REASON_IO_INSTRUCTION:
        # td_generic_ve_exit(), whatever SEPT_VE_DISABLE: #VE with the exit reason, the exit
        # qualification (I/O: size, direction, string, rep, port) and the instruction length;
        # the guest's handler asks the VMM (TDG.VP.VMCALL<Instruction.HLT/IO>) and skips it.
        hw.set_reg("rip", ex.rip)
        tdx_inject_ve(v, hw, reason, ex.qualification, insn_len=ex.insn_len)
        return None
    if reason == EXIT_REASON_CPUID:
        if td_cpuid_exit(v, hw, ex):
            tdx_inject_ve(v, hw, EXIT_REASON_CPUID, 0, insn_len=ex.insn_len)
        return None
    if reason == EXIT_REASON_MSR_READ or reason == EXIT_REASON_MSR_WRITE:
        status = td_rdmsr_exit(v, hw) if reason == EXIT_REASON_MSR_READ else td_wrmsr_exit(v, hw)
        if status == TD_MSR_ACCESS_SUCCESS:
            hw.set_reg("rip", ex.rip + ex.insn_len)
        elif status == TD_MSR_ACCESS_GP:
            hw.inject_event(13, 0)  # inject_gp(0), RIP on the instruction
        else:
            tdx_inject_ve(v, hw, reason, 0, insn_len=ex.insn_len)
        return None
    if reason == EXIT_REASON_EPT_VIOLATION:
        # td_ept_violation_exit()
        gpa = ex.gpa
        ext = TDX_EXT_EXIT_QUAL_TYPE_NONE
        if not gpa & td.shared_bit:
            ptr, e, lvl = mod.sept_walk(td, gpa & ~0xFFF, 0)
            if S.sept_state(e) in S.PENDING_GUEST_ACCEPTABLE:
                # PENDING only: a PENDING_BLOCKED page is not guest-acceptable, so an access to
                # it is an ordinary EPT violation.
                if not td.attributes & TD_ATTR_SEPT_VE_DISABLE:
                    # #VE to the guest, the violation's qualification (uncleared), GPA and GLA
                    # in VE_INFO; delivered through the TD's IDT at the next entry.
                    tdx_inject_ve(v, hw, EXIT_REASON_EPT_VIOLATION, ex.qualification, gpa=gpa, gla=ex.gla or 0)
                    return None
                ext = TDX_EXT_EXIT_QUAL_TYPE_PENDING_EPT_VIOLATION
            _stepping_log(v, ex.rip, gpa)
        # tdx_ept_violation_exit_to_vmm(): qualification bits 12:7 cleared, GPA bits 11:0 cleared,
        # every other GPR 0.
        return _exit(EXIT_REASON_EPT_VIOLATION, ex.qualification & ~_EPT_QUAL_CLEARED, ext, gpa)
    if reason == EXIT_REASON_EPT_MISCONFIG:
        return _exit(EXIT_REASON_EPT_MISCONFIG, gpa=ex.gpa)
    if reason == EXIT_REASON_VMCALL:
        # td_generic_ve_exit(): VMCALL in a TD is a #VE (exit reason VMCALL, length 3).
        hw.set_reg("rip", ex.rip)
        tdx_inject_ve(v, hw, EXIT_REASON_VMCALL, 0, insn_len=3)
        return None
    v.last_td_exit = LAST_EXIT_ASYNC_FAULT
    if reason == EXIT_REASON_TRIPLE_FAULT:
        return _triple_fault(v, ex, hw)
    if reason == EXIT_REASON_EXCEPTION_NMI:
        if ex.vector == 18 and ex.misconfig is None:
            # td_exception_or_nmi_exit(): a #MC (the only exception the TD VMCS intercepts)
            # disables the TD: TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE, TDR.FATAL set, later
            # SEAMCALLs on the TD TD_FATAL, its other vCPUs' next exits fatal too.
            td.fatal = True
            mod.touch(("td", td.tdr), True)
            return _fatal_exit(mod, v, ex)
        # Otherwise only an emulator failure comes here (model): the vCPU shuts down.
        return _triple_fault(v, ex, hw)
    return _exit(reason, ex.qualification, 0, ex.gpa or 0)


def _tdcall_done(mod, v, hw, ex, status):
    """The TDCALL completes in the guest: RAX the status, RIP past the instruction."""
    hw.set_reg("rax", status)
    hw.set_reg("rip", ex.rip + TDCALL_LEN)
    if mod.on_tdcall is not None:
        mod.on_tdcall(v, v.last_tdcall_leaf, status)
    return None


def tdg_vp_vmcall(mod, v, hw, ex, caller=None):
    """TDG.VP.VMCALL (tdg_vp_vmcall.c): RAX, RCX, RSP (and RBP under NO_RBP_MOD) cannot be
    passed, and RCX bits 63:32 are reserved: OPERAND_INVALID|RCX to the guest, no exit.  Else a
    TD exit (trap-like: LAST_EXIT_TDVMCALL) with the registers the guest selected."""
    td = v.td
    ctl = hw.reg("rcx")
    check = 0x13 | (0x20 if td.config_flags & TD_CONFIG_FLAGS_NO_RBP_MOD else 0)
    if ctl & check or ctl >> 32:
        return _tdcall_done(mod, v, hw, ex, TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    regs = {name: hw.reg(name) for name, bit in _VMCALL_REGS if ctl >> bit & 1}
    v.vmcall_pending = TDCALL_LEN
    v.vmcall_control = ctl
    v.last_td_exit = LAST_EXIT_TDVMCALL
    return Regs(EXIT_REASON_TDCALL, rcx=ctl, **regs)


def tdg_vp_info(mod, v, hw, ex, caller=None):
    """TDG.VP.INFO (tdg_vp_info.c): R8 = num_vcpus (initialized) | max_vcpus << 32, R9 = this
    vCPU's index, R10 = the commands available (TDG.SYS.RD is not modelled: 0), R11 = 0."""
    td = v.td
    hw.set_regs(
        {
            "rcx": 48 if not td.gpaw else 52,
            "rdx": td.attributes,
            "r8": td.num_vcpus | (td.max_vcpus << 32),
            "r9": v.vcpu_index,
            "r10": 0,
            "r11": 0,
        }
    )
    return _tdcall_done(mod, v, hw, ex, TDX_SUCCESS)


def _tdg_vp_veinfo_get(mod, v, hw, ex, caller=None):
    return _tdcall_done(mod, v, hw, ex, tdg_vp_veinfo_get(v, hw))


def _tdg_mem_page_accept(mod, v, hw, ex, caller=None):
    return tdg_mem_page_accept(mod, v, hw, caller)


def tdg_unknown(mod, v, hw, ex, caller=None):
    """td_call(): a leaf it does not know, reserved bits or a version in RAX: OPERAND_INVALID with
    operand id RAX (0) to the guest."""
    return _tdcall_done(mod, v, hw, ex, TDX_OPERAND_INVALID)


def _fatal_exit(mod, v, ex):
    """async_tdexit_to_vmm(TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE): RAX the status | the exit
    reason, RCX the qualification, R9 the interruption information; the TD's state is not
    touched (td_vmexit_to_vmm(is_td_dead)): no state stored, the epoch count not given back."""
    v.exit_state = None
    intr = 0
    if ex.reason == EXIT_REASON_EXCEPTION_NMI and ex.vector is not None:
        intr = ex.vector | (3 << 8) | (1 << 31)
    return Regs(TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE | (ex.reason & 0xFFFF), rcx=ex.qualification or 0, r9=intr)


def _trace(mod, tracer, caller, v, hw, ex, out):
    """tdcall for a TDCALL the module completed; tdx_exit for what goes to the VMM."""
    from emu.disasm import disassemble_one
    from .abi import TDCALL_NAMES, status_name

    if ex.reason == EXIT_REASON_TDCALL and out is None:
        tracer.emit(
            "tdcall",
            caller,
            leaf=TDCALL_NAMES.get(v.last_tdcall_leaf, "TDCALL"),
            rcx=v.last_tdcall_rcx,
            status=status_name(hw.reg("rax")),
        )
        return
    if out is None:
        return
    rip = ex.rip
    sym = tracer.symbolize(rip) if tracer.symbolize else None
    insn = disassemble_one(hw.read_guest(rip, 15), rip) or "?"
    from emu.hw.exits import REASON_NAMES

    tracer.emit(
        "tdx_exit",
        caller,
        reason=REASON_NAMES.get(out.rax & 0xFFFF, str(out.rax & 0xFFFF)),
        rip=rip,
        where=sym or f"{rip:#x}",
        insn=insn,
        qualification=out.rcx,
        ext_qualification=out.rdx,
        gpa=out.r8,
    )


def tdg_mem_page_accept(mod, v, hw, caller=None):
    """TDG.MEM.PAGE.ACCEPT (tdg_mem_page_accept.c): walk to the requested level; a failed walk is
    PAGE_ALREADY_ACCEPTED (a guest-accessible leaf above) or an EPT violation to the VMM; else take
    the entry lock the guest's way (sept_lock_acquire_guest(): BUSY, or BUSY_HOST_PRIORITY when a
    host asked for priority), re-read the entry, and only then check its state."""
    td = v.td
    rcx = hw.reg("rcx")
    rip = hw.reg("rip")
    level = rcx & 7
    gpa = rcx & ~0xFFF & ((1 << 52) - 1)

    def done(status):
        hw.set_reg("rax", status)
        hw.set_reg("rip", rip + TDCALL_LEN)
        if mod.on_tdcall is not None:
            mod.on_tdcall(v, TDG_MEM_PAGE_ACCEPT, status)
        return None

    def violation(e, lvl):
        # async_tdexit_ept_violation(..., VMX_EEQ_ACCEPT): the VMM maps the page (SEPT.ADD...,
        # PAGE.AUG); the guest's TDCALL runs again after the VMM resumes it.
        state = S.sept_state(e)
        qual = 2 | ((e & S.SEPT_RWX) << 3)
        # tdaccept_vmx_eeq_info: requested level 2:0, error level 5:3, public state 13:6, PS 14
        info = level | (lvl << 3) | (S.PUBLIC_STATE.get(state, 0) << 6) | (((e >> 7) & 1) << 14)
        return _exit(EXIT_REASON_EPT_VIOLATION, qual, TDX_EXT_EXIT_QUAL_TYPE_ACCEPT | (info << 32), gpa)

    # verify_page_info_input(): reserved bits 11:3 and 63:52, the level, the alignment
    if rcx & 0xFF8 or rcx >> 52 or level not in (0, 1) or gpa & ((0x1000 << (9 * level)) - 1):
        return done(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    if not mod.private_gpa_ok(td, gpa):
        return done(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    ptr, e, lvl = mod.sept_walk(td, gpa, level)
    if lvl != level:
        if S.sept_state(e) in S.GUEST_ACCESSIBLE_LEAF:
            return done(TDX_PAGE_ALREADY_ACCEPTED | lvl)
        return violation(e, lvl)
    st = mod.lock_entry_guest(ptr)
    if st:
        # The guest will retry: time passes for the lock's holder (a yield, or a guest
        # retrying in a loop would never let it finish).
        mod.point(caller, "tdcall_busy")
        return done(st | OPERAND_ID_RCX)
    e = mod.mem.q[ptr >> 3]  # the copy, read again under the lock
    mod.point(caller, "sept_entry_locked_guest")
    state = S.sept_state(e)
    if state != S.SEPT_FREE and not S.is_leaf_state(state):
        mod.unlock_entry(ptr)
        return done(TDX_PAGE_SIZE_MISMATCH | lvl)
    if state in S.GUEST_ACCESSIBLE_LEAF:
        mod.unlock_entry(ptr)
        return done(TDX_PAGE_ALREADY_ACCEPTED | lvl)
    if state not in S.TDCALL_LEGAL_STATES[TDG_MEM_PAGE_ACCEPT]:
        mod.unlock_entry(ptr)
        return violation(e, lvl)
    hpa = S.leaf_hpa(e, level)
    if level == 0:
        mod.mem.zero(hpa, 0x1000)
        mod.mem.td_write(hpa, 0x1000)  # zero_area_cacheline() with the TD's key
        interrupted = False
    else:
        # A 2M ACCEPT clears the page 4K at a time, counting in the entry (INIT_COUNTER, bits
        # 20:12), and stops when an interrupt is pending in the guest: the TDCALL is left
        # unfinished (RIP and RAX unchanged), the TD exits for the interrupt, and the ACCEPT
        # resumes from the count when the guest runs the TDCALL again.
        counter = (e & S.SEPT_ACCEPT_COUNTER) >> S.SEPT_ACCEPT_COUNTER_SHIFT
        interrupted = False
        while True:
            mod.mem.zero(hpa + (counter << 12), 0x1000)
            mod.mem.td_write(hpa + (counter << 12), 0x1000)
            if counter == 511:
                counter = 0
                break
            counter += 1
            if counter % 128 == 0:
                mod.point(caller, "tdcall_accept_2m")  # (another CPU may kick this one meanwhile)
            if hw.intr_pending:  # is_interrupt_pending_guest_side()
                interrupted = True
                break
        e = (e & ~S.SEPT_ACCEPT_COUNTER) | (counter << S.SEPT_ACCEPT_COUNTER_SHIFT)
    if interrupted:
        mod.mem.q[ptr >> 3] = e  # still PENDING, with the count so far
        mod.unlock_entry(ptr)
        return None
    mod.mem.q[ptr >> 3] = S.set_state(e, S.SEPT_MAPPED)  # from the copy read under the lock
    mod.unlock_entry(ptr)
    return done(TDX_SUCCESS)


# TDCALL leaf (the guest's RAX) -> handler(mod, vcpu, hw, exit, caller): the TD exit Regs for the
# VMM, or None when the TDCALL completes in the guest.  Any other leaf: tdg_unknown.
TDCALL_HANDLERS = {
    TDG_VP_VMCALL: tdg_vp_vmcall,
    TDG_VP_INFO: tdg_vp_info,
    TDG_VP_VEINFO_GET: _tdg_vp_veinfo_get,
    TDG_MEM_PAGE_ACCEPT: _tdg_mem_page_accept,
}
