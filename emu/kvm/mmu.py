"""The MMU entry points around the TDP MMU (arch/x86/kvm/mmu/mmu.c).

kvm_mmu_page_fault -> kvm_mmu_do_page_fault -> kvm_tdp_page_fault:
top up the vCPU's memory caches (outside mmu_lock, where allocation may sleep),
fault in the pfn from the memslot, take mmu_lock for read, and map.
"""

from .uapi import KVM_MEMSLOT_INVALID
from .spte import PG_LEVEL_4K, PG_LEVEL_1G, KVM_PAGES_PER_HPAGE, PT64_ROOT_MAX_LEVEL, \
    is_mmio_spte, get_mmio_spte_generation, MMIO_SPTE_GEN_MASK

# Page-fault error code bits KVM uses (kvm_host.h)
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4
PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_GUEST_PAGE_MASK = 1 << 33
PFERR_PRIVATE_ACCESS = 1 << 49

# enum RET_PF_* (mmu_internal.h)
RET_PF_CONTINUE, RET_PF_RETRY, RET_PF_EMULATE, RET_PF_WRITE_PROTECTED, RET_PF_INVALID, RET_PF_FIXED, \
    RET_PF_SPURIOUS = range(7)
RET_PF_NAMES = ["CONTINUE", "RETRY", "EMULATE", "WRITE_PROTECTED", "INVALID", "FIXED", "SPURIOUS"]

KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G
KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE = 40

ENOMEM = 12
EFAULT = 14


class KvmMmuMemoryCache:
    """struct kvm_mmu_memory_cache: pages allocated ahead, outside mmu_lock."""

    def __init__(self, kvm, name, init_value=0):
        self.kvm = kvm
        self.name = name
        self.objects = []
        # Shadow pages start with every entry SHADOW_NONPRESENT_VALUE (kvm_mmu_create sets
        # init_value), so hardware sees suppress-#VE non-present entries, never 0.
        self.init_page = (init_value.to_bytes(8, "little") * 512) if init_value else None

    def _new_page(self):
        page = self.kvm.alloc_page_for(self.name)
        if page is not None and self.init_page is not None:
            self.kvm.mem.buf[page:page + 4096] = self.init_page
        return page

    def topup(self, min_objs):
        """kvm_mmu_topup_memory_cache(): fill to capacity; -ENOMEM if fewer than ``min_objs`` could be had."""
        if len(self.objects) >= min_objs:
            return 0
        while len(self.objects) < KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE:
            page = self._new_page()
            if page is None:
                return -ENOMEM if len(self.objects) < min_objs else 0
            self.objects.append(page)
        return 0

    def alloc(self):
        """kvm_mmu_memory_cache_alloc(): never fails inside mmu_lock, because of the top-up."""
        if not self.objects:
            self.kvm.warn(f"{self.name} empty inside mmu_lock")
            page = self._new_page()
            if page is None:
                raise MemoryError(f"{self.name}: allocation failed with the cache empty (BUG_ON)")
            return page
        return self.objects.pop()

    def free_all(self):
        for page in self.objects:
            self.kvm.host.free_kernel_page(page)
        self.objects.clear()


class KvmPageFault:
    """struct kvm_page_fault"""
    __slots__ = ("addr", "error_code", "prefetch", "exec", "write", "present", "rsvd", "user", "is_tdp",
                 "is_private", "max_level", "req_level", "goal_level", "gfn", "slot", "pfn", "map_writable",
                 "huge_page_disallowed", "mmu_seq")

    def __init__(self, addr, error_code, prefetch=False):
        self.addr = addr
        self.error_code = error_code
        self.prefetch = prefetch
        self.exec = bool(error_code & PFERR_FETCH_MASK)
        self.write = bool(error_code & PFERR_WRITE_MASK)
        self.present = bool(error_code & PFERR_PRESENT_MASK)
        self.rsvd = bool(error_code & PFERR_RSVD_MASK)
        self.user = bool(error_code & PFERR_USER_MASK)
        self.is_tdp = True
        self.is_private = bool(error_code & PFERR_PRIVATE_ACCESS)
        self.max_level = KVM_MAX_HUGEPAGE_LEVEL
        self.req_level = PG_LEVEL_4K
        self.goal_level = PG_LEVEL_4K
        self.huge_page_disallowed = False
        self.slot = None
        self.pfn = None
        self.map_writable = False


def mmu_topup_memory_caches(vcpu):
    """mmu_topup_memory_caches(): enough pages for a full walk of new tables (and their S-EPT pages)."""
    r = vcpu.mmu_shadow_page_cache.topup(PT64_ROOT_MAX_LEVEL)
    if r:
        return r
    if vcpu.kvm.has_mirrored_tdp:
        r = vcpu.mmu_external_spt_cache.topup(PT64_ROOT_MAX_LEVEL)
    return r


def kvm_mmu_max_mapping_level(kvm, slot, gfn, is_private):
    """The largest level the memslot and its backing allow at ``gfn``."""
    if is_private and kvm.has_mirrored_tdp:
        return kvm.x86_ops.private_max_mapping_level(kvm, gfn)
    level = min(KVM_MAX_HUGEPAGE_LEVEL, slot.backing_level)
    while level > PG_LEVEL_4K:
        if not slot.lpage_allowed(gfn, level) or kvm.has_mirrored_tdp and _has_private(kvm, gfn, level):
            # KVM_LPAGE_MIXED_FLAG: a shared huge page may not cover a private gfn.
            level -= 1
            continue
        break
    return level


