"""Register-level tests of private huge pages in the TDX module (issue 24): TDH.MEM.PAGE.AUG at 2M,
TDH.MEM.PAGE.DEMOTE, TDH.MEM.PAGE.PROMOTE and TDG.MEM.PAGE.ACCEPT at 2M.  Every call is a SEAMCALL
(or the guest's TDCALL); state is read back from the S-EPT entries (encoded independently in
tdxhelpers) and the PAMT.  Each docstring names the tdx_1.5 function (intel/tdx-module, branch
tdx_1.5) whose behaviour it pins.
"""

import pytest

from emu.checkers.inject import Plan
from emu.userspace.vmm import Machine
from tdxmod import abi as A
from tdxmod.pamt import PT_4KB, PT_2MB

from tdxhelpers import (
    PAGE,
    M2,
    SUCCESS,
    OPERAND_BUSY,
    OPERAND_INVALID,
    EPT_ENTRY_STATE_INCORRECT,
    TLB_TRACKING_NOT_DONE,
    PAGE_SIZE_MISMATCH,
    PAGE_METADATA_INCORRECT,
    PAGE_ALREADY_ACCEPTED,
    OP_RCX,
    OP_R8,
    PT_NDA,
    PT_REG,
    PT_EPT,
    TDEL,
    TDHP,
    FREE,
    NL_MAPPED,
    NL_BLOCKED,
    PENDING,
    PENDING_BLOCKED,
    MAPPED,
    entry_value,
    decode_state,
    arch_entry,
    info,
)

GPA_RANGE_NOT_BLOCKED = 0xC0000B0600000000
INVALID_PROMOTE_CONDITIONS = 0xC0000B0900000000
INTERRUPTED_RESTARTABLE = 0x8000000400000000
G = 0x4000_0000  # a 2M-aligned private GPA of the register-level TD
EXIT_TDCALL = 77
EXIT_EPT_VIOLATION = 48


def aug_2m(env, gpa=G):
    env.ensure_path(gpa, 1)
    out, page = env.aug(gpa, 1)
    env.ok(out, "AUG 2M")
    return page


def demote(env, gpa=G, page=None):
    page = env.kpage() if page is None else page
    return env.call(A.TDH_MEM_PAGE_DEMOTE, rcx=gpa | 1, rdx=env.tdr, r8=page), page


def blocked_and_tracked(env, gpa=G, level=1):
    env.ok(env.block(gpa, level), "BLOCK")
    env.ok(env.track(), "TRACK")


# ==================================================================================================
# TDH.MEM.PAGE.AUG at 2M
# ==================================================================================================
def test_aug_2m_is_one_pending_leaf_and_one_pamt_entry(td_run):
    """tdh_mem_page_aug(): level 1 maps a 2M page: a PENDING leaf at level 1 (PS set), the page's 2M
    PAMT entry PT_REG owned by the TDR; the TD's child count + 512 (it counts 4K pages: "1 << (9 *
    page_level_entry)")."""
    env = td_run
    env.ensure_path(G, 1)
    chld = env.td.chldcnt
    page = aug_2m(env)
    assert env.entry(G, 1) == entry_value(PENDING, page)
    assert env.pamt.page_type(page) == PT_REG and env.pamt.page_size(page) == PT_2MB
    assert env.pamt.owner(page + 5 * PAGE) == env.tdr
    assert env.td.chldcnt == chld + 512


def test_aug_2m_needs_a_2m_aligned_page(td_run):
    """tdh_mem_page_aug() -> check_and_lock_free_range_hpa(): a page not aligned to its size ->
    OPERAND_INVALID|R8; the entry stays FREE."""
    env = td_run
    env.ensure_path(G, 1)
    page = env.upage(2 * M2, align=M2) + PAGE
    out = env.call(A.TDH_MEM_PAGE_AUG, rcx=G | 1, rdx=env.tdr, r8=page)
    assert out.rax == OPERAND_INVALID | OP_R8
    assert decode_state(env.entry(G, 1)) == FREE


