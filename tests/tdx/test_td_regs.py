"""Register-level tests of what the TDX module does while a TD runs: TDH.VP.ENTER and the TD's exits,
TDG.MEM.PAGE.ACCEPT's entry lock, the zero-step mitigation, TLB epochs.

A tiny guest runs in a TD that the VMM built (``emu.userspace.vmm.Machine``), but every call here is a
SEAMCALL to the module (``module.seamcall``): TDH.VP.ENTER's output registers are the TD exit, the
guest's registers are read back with TDH.VP.RD (a debug TD).  KVM is not involved: its mirror does
not know about the S-EPT entries these tests make with SEAMCALLs of their own.  Each test's
docstring names the source function (TDX module 1.5, intel/tdx-module branch tdx_1.5) whose
behaviour it checks.
"""

import pytest

from emu.userspace.vmm import Machine
from tdxmod import abi as A
from tdxmod.module import MD_TDVPS_GPR_BASE, MD_TDVPS_RIP, GPR_ORDER

from tdxhelpers import (
    SUCCESS,
    OPERAND_BUSY,
    OPERAND_INVALID,
    TLB_TRACKING_NOT_DONE,
    OPERAND_BUSY_HOST_PRIORITY,
    PAGE_ALREADY_ACCEPTED,
    OP_RCX,
    OP_SEPT_TREE,
    OP_TD_EPOCH,
    TDEL,
    TDHP,
    FREE_ENTRY,
    MAPPED,
    PENDING,
    PENDING_BLOCKED,
    entry_value,
    arch_entry,
    info,
    decode_state,
    RaceSched,
)

AREA = 0x1000000  # private GPA outside the loaded image (16 MiB)
EXIT_EPT_VIOLATION = 48
EXIT_TDCALL = 77


def at_hlt(out):
    """The guest stopped at its final HLT.  A HLT in a TD is a #VE (td_generic_ve_exit(), whatever
    SEPT_VE_DISABLE); these guests load no IDT, so the TD firmware's #VE handler, which the model
    stands in for, asks for TDG.VP.VMCALL<Instruction.HLT>: that TD exit, every register as the
    guest left it."""
    return out.rax == EXIT_TDCALL and out.r11 == A.EXIT_REASON_HLT


GPR = {name: MD_TDVPS_GPR_BASE + i for i, name in enumerate(GPR_ORDER)}

HEAD = """\
.intel_syntax noprefix
.include "emu.inc"
    .text
    .globl _start
_start:
"""

# TDG.VP.VMCALL exposing RDX, RBX, RSI, RDI, R8..R15 (RCX bits 2, 3, 6..15), an unknown
# sub-function; then a bare HLT (where the guest stops: at_hlt()) to read the registers back.
VMCALL_GUEST = (
    HEAD
    + """\
    mov rdx, 0x0202
    mov rbx, 0x0303
    mov rsi, 0x0606
    mov rdi, 0x0707
    mov r8, 0x0808
    mov r9, 0x0909
    mov r10, 0
    mov r11, 0x77777
    mov r12, 0x1212
    mov r13, 0x1313
    mov r14, 0x1414
    mov r15, 0x1515
    mov rbp, 0x0505
    mov rcx, 0xFFCC
    mov rax, 0
    TDCALL
    .globl after_vmcall
after_vmcall:
    hlt
"""
)

# A read of the private page at AREA, at one RIP, then a HLT.
TOUCH_GUEST = (
    HEAD
    + """\
    mov rax, 0x1000000
    .globl touch
touch:
    mov rbx, qword ptr [rax + 0x10]
    .globl touched
touched:
    hlt
"""
)

# TDG.MEM.PAGE.ACCEPT with the RCX the test sets through TDH.VP.WR, then a HLT.
ACCEPT_GUEST = (
    HEAD
    + """\
    .globl accept
accept:
    mov rax, 6
    TDCALL
    .globl accepted
accepted:
    hlt
"""
)


@pytest.fixture(scope="module")
def guest_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("td_regs_guests")


