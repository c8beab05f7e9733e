"""Checks and locks the SEAMCALL handlers share (src/common/helpers/helpers.c, helpers.h and
tdx_locks.h of the TDX module, tdx_1.5).

Each takes the module (tdxmod.module.TdxModule) as its first argument; none imports it.  A
handler collects what it locks in a Held and releases all of it on the way out, in the reverse
order, as the source's ``EXIT:`` label does (seamcall_leaf).

The lock a handler takes on a structure is the source's: the TDR (its page's PAMT entry lock,
shared or exclusive per leaf), the TDCS op_state lock, the S-EPT tree lock, an S-EPT entry's
lock, a TDVPR (its PAMT entry lock) and the PAMT entry of a page the call adds or removes.  A
lock that is taken is a try-lock: BUSY with the operand's id, and nothing changed.
"""

import functools

from .abi import *  # noqa: F401,F403
from .regs import Regs
from .td_structures import PAGE, TDCS_PAGES, TDVPX_PAGES
from . import locks as L
from . import sept as S

# The op_states in which the S-EPT leaves run.
RUN_STATES = (OP_STATE_INITIALIZED, OP_STATE_RUNNABLE)

# op_state_is_seamcall_allowed() (include/auto_gen/op_state_lookup.c), for the op_states the
# model has (UNINITIALIZED, INITIALIZED, RUNNABLE: the migration states are not modelled).
OP_STATE_ALLOWED = {
    TDH_VP_ENTER: (OP_STATE_RUNNABLE,),
    TDH_MNG_ADDCX: (OP_STATE_UNINITIALIZED,),
    TDH_MEM_PAGE_ADD: (OP_STATE_INITIALIZED,),
    TDH_MEM_SEPT_ADD: RUN_STATES,
    TDH_VP_ADDCX: (OP_STATE_INITIALIZED,),
    TDH_MEM_PAGE_AUG: RUN_STATES,
    TDH_MEM_RANGE_BLOCK: RUN_STATES,
    TDH_VP_CREATE: (OP_STATE_INITIALIZED,),
    TDH_MR_EXTEND: (OP_STATE_INITIALIZED,),
    TDH_MR_FINALIZE: (OP_STATE_INITIALIZED,),
    TDH_MNG_INIT: (OP_STATE_UNINITIALIZED,),
    TDH_VP_INIT: (OP_STATE_INITIALIZED,),
    TDH_VP_RD: RUN_STATES,
    TDH_VP_WR: RUN_STATES,
    TDH_MEM_PAGE_REMOVE: RUN_STATES,
    TDH_MEM_PAGE_DEMOTE: RUN_STATES,
    TDH_MEM_PAGE_PROMOTE: RUN_STATES,
    TDH_MEM_SEPT_REMOVE: RUN_STATES,
    TDH_MEM_TRACK: RUN_STATES,
    TDH_MEM_RANGE_UNBLOCK: RUN_STATES,
}


class Held:
    """What a SEAMCALL holds: release callbacks, run last-in first-out on the way out."""

    __slots__ = ("stack",)

    def __init__(self):
        self.stack = []

    def push(self, release):
        self.stack.append(release)
        return release

    def drop(self, token):
        """``token`` was released by the handler itself (an S-EPT entry written unlocked)."""
        self.stack.remove(token)

    def release(self):
        stack = self.stack
        while stack:
            stack.pop()()


def seamcall_leaf(fn):
    """A handler ``fn(mod, r, caller, held)`` as the dispatcher calls it: (mod, r, caller), with
    every lock it took released however it returns (or raises)."""

    @functools.wraps(fn)
    def leaf(mod, r, caller):
        held = Held()
        try:
            return fn(mod, r, caller, held)
        finally:
            held.release()

    return leaf


# -- physical addresses ------------------------------------------------------------------------------------
def hpa_check(mod, hpa, size=PAGE):
    """hpa_check_with_pwr_2_alignment(): aligned, no HKID bits, below MAX_PA."""
    return not (hpa & (size - 1) or hpa >> mod.x86_phys_bits)