# ==================================================================================================
# TDH.MEM.PAGE.DEMOTE
# ==================================================================================================
def test_demote_needs_blocked_and_tracked_while_the_td_runs(td_run):
    """tdh_mem_page_demote(): a RUNNABLE TD may have the 2M translation cached: PENDING (not
    blocked) -> GPA_RANGE_NOT_BLOCKED|RCX with the entry's details; blocked but not tracked ->
    TLB_TRACKING_NOT_DONE|RCX; nothing changes, no lock is left."""
    env = td_run
    page = aug_2m(env)
    out, new = demote(env)
    assert (out.rax, out.rcx, out.rdx) == (GPA_RANGE_NOT_BLOCKED | OP_RCX, arch_entry(PENDING, page), info(PENDING, 1))
    env.ok(env.block(G, 1))
    out, _ = demote(env, page=new)
    assert out.rax == TLB_TRACKING_NOT_DONE | OP_RCX
    assert env.entry(G, 1) == entry_value(PENDING_BLOCKED, page)
    assert env.pamt.page_type(new) == PT_NDA and env.pamt.locks_held() == []


def test_demote_splits_into_512_unblocked_children(td_run):
    """tdh_mem_page_demote(): the new S-EPT page holds 512 4K leaves in the huge entry's state
    unblocked (PENDING_BLOCKED -> PENDING), each 4K further into the 2M page; the entry is NL_MAPPED
    to it (no UNBLOCK needed); the page PT_EPT, the TD's child count + 1; pamt_demote(): the 2M
    PAMT entry PT_NDA, the 512 4K entries PT_REG owned by the TDR; no lock left."""
    env = td_run
    page = aug_2m(env)
    blocked_and_tracked(env)
    chld = env.td.chldcnt
    out, new = demote(env)
    env.ok(out, "DEMOTE")
    assert env.entry(G, 1) == entry_value(NL_MAPPED, new)
    for i in (0, 1, 255, 511):
        assert env.entry(G + i * PAGE, 0) == entry_value(PENDING, page + i * PAGE), i
    assert env.pamt.page_type(new) == PT_EPT and env.pamt.owner(new) == env.tdr
    assert env.pamt.page_size(page) == PT_4KB
    assert all(
        env.pamt.page_type(page + i * PAGE) == PT_REG and env.pamt.owner(page + i * PAGE) == env.tdr for i in range(512)
    )
    assert env.td.chldcnt == chld + 1
    assert env.pamt.locks_held() == []


def test_demote_refuses_non_leaves_and_4k(td_run):
    """tdh_mem_page_demote(): the level must be 1 or 2 (OPERAND_INVALID|RCX at level 0); a non-leaf
    entry (NL_MAPPED) -> EPT_ENTRY_STATE_INCORRECT|RCX with its details."""
    env = td_run
    env.ensure_path(G, 0)
    assert env.call(A.TDH_MEM_PAGE_DEMOTE, rcx=G, rdx=env.tdr, r8=env.kpage()).rax == OPERAND_INVALID | OP_RCX
    out, _ = demote(env)
    assert out.rax == EPT_ENTRY_STATE_INCORRECT | OP_RCX
    assert out.rdx == info(NL_MAPPED, 1)


def test_demote_new_page_must_be_free(td_run):
    """tdh_mem_page_demote() -> check_and_lock_private_hpa(R8, PT_NDA): a page the module owns (a TDCS
    page) -> PAGE_METADATA_INCORRECT|R8; the TDR itself, whose PAMT entry the call holds shared ->
    OPERAND_BUSY|R8 (the lock is taken before the type is read); the huge entry stays as it was."""
    env = td_run
    page = aug_2m(env)
    blocked_and_tracked(env)
    assert demote(env, page=env.tdcs[0])[0].rax == PAGE_METADATA_INCORRECT | OP_R8
    assert demote(env, page=env.tdr)[0].rax == OPERAND_BUSY | OP_R8
    assert env.entry(G, 1) == entry_value(PENDING_BLOCKED, page)
    assert env.pamt.locks_held() == []