class Td:
    """A TD built by the VMM for one guest, driven by SEAMCALLs."""

    def __init__(self, guest_dir, name, text, attributes=A.TD_ATTR_SEPT_VE_DISABLE | A.TD_ATTR_DEBUG):
        path = guest_dir / f"{name}.S"
        path.write_text(text)
        self.m = Machine(str(path), vm="tdx", td_attributes=attributes)
        self.mod = self.m.kvm.x86_ops.module
        self.tdr = self.m.kvm.tdx.tdr_pa
        self.tdvpr = self.m.vcpus[0].arch.tdvpr_pa
        self.td = self.mod.tds[self.tdr]
        self.v = self.mod.vcpus[self.tdvpr]
        self.host = self.m.host

    def call(self, leaf, **regs):
        return self.mod.seamcall(leaf, **regs)

    def enter(self, **regs):
        return self.call(A.TDH_VP_ENTER, rcx=self.tdvpr, **regs)

    def rd(self, name):
        field = MD_TDVPS_RIP if name == "rip" else GPR[name]
        out = self.call(A.TDH_VP_RD, rcx=self.tdvpr, rdx=field)
        assert out.rax == SUCCESS
        return out.r8

    def wr(self, name, value):
        assert self.call(A.TDH_VP_WR, rcx=self.tdvpr, rdx=GPR[name], r8=value, r9=(1 << 64) - 1).rax == SUCCESS

    def sym(self, name):
        return self.m.image.symbol(name)

    # S-EPT entries made here with SEAMCALLs (KVM's mirror does not see them)
    def sept_path(self, gpa):
        for level in (3, 2, 1):
            base = gpa & ~((0x1000 << (9 * level)) - 1)
            out = self.call(A.TDH_MEM_SEPT_ADD, rcx=base | level, rdx=self.tdr | 1, r8=self.host.alloc_kernel_page())
            assert out.rax == SUCCESS, A.status_name(out.rax)

    def aug(self, gpa):
        self.sept_path(gpa)
        page = self.m.gmem + gpa  # the guest_memfd page KVM would give it
        assert self.call(A.TDH_MEM_PAGE_AUG, rcx=gpa, rdx=self.tdr, r8=page).rax == SUCCESS
        return page

    def entry_pa(self, gpa):
        q = self.mod.mem.q
        table = self.td.sept_root
        for level in (3, 2, 1):
            table = q[(table + (((gpa >> (12 + 9 * level)) & 511) << 3)) >> 3] & 0x000FFFFFFFFFF000
        return table + (((gpa >> 12) & 511) << 3)

    def entry(self, gpa):
        return self.mod.mem.read64(self.entry_pa(gpa))


def zero_regs_besides(out, *names):
    return {
        k: getattr(out, k)
        for k in ("rbx", "rsi", "rdi", "r10", "r11", "r12", "r13", "r14", "r15")
        if k not in names and getattr(out, k)
    }


# ==================================================================================================
# TDG.VP.VMCALL completion
# ==================================================================================================
def test_tdvmcall_completion_copies_every_exposed_register(guest_dir):
    """tdh_vp_enter() -> save_regs_after_tdvmcall(): on the next entry after a TDG.VP.VMCALL every GPR the
    guest selected in RCX (RDX..R15) gets the VMM's value, RAX = 0, RCX = the selection; the others
    (RBP here) keep the guest's values.  The exit itself (tdg_vp_vmcall()) passes the selected GPRs out."""
    t = Td(guest_dir, "vmcall", VMCALL_GUEST)
    out = t.enter()
    assert (out.rax, out.rcx) == (EXIT_TDCALL, 0xFFCC)
    assert (out.rdx, out.rbx, out.rsi, out.rdi, out.r8, out.r9) == (0x202, 0x303, 0x606, 0x707, 0x808, 0x909)
    assert (out.r10, out.r11, out.r12, out.r13, out.r14, out.r15) == (0, 0x77777, 0x1212, 0x1313, 0x1414, 0x1515)
    host = dict(
        rdx=0xA2,
        rbx=0xA3,
        rsi=0xA6,
        rdi=0xA7,
        r8=0xA8,
        r9=0xA9,
        r10=0xAA,
        r11=0xAB,
        r12=0xAC,
        r13=0xAD,
        r14=0xAE,
        r15=0xAF,
    )
    out = t.enter(**host)
    assert at_hlt(out)  # the bare HLT
    assert t.rd("rip") == t.sym("after_vmcall")
    for name, value in host.items():
        assert t.rd(name) == value, name
    assert (t.rd("rax"), t.rd("rcx"), t.rd("rbp")) == (0, 0xFFCC, 0x0505)


# TDG.VP.VMCALL with the RCX the test sets through TDH.VP.WR, then a HLT.
VMCALL_RCX_GUEST = (
    HEAD
    + """\
    mov rax, 0
    TDCALL
    .globl vmcall_done
vmcall_done:
    hlt
"""
)


