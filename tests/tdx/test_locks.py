"""Register-level tests of the TDX module's locks (tdx_locks.h) and of the defects a stateful fuzzer
found (issue 28): a second CPU's SEAMCALL runs at the first one's scheduling point (RaceSched), on
another logical CPU where that matters (``caller=1``).  Each test's docstring names the tdx_1.5
function whose behaviour it pins.
"""

import pytest

from tdxmod import abi as A
from tdxmod import locks as L
from tdxmod.module import MD_TDVPS_VMCS_SHARED_EPTP

from tdxhelpers import (
    PAGE,
    SUCCESS,
    OPERAND_BUSY,
    OPERAND_INVALID,
    TD_FATAL,
    OP_RCX,
    OP_RDX,
    OP_R8,
    OP_R9,
    OP_TDR,
    OP_OP_STATE,
    PT_NDA,
    PT_REG,
    FREE_ENTRY,
    PENDING,
    MAPPED,
    entry_value,
    RaceSched,
)

G = 0x4000_0000
G2 = 0x4000_1000
G_2M = 0x4020_0000
VCPU_ASSOCIATED = 0x8000070100000000
VCPU_NOT_ASSOCIATED = 0x8000070200000000
METADATA_FIELD_VALUE_NOT_VALID = 0xC0000C0300000000
EXIT_EPT_VIOLATION = 48


def race(env, at, first, second):
    sched = RaceSched(at, second)
    env.mod.sched = sched
    try:
        out = first()
    finally:
        env.mod.sched = None
    assert sched.fired, f"no scheduling point {at!r} (saw {sorted(set(sched.points))})"
    return out, sched.result


def no_locks_held(env):
    """Nothing is locked once no call is in flight (host priority is not a lock)."""
    assert env.pamt.locks_held() == []
    for td in env.mod.tds.values():
        assert td.op_state_lock & ~L.SHAREX_HP_HOST_PRIORITY == 0
        assert td.secure_ept_lock == 0 and td.epoch_lock == 0


# ==================================================================================================
# The lock primitives (tdx_locks.h)
# ==================================================================================================
def test_sharex_hp_host_priority():
    """acquire_sharex_lock_hp_ex()/_sh(): a host that fails sets host priority; a guest then backs
    off (BUSY_HOST_PRIORITY) even from a free lock; the next host to take it clears it."""
    raw, st = L.sharex_hp_acquire(0, L.TDX_LOCK_EXCLUSIVE)
    assert (raw, st) == (1, SUCCESS)
    raw, st = L.sharex_hp_acquire(raw, L.TDX_LOCK_EXCLUSIVE)  # a second host
    assert (raw, st) == (1 | 2, OPERAND_BUSY)
    raw = L.sharex_hp_release(raw, L.TDX_LOCK_EXCLUSIVE)
    assert raw == 2  # priority kept
    assert L.sharex_hp_acquire(raw, L.TDX_LOCK_SHARED, is_guest=True) == (2, A.TDX_OPERAND_BUSY_HOST_PRIORITY)
    raw, st = L.sharex_hp_acquire(raw, L.TDX_LOCK_SHARED)  # a host reader clears it
    assert (raw, st) == (4, SUCCESS)
    assert L.sharex_hp_promote(raw) == (1, SUCCESS)
    assert L.sharex_hp_promote(8) == (8 | 2, OPERAND_BUSY)  # two readers
    with pytest.raises(L.LockError):
        L.sharex_hp_release(0, L.TDX_LOCK_SHARED)


def test_sharex_shared_and_exclusive():
    raw, ok = L.sharex_acquire(0, L.TDX_LOCK_SHARED)
    raw, ok2 = L.sharex_acquire(raw, L.TDX_LOCK_SHARED)
    assert ok and ok2 and L.sharex_readers(raw) == 2
    assert L.sharex_acquire(raw, L.TDX_LOCK_EXCLUSIVE) == (raw, False)
    raw = L.sharex_release(L.sharex_release(raw, L.TDX_LOCK_SHARED), L.TDX_LOCK_SHARED)
    raw, ok = L.sharex_acquire(raw, L.TDX_LOCK_EXCLUSIVE)
    assert ok and L.sharex_acquire(raw, L.TDX_LOCK_SHARED)[1] is False
    assert L.sharex_release(raw, L.TDX_LOCK_EXCLUSIVE) == 0