def test_demote_interrupted_is_restartable(td_run):
    """tdh_mem_page_demote(): without TDX_FEATURES0.ENHANCED_DEMOTE_INTERRUPTIBILITY, a pending host
    interrupt (is_interrupt_pending_host_side()) after the 512 entries are written ends the call with
    TDX_INTERRUPTED_RESTARTABLE, RCX/RDX as given; nothing is committed (the entry still the blocked
    2M leaf, the new page still free, the 2M PAMT entry whole); the same call again succeeds.  With
    the feature (the default here), the interrupt is not looked at."""
    env = td_run
    page = aug_2m(env)
    blocked_and_tracked(env)
    env.mod.features0 &= ~A.TDX_FEATURES0_ENHANCED_DEMOTE_INTERRUPTIBILITY
    env.mod.inject = Plan(["tdx.host_interrupt@1"])
    out, new = demote(env)
    assert (out.rax, out.rcx, out.rdx) == (INTERRUPTED_RESTARTABLE, G | 1, env.tdr)
    assert env.entry(G, 1) == entry_value(PENDING_BLOCKED, page)
    assert env.pamt.page_type(new) == PT_NDA and env.pamt.page_size(page) == PT_2MB
    assert env.pamt.locks_held() == []
    env.ok(demote(env, page=new)[0], "DEMOTE again")
    assert env.entry(G, 1) == entry_value(NL_MAPPED, new)


def test_demote_ignores_interrupts_with_enhanced_interruptibility(td_run):
    env = td_run
    aug_2m(env)
    blocked_and_tracked(env)
    assert env.mod.features0 & A.TDX_FEATURES0_ENHANCED_DEMOTE_INTERRUPTIBILITY
    env.mod.inject = Plan(["tdx.host_interrupt@every"])
    env.ok(demote(env)[0], "DEMOTE")


def test_demote_meets_the_entry_lock(td_run):
    """tdh_mem_page_demote() -> sept_lock_acquire_host(): the entry locked (a guest's ACCEPT holds it)
    -> OPERAND_BUSY|RCX, and host priority (TDHP) set for the next host caller."""
    env = td_run
    page = aug_2m(env)
    blocked_and_tracked(env)
    pa = env.entry_pa(G, 1)
    env.mem.write64(pa, entry_value(PENDING_BLOCKED, page) | TDEL)
    out, _ = demote(env)
    assert out.rax == OPERAND_BUSY | OP_RCX
    assert env.mem.read64(pa) & (1 << 52)
    env.mem.write64(pa, entry_value(PENDING_BLOCKED, page))


def test_demote_meets_the_2m_pamt_lock(td_run):
    """pamt_demote(): the 2M page's PAMT entry held (another CPU's SEAMCALL on the page) ->
    OPERAND_BUSY|RCX; nothing committed."""
    env = td_run
    page = aug_2m(env)
    blocked_and_tracked(env)
    assert env.pamt.implicit_lock(page, PT_2MB, 1) == SUCCESS  # TDX_LOCK_EXCLUSIVE
    try:
        out, new = demote(env)
    finally:
        env.pamt.implicit_unlock(page, PT_2MB, 1)
    assert out.rax == OPERAND_BUSY | OP_RCX
    assert env.entry(G, 1) == entry_value(PENDING_BLOCKED, page)
    assert env.pamt.page_type(new) == PT_NDA


def test_demoted_child_is_blocked_tracked_and_removed_alone(td_run):
    """After DEMOTE each 4K child is an ordinary leaf: BLOCK, TRACK, REMOVE of one (what KVM does to
    convert one 4K page of a split huge page) leaves the other 511."""
    env = td_run
    page = aug_2m(env)
    blocked_and_tracked(env)
    env.ok(demote(env)[0])
    gpa = G + 7 * PAGE
    blocked_and_tracked(env, gpa, 0)
    out = env.remove(gpa)
    assert (out.rax, out.rcx) == (SUCCESS, page + 7 * PAGE)
    assert decode_state(env.entry(gpa, 0)) == FREE
    assert env.entry(gpa + PAGE, 0) == entry_value(PENDING, page + 8 * PAGE)
    assert env.pamt.page_type(page + 7 * PAGE) == PT_NDA and env.pamt.page_type(page + 8 * PAGE) == PT_REG