@pytest.mark.parametrize("ctl", [0x1, 0x2, 0x10, 0x1C00 | (1 << 32)])
def test_tdvmcall_refuses_rax_rcx_rsp_and_reserved_bits(guest_dir, ctl):
    """tdg_vp_vmcall(): selecting RAX, RCX or RSP (bits 0, 1, 4), or a reserved bit (63:32), is
    OPERAND_INVALID|RCX to the guest, with no TD exit (the guest goes on to its HLT)."""
    t = Td(guest_dir, "vmcallrcx", VMCALL_RCX_GUEST)
    t.wr("rcx", ctl)
    out = t.enter()
    assert at_hlt(out)
    assert t.rd("rax") == OPERAND_INVALID | OP_RCX
    assert t.rd("rip") == t.sym("vmcall_done")


VP_INFO_GUEST = (
    HEAD
    + """\
    mov rax, 1
    TDCALL
    hlt
"""
)


def test_vp_info_counts_initialized_vcpus(guest_dir):
    """tdg_vp_info(): R8 = num_vcpus (the vCPUs TDH.VP.INIT initialized) | max_vcpus << 32, R9 = the
    vCPU's index (VP.INIT order), RCX = 48 (GPAW 0), RDX = ATTRIBUTES, R10 = R11 = 0 here."""
    path = guest_dir / "vpinfo.S"
    path.write_text(VP_INFO_GUEST)
    m = Machine(str(path), vm="tdx", vcpus=2)
    mod = m.kvm.x86_ops.module
    m.vcpus[1].mmu_load()  # the shared EPT pointer (TDH.VP.WR)
    tdvpr = m.vcpus[1].arch.tdvpr_pa
    out = mod.seamcall(A.TDH_VP_ENTER, rcx=tdvpr, caller=1)  # on vCPU 1's CPU
    assert at_hlt(out)
    rd = lambda name: mod.seamcall(A.TDH_VP_RD, rcx=tdvpr, rdx=GPR[name], caller=1).r8
    assert (rd("rax"), rd("rcx"), rd("rdx")) == (SUCCESS, 48, m.kvm.tdx.attributes)
    assert (rd("r8"), rd("r9"), rd("r10"), rd("r11")) == (2 | (64 << 32), 1, 0, 0)


# ==================================================================================================
# EPT-violation TD exits
# ==================================================================================================
def test_ept_violation_exit_clears_qualification_bits_and_zeroes_gprs(guest_dir):
    """tdx_ept_violation_exit_to_vmm(): exit qualification bits 12:7 (GLA valid, final translation, the
    advanced information, NMI unblocking) cleared, R8 = the GPA with bits 11:0 cleared, R10 and every other
    GPR 0 (no GLA in R10); extended qualification type NONE for a FREE private page."""
    t = Td(guest_dir, "touch", TOUCH_GUEST)
    out = t.enter()
    assert (out.rax, out.rcx, out.rdx, out.r8, out.r9) == (EXIT_EPT_VIOLATION, 0x1, 0, AREA, 0)
    assert out.r10 == 0 and zero_regs_besides(out) == {}
    assert t.rd("rip") == t.sym("touch")


@pytest.mark.parametrize("state,ext", [(PENDING, 6), (PENDING_BLOCKED, 0)])
def test_pending_blocked_access_is_an_ordinary_ept_violation(guest_dir, state, ext):
    """td_ept_violation_exit(): only a PENDING page is "pending and guest-acceptable" and gets the extended
    qualification PENDING_EPT_VIOLATION (6, SEPT_VE_DISABLE); an access to a PENDING_BLOCKED page is an
    ordinary EPT violation (type NONE), which KVM handles as a fault instead of killing the VM."""
    t = Td(guest_dir, "touch", TOUCH_GUEST)
    t.aug(AREA)
    if state == PENDING_BLOCKED:
        assert t.call(A.TDH_MEM_RANGE_BLOCK, rcx=AREA, rdx=t.tdr).rax == SUCCESS
    assert decode_state(t.entry(AREA)) == state
    out = t.enter()
    assert (out.rax, out.rcx, out.rdx, out.r8) == (EXIT_EPT_VIOLATION, 0x1, ext, AREA)
    kvm_ops = t.m.kvm.x86_ops
    assert kvm_ops.is_sept_violation_unexpected_pending(out) == (state == PENDING)


