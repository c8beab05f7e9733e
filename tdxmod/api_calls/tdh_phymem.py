"""Physical page leaves: TDH.PHYMEM.PAGE.RECLAIM, TDH.PHYMEM.PAGE.WBINVD, TDH.PHYMEM.CACHE.WB.

Follows src/vmm_dispatcher/api_calls/tdh_phymem_page_reclaim.c, tdh_phymem_page_wbinvd.c and
tdh_phymem_cache_wb.c of the TDX module (tdx_1.5).
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import PAGE


def tdh_phymem_page_reclaim(mod, r, caller):
    """tdh_phymem_page_reclaim.c: operand, TDMR, PAMT lock, page type; then the outputs (RCX page
    type, RDX owner, R8 size) are set, and the alignment of a large page and the owner TD's
    lifecycle are checked with them in place."""
    hpa = r.rcx
    if hpa & 0xFFF or hpa >> mod.maxphyaddr or hpa >> mod.x86_phys_bits:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    if not mod.pamt.covers(hpa):
        return Regs(TDX_OPERAND_ADDR_RANGE_ERROR | OPERAND_ID_RCX)
    if not mod.pamt.try_lock(hpa):
        return Regs(TDX_OPERAND_BUSY | OPERAND_ID_RCX)
    try:
        pt = mod.pamt.page_type(hpa)
        if pt in (PT_NDA, PT_RSVD):
            return Regs(TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX)
        owner = mod.pamt.owner(hpa)
        size = mod.pamt.page_size(hpa)
        out = lambda status: Regs(status, rcx=pt, rdx=owner, r8=size)
        if size and hpa & ((PAGE << (9 * size)) - 1):
            return out(TDX_OPERAND_INVALID | OPERAND_ID_RCX)      # a 2M page is reclaimed at its head
        npages = 512 ** size
        if pt != PT_TDR:
            td = mod.tds.get(owner)
            if td is None or td.lifecycle != TD_TEARDOWN:
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
    finally:
        mod.pamt.unlock(hpa)


def tdh_phymem_page_wbinvd(mod, r, caller):
    """tdh_phymem_page_wbinvd.c: only the HKID bits are stripped from RCX; then the usual checks
    of a private 4K HPA (aligned, below MAX_PA, in a TDMR, PT_NDA)."""
    hkid_mask = ((1 << mod.maxphyaddr) - 1) & ~((1 << mod.x86_phys_bits) - 1)
    hpa = r.rcx & ~hkid_mask
    if hpa & 0xFFF or hpa >> mod.maxphyaddr:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    if not mod.pamt.covers(hpa):
        return Regs(TDX_OPERAND_ADDR_RANGE_ERROR | OPERAND_ID_RCX)
    if mod.pamt.page_type(hpa) != PT_NDA:
        return Regs(TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX)
    return Regs(TDX_SUCCESS)


def tdh_phymem_cache_wb(mod, r, caller):
    """Write back and invalidate the caches (one package here): every blocked TD's key is clean."""
    for td in mod.tds.values():
        td.wbcache_needed = False
    return Regs(TDX_SUCCESS)



# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {
    TDH_PHYMEM_PAGE_RECLAIM: tdh_phymem_page_reclaim,
    TDH_PHYMEM_PAGE_WBINVD: tdh_phymem_page_wbinvd,
    TDH_PHYMEM_CACHE_WB: tdh_phymem_cache_wb,
}