# ==================================================================================================
# TDH.MEM.PAGE.PROMOTE
# ==================================================================================================
def test_promote_merges_back(td_run):
    """tdh_mem_page_promote(): NL_BLOCKED and tracked, 512 contiguous PENDING children -> one 2M
    PENDING leaf; RCX = the S-EPT page, PT_NDA again; pamt_promote(): the 2M entry PT_REG; the child
    count - 1.  Version 1 returns NULL_PA in R9-R11."""
    env = td_run
    page = aug_2m(env)
    blocked_and_tracked(env)
    _, new = demote(env)
    chld = env.td.chldcnt
    out = env.call(A.TDH_MEM_PAGE_PROMOTE, rcx=G | 1, rdx=env.tdr)
    assert out.rax == GPA_RANGE_NOT_BLOCKED | OP_RCX and out.rdx == info(NL_MAPPED, 1)
    blocked_and_tracked(env)
    assert decode_state(env.entry(G, 1)) == NL_BLOCKED
    out = env.call(A.TDH_MEM_PAGE_PROMOTE | (1 << 16), rcx=G | 1, rdx=env.tdr)
    assert (out.rax, out.rcx) == (SUCCESS, new)
    assert (out.r9, out.r10, out.r11) == ((1 << 64) - 1,) * 3
    assert env.entry(G, 1) == entry_value(PENDING, page)
    assert env.pamt.page_type(new) == PT_NDA
    assert env.pamt.page_size(page) == PT_2MB and env.pamt.page_type(page) == PT_REG
    assert env.td.chldcnt == chld - 1 and env.pamt.locks_held() == []


def test_promote_needs_contiguous_children(td_run):
    """tdh_mem_page_promote() -> is_sept_page_valid_for_merge(): a removed child (FREE) ->
    EPT_INVALID_PROMOTE_CONDITIONS|RCX; every child lock released, the table kept."""
    env = td_run
    aug_2m(env)
    blocked_and_tracked(env)
    _, new = demote(env)
    blocked_and_tracked(env, G + 3 * PAGE, 0)
    env.ok(env.remove(G + 3 * PAGE))
    blocked_and_tracked(env)
    out = env.call(A.TDH_MEM_PAGE_PROMOTE, rcx=G | 1, rdx=env.tdr)
    assert out.rax == INVALID_PROMOTE_CONDITIONS | OP_RCX
    assert env.entry(G, 1) == entry_value(NL_BLOCKED, new)
    assert not any(env.mem.read64(new + 8 * i) & TDEL for i in range(512))
    assert env.pamt.locks_held() == []


def test_promote_refuses_a_leaf_and_version_2(td_run):
    env = td_run
    page = aug_2m(env)
    out = env.call(A.TDH_MEM_PAGE_PROMOTE, rcx=G | 1, rdx=env.tdr)
    assert out.rax == EPT_ENTRY_STATE_INCORRECT | OP_RCX and out.rcx == arch_entry(PENDING, page)
    out = env.call(A.TDH_MEM_PAGE_PROMOTE | (2 << 16), rcx=G | 1, rdx=env.tdr)
    assert out.rax == OPERAND_INVALID  # |RAX: operand id 0


# ==================================================================================================
# TDG.MEM.PAGE.ACCEPT at 2M (a TD the VMM built; the calls are SEAMCALLs, the guest's a TDCALL)
# ==================================================================================================
AREA = 0x1000000
ACCEPT_GUEST = """\
.intel_syntax noprefix
.include "emu.inc"
    .text
    .globl _start
_start:
    .globl accept
accept:
    mov rax, 6
    TDCALL
    .globl accepted
accepted:
    hlt
"""