def test_kvm_pending_check_uses_the_prot_bits():
    """Linux 6.16 tdx_is_sept_violation_unexpected_pending(): type PENDING_EPT_VIOLATION and no
    EPT_VIOLATION_PROT_MASK bits (5:3) and no EXEC_FOR_RING3_LIN (bit 6) in the exit qualification."""
    from emu.kvm.tdx import TdxX86Ops
    from tdxmod.module import Regs

    check = TdxX86Ops.is_sept_violation_unexpected_pending
    assert check(Regs(48, rcx=0x1, rdx=6))
    assert check(Regs(48, rcx=0x2 | (1 << 32), rdx=6))
    for bit in (3, 4, 5, 6):
        assert not check(Regs(48, rcx=0x1 | (1 << bit), rdx=6))
    assert not check(Regs(48, rcx=0x1, rdx=0)) and not check(Regs(48, rcx=0x1, rdx=1))


# ==================================================================================================
# Zero-step mitigation
# ==================================================================================================
def _fault_until_recorded(t):
    """Enter until the GPA is recorded: STEPPING_EPF_THRESHOLD EPT violations at the faulting RIP are
    counted, the next one records the GPA."""
    for n in range(1, 8):
        out = t.enter()
        assert (out.rax, out.rcx, out.rdx) == (EXIT_EPT_VIOLATION, 0x1, 0), n
        assert t.v.last_epf_gpa_list == ([] if n < 7 else [AREA + 0x10]), n
    assert t.v.possibly_epf_stepping == A.STEPPING_EPF_THRESHOLD == 6


def test_zero_step_emulated_ept_violation(guest_dir):
    """td_exit_epf_stepping_log() / td_entry_stepping_filter() / emulate_ept_violation_td_exit(): past the
    threshold of EPT violations at one RIP the GPA is recorded; the next TDH.VP.ENTER finds it would still
    fault and does not enter the TD: RAX = 48, RCX = 2 (write), RDX = 0, R8 = GPA & ~0xFFF, R9 = 0, every
    other GPR 0; the TLB-tracking count taken at entry is given back."""
    t = Td(guest_dir, "touch", TOUCH_GUEST)
    _fault_until_recorded(t)
    rip = t.rd("rip")
    out = t.enter()
    assert (out.rax, out.rcx, out.rdx, out.r8, out.r9) == (EXIT_EPT_VIOLATION, 0x2, 0, AREA, 0)
    assert zero_regs_besides(out) == {}
    assert t.rd("rip") == rip == t.sym("touch")
    assert t.td.refcount == [0, 0] and not t.td.sept_writer


def test_zero_step_busy_on_the_sept_tree_lock(guest_dir):
    """td_entry_stepping_filter(): with a GPA recorded, TDH.VP.ENTER takes the S-EPT tree lock exclusively;
    held (here shared, as a SEPT.ADD or AUG holds it) -> TDX_OPERAND_BUSY|SEPT_TREE (0x8000020000000092),
    the TLB-tracking count given back (revert_tlb_tracking_state())."""
    t = Td(guest_dir, "touch", TOUCH_GUEST)
    _fault_until_recorded(t)
    t.td.secure_ept_lock = 2  # one reader (sharex: bits 15:1 count them)
    try:
        out = t.enter()
    finally:
        t.td.secure_ept_lock = 0
    assert (out.rax, out.rcx, out.rdx) == (OPERAND_BUSY | OP_SEPT_TREE, 0, 0)
    assert out.rax == 0x8000020000000092
    assert t.td.refcount == [0, 0]


def test_zero_step_holds_the_sept_tree_lock_against_aug(guest_dir):
    """td_entry_stepping_filter() holds the S-EPT tree lock exclusively until the TD entry: an AUG on
    another CPU meanwhile (lock_sept_check_and_walk_private_gpa()) -> BUSY|SEPT_TREE; once the page is
    mapped the filter lets the vCPU in, and forward progress resets the tracking."""
    t = Td(guest_dir, "touch", TOUCH_GUEST)
    _fault_until_recorded(t)
    t.sept_path(AREA)
    page = t.m.gmem + AREA
    seen = {}

    def aug():
        seen["aug"] = t.call(A.TDH_MEM_PAGE_AUG, rcx=AREA, rdx=t.tdr, r8=page)

    sched = RaceSched("sept_locked_exclusive", aug)
    t.mod.sched = sched
    try:
        out = t.enter()
    finally:
        t.mod.sched = None
    assert sched.fired and seen["aug"].rax == OPERAND_BUSY | OP_SEPT_TREE
    assert out.rax == EXIT_EPT_VIOLATION and out.rcx == 0x2  # still unmapped: emulated exit
    # Map it (AUG; the MAPPED state by hand, as an ACCEPT would leave it): the filter passes.
    assert t.call(A.TDH_MEM_PAGE_AUG, rcx=AREA, rdx=t.tdr, r8=page).rax == SUCCESS
    t.mod.mem.write64(t.entry_pa(AREA), entry_value(MAPPED, page))
    out = t.enter()
    assert at_hlt(out)  # the read went through
    assert t.v.last_epf_gpa_list == [] and t.v.possibly_epf_stepping == 0


