"""TD private page leaves: TDH.MEM.PAGE.AUG, TDH.MEM.PAGE.ADD, TDH.MEM.PAGE.REMOVE, and the page
size changes TDH.MEM.PAGE.DEMOTE and TDH.MEM.PAGE.PROMOTE.

Follows src/vmm_dispatcher/api_calls/tdh_mem_page_aug.c, tdh_mem_page_add.c, tdh_mem_page_remove.c,
tdh_mem_page_demote.c and tdh_mem_page_promote.c of the TDX module (tdx_1.5), with pamt_demote()
and pamt_promote() of src/common/memory_handlers/pamt_manager.c.  The model's TDs have no L2 VMs
(TD partitioning is not modelled): DEMOTE's and PROMOTE's L2 S-EPT pages (R9-R11) are not used.
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import PAGE
from ..helpers import (
    walk_and_host_lock,
    seamcall_leaf,
    begin,
    page_info,
    check_blocked_and_tracked,
    check_lock_tdr,
    check_state_and_lock_op_state,
    check_and_lock_private_hpa,
    shared_hpa_check,
    hpa_check,
)
from ..helpers import tlb_tracking_required
from ..locks import TDX_LOCK_EXCLUSIVE, TDX_LOCK_SHARED, TDX_LOCK_NO_LOCK
from ..pamt import PT_4KB, PT_2MB
from .. import sept as S


def check_and_lock_free_range_hpa(mod, held, hpa, op, level, caller):
    """check_and_lock_free_range_hpa(): a free (PT_NDA) 4K or 2M range, its PAMT entry (4K or 2M)
    locked exclusively; a status or TDX_SUCCESS.  Once held, a scheduling point ("pamt_locked")."""
    size = PAGE << (9 * level)
    if not hpa_check(mod, hpa, size):
        return TDX_OPERAND_INVALID | op
    if not mod.pamt.covers(hpa + size - 1):
        return TDX_OPERAND_ADDR_RANGE_ERROR | op  # (a range that leaves the TDMR)
    st = check_and_lock_private_hpa(mod, held, hpa, op, TDX_LOCK_EXCLUSIVE, PT_NDA, level)
    if st:
        return st
    if level == 1 and not mod.pamt.is_2mb_range_free(hpa):
        return TDX_PAGE_METADATA_INCORRECT | op
    mod.point(caller, "pamt_locked")
    return TDX_SUCCESS


@seamcall_leaf
def tdh_mem_page_aug(mod, r, caller, held):
    """tdh_mem_page_aug.c: the TDR shared, the TD's state, the GPA, the S-EPT tree shared, the
    walk, the entry lock, the state, then the new page (check_and_lock_free_range_hpa()), whose
    PAMT entry stays locked until the entry is written (sept_set_leaf_and_release_locks())."""
    got, err = begin(mod, held, r, caller, TDH_MEM_PAGE_AUG, lambda td: (0, 1), TDX_LOCK_SHARED)
    if err:
        return err
    td, gpa, level = got
    page = r.r8
    ptr, e, entry = walk_and_host_lock(mod, held, td, gpa, level, caller, "sept_entry_locked")
    if ptr is None:
        return e
    if not S.seamcall_allowed(TDH_MEM_PAGE_AUG, S.sept_state(e)):
        return mod.state_incorrect(e, level)
    st = check_and_lock_free_range_hpa(mod, held, page, OPERAND_ID_R8, level, caller)
    if st:
        return Regs(st)
    npages = 512**level
    mod.mem.q[ptr >> 3] = S.make_pending(page)  # sept_set_leaf_and_release_locks()
    held.drop(entry)
    td.chldcnt += npages
    mod.give_to_td(page, td.tdr, npages)
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mem_page_add(mod, r, caller, held):
    """tdh_mem_page_add.c: the TDR exclusively (so no S-EPT tree or entry lock: nobody else is in
    this TD's S-EPT), the TD's state, the GPA, the walk, the state, the source (a shared page:
    shared_hpa_check(), so never the module's own memory), then the target page (PT_NDA, locked
    exclusively).  (Model: a source page the PAMT gives to a TD or the module is refused too;
    the CPU would read zeros through the shared key.)"""
    td, st = check_lock_tdr(mod, held, r.rdx, OPERAND_ID_RDX, TDX_LOCK_EXCLUSIVE, caller)
    if st:
        return Regs(st)
    st = check_state_and_lock_op_state(mod, held, td, TDH_MEM_PAGE_ADD, TDX_LOCK_NO_LOCK)
    if st:
        return Regs(st)
    pi, st = page_info(mod, td, r.rcx, (0,))
    if st:
        return Regs(st)
    gpa, level = pi
    target, source = r.r8, r.r9
    ptr, e, lvl = mod.sept_walk(td, gpa, 0)
    if lvl != 0:
        return mod.walk_failed(e, lvl)
    if not S.seamcall_allowed(TDH_MEM_PAGE_ADD, S.sept_state(e)):
        return mod.state_incorrect(e, lvl)
    if not shared_hpa_check(mod, source, read=True):
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R9)
    if mod.pamt.covers(source) and mod.pamt.page_type(source) != PT_NDA:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R9)  # model-defined: must be shared memory
    st = check_and_lock_private_hpa(
        mod, held, target, OPERAND_ID_R8, TDX_LOCK_EXCLUSIVE, PT_NDA, caller=caller, point="pamt_locked"
    )
    if st:
        return Regs(st)
    mod.mem.write(target, mod.mem.read(source, PAGE))
    mod.mem.td_write(target)  # copied in with the TD's key
    mod.mem.q[ptr >> 3] = S.make_mapped(target)  # sept_set_leaf_unlocked_entry()
    td.mrtd.update(b"MEM.PAGE.ADD" + gpa.to_bytes(8, "little"))
    td.chldcnt += 1
    mod.give_to_td(target, td.tdr)
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mem_page_remove(mod, r, caller, held):
    """tdh_mem_page_remove.c: the TDR shared, the TD's state, the GPA, the S-EPT tree shared, the
    walk, the entry lock, a leaf in a legal state, the page's PAMT entry (of the leaf's size)
    locked exclusively (pamt_implicit_get_and_lock(): BUSY|RCX), blocked and tracked."""
    got, err = begin(mod, held, r, caller, TDH_MEM_PAGE_REMOVE, lambda td: (0, 1, 2), TDX_LOCK_SHARED)
    if err:
        return err
    td, gpa, level = got
    ptr, e, entry = walk_and_host_lock(mod, held, td, gpa, level, caller, "sept_entry_locked")
    if ptr is None:
        return e
    state = S.sept_state(e)
    if not S.is_leaf_state(state) or not S.seamcall_allowed(TDH_MEM_PAGE_REMOVE, state):
        rcx, rdx = mod.sept_details(e, level)
        return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    e = S.cleanup_if_pending(e, level)
    hpa = e & S.SEPT_HPA
    pamt = mod.pamt
    st = pamt.implicit_lock(hpa, level, TDX_LOCK_EXCLUSIVE)
    if st:
        return Regs(st | OPERAND_ID_RCX)
    held.push(lambda: pamt.implicit_unlock(hpa, level, TDX_LOCK_EXCLUSIVE))
    mod.point(caller, "pamt_locked")
    bad = check_blocked_and_tracked(mod, td, e, state, level, hpa)
    if bad:
        return bad
    npages = 512**level
    mod.mem.q[ptr >> 3] = S.SEPT_FREE_ENTRY  # septe_set_free_or_removed_and_release_locks()
    held.drop(entry)
    td.chldcnt -= npages
    mod.release(hpa, npages)
    return Regs(TDX_SUCCESS, rcx=hpa)


# -- page size changes ------------------------------------------------------------------------------------
NULL_PA = (1 << 64) - 1


def _blocked_and_tracked(mod, td, e, state, level, pamt_hpa, pamt_level):
    """The TLB-tracking checks DEMOTE and PROMOTE share: when the TD may run (and the state needs
    it), the entry BLOCKED (GPA_RANGE_NOT_BLOCKED with its details) and tracked since
    (TLB_TRACKING_NOT_DONE), by the BEPOCH of the PAMT entry the source reads."""
    if state not in S.TLB_TRACKING_REQUIRED or not tlb_tracking_required(td):
        return None
    if state not in S.BLOCKED_STATES:
        rcx, rdx = mod.sept_details(e, level)
        return Regs(TDX_GPA_RANGE_NOT_BLOCKED | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    if not mod.is_tlb_tracked(td, mod.pamt.bepoch_of(pamt_hpa, pamt_level)):
        return Regs(TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_RCX)
    return None


def _interruptible(mod, td):
    """DEMOTE checks for a pending host interrupt unless the module enumerates
    ENHANCED_DEMOTE_INTERRUPTIBILITY and the TD has no L2 VMs (none in the model)."""
    return not mod.features0 & TDX_FEATURES0_ENHANCED_DEMOTE_INTERRUPTIBILITY


def pamt_demote(mod, held, hpa, caller):
    """pamt_demote() of a 2M page: its 2M PAMT entry locked exclusively (BUSY), its page type and
    owner copied to the 512 4K entries (BEPOCH 0), the 2M entry PT_NDA.  A status."""
    pamt = mod.pamt
    st = pamt.implicit_lock(hpa, PT_2MB, TDX_LOCK_EXCLUSIVE)
    if st:
        return st
    held.push(lambda: pamt.implicit_unlock(hpa, PT_2MB, TDX_LOCK_EXCLUSIVE))
    mod.point(caller, "pamt_locked")
    pt, owner = pamt.page_type(hpa), pamt.owner(hpa)
    pamt.set(hpa, PT_NDA, 0, PT_2MB)  # (the parent first: the index is keyed by HPA)
    for k in range(512):
        pamt.set(hpa + k * PAGE, pt, owner, PT_4KB)
        pamt.set_bepoch(hpa + k * PAGE, 0, PT_4KB)
    return TDX_SUCCESS


def pamt_promote(mod, held, hpa, caller):
    """pamt_promote() of 512 4K pages: the 2M entry locked exclusively (BUSY), the first child's
    page type and owner copied to it, the 4K entries PT_NDA.  A status."""
    pamt = mod.pamt
    st = pamt.implicit_lock(hpa, PT_2MB, TDX_LOCK_EXCLUSIVE)
    if st:
        return st
    held.push(lambda: pamt.implicit_unlock(hpa, PT_2MB, TDX_LOCK_EXCLUSIVE))
    mod.point(caller, "pamt_locked")
    pt, owner = pamt.page_type(hpa), pamt.owner(hpa)
    for k in range(512):
        pamt.set(hpa + k * PAGE, PT_NDA, 0, PT_4KB)
    pamt.set(hpa, pt, owner, PT_2MB)
    pamt.set_bepoch(hpa, 0, PT_2MB)
    return TDX_SUCCESS


@seamcall_leaf
def tdh_mem_page_demote(mod, r, caller, held):
    """tdh_mem_page_demote.c: split a 2M leaf into a new S-EPT page of 512 4K leaves.
    RCX = GPA | level (1 = 2M), RDX = the TDR | flags (bit 0 L2_SEPT_ADD_MODE), R8 = the new
    S-EPT page.  The TD handle's reserved bits; the TDR shared; the TD's state and op_state;
    the GPA; the S-EPT tree SHARED; the walk; the entry lock (BUSY|RCX, and host priority
    against the guest's ACCEPT); the state (a leaf: MAPPED, BLOCKED, PENDING, PENDING_BLOCKED);
    blocked and tracked while the TD may run; the new page (PT_NDA, its PAMT entry locked);
    the 512 entries written into it, each the huge entry unblocked and unlocked with its HPA
    (a PENDING page's INIT_COUNTER reset: a 2M ACCEPT under way starts over, 4K at a time);
    then, without ENHANCED_DEMOTE_INTERRUPTIBILITY, a pending host interrupt ends the call with
    TDX_INTERRUPTED_RESTARTABLE (RCX/RDX as given, nothing committed); the 2M page's PAMT split
    (pamt_demote(): BUSY|RCX); and the commit: the entry NL_MAPPED to the new page, the page
    PT_EPT, the TD's child count + 1.  No UNBLOCK is needed afterwards."""
    if r.rdx & 0xFFE or r.rdx >> 52:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    got, err = begin(mod, held, r, caller, TDH_MEM_PAGE_DEMOTE, lambda td: (1, 2), TDX_LOCK_SHARED, tdr=r.rdx & ~0xFFF)
    if err:
        return err
    td, gpa, level = got
    ptr, e, entry = walk_and_host_lock(mod, held, td, gpa, level, caller, "sept_entry_locked")
    if ptr is None:
        return e
    state = S.sept_state(e)
    if not S.seamcall_allowed(TDH_MEM_PAGE_DEMOTE, state):
        rcx, rdx = mod.sept_details(e, level)
        return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    e = S.cleanup_if_pending(e, level)
    huge = S.leaf_hpa(e, level)
    bad = _blocked_and_tracked(mod, td, e, state, level, huge, level)
    if bad:
        return bad
    new = r.r8
    st = check_and_lock_private_hpa(
        mod, held, new, OPERAND_ID_R8, TDX_LOCK_EXCLUSIVE, PT_NDA, caller=caller, point="pamt_locked"
    )
    if st:
        return Regs(st)
    # sept_split_entry(): the small entries, non-blocked and non-locked, into the new page.
    child = S.set_state(e, S.UNBLOCKED.get(state, state)) & ~S.SEPT_TDEL
    step = PAGE << (9 * (level - 1))
    q = mod.mem.q
    base = child & ~S.SEPT_HPA
    for i in range(512):
        q[(new >> 3) + i] = base | (huge + i * step)
    # (written through the TD's key: "This can fail; in this case the new SEPT pages are modified
    # but their PAMT entries are not yet updated" -- the page's lines hold the TD bit from here on)
    mod.mem.td_write(new)
    if _interruptible(mod, td) and mod.interrupt_pending_host_side(caller):
        return Regs(TDX_INTERRUPTED_RESTARTABLE, rcx=r.rcx, rdx=r.rdx)
    st = pamt_demote(mod, held, huge, caller) if level == 1 else TDX_OPERAND_INVALID  # (no 1G pages)
    if st:
        return Regs(st | OPERAND_ID_RCX)
    # Commit: nothing can fail from here.
    q[ptr >> 3] = S.make_nl_mapped(new) | S.SEPT_TDEL  # sept_set_mapped_non_leaf(): kept locked
    mod.give_to_module(new, PT_EPT, td.tdr)
    td.chldcnt += 1
    return Regs(TDX_SUCCESS, r9=r.r9, r10=r.r10, r11=r.r11)


@seamcall_leaf
def tdh_mem_page_promote(mod, r, caller, held):
    """tdh_mem_page_promote.c: merge an S-EPT page of 512 leaves back into one 2M leaf (KVM never
    promotes a mirror leaf; here for completeness).  RCX = GPA | level (1 = 2M), RDX = the TDR.
    Version 1 also returns R9-R11 (NULL_PA with no L2 VMs).  The version; the TDR shared; the
    TD's state and op_state; the GPA; the S-EPT tree SHARED; the walk; the entry lock; the
    state (NL_MAPPED or NL_BLOCKED); the S-EPT page's PAMT entry locked exclusively (BUSY|RCX);
    blocked and tracked while the TD may run; every child locked (BUSY|RCX) and checked
    (is_sept_page_valid_for_merge(): the first a MAPPED or PENDING leaf of a 2M-aligned page,
    every other the same entry 4K further: EPT_INVALID_PROMOTE_CONDITIONS|RCX); a pending host
    interrupt (TDX_INTERRUPTED_RESTARTABLE, RCX/RDX as given); the PAMT merged (pamt_promote():
    BUSY|RCX); the commit: the entry becomes the first child (a 2M leaf, still locked), the
    S-EPT page PT_NDA and returned in RCX, the child count - 1."""
    version = (r.rax >> 16) & 0xFF
    out = {"r9": NULL_PA, "r10": NULL_PA, "r11": NULL_PA} if version > 0 else {}
    if version > 1:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RAX, **out)
    got, err = begin(mod, held, r, caller, TDH_MEM_PAGE_PROMOTE, lambda td: (1, 2), TDX_LOCK_SHARED)
    if err:
        for name, value in out.items():
            setattr(err, name, value)
        return err
    td, gpa, level = got

    def fail(status, **regs):
        return Regs(status, **{**out, **regs})

    ptr, e, entry = walk_and_host_lock(mod, held, td, gpa, level, caller, "sept_entry_locked")
    if ptr is None:
        return fail(e.rax, rcx=e.rcx, rdx=e.rdx)
    state = S.sept_state(e)
    if not S.seamcall_allowed(TDH_MEM_PAGE_PROMOTE, state):
        rcx, rdx = mod.sept_details(e, level)
        return fail(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    table = e & S.SEPT_HPA
    pamt = mod.pamt
    st = pamt.implicit_lock(table, PT_4KB, TDX_LOCK_EXCLUSIVE)
    if st:
        return fail(st | OPERAND_ID_RCX)
    held.push(lambda: pamt.implicit_unlock(table, PT_4KB, TDX_LOCK_EXCLUSIVE))
    bad = _blocked_and_tracked(mod, td, e, state, level, table, PT_4KB)
    if bad:
        return fail(bad.rax, rcx=bad.rcx, rdx=bad.rdx)
    # is_sept_page_valid_for_merge(): every child locked and read under its lock.
    child_level = level - 1
    step = PAGE << (9 * child_level)
    q = mod.mem.q
    locked = []
    held.push(lambda: [mod.unlock_entry(p) for p in locked])
    first = None
    for i in range(512):
        cptr = table + i * 8
        if not mod.lock_entry(cptr):
            rcx, rdx = mod.sept_details(e, level)
            return fail(TDX_OPERAND_BUSY | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        locked.append(cptr)
        c = S.cleanup_if_pending(q[cptr >> 3], child_level)
        if i == 0:
            if S.leaf_hpa(c, child_level) & ((PAGE << (9 * level)) - 1) or S.sept_state(c) not in S.MAPPED_OR_PENDING:
                rcx, rdx = mod.sept_details(e, level)
                return fail(TDX_EPT_INVALID_PROMOTE_CONDITIONS | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
            first = c
        elif c != first + i * step:
            rcx, rdx = mod.sept_details(e, level)
            return fail(TDX_EPT_INVALID_PROMOTE_CONDITIONS | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    if mod.interrupt_pending_host_side(caller):
        return fail(TDX_INTERRUPTED_RESTARTABLE, rcx=r.rcx, rdx=r.rdx)
    merged = S.leaf_hpa(first, child_level)
    st = pamt_promote(mod, held, merged, caller) if level == 1 else TDX_OPERAND_INVALID
    if st:
        return fail(st | OPERAND_ID_RCX)
    # Commit: the first child (locked) becomes the huge leaf; the S-EPT page goes back to the host.
    locked.clear()
    q[ptr >> 3] = first
    td.chldcnt -= 1
    mod.release(table)
    return Regs(TDX_SUCCESS, rcx=table, **out)


# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {
    TDH_MEM_PAGE_AUG: tdh_mem_page_aug,
    TDH_MEM_PAGE_ADD: tdh_mem_page_add,
    TDH_MEM_PAGE_REMOVE: tdh_mem_page_remove,
    TDH_MEM_PAGE_DEMOTE: tdh_mem_page_demote,
    TDH_MEM_PAGE_PROMOTE: tdh_mem_page_promote,
}