# ==================================================================================================
# The TDR lock (check_lock_and_map_explicit_tdr(): its PAMT entry, shared or exclusive)
# ==================================================================================================
def test_page_add_meets_aug_holding_the_tdr_shared(td_init):
    """Issue 28 defect 5.  tdh_mem_page_add() takes the TDR exclusively; tdh_mem_page_aug() holds it
    shared (and the entry lock of the GPA): a PAGE.ADD of the same GPA on another CPU while AUG is
    at its entry-locked point gets BUSY|RDX, and nothing changes; the AUG completes."""
    env = td_init
    env.ensure_path(G, 0)
    aug_page, add_page = env.upage(), env.upage()
    chld = env.td.chldcnt
    out, add = race(
        env,
        "sept_entry_locked",
        lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=aug_page),
        lambda: env.call(A.TDH_MEM_PAGE_ADD, rcx=G, rdx=env.tdr, r8=add_page, r9=env.source(b"x")),
    )
    assert add.rax == OPERAND_BUSY | OP_RDX
    assert out.rax == SUCCESS
    assert env.entry(G, 0) == entry_value(PENDING, aug_page)
    assert env.pamt.page_type(add_page) == PT_NDA and env.pamt.page_type(aug_page) == PT_REG
    assert env.td.chldcnt == chld + 1
    no_locks_held(env)


def test_aug_meets_page_add_holding_the_tdr_exclusively(td_init):
    """check_lock_and_map_explicit_tdr(): while PAGE.ADD holds the TDR exclusively (its tdr_locked
    point), an AUG of any GPA of that TD is BUSY|RDX; a TRACK is BUSY|RCX."""
    env = td_init
    env.ensure_path(G, 0)
    page = env.upage()
    results = {}

    def second():
        results["aug"] = env.call(A.TDH_MEM_PAGE_AUG, rcx=G2, rdx=env.tdr, r8=env.upage()).rax
        results["track"] = env.call(A.TDH_MEM_TRACK, rcx=env.tdr).rax

    out, _ = race(
        env,
        "tdr_locked",
        lambda: env.call(A.TDH_MEM_PAGE_ADD, rcx=G, rdx=env.tdr, r8=page, r9=env.source(b"x")),
        second,
    )
    assert results == {"aug": OPERAND_BUSY | OP_RDX, "track": OPERAND_BUSY | OP_RCX}
    assert out.rax == SUCCESS and env.entry(G, 0) == entry_value(MAPPED, page)
    no_locks_held(env)


def test_vcpu_leaf_meets_the_tdr_held_exclusively(td_init):
    """lock_and_map_implicit_tdr(): a vCPU leaf takes its TDVPR's owner TDR shared; while
    MR.EXTEND holds it exclusively the TDVPR's owner is BUSY with operand id TDR (0x80)."""
    env = td_init
    tdvpr = env.add_vcpu()
    env.make_state(G, 0, MAPPED)
    out, rd = race(
        env,
        "tdr_locked",
        lambda: env.call(A.TDH_MR_EXTEND, rcx=G, rdx=env.tdr),
        lambda: env.call(A.TDH_VP_RD, rcx=tdvpr, rdx=MD_TDVPS_VMCS_SHARED_EPTP),
    )
    assert rd.rax == OPERAND_BUSY | OP_TDR == 0x8000020000000080
    assert out.rax == SUCCESS
    no_locks_held(env)


def test_op_state_lock_held_exclusively(td_run):
    """check_state_map_tdcs_and_lock(): the op_state lock (sharex_hp) taken shared; held
    exclusively elsewhere (no leaf of the model does: the migration leaves would) -> BUSY|OP_STATE
    (0xAC), after the TD's build state; nothing changes."""
    env = td_run
    env.ensure_path(G, 0)
    env.td.op_state_lock = L.SHAREX_HP_EXCLUSIVE_LOCK
    try:
        out = env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=env.upage())
    finally:
        assert env.td.op_state_lock & L.SHAREX_HP_HOST_PRIORITY  # the host asked for priority
        env.td.op_state_lock = 0
    assert out.rax == OPERAND_BUSY | OP_OP_STATE == 0x80000200000000AC
    assert env.entry(G, 0) == FREE_ENTRY
    no_locks_held(env)