# ==================================================================================================
# TDG.MEM.PAGE.ACCEPT and the entry lock
# ==================================================================================================
def _accept(t, rcx):
    t.wr("rcx", rcx)
    out = t.enter()
    assert at_hlt(out)
    assert t.rd("rip") == t.sym("accepted")
    return t.rd("rax")


def test_accept_rejects_rcx_bits_63_52(guest_dir):
    """tdg_mem_page_accept() -> verify_page_info_input(): reserved bits 63:52 of RCX -> OPERAND_INVALID|RCX;
    the entry is untouched."""
    t = Td(guest_dir, "accept", ACCEPT_GUEST)
    page = t.aug(AREA)
    assert _accept(t, AREA | (1 << 52)) == OPERAND_INVALID | OP_RCX
    assert t.entry(AREA) == entry_value(PENDING, page)


def test_accept_success(guest_dir):
    """tdg_mem_page_accept(): a PENDING 4K page becomes MAPPED, the lock released; a second ACCEPT is
    PAGE_ALREADY_ACCEPTED with the level (0) as detail."""
    t = Td(guest_dir, "accept", ACCEPT_GUEST)
    page = t.aug(AREA)
    assert _accept(t, AREA) == SUCCESS
    assert t.entry(AREA) == entry_value(MAPPED, page)
    t.m.kvm.x86_ops.set_regs(t.m.vcpus[0], {"rip": t.sym("accept")})
    assert _accept(t, AREA) == PAGE_ALREADY_ACCEPTED | 0


def test_accept_entry_lock_held(guest_dir):
    """sept_lock_acquire_guest(): TDEL already set -> TDX_OPERAND_BUSY|RCX to the guest, nothing changes."""
    t = Td(guest_dir, "accept", ACCEPT_GUEST)
    page = t.aug(AREA)
    pa = t.entry_pa(AREA)
    t.mod.mem.write64(pa, entry_value(PENDING, page) | TDEL)
    assert _accept(t, AREA) == OPERAND_BUSY | OP_RCX
    assert t.mod.mem.read64(pa) == entry_value(PENDING, page) | TDEL


def test_accept_host_priority(guest_dir):
    """sept_lock_acquire_guest(): the lock is free but TDHP is set (a host lost the lock) -> the guest does
    not keep it: TDX_OPERAND_BUSY_HOST_PRIORITY|RCX (0x8000020400000001), TDEL clear, TDHP still set; the
    next host SEAMCALL that takes the lock (sept_lock_acquire_host()) clears TDHP."""
    t = Td(guest_dir, "accept", ACCEPT_GUEST)
    page = t.aug(AREA)
    pa = t.entry_pa(AREA)
    t.mod.mem.write64(pa, entry_value(PENDING, page) | TDHP)
    status = _accept(t, AREA)
    assert status == OPERAND_BUSY_HOST_PRIORITY | OP_RCX == 0x8000020400000001
    assert t.mod.mem.read64(pa) == entry_value(PENDING, page) | TDHP
    assert t.call(A.TDH_MEM_RANGE_BLOCK, rcx=AREA, rdx=t.tdr).rax == SUCCESS
    assert t.mod.mem.read64(pa) == entry_value(PENDING_BLOCKED, page)