def shared_hpa_check(mod, hpa, size=PAGE, read=False):
    """shared_hpa_check_with_pwr_2_alignment(): aligned, below MAX_PA, outside SEAMRR (the
    module's own memory: in this model its PAMT), a shared HKID (0: every other is private).
    (Model: with ``read``, for memory the module itself reads, memory that does not exist is
    refused too, where the CPU would read all ones.)"""
    if hpa & (size - 1) or hpa >> mod.maxphyaddr:
        return False
    if hpa < mod.seamrr_end and hpa + size > mod.seamrr_base:
        return False
    if hpa >> mod.x86_phys_bits:
        return False
    return not read or hpa + size <= mod.mem.size


def check_and_lock_private_hpa(mod, held, hpa, op, lock_type, expected_pt, level=0, caller=None, point=None):
    """check_and_lock_explicit_private_hpa() (walk to the leaf size): the HPA checks
    (OPERAND_INVALID), the TDMR (OPERAND_ADDR_RANGE_ERROR), the PAMT walk taking the entry's lock
    (BUSY), the page size and type (PAGE_METADATA_INCORRECT); all with ``op``.  With ``point``,
    a scheduling point once the lock is held (another CPU may contend for it there)."""
    if not hpa_check(mod, hpa, PAGE << (9 * level)):
        return TDX_OPERAND_INVALID | op
    pamt = mod.pamt
    if not pamt.covers(hpa):
        return TDX_OPERAND_ADDR_RANGE_ERROR | op
    st, found = pamt.walk(hpa, lock_type, level)
    if st:
        return st | op
    if found != level or pamt.page_type(hpa) != expected_pt:
        pamt.unwalk(hpa, lock_type, found)
        return TDX_PAGE_METADATA_INCORRECT | op
    held.push(lambda: pamt.unwalk(hpa, lock_type, found))
    if point is not None:
        mod.point(caller, point)
    return TDX_SUCCESS


def check_lock_tdr(mod, held, tdr, op, lock_type, caller=None):
    """check_lock_and_map_explicit_tdr(): (td, None) with the TDR locked, or (None, status).
    A TDR held exclusively is a scheduling point ("tdr_locked")."""
    st = check_and_lock_private_hpa(
        mod,
        held,
        tdr,
        op,
        lock_type,
        PT_TDR,
        caller=caller,
        point="tdr_locked" if lock_type == L.TDX_LOCK_EXCLUSIVE else None,
    )
    if st:
        return None, st
    return mod.tds[tdr], None


def lock_implicit_tdr(mod, held, tdr, lock_type):
    """lock_and_map_implicit_tdr(): the TDR a TDVPR (or a page) names as its owner, locked;
    BUSY|TDR when another CPU holds it exclusively."""
    st = mod.pamt.implicit_lock(tdr, 0, lock_type)
    if st:
        return None, st | OPERAND_ID_TDR
    held.push(lambda: mod.pamt.implicit_unlock(tdr, 0, lock_type))
    return mod.tds[tdr], None


def check_td_in_correct_build_state(td):
    """TD_FATAL, then keys configured, then the TDCS pages allocated."""
    if td.fatal:
        return TDX_TD_FATAL
    if td.lifecycle != TD_KEYS_CONFIGURED:
        return TDX_TD_KEYS_NOT_CONFIGURED
    if len(td.tdcx) < TDCS_PAGES:
        return TDX_TDCS_NOT_ALLOCATED
    return TDX_SUCCESS