# ==================================================================================================
# PAMT entry locks (pamt_walk(), pamt_implicit_get_and_lock()), held across pamt_locked
# ==================================================================================================
def test_aug_same_page_meets_the_pamt_lock(td_run):
    """check_and_lock_free_range_hpa(): AUG holds the new page's PAMT entry exclusively until it has
    written the S-EPT entry; an AUG of that page at another GPA meanwhile is BUSY|R8, its entry
    left FREE and unlocked."""
    env = td_run
    env.ensure_path(G, 0)
    page = env.upage()
    out, second = race(
        env,
        "pamt_locked",
        lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=page),
        lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G2, rdx=env.tdr, r8=page),
    )
    assert second.rax == OPERAND_BUSY | OP_R8
    assert out.rax == SUCCESS
    assert env.entry(G2, 0) == FREE_ENTRY and env.entry(G, 0) == entry_value(PENDING, page)
    no_locks_held(env)


def test_reclaim_meets_remove_holding_the_page(td_run):
    """tdh_mem_page_remove() locks the removed page's PAMT entry (pamt_implicit_get_and_lock());
    TDH.PHYMEM.PAGE.RECLAIM of that page meanwhile (pamt_walk() exclusively) is BUSY|RCX with no
    outputs."""
    env = td_run
    hpa = env.make_state(G, 0, PENDING)
    env.ok(env.block(G))
    env.ok(env.track())
    out, rec = race(env, "pamt_locked", lambda: env.remove(G), lambda: env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=hpa))
    assert (rec.rax, rec.rcx, rec.rdx, rec.r8) == (OPERAND_BUSY | OP_RCX, 0, 0, 0)
    assert (out.rax, out.rcx) == (SUCCESS, hpa)
    no_locks_held(env)


def test_4k_aug_inside_a_2m_aug(td_run):
    """pamt_walk(): a 2M AUG holds the range's 2M PAMT entry exclusively (promoted from shared); a
    4K AUG of a page inside it meanwhile needs that entry shared: BUSY|R8."""
    env = td_run
    env.ensure_path(G_2M, 1)
    env.ensure_path(G, 0)
    big = env.upage(512 * PAGE, align=512 * PAGE)
    out, small = race(
        env,
        "pamt_locked",
        lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G_2M | 1, rdx=env.tdr, r8=big),
        lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=big + 7 * PAGE),
    )
    assert small.rax == OPERAND_BUSY | OP_R8
    assert out.rax == SUCCESS
    assert env.pamt.page_type(big + 7 * PAGE) == PT_REG and env.pamt.page_size(big + 7 * PAGE) == 1
    no_locks_held(env)


def test_2m_aug_over_a_4k_aug(td_run):
    """pamt_walk(): a 4K AUG holds the 2M entry of its range shared; a 2M AUG of that range
    meanwhile cannot promote it: BUSY|R8 (and the host priority it sets is cleared by the next
    host to take the entry)."""
    env = td_run
    env.ensure_path(G_2M, 1)
    env.ensure_path(G, 0)
    big = env.upage(512 * PAGE, align=512 * PAGE)
    out, large = race(
        env,
        "pamt_locked",
        lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=big),
        lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G_2M | 1, rdx=env.tdr, r8=big),
    )
    assert large.rax == OPERAND_BUSY | OP_R8
    assert out.rax == SUCCESS
    assert env.pamt.page_size(big) == 0
    no_locks_held(env)


def test_sept_add_new_page_meets_reclaim(td_run):
    """process_l1_page(): SEPT.ADD holds the new S-EPT page's PAMT entry exclusively; a RECLAIM of
    that page meanwhile is BUSY|RCX (before the page type: PT_NDA still)."""
    env = td_run
    env.ensure_path(G, 1)
    page = env.kpage()
    out, rec = race(
        env,
        "pamt_locked",
        lambda: env.call(A.TDH_MEM_SEPT_ADD, rcx=G | 1, rdx=env.tdr, r8=page),
        lambda: env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=page),
    )
    assert rec.rax == OPERAND_BUSY | OP_RCX
    assert out.rax == SUCCESS
    no_locks_held(env)


# ==================================================================================================
# The TDVPR: one logical CPU at a time (check_and_associate_vcpu(), the TDVPR's PAMT entry lock)
# ==================================================================================================
def test_vp_flush_meets_vp_init_holding_the_tdvpr(td_init):
    """tdh_vp_init() holds the TDVPR exclusively (tdvpr_locked); TDH.VP.FLUSH of it meanwhile is
    BUSY|RCX."""
    env = td_init
    tdvpr = env.vp_create()
    env.vp_addcx(tdvpr)
    out, flush = race(
        env, "tdvpr_locked", lambda: env.vp_init(tdvpr, x2apic=0), lambda: env.call(A.TDH_VP_FLUSH, rcx=tdvpr)
    )
    assert flush.rax == OPERAND_BUSY | OP_RCX
    assert out.rax == SUCCESS
    no_locks_held(env)