def test_host_meets_the_guest_held_lock(guest_dir):
    """A host leaf meeting the lock ACCEPT holds (tdh_mem_range_block() -> sept_lock_acquire_host()):
    TDX_OPERAND_BUSY|RCX with the walked entry's details in RCX/RDX, and TDHP set; the ACCEPT, which read
    its copy under the lock, completes (its write drops TDHP) with the vCPU in the TD all along."""
    t = Td(guest_dir, "accept", ACCEPT_GUEST)
    page = t.aug(AREA)
    pa = t.entry_pa(AREA)
    t.wr("rcx", AREA)
    seen = {}

    def block():
        seen["in_td"] = (t.v.in_td, list(t.td.refcount))
        seen["block"] = t.call(A.TDH_MEM_RANGE_BLOCK, rcx=AREA, rdx=t.tdr)
        seen["entry"] = t.mod.mem.read64(pa)

    t.mod.sched = RaceSched("sept_entry_locked_guest", block)
    try:
        out = t.enter()
    finally:
        t.mod.sched = None
    b = seen["block"]
    assert (b.rax, b.rcx, b.rdx) == (OPERAND_BUSY | OP_RCX, arch_entry(PENDING, page), info(PENDING, 0))
    assert seen["entry"] == entry_value(PENDING, page) | TDEL | TDHP
    assert seen["in_td"][0] and sum(seen["in_td"][1]) == 1
    assert at_hlt(out) and t.rd("rax") == SUCCESS
    assert t.mod.mem.read64(pa) == entry_value(MAPPED, page)
    assert t.td.refcount == [0, 0] and not t.v.in_td


# ==================================================================================================
# TLB epochs: REMOVE waits for the vCPUs that entered before the BLOCK's epoch ended
# ==================================================================================================
def test_remove_tracking_follows_vcpus_in_the_td(guest_dir):
    """tdh_mem_page_remove() -> is_tlb_tracked(): with BEPOCH = the epoch of the BLOCK, REMOVE is
    TLB_TRACKING_NOT_DONE|RCX until TRACK has moved the epoch on and no vCPU that entered in the BLOCK's
    epoch is still in the TD (refcount[BEPOCH & 1] == 0).  A vCPU held in the TD at ACCEPT's scheduling
    point is counted in its entry epoch; one entering after the TRACK does not hold REMOVE back."""
    t = Td(guest_dir, "accept", ACCEPT_GUEST)
    other = t.aug(AREA + 0x1000)  # the page to remove
    assert t.call(A.TDH_MEM_RANGE_BLOCK, rcx=AREA + 0x1000, rdx=t.tdr).rax == SUCCESS
    bepoch = t.td.epoch
    page = t.aug(AREA)
    t.wr("rcx", AREA)
    seen = []

    def host():
        # The vCPU is in the TD (entered in epoch bepoch): neither before nor after TRACK may REMOVE go.
        seen.append(t.call(A.TDH_MEM_PAGE_REMOVE, rcx=AREA + 0x1000, rdx=t.tdr).rax)
        seen.append(t.call(A.TDH_MEM_TRACK, rcx=t.tdr).rax)
        seen.append(t.call(A.TDH_MEM_PAGE_REMOVE, rcx=AREA + 0x1000, rdx=t.tdr).rax)
        seen.append(list(t.td.refcount))

    t.mod.sched = RaceSched("sept_entry_locked_guest", host)
    try:
        out = t.enter()
    finally:
        t.mod.sched = None
    assert at_hlt(out)
    assert seen[:3] == [TLB_TRACKING_NOT_DONE | OP_RCX, SUCCESS, TLB_TRACKING_NOT_DONE | OP_RCX]
    assert seen[3][bepoch & 1] == 1 and t.td.epoch == bepoch + 1
    # The vCPU has left the TD: tracked now.  A vCPU entering in the new epoch would not matter.
    t.td.refcount[t.td.epoch & 1] += 1
    try:
        out = t.call(A.TDH_MEM_PAGE_REMOVE, rcx=AREA + 0x1000, rdx=t.tdr)
    finally:
        t.td.refcount[t.td.epoch & 1] -= 1
    assert (out.rax, out.rcx) == (SUCCESS, other)
    assert t.entry(AREA + 0x1000) == FREE_ENTRY
    assert t.entry(AREA) == entry_value(MAPPED, page)


def test_track_busy_while_vcpu_enters(guest_dir):
    """tdh_mem_track() holds the epoch lock exclusively; TDH.VP.ENTER (adjust_tlb_tracking_state()) takes
    it shared: a TD entry meeting TRACK's hold -> TDX_OPERAND_BUSY|TD_EPOCH (0x80000200000000A9), no
    refcount taken, the guest not entered."""
    t = Td(guest_dir, "touch", TOUCH_GUEST)
    seen = {}

    def enter():
        seen["enter"] = t.enter()
        seen["refcount"] = list(t.td.refcount)

    t.mod.sched = RaceSched("epoch_locked", enter)
    try:
        out = t.call(A.TDH_MEM_TRACK, rcx=t.tdr)
    finally:
        t.mod.sched = None
    assert out.rax == SUCCESS and t.td.epoch == 2
    assert seen["enter"].rax == OPERAND_BUSY | OP_TD_EPOCH == 0x80000200000000A9
    assert seen["refcount"] == [0, 0]
    assert t.rd("rip") == t.sym("_start")


