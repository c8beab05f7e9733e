"""Physical page leaves: TDH.PHYMEM.PAGE.RECLAIM, TDH.PHYMEM.PAGE.WBINVD, TDH.PHYMEM.CACHE.WB.

Follows src/vmm_dispatcher/api_calls/tdh_phymem_page_reclaim.c, tdh_phymem_page_wbinvd.c and
tdh_phymem_cache_wb.c of the TDX module (tdx_1.5).
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import PAGE
from ..helpers import seamcall_leaf, check_and_lock_private_hpa, lock_implicit_tdr
from ..locks import TDX_LOCK_EXCLUSIVE, TDX_LOCK_SHARED


@seamcall_leaf
def tdh_phymem_page_reclaim(mod, r, caller, held):
    """tdh_phymem_page_reclaim.c: operand, TDMR, the PAMT walk to the page's leaf entry locked
    exclusively (BUSY|RCX), page type; then the outputs (RCX page type, RDX owner, R8 size) are
    set, and the alignment of a large page and the owner TD (its TDR locked shared:
    BUSY|TDR) are checked with them in place."""
    hpa = r.rcx
    if hpa & 0xFFF or hpa >> mod.maxphyaddr or hpa >> mod.x86_phys_bits:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    pamt = mod.pamt
    if not pamt.covers(hpa):
        return Regs(TDX_OPERAND_ADDR_RANGE_ERROR | OPERAND_ID_RCX)
    st, size = pamt.walk(hpa, TDX_LOCK_EXCLUSIVE, walk_to_leaf_size=False)
    if st:
        return Regs(st | OPERAND_ID_RCX)
    held.push(lambda: pamt.unwalk(hpa, TDX_LOCK_EXCLUSIVE, size))
    mod.point(caller, "pamt_locked")
    pt = pamt.page_type(hpa)
    if pt in (PT_NDA, PT_RSVD):
        return Regs(TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX)
    owner = pamt.owner(hpa)
    out = lambda status: Regs(status, rcx=pt, rdx=owner, r8=size)
    if size and hpa & ((PAGE << (9 * size)) - 1):
        return out(TDX_OPERAND_INVALID | OPERAND_ID_RCX)  # a 2M page is reclaimed at its head
    npages = 512**size
    if pt != PT_TDR:
        td, st = lock_implicit_tdr(mod, held, owner, TDX_LOCK_SHARED)
        if st:
            return out(st)
        if td.lifecycle != TD_TEARDOWN:
            return out(TDX_LIFECYCLE_STATE_INCORRECT)
        td.chldcnt -= npages
        if pt == PT_TDVPR:
            mod.vcpus.pop(hpa)
            td.vcpus.pop(hpa, None)
    else:
        td = mod.tds[hpa]
        if td.lifecycle != TD_TEARDOWN:
            return out(TDX_LIFECYCLE_STATE_INCORRECT)
        if td.chldcnt:
            return out(TDX_TD_ASSOCIATED_PAGES_EXIST)
        del mod.tds[hpa]
    mod.release(hpa, npages)
    return out(TDX_SUCCESS)


@seamcall_leaf
def tdh_phymem_page_wbinvd(mod, r, caller, held):
    """tdh_phymem_page_wbinvd.c: only the HKID bits are stripped from RCX; then the checks of a
    private 4K HPA (aligned, below MAX_PA, in a TDMR, PT_NDA) with its PAMT entry held shared."""
    hkid_mask = ((1 << mod.maxphyaddr) - 1) & ~((1 << mod.x86_phys_bits) - 1)
    hpa = r.rcx & ~hkid_mask
    if hpa & 0xFFF or hpa >> mod.maxphyaddr:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    st = check_and_lock_private_hpa(mod, held, hpa, OPERAND_ID_RCX, TDX_LOCK_SHARED, PT_NDA)
    if st:
        return Regs(st)
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_phymem_cache_wb(mod, r, caller, held):
    """tdh_phymem_cache_wb.c: RCX the command (0 start, 1 resume: the model is never interrupted,
    so both do the whole job); with no HKID flushed (TDH.MNG.VPFLUSHDONE) and waiting,
    TDX_NO_HKID_READY_TO_WBCACHE; else every such TD's key is clean (one package here)."""
    if r.rcx > 1:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    ready = [td for td in mod.tds.values() if td.wbcache_needed]
    if not ready:
        return Regs(TDX_NO_HKID_READY_TO_WBCACHE)
    for td in ready:
        td.wbcache_needed = False
    return Regs(TDX_SUCCESS)


# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {
    TDH_PHYMEM_PAGE_RECLAIM: tdh_phymem_page_reclaim,
    TDH_PHYMEM_PAGE_WBINVD: tdh_phymem_page_wbinvd,
    TDH_PHYMEM_CACHE_WB: tdh_phymem_cache_wb,
}