class HugeTd:
    """A TD (2M-backed guest_memfd) running ACCEPT_GUEST, driven by SEAMCALLs; KVM is not involved."""

    def __init__(self, tmp_path):
        path = tmp_path / "accept.S"
        path.write_text(ACCEPT_GUEST)
        self.m = Machine(str(path), vm="tdx", hugepages="2m")
        self.mod = self.m.kvm.x86_ops.module
        self.tdr = self.m.kvm.tdx.tdr_pa
        self.tdvpr = self.m.vcpus[0].arch.tdvpr_pa
        self.td = self.mod.tds[self.tdr]
        from tdxmod.module import MD_TDVPS_GPR_BASE, GPR_ORDER

        self.gpr = {name: MD_TDVPS_GPR_BASE + i for i, name in enumerate(GPR_ORDER)}

    def call(self, leaf, **regs):
        return self.mod.seamcall(leaf, **regs)

    def aug_2m(self, gpa=AREA):
        for level in (3, 2):
            base = gpa & ~((PAGE << (9 * level)) - 1)
            out = self.call(A.TDH_MEM_SEPT_ADD, rcx=base | level, rdx=self.tdr | 1, r8=self.m.host.alloc_kernel_page())
            assert out.rax == SUCCESS, A.status_name(out.rax)
        page = self.m.gmem + gpa
        assert page % M2 == 0
        assert self.call(A.TDH_MEM_PAGE_AUG, rcx=gpa | 1, rdx=self.tdr, r8=page).rax == SUCCESS
        return page

    def entry_pa(self, gpa, level):
        q = self.mod.mem.q
        table = self.td.sept_root
        for lvl in range(3, level, -1):
            table = q[(table + (((gpa >> (12 + 9 * lvl)) & 511) << 3)) >> 3] & 0x000FFFFFFFFFF000
        return table + (((gpa >> (12 + 9 * level)) & 511) << 3)

    def entry(self, gpa, level):
        return self.mod.mem.read64(self.entry_pa(gpa, level))

    def wr(self, name, value):
        assert self.call(A.TDH_VP_WR, rcx=self.tdvpr, rdx=self.gpr[name], r8=value, r9=(1 << 64) - 1).rax == SUCCESS

    def rd(self, name):
        out = self.call(A.TDH_VP_RD, rcx=self.tdvpr, rdx=self.gpr[name])
        assert out.rax == SUCCESS
        return out.r8

    def enter(self):
        return self.call(A.TDH_VP_ENTER, rcx=self.tdvpr)


@pytest.fixture
def huge_td(tmp_path):
    return HugeTd(tmp_path)


def test_accept_2m_maps_and_clears_the_whole_page(huge_td):
    """tdg_mem_page_accept() at level 1: the 2M PENDING leaf becomes MAPPED, all 512 4K pages zeroed
    (INIT_COUNTER back to 0); a second ACCEPT is PAGE_ALREADY_ACCEPTED with level 1."""
    t = huge_td
    page = t.aug_2m()
    t.mod.mem.write(page + 511 * PAGE, b"stale")
    t.wr("rcx", AREA | 1)
    out = t.enter()
    assert out.rax == EXIT_TDCALL and out.r11 == A.EXIT_REASON_HLT
    assert t.rd("rax") == SUCCESS
    assert t.entry(AREA, 1) == entry_value(MAPPED, page)
    assert t.mod.mem.read(page + 511 * PAGE, 5) == b"\0" * 5


def test_accept_4k_inside_a_2m_pending_page_exits_with_the_levels(huge_td):
    """tdg_mem_page_accept() at level 0 where a 2M leaf is: the walk stops at level 1, the leaf is not
    guest-accessible (PENDING): an EPT violation to the VMM with the accept's extended exit qualification
    (type ACCEPT, requested level 0, error level 1, state PENDING): what makes KVM split."""
    t = huge_td
    t.aug_2m()
    t.wr("rcx", AREA + 5 * PAGE)
    out = t.enter()
    assert out.rax == EXIT_EPT_VIOLATION
    ext = out.rdx
    assert ext & 0xF == A.TDX_EXT_EXIT_QUAL_TYPE_ACCEPT
    eeq = ext >> 32
    assert (eeq & 7, (eeq >> 3) & 7, (eeq >> 6) & 0xFF) == (0, 1, 2)


def test_accept_2m_where_4k_pages_are_is_size_mismatch(huge_td):
    """tdg_mem_page_accept() at level 1 where the entry is a non-leaf (the range mapped 4K at a time):
    PAGE_SIZE_MISMATCH with the level (1) -- the guest then accepts 4K pages."""
    t = huge_td
    for level in (3, 2, 1):
        base = AREA & ~((PAGE << (9 * level)) - 1)
        t.call(A.TDH_MEM_SEPT_ADD, rcx=base | level, rdx=t.tdr | 1, r8=t.m.host.alloc_kernel_page())
    assert t.call(A.TDH_MEM_PAGE_AUG, rcx=AREA, rdx=t.tdr, r8=t.m.gmem + AREA).rax == SUCCESS
    t.wr("rcx", AREA | 1)
    out = t.enter()
    assert out.rax == EXIT_TDCALL
    assert t.rd("rax") == PAGE_SIZE_MISMATCH | 1


