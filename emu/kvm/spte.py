"""SPTE encoding, EPT flavour (arch/x86/kvm/mmu/spte.h, spte.c:kvm_mmu_set_ept_masks).

Every bit is named once here; masks are derived from the names.
"""

from ..hw.ept import EPT_R, EPT_W, EPT_X, EPT_PS, EPT_A, EPT_D, EPT_IPAT, EPT_SVE, MT_WB, ADDR_MASK

PT_PAGE_SIZE_MASK = EPT_PS
PT_WRITABLE_MASK = EPT_W
SPTE_MMU_PRESENT_MASK = 1 << 11
SPTE_BASE_ADDR_MASK = ADDR_MASK  # bits MAXPHYADDR-1:12 (KVM: 51:12)

VMX_EPT_READABLE_MASK = EPT_R
VMX_EPT_WRITABLE_MASK = EPT_W
VMX_EPT_EXECUTABLE_MASK = EPT_X
VMX_EPT_RWX_MASK = EPT_R | EPT_W | EPT_X
VMX_EPT_IPAT_BIT = EPT_IPAT
VMX_EPT_MT_EPTE_SHIFT = 3
VMX_EPT_ACCESS_BIT = EPT_A
VMX_EPT_DIRTY_BIT = EPT_D
VMX_EPT_SUPPRESS_VE_BIT = EPT_SVE

SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_ENABLED = 0 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_DISABLED = 1 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_WRPROT_ONLY = 2 << SPTE_TDP_AD_SHIFT

EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58

# kvm_mmu_set_ept_masks(has_ad_bits=true, has_exec_only=true)
shadow_user_mask = VMX_EPT_READABLE_MASK
shadow_accessed_mask = VMX_EPT_ACCESS_BIT
shadow_dirty_mask = VMX_EPT_DIRTY_BIT
shadow_nx_mask = 0
shadow_x_mask = VMX_EPT_EXECUTABLE_MASK
# Exec-only is supported, so R is not part of the present mask; SVE is, so every
# present SPTE suppresses #VE and a non-present one causes an EPT violation.
shadow_present_mask = VMX_EPT_SUPPRESS_VE_BIT
shadow_host_writable_mask = EPT_SPTE_HOST_WRITABLE
shadow_mmu_writable_mask = EPT_SPTE_MMU_WRITABLE

SHADOW_NONPRESENT_VALUE = 1 << 63
# The seed patch's name; upstream renamed it FROZEN_SPTE.  Bits 5, 7, 8, 10 and 63:
# no RWX (hardware sees a non-present entry) and no MMU-present bit (KVM too).
REMOVED_SPTE = SHADOW_NONPRESENT_VALUE | 0x5A0
FROZEN_SPTE = REMOVED_SPTE

# MMIO SPTEs: EPT misconfig value W|X (0b110), so an access exits as a misconfig.  The value
# is per VM (kvm->arch.shadow_mmio_value, Kvm.shadow_mmio_value): a TD's is 0
# (kvm_mmu_set_mmio_spte_value(kvm, 0) in tdx_vm_init()), so its MMIO SPTEs have RWX = 0 and
# suppress-#VE clear, and an access is a #VE in the guest, not an exit.  The mask is global.
shadow_mmio_mask = VMX_EPT_RWX_MASK | VMX_EPT_SUPPRESS_VE_BIT
shadow_mmio_value = VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK
VMX_EPT_MISCONFIG_WX_VALUE = VMX_EPT_WRITABLE_MASK | VMX_EPT_EXECUTABLE_MASK
shadow_mmio_access_mask = 0  # ACC bits are not kept in EPT MMIO SPTEs in this model

# Memory type bits KVM ORs into leaf SPTEs (vmx_get_mt_mask) for ordinary RAM.
MT_MASK_DEFAULT_VM = (MT_WB << VMX_EPT_MT_EPTE_SHIFT) | VMX_EPT_IPAT_BIT  # IGNORE_GUEST_PAT quirk on
MT_MASK_TDX_VM = MT_WB << VMX_EPT_MT_EPTE_SHIFT  # TDX disables the quirk

ACC_EXEC_MASK = 1
ACC_WRITE_MASK = PT_WRITABLE_MASK
ACC_USER_MASK = 1 << 2
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G = 1, 2, 3
PT64_ROOT_MAX_LEVEL = 5
SPTE_ENT_PER_PAGE = 512


def KVM_PAGES_PER_HPAGE(level):
    return 1 << (9 * (level - 1))


def SPTE_LEVEL_SHIFT(level):
    return 12 + 9 * (level - 1)


# By level (lookups, not calls, for the walks of the fault path): KVM_PAGES_PER_HPAGE(), and
# where a GFN's bits of SPTE_INDEX() start (SPTE_INDEX(gfn << 12, level) is
# (gfn >> GFN_INDEX_SHIFT[level]) & SPTE_INDEX_MASK).
PAGES_PER_HPAGE = (0,) + tuple(KVM_PAGES_PER_HPAGE(level) for level in range(1, PT64_ROOT_MAX_LEVEL + 1))
GFN_INDEX_SHIFT = (0,) + tuple(SPTE_LEVEL_SHIFT(level) - 12 for level in range(1, PT64_ROOT_MAX_LEVEL + 1))
SPTE_INDEX_MASK = 511