def test_vcpu_associated_with_another_cpu(td_init):
    """associate_vcpu(): TDH.VP.INIT associated the vCPU with CPU 0; TDH.VP.RD, TDH.VP.WR and
    TDH.VP.ENTER on CPU 1 are TDX_VCPU_ASSOCIATED; TDH.VP.FLUSH on CPU 1 TDX_VCPU_NOT_ASSOCIATED;
    after TDH.VP.FLUSH on CPU 0, CPU 1 may use it (and it counts as associated again)."""
    env = td_init
    tdvpr = env.add_vcpu()
    env.finalize()
    field = MD_TDVPS_VMCS_SHARED_EPTP
    assert env.mod.seamcall(A.TDH_VP_RD, rcx=tdvpr, rdx=field, caller=1).rax == VCPU_ASSOCIATED
    assert env.mod.seamcall(A.TDH_VP_WR, rcx=tdvpr, rdx=field, r8=0, r9=0, caller=1).rax == VCPU_ASSOCIATED
    assert env.mod.seamcall(A.TDH_VP_ENTER, rcx=tdvpr, caller=1).rax == VCPU_ASSOCIATED
    assert env.mod.seamcall(A.TDH_VP_FLUSH, rcx=tdvpr, caller=1).rax == VCPU_NOT_ASSOCIATED
    assert env.td.num_assoc_vcpus == 1
    env.ok(env.call(A.TDH_VP_FLUSH, rcx=tdvpr))
    assert env.td.num_assoc_vcpus == 0 and env.mod.vcpus[tdvpr].assoc_lpid is None
    assert env.mod.seamcall(A.TDH_VP_RD, rcx=tdvpr, rdx=field, caller=1).rax == SUCCESS
    assert env.mod.vcpus[tdvpr].assoc_lpid == 1 and env.td.num_assoc_vcpus == 1
    assert env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr).rax == A.TDX_FLUSHVP_NOT_DONE


# ==================================================================================================
# Defects 1 and 3: operands the module refuses
# ==================================================================================================
def test_vp_wr_shared_eptp_reserved_bits_then_enter(make_td):
    """Issue 28 defect 1.  md_vp_handle_field_attribute_on_wr() -> shared_hpa_check(): SHARED_EPTP
    with bits 51:48 set (above MAX_PA 48) is TDX_METADATA_FIELD_VALUE_NOT_VALID and not written;
    TDH.VP.ENTER then enters with the previous root (an EPT violation exit), leaves the TLB
    tracking at [0, 0], and TDH.MEM.TRACK succeeds twice."""
    env = TdEnvRunnable(make_td)
    tdvpr = env.tdvpr
    out = env.call(
        A.TDH_VP_WR, rcx=tdvpr, rdx=MD_TDVPS_VMCS_SHARED_EPTP, r8=0x000F_0000_0000_0000 | env.root, r9=(1 << 64) - 1
    )
    assert (out.rax, out.r8) == (METADATA_FIELD_VALUE_NOT_VALID, 0)
    out = env.call(A.TDH_VP_ENTER, rcx=tdvpr)
    assert out.rax & 0xFFFF == EXIT_EPT_VIOLATION and not out.rax >> 32
    assert env.td.refcount == [0, 0]
    env.ok(env.track())
    env.ok(env.track())
    no_locks_held(env)


class TdEnvRunnable:
    """A runnable TD whose vCPU has KVM's empty shared EPT root (a zeroed kernel page)."""

    def __init__(self, make_td):
        env = make_td("runnable")
        self.__dict__["env"] = env
        self.tdvpr = env.vcpus[0][0]
        self.root = env.kpage()
        env.ok(env.call(A.TDH_VP_WR, rcx=self.tdvpr, rdx=MD_TDVPS_VMCS_SHARED_EPTP, r8=self.root, r9=(1 << 64) - 1))

    def __getattr__(self, name):
        return getattr(self.__dict__["env"], name)

    def __setattr__(self, name, value):
        self.__dict__[name] = value