def test_accept_2m_is_resumable_across_an_interrupt(huge_td):
    """tdg_mem_page_accept() at level 1 with an interrupt becoming pending in the guest
    (is_interrupt_pending_guest_side()) after 128 of the 4K pages: the TDCALL is left unfinished (RIP
    at the TDCALL), the entry still PENDING with INIT_COUNTER = 128 (bits 20:12), unlocked; the next
    entry resumes from there (the pages before it are not cleared again) and maps the page."""
    from tdxmod.module import MD_TDVPS_RIP

    t = huge_td
    page = t.aug_2m()
    t.wr("rcx", AREA | 1)
    hw = t.m.vcpus[0].hw

    class Interrupt:
        steps = 0

        def point(self, caller, what, *args):
            if what == "tdcall_accept_2m":
                hw.intr_pending = True

    t.mod.sched = Interrupt()
    try:
        t.enter()
    finally:
        t.mod.sched = None
        hw.intr_pending = False
    e = t.entry(AREA, 1)
    assert e == entry_value(PENDING, page) | (128 << 12)
    assert t.call(A.TDH_VP_RD, rcx=t.tdvpr, rdx=MD_TDVPS_RIP).r8 == t.m.image.symbol("accepted") - 4  # the TDCALL
    t.mod.mem.write(page, b"kept")  # below the count: not cleared again
    out = t.enter()
    assert out.rax == EXIT_TDCALL and t.rd("rax") == SUCCESS
    assert t.entry(AREA, 1) == entry_value(MAPPED, page)
    assert t.mod.mem.read(page, 4) == b"kept"


def test_accept_4k_inside_a_2m_mapped_page_is_already_accepted(huge_td):
    """tdg_mem_page_accept() at level 0 where a 2M MAPPED leaf is: the walk stops at level 1 on a
    guest-accessible leaf -> PAGE_ALREADY_ACCEPTED with the level (1), no exit."""
    t = huge_td
    t.aug_2m()
    t.wr("rcx", AREA | 1)
    assert t.enter().rax == EXIT_TDCALL and t.rd("rax") == SUCCESS
    t.m.kvm.x86_ops.set_regs(t.m.vcpus[0], {"rip": t.m.image.symbol("accept")})
    t.wr("rcx", AREA + 9 * PAGE)
    out = t.enter()
    assert out.rax == EXIT_TDCALL and t.rd("rax") == PAGE_ALREADY_ACCEPTED | 1


def test_demote_losing_the_entry_lock_gives_the_host_priority(huge_td):
    """tdh_mem_page_demote() -> sept_lock_acquire_host() on an entry the guest holds: BUSY|RCX and
    TDHP set; the guest's next 2M ACCEPT (sept_lock_acquire_guest()) then backs off with
    BUSY_HOST_PRIORITY|RCX, so the host's retry gets the lock."""
    t = huge_td
    page = t.aug_2m()
    pa = t.entry_pa(AREA, 1)
    t.mod.mem.write64(pa, entry_value(PENDING, page) | TDEL)  # the guest holds it
    out = t.call(A.TDH_MEM_PAGE_DEMOTE, rcx=AREA | 1, rdx=t.tdr, r8=t.m.host.alloc_kernel_page())
    assert out.rax == OPERAND_BUSY | OP_RCX
    assert t.mod.mem.read64(pa) == entry_value(PENDING, page) | TDEL | TDHP
    t.mod.mem.write64(pa, entry_value(PENDING, page) | TDHP)  # the guest let it go
    t.wr("rcx", AREA | 1)
    assert t.enter().rax == EXIT_TDCALL
    assert t.rd("rax") == A.TDX_OPERAND_BUSY_HOST_PRIORITY | OP_RCX
    assert t.mod.mem.read64(pa) == entry_value(PENDING, page) | TDHP