def _has_private(kvm, gfn, level):
    """hugepage_has_attrs() is false: some gfn of the huge page around ``gfn`` is private."""
    pages = KVM_PAGES_PER_HPAGE(level)
    start = gfn & -pages
    kvm.touch("attributes", False)
    return kvm.private_gfns.intersects(start, start + pages)


def kvm_mmu_hugepage_adjust(vcpu, fault):
    """Pick the goal level; align the pfn to it."""
    fault.huge_page_disallowed = fault.exec and vcpu.kvm.nx_huge_pages
    if fault.slot is None or fault.max_level == PG_LEVEL_4K:
        return
    fault.req_level = min(fault.max_level, kvm_mmu_max_mapping_level(vcpu.kvm, fault.slot, fault.gfn,
                                                                     fault.is_private))
    if fault.req_level == PG_LEVEL_4K or fault.huge_page_disallowed:
        return
    fault.goal_level = fault.req_level
    mask = KVM_PAGES_PER_HPAGE(fault.goal_level) - 1
    assert (fault.gfn & mask) == (fault.pfn & mask), "memslot backing misaligned for a huge page"
    fault.pfn &= ~mask


def kvm_mmu_faultin_pfn(vcpu, fault):
    """Find the memslot and the host page backing ``fault.gfn``.

    Returns RET_PF_CONTINUE, or RET_PF_EMULATE for a write to a read-only slot
    (KVM_PFN_ERR_RO_FAULT: the access is emulated, which exits to userspace as
    MMIO), or a negative errno when the backing cannot be had.
    """
    kvm = vcpu.kvm
    slot = kvm.gfn_to_memslot(fault.gfn)
    fault.slot = slot
    if slot is not None and slot.flags & KVM_MEMSLOT_INVALID:
        # The slot is being deleted or moved: retry until the new memslots are installed.
        return RET_PF_RETRY
    # Snapshot the invalidation sequence before looking up the pfn (smp_rmb): an invalidation
    # that starts after this is caught by is_page_fault_stale() under mmu_lock.
    fault.mmu_seq = kvm.mmu_invalidate_seq
    if slot is not None and kvm.mmu_invalidate_retry_gfn_unsafe(fault.mmu_seq, fault.gfn):
        return _invalidate_retry(vcpu)
    if kvm.sched is not None:
        kvm.sched.point(vcpu.vcpu_id, "faultin_pfn")
    if kvm.has_mirrored_tdp and (slot is None and fault.is_private
                                 or slot is not None and fault.is_private != kvm.mem_is_private(fault.gfn)):
        # The access disagrees with the page's attribute (or a private GPA has no slot):
        # userspace decides (kvm_mmu_prepare_memory_fault_exit, -EFAULT).
        vcpu.prepare_memory_fault_exit(fault)
        return -EFAULT
    if slot is None:
        # No memslot: MMIO.  The TDP MMU installs an MMIO SPTE and the access is emulated.
        fault.pfn = 0
        return RET_PF_CONTINUE
    if fault.write and slot.readonly:
        return RET_PF_EMULATE
    pfn = kvm.faultin_pfn(slot, fault.gfn, fault.write, fault.is_private)
    if pfn is None:
        return -EFAULT
    if kvm.sched is not None:
        kvm.sched.point(vcpu.vcpu_id, "faultin_pfn_done")
    if kvm.mmu_invalidate_retry_gfn_unsafe(fault.mmu_seq, fault.gfn):
        return _invalidate_retry(vcpu)
    fault.pfn = pfn
    fault.map_writable = not slot.readonly
    return RET_PF_CONTINUE


def _invalidate_retry(vcpu):
    """RET_PF_RETRY because an invalidation of the gfn runs: the vCPU waits for it to end
    (a yield: it refaults until then, and the invalidating task must get to run)."""
    sched = vcpu.kvm.sched
    if sched is not None:
        sched.point(vcpu.vcpu_id, "mmu_invalidate_retry")
    return RET_PF_RETRY


def handle_mmio_page_fault(vcpu, addr):
    """An EPT misconfig: emulate if it is one of our MMIO SPTEs."""
    spte = vcpu.kvm.get_leaf_spte(vcpu, addr)
    if spte is None:
        return RET_PF_RETRY
    if is_mmio_spte(spte, vcpu.kvm.shadow_mmio_value):
        # check_mmio_spte(): an SPTE from before the last memslot change may be wrong now
        # (a slot was added there): let the normal fault path replace it.
        if get_mmio_spte_generation(spte) != vcpu.kvm.memslots_generation & MMIO_SPTE_GEN_MASK:
            return RET_PF_INVALID
        return RET_PF_EMULATE
    # Not an MMIO SPTE (any more): another vCPU changed it since the CPU's walk.  Let the guest
    # fault again on the address (upstream's answer, not a KVM bug).
    return RET_PF_RETRY