@pytest.mark.parametrize("where", ["run", "load_eptp"])
def test_vp_enter_keeps_the_module_consistent_when_the_cpu_raises(make_td, where):
    """td_vmexit_to_vmm(): however the TD run ends, the vCPU's count in the epoch is given back and
    the TDR and TDVPR released.  An exception out of the emulated CPU (a model failure, which the
    VMM reports as an internal error), entering or running, leaves the module as a TD exit would."""
    env = TdEnvRunnable(make_td)
    hw = env.mod.vcpus[env.tdvpr].hw

    def broken(*args):
        raise RuntimeError("emulated CPU failure")

    setattr(hw, where, broken)
    with pytest.raises(RuntimeError):
        env.call(A.TDH_VP_ENTER, rcx=env.tdvpr)
    v = env.mod.vcpus[env.tdvpr]
    assert env.td.refcount == [0, 0] and v.state == A.VCPU_READY
    no_locks_held(env)


def test_page_add_refuses_module_memory_as_source(td_init):
    """Issue 28 defect 3.  tdh_mem_page_add() -> shared_hpa_check(): a source inside SEAMRR (the
    module's own memory: here its PAMT) is OPERAND_INVALID|R9; nothing is mapped or owned."""
    env = td_init
    env.ensure_path(G, 0)
    target = env.upage()
    for source in (env.pamt.base, env.pamt.base + env.pamt.size - PAGE):
        out = env.call(A.TDH_MEM_PAGE_ADD, rcx=G, rdx=env.tdr, r8=target, r9=source)
        assert out.rax == OPERAND_INVALID | OP_R9
    assert env.entry(G, 0) == FREE_ENTRY and env.pamt.page_type(target) == PT_NDA
    no_locks_held(env)


def test_vp_enter_reserved_rcx_bits(make_td):
    """tdh_vp_enter(): RCX bits 11:2 or 63:52 -> OPERAND_INVALID|RCX first; bit 0 (the host
    recoverability hint) after a fault-like exit, or bit 1 (RESUME_L1, no L2 VM) ->
    OPERAND_INVALID|RCX once the vCPU is associated."""
    env = TdEnvRunnable(make_td)
    for bad in (env.tdvpr | 0x4, env.tdvpr | (1 << 60), env.tdvpr | 1, env.tdvpr | 2):
        assert env.call(A.TDH_VP_ENTER, rcx=bad).rax == OPERAND_INVALID | OP_RCX
    assert env.td.refcount == [0, 0]
    no_locks_held(env)


# ==================================================================================================
# TD_FATAL: the leaves that check it and the ones that tear a fatal TD down
# ==================================================================================================
def test_fatal_td_can_only_be_torn_down(make_td):
    """check_td_in_correct_build_state(): a fatal TD is TD_FATAL to AUG, TRACK, VP.ENTER, VP.RD;
    TDH.VP.FLUSH (tdh_vp_flush.c), TDH.MNG.VPFLUSHDONE, TDH.MNG.KEY.FREEID and
    TDH.PHYMEM.PAGE.RECLAIM do not check it: the TD is torn down and every page comes back."""
    env = TdEnvRunnable(make_td)
    env.td.fatal = True
    assert env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=env.upage()).rax == TD_FATAL
    assert env.call(A.TDH_MEM_TRACK, rcx=env.tdr).rax == TD_FATAL
    assert env.call(A.TDH_VP_ENTER, rcx=env.tdvpr).rax == TD_FATAL
    assert env.call(A.TDH_VP_RD, rcx=env.tdvpr, rdx=MD_TDVPS_VMCS_SHARED_EPTP).rax == TD_FATAL
    env.ok(env.call(A.TDH_VP_FLUSH, rcx=env.tdvpr))
    env.ok(env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr))
    env.ok(env.call(A.TDH_PHYMEM_CACHE_WB, rcx=0))
    env.ok(env.call(A.TDH_MNG_KEY_FREEID, rcx=env.tdr))
    pages = [p for tdvpr, tdvpx in env.vcpus for p in tdvpx + [tdvpr]] + env.tdcs
    for page in pages + [env.tdr]:
        assert env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=page).rax == SUCCESS, hex(page)
    assert env.pamt.owned_pages() == []
    no_locks_held(env)


def test_cache_wb_with_nothing_to_flush(td_run):
    """tdh_phymem_cache_wb(): no HKID waiting for it -> TDX_NO_HKID_READY_TO_WBCACHE (informational);
    a command above RESUME (1) -> OPERAND_INVALID|RCX."""
    env = td_run
    assert env.call(A.TDH_PHYMEM_CACHE_WB, rcx=0).rax == A.TDX_NO_HKID_READY_TO_WBCACHE
    assert env.call(A.TDH_PHYMEM_CACHE_WB, rcx=2).rax == OPERAND_INVALID | OP_RCX