# ==================================================================================================
# One logical CPU per vCPU (issue 28 defects 2 and 4) and the module's fatal paths
# ==================================================================================================
VCPU_ASSOCIATED = 0x8000070100000000
NON_RECOVERABLE_VCPU = 0x4000000100000000
NON_RECOVERABLE_TD_NON_ACCESSIBLE = 0x6000000500000000
EXIT_TRIPLE_FAULT = 2


def test_zero_step_exit_keeps_the_vcpu_associated(guest_dir):
    """Issue 28 defect 2.  tdh_vp_enter() associates the vCPU (check_and_associate_vcpu()) before
    the stepping filter (handle_stepping_filter()): after TDH.VP.FLUSH, an entry that ends in the
    emulated EPT-violation exit leaves the vCPU associated with this CPU, so TDH.MNG.VPFLUSHDONE is
    TDX_FLUSHVP_NOT_DONE until the next TDH.VP.FLUSH."""
    t = Td(guest_dir, "touch", TOUCH_GUEST)
    _fault_until_recorded(t)
    assert t.call(A.TDH_VP_FLUSH, rcx=t.tdvpr).rax == SUCCESS
    assert not t.v.associated and t.td.num_assoc_vcpus == 0
    out = t.enter()
    assert (out.rax, out.rcx, out.r8) == (EXIT_EPT_VIOLATION, 0x2, AREA)  # emulated: no entry
    assert t.v.assoc_lpid == 0 and t.td.num_assoc_vcpus == 1
    assert t.call(A.TDH_MNG_VPFLUSHDONE, rcx=t.tdr).rax == A.TDX_FLUSHVP_NOT_DONE
    assert t.call(A.TDH_VP_FLUSH, rcx=t.tdvpr).rax == SUCCESS
    assert t.call(A.TDH_MNG_VPFLUSHDONE, rcx=t.tdr).rax == SUCCESS


def test_a_vcpu_in_the_td_on_one_cpu(guest_dir):
    """Issue 28 defect 4.  While the vCPU runs in the TD (held at ACCEPT's scheduling point):
    check_and_associate_vcpu() refuses a second TDH.VP.ENTER of it on another CPU (its state is
    ACTIVE: TDX_VCPU_STATE_INCORRECT) and TDH.VP.WR (the same); TDH.VP.FLUSH cannot take its TDVPR
    exclusively (VP.ENTER holds it shared until the TD exit): BUSY|RCX.  After a TRACK moved the
    epoch, the refused entry has not touched the TLB tracking: [0, 0] once the vCPU is out."""
    t = Td(guest_dir, "accept", ACCEPT_GUEST)
    t.aug(AREA)
    t.wr("rcx", AREA)
    seen = {}

    def other_cpu():
        seen["track"] = t.call(A.TDH_MEM_TRACK, rcx=t.tdr).rax
        seen["enter"] = t.mod.seamcall(A.TDH_VP_ENTER, rcx=t.tdvpr, caller=1).rax
        seen["enter0"] = t.mod.seamcall(A.TDH_VP_ENTER, rcx=t.tdvpr, caller=0).rax
        seen["wr"] = t.mod.seamcall(A.TDH_VP_WR, rcx=t.tdvpr, rdx=GPR["rbx"], r8=1, r9=1, caller=0).rax
        seen["flush"] = t.call(A.TDH_VP_FLUSH, rcx=t.tdvpr).rax
        seen["refcount"] = list(t.td.refcount)

    t.mod.sched = RaceSched("sept_entry_locked_guest", other_cpu)
    try:
        out = t.enter()
    finally:
        t.mod.sched = None
    assert seen["track"] == SUCCESS
    assert seen["enter"] == seen["enter0"] == seen["wr"] == A.TDX_VCPU_STATE_INCORRECT
    assert seen["flush"] == OPERAND_BUSY | OP_RCX
    assert sum(seen["refcount"]) == 1  # the vCPU in the TD, in the old epoch
    assert out.rax == EXIT_TDCALL and t.rd("rax") == SUCCESS
    assert t.td.refcount == [0, 0] and t.v.state == A.VCPU_READY
    assert t.call(A.TDH_MEM_TRACK, rcx=t.tdr).rax == SUCCESS  # nothing left in the previous epoch
    assert t.mod.seamcall(A.TDH_VP_ENTER, rcx=t.tdvpr, caller=1).rax == VCPU_ASSOCIATED