def gfn_round_for_level(gfn, level):
    return gfn & -PAGES_PER_HPAGE[level]


def SPTE_INDEX(addr, level):
    return (addr >> SPTE_LEVEL_SHIFT(level)) & SPTE_INDEX_MASK


def is_shadow_present_pte(spte):
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_large_pte(spte):
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte, level):
    return level == PG_LEVEL_4K or is_large_pte(spte)


def is_removed_spte(spte):
    return spte == REMOVED_SPTE


is_frozen_spte = is_removed_spte


def is_mmio_spte(spte, mmio_value=shadow_mmio_value):
    """is_mmio_spte(kvm, spte): pass the VM's ``kvm.shadow_mmio_value`` (0 for a TD)."""
    return (spte & shadow_mmio_mask) == mmio_value and not spte & SPTE_MMU_PRESENT_MASK


def is_writable_pte(spte):
    return bool(spte & PT_WRITABLE_MASK)


def spte_to_pfn(spte):
    return (spte & SPTE_BASE_ADDR_MASK) >> 12


def is_accessed_spte(spte):
    return bool(spte & shadow_accessed_mask)


def is_dirty_spte(spte):
    return bool(spte & shadow_dirty_mask)


def is_ept_ve_possible(spte):
    """An SPTE hardware would turn into a #VE: SVE clear and not the W|X MMIO value.  (A TD's
    MMIO SPTE is one, on purpose: upstream's KVM_MMU_WARN_ON of it is compiled only with
    CONFIG_KVM_PROVE_MMU, and this model does not check it on writes.)"""
    return not spte & VMX_EPT_SUPPRESS_VE_BIT and (spte & VMX_EPT_RWX_MASK) != VMX_EPT_MISCONFIG_WX_VALUE


def make_spte(level, pfn, pte_access, mt_mask, host_writable=True, prefetch=False, nx_huge_pages=False):
    """make_spte() for a TDP MMU leaf: (spte, wrprot).  With the NX huge page mitigation a huge
    leaf is never executable: a fetch there faults, and is mapped at 4K."""
    if level > PG_LEVEL_4K and pte_access & ACC_EXEC_MASK and nx_huge_pages:
        pte_access &= ~ACC_EXEC_MASK
    spte = SPTE_MMU_PRESENT_MASK | shadow_present_mask
    if not prefetch:
        spte |= shadow_accessed_mask
    if pte_access & ACC_EXEC_MASK:
        spte |= shadow_x_mask
    if pte_access & ACC_USER_MASK:
        spte |= shadow_user_mask
    if level > PG_LEVEL_4K:
        spte |= PT_PAGE_SIZE_MASK
    spte |= mt_mask
    if host_writable:
        spte |= shadow_host_writable_mask
    else:
        pte_access &= ~ACC_WRITE_MASK
    spte |= pfn << 12
    if pte_access & ACC_WRITE_MASK:
        spte |= PT_WRITABLE_MASK | shadow_mmu_writable_mask | shadow_dirty_mask
    return spte, False


def make_nonleaf_spte(child_hpa):
    return (
        SPTE_MMU_PRESENT_MASK
        | child_hpa
        | shadow_present_mask
        | PT_WRITABLE_MASK
        | shadow_user_mask
        | shadow_x_mask
        | shadow_accessed_mask
    )


MMIO_SPTE_GEN_LOW_SHIFT = 3  # generation bits 7:0 in SPTE bits 10:3
MMIO_SPTE_GEN_HIGH_SHIFT = 52  # generation bits 18:8 in SPTE bits 62:52
MMIO_SPTE_GEN_MASK = (1 << 19) - 1


def make_mmio_spte(gfn, generation=0, mmio_value=shadow_mmio_value):
    """make_mmio_spte(): the VM's MMIO value (W|X, a misconfig; a TD's is 0), the GFN, and the
    memslots generation it was made in."""
    gen = generation & MMIO_SPTE_GEN_MASK
    return (
        mmio_value | (gfn << 12) | ((gen & 0xFF) << MMIO_SPTE_GEN_LOW_SHIFT) | ((gen >> 8) << MMIO_SPTE_GEN_HIGH_SHIFT)
    )


def get_mmio_spte_generation(spte):
    return ((spte >> MMIO_SPTE_GEN_LOW_SHIFT) & 0xFF) | (((spte >> MMIO_SPTE_GEN_HIGH_SHIFT) & 0x7FF) << 8)


def get_mmio_spte_gfn(spte):
    return (spte & SPTE_BASE_ADDR_MASK & ((1 << 52) - 1)) >> 12


def spte_str(spte):
    """A short decoding for traces and table dumps."""
    if spte == SHADOW_NONPRESENT_VALUE:
        return "nonpresent"
    if spte == REMOVED_SPTE:
        return "REMOVED"
    if is_mmio_spte(spte):
        return f"mmio gfn {get_mmio_spte_gfn(spte):#x}"
    if not is_shadow_present_pte(spte):
        return f"nonpresent {spte:#x}"
    p = "".join(c if spte & b else "-" for c, b in (("R", EPT_R), ("W", EPT_W), ("X", EPT_X)))
    flags = [p, f"pfn {spte_to_pfn(spte):#x}"]
    if is_large_pte(spte):
        flags.append("PS")
    if spte & EPT_A:
        flags.append("A")
    if spte & EPT_D:
        flags.append("D")
    return " ".join(flags)