def check_state_and_lock_op_state(mod, held, td, leaf, lock_type):
    """check_state_map_tdcs_and_lock(): the build state, the op_state lock (BUSY|OP_STATE), then
    the op_state against the leaf's (OP_STATE_INCORRECT)."""
    st = check_td_in_correct_build_state(td)
    if st:
        return st
    if lock_type != L.TDX_LOCK_NO_LOCK:
        old = td.op_state_lock
        new, st = L.sharex_hp_acquire(old, lock_type)
        td.op_state_lock = new
        if mod.sched is not None:  # (emu.checkers.dpor: only a scheduler records footprints)
            mod.touch(("op_state", td.tdr), lock_type == L.TDX_LOCK_EXCLUSIVE or not L.is_a_read(old, new, st))
        if st:
            return st | OPERAND_ID_OP_STATE

        def release():
            td.op_state_lock = L.sharex_hp_release(td.op_state_lock, lock_type)
            if mod.sched is not None:
                mod.touch(("op_state", td.tdr), lock_type == L.TDX_LOCK_EXCLUSIVE)

        held.push(release)
    if td.op_state not in OP_STATE_ALLOWED.get(leaf, ()):
        return TDX_OP_STATE_INCORRECT
    return TDX_SUCCESS


def sept_tree_lock(mod, held, td, lock_type):
    """The S-EPT tree lock (secure_ept_lock); False when another holder conflicts (the caller's
    BUSY|SEPT_TREE)."""
    old = td.secure_ept_lock
    new, ok = L.sharex_acquire(old, lock_type)
    td.secure_ept_lock = new
    exclusive = lock_type == L.TDX_LOCK_EXCLUSIVE
    if mod.sched is not None:  # (emu.checkers.dpor: only a scheduler records footprints)
        mod.touch(("sept_tree", td.tdr), exclusive or not ok)
    if not ok:
        # (A failed shared acquire leaves its count: the exclusive holder's release clears it.)
        return False

    def release():
        td.secure_ept_lock = L.sharex_release(td.secure_ept_lock, lock_type)
        if mod.sched is not None:
            mod.touch(("sept_tree", td.tdr), exclusive)

    held.push(release)
    return True


# -- the TDVPR ---------------------------------------------------------------------------------------------
def lock_tdvpr(mod, held, tdvpr, op, lock_type, leaf, op_state_lock=L.TDX_LOCK_SHARED, caller=None):
    """The prologue of the vCPU leaves: the TDVPR checked and locked
    (check_and_lock_explicit_4k_private_hpa), its owner TDR locked shared
    (lock_and_map_implicit_tdr), then check_state_map_tdcs_and_lock() unless ``leaf`` is None.
    (v, None) or (None, status).  A TDVPR held exclusively is a scheduling point ("tdvpr_locked")."""
    st = check_and_lock_private_hpa(
        mod,
        held,
        tdvpr,
        op,
        lock_type,
        PT_TDVPR,
        caller=caller,
        point="tdvpr_locked" if lock_type == L.TDX_LOCK_EXCLUSIVE else None,
    )
    if st:
        return None, st
    v = mod.vcpus[tdvpr]
    td, st = lock_implicit_tdr(mod, held, v.td.tdr, L.TDX_LOCK_SHARED)
    if st:
        return None, st
    if leaf is not None:
        st = check_state_and_lock_op_state(mod, held, td, leaf, op_state_lock)
        if st:
            return None, st
    return v, None


def map_tdvps(v):
    """map_tdvps(): fails (the caller's TDX_TDCX_NUM_INCORRECT) while TDVPS pages are missing."""
    return len(v.tdvpx) == TDVPX_PAGES


def associate_vcpu(mod, v, lp):
    """associate_vcpu(): (status, new association).  A vCPU associated with another logical CPU
    is TDX_VCPU_ASSOCIATED; a new association counts in TDCS.NUM_ASSOC_VCPUS."""
    if mod.sched is not None:  # (emu.checkers.dpor: only a scheduler records footprints)
        mod.touch(("tdvpr", v.tdvpr), True)
    if v.assoc_lpid is not None and v.assoc_lpid != lp:
        return TDX_VCPU_ASSOCIATED, False
    if v.assoc_lpid is None:
        v.assoc_lpid = lp
        v.td.num_assoc_vcpus += 1
        return TDX_SUCCESS, True
    return TDX_SUCCESS, False


def check_and_associate_vcpu(mod, v, lp, allow_disabled):
    """check_and_associate_vcpu(): the vCPU READY (or DISABLED, for a read), else
    TDX_VCPU_STATE_INCORRECT (ACTIVE: it runs in the TD on another CPU); then associate_vcpu()."""
    if not (v.state == VCPU_READY or (v.state == VCPU_DISABLED and allow_disabled)):
        return TDX_VCPU_STATE_INCORRECT, False
    return associate_vcpu(mod, v, lp)