TRIPLE_FAULT_GUEST = (
    HEAD
    + """\
    ud2
"""
)

MC_GUEST = (
    HEAD
    + """\
    int 0x12
    hlt
"""
)


def test_triple_fault_disables_the_vcpu(guest_dir):
    """tdx_td_dispatcher(): a triple fault is async_tdexit_to_vmm(TDX_NON_RECOVERABLE_VCPU): RAX =
    0x4000000100000000 | 2, the vCPU DISABLED (td_exit.c): TDH.VP.ENTER is then
    VCPU_STATE_INCORRECT, TDH.VP.WR too, TDH.VP.RD still reads it (check_and_associate_vcpu(),
    allow_disabled on a read); the TD itself is not fatal."""
    t = Td(guest_dir, "triple", TRIPLE_FAULT_GUEST)
    out = t.enter()
    assert out.rax == NON_RECOVERABLE_VCPU | EXIT_TRIPLE_FAULT
    assert t.v.state == A.VCPU_DISABLED and t.td.refcount == [0, 0] and not t.td.fatal
    assert t.enter().rax == A.TDX_VCPU_STATE_INCORRECT
    assert t.call(A.TDH_VP_WR, rcx=t.tdvpr, rdx=GPR["rbx"], r8=1, r9=1).rax == A.TDX_VCPU_STATE_INCORRECT
    assert t.rd("rip") == t.sym("_start")
    assert t.call(A.TDH_MEM_TRACK, rcx=t.tdr).rax == SUCCESS


def test_machine_check_makes_the_td_fatal(guest_dir):
    """td_exception_or_nmi_exit(): a #MC exit (vector 18, the only exception the TD VMCS intercepts;
    the emulated CPU reports the guest's INT 18 so) is async_tdexit_to_vmm(
    TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE): RAX = 0x6000000500000000 | 0, R9 the interruption
    information; TDR.FATAL is set (td_exit.c) without touching the TD (is_td_dead: the vCPU stays
    ACTIVE and counted).  Later SEAMCALLs on the TD are TD_FATAL
    (check_td_in_correct_build_state()); its teardown still works."""
    t = Td(guest_dir, "mc", MC_GUEST)
    out = t.enter()
    assert out.rax == NON_RECOVERABLE_TD_NON_ACCESSIBLE | 0
    assert out.r9 == 18 | (3 << 8) | (1 << 31)
    assert t.td.fatal and t.v.state == A.VCPU_ACTIVE and sum(t.td.refcount) == 1
    assert t.enter().rax == A.TDX_TD_FATAL
    assert t.call(A.TDH_MEM_TRACK, rcx=t.tdr).rax == A.TDX_TD_FATAL
    assert t.call(A.TDH_MEM_PAGE_AUG, rcx=AREA, rdx=t.tdr, r8=t.m.gmem + AREA).rax == A.TDX_TD_FATAL
    assert t.call(A.TDH_VP_FLUSH, rcx=t.tdvpr).rax == SUCCESS
    assert t.call(A.TDH_MNG_VPFLUSHDONE, rcx=t.tdr).rax == SUCCESS


UNKNOWN_TDCALL_GUEST = (
    HEAD
    + """\
    TDCALL
    .globl after_tdcall
after_tdcall:
    hlt
"""
)


@pytest.mark.parametrize("rax", [99, A.TDG_VP_INFO | (1 << 16), A.TDG_VP_INFO | (1 << 40)])
def test_unknown_tdcall_leaf(guest_dir, rax):
    """td_call(): an unknown leaf, a version (RAX 23:16) the leaf does not have, or reserved bits of
    RAX: OPERAND_INVALID with operand id RAX (0) to the guest, which goes on (no TD exit)."""
    t = Td(guest_dir, "unknowntdcall", UNKNOWN_TDCALL_GUEST)
    t.wr("rax", rax)
    out = t.enter()
    assert out.rax == EXIT_TDCALL and out.r11 == A.EXIT_REASON_HLT
    assert t.rd("rax") == OPERAND_INVALID == 0xC000010000000000
    assert t.rd("rip") == t.sym("after_tdcall")