# -- GPAs and the S-EPT ------------------------------------------------------------------------------------
def page_info(mod, td, rcx, levels):
    """verify_page_info_input() and check_gpa_validity(): (gpa, level) of a page-info operand,
    or (None, status)."""
    level = rcx & 7
    gpa = rcx & ~0xFFF & ((1 << 52) - 1)
    if rcx & 0xFF8 or rcx >> 52 or level not in levels or gpa & ((PAGE << (9 * level)) - 1):
        return None, TDX_OPERAND_INVALID | OPERAND_ID_RCX
    if not mod.private_gpa_ok(td, gpa):
        return None, TDX_OPERAND_INVALID | OPERAND_ID_RCX
    return (gpa, level), None


def begin(mod, held, r, caller, leaf, levels, tree_lock, tdr=None):
    """The prologue the S-EPT leaves share, in the module's order: the TDR operand locked shared,
    the state and the op_state lock, the page-info operand, then the S-EPT tree lock
    (lock_sept_check_and_walk_private_gpa()).  ((td, gpa, level), None) with the locks in
    ``held``, or (None, the error Regs)."""
    td, st = check_lock_tdr(mod, held, r.rdx if tdr is None else tdr, OPERAND_ID_RDX, L.TDX_LOCK_SHARED)
    if st:
        return None, Regs(st)
    st = check_state_and_lock_op_state(mod, held, td, leaf, L.TDX_LOCK_SHARED)
    if st:
        return None, Regs(st)
    pi, st = page_info(mod, td, r.rcx, levels(td))
    if st:
        return None, Regs(st)
    if not sept_tree_lock(mod, held, td, tree_lock):
        return None, Regs(TDX_OPERAND_BUSY | OPERAND_ID_SEPT)
    return (td,) + pi, None


def tlb_tracking_required(td):
    return td.op_state == OP_STATE_RUNNABLE


def host_lock(mod, held, ptr, e, lvl, caller, what):
    """sept_lock_acquire_host() on the walked entry, the copy re-read under the lock, then a
    scheduling point while the lock is held (another CPU may meet it there) before the caller
    checks the state.  Returns (the copy, the release token), or (None, BUSY|RCX with the walked
    entry's details in RCX/RDX)."""
    if not mod.lock_entry(ptr):
        rcx, rdx = mod.sept_details(e, lvl)
        return None, Regs(TDX_OPERAND_BUSY | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    token = held.push(lambda: mod.unlock_entry(ptr))
    e = mod.mem.q[ptr >> 3]
    mod.point(caller, what)
    return e, token


def walk_and_host_lock(mod, held, td, gpa, level, caller, what):
    """What every S-EPT leaf does first: walk_private_gpa() down to ``level`` (TDX_EPT_WALK_FAILED
    with the entry where the walk stopped, when it stops above it), then host_lock() on the entry
    it reached.  Returns (the entry's pointer, its copy under the lock, the lock's release token),
    or (None, the error Regs, None)."""
    ptr, e, lvl = mod.sept_walk(td, gpa, level)
    if lvl != level:
        return None, mod.walk_failed(e, lvl), None
    e, token = host_lock(mod, held, ptr, e, lvl, caller, what)
    if e is None:
        return None, token, None
    return ptr, e, token


def check_blocked_and_tracked(mod, td, e, state, level, child_hpa):
    """The TLB-tracking checks of PAGE.REMOVE / SEPT.REMOVE (a status Regs, or None)."""
    if not tlb_tracking_required(td):
        return None
    if state not in S.BLOCKED_STATES:
        rcx, rdx = mod.sept_details(e, level)
        return Regs(TDX_GPA_RANGE_NOT_BLOCKED | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    if not mod.is_tlb_tracked(td, mod.pamt.bepoch(child_hpa)):
        return Regs(TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_RCX)
    return None
