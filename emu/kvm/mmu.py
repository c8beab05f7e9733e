"""The MMU entry points around the TDP MMU (arch/x86/kvm/mmu/mmu.c).

kvm_mmu_page_fault -> kvm_mmu_do_page_fault -> kvm_tdp_page_fault:
top up the vCPU's memory caches (outside mmu_lock, where allocation may sleep),
fault in the pfn from the memslot, take mmu_lock for read, and map.
"""

from ..hw.memory import OutOfHostMemory
from .kvm_host import KvmIoctlError, KvmMemoryFault, KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, EIO, ENOENT
from .tdp_iter import TdpIter, for_each_tdp_pte_min_level
from .tdp_mmu import KVM_DIRECT_ROOTS, KVM_VALID_ROOTS
from .uapi import (
    KVM_MEMSLOT_INVALID,
    KVM_EXIT_MEMORY_FAULT,
    KVM_EXIT_MMIO,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SW_PROTECTED_VM,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
)
from .x86_ops import X86EMUL_RETRY_INSTR
from .spte import (
    PG_LEVEL_4K,
    KVM_PAGES_PER_HPAGE,
    PT64_ROOT_MAX_LEVEL,
    is_mmio_spte,
    get_mmio_spte_generation,
    MMIO_SPTE_GEN_MASK,
)

from .mmu_internal import (  # noqa: F401  (the names mmu.c users import from here)
    PFERR_PRESENT_MASK,
    PFERR_WRITE_MASK,
    PFERR_USER_MASK,
    PFERR_RSVD_MASK,
    PFERR_FETCH_MASK,
    PFERR_GUEST_FINAL_MASK,
    PFERR_GUEST_PAGE_MASK,
    PFERR_PRIVATE_ACCESS,
    RET_PF_CONTINUE,
    RET_PF_RETRY,
    RET_PF_EMULATE,
    RET_PF_WRITE_PROTECTED,
    RET_PF_INVALID,
    RET_PF_FIXED,
    RET_PF_SPURIOUS,
    RET_PF_NAMES,
    KVM_MAX_HUGEPAGE_LEVEL,
    KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE,
    KvmPageFault,
)

ENOMEM = 12
EFAULT = 14
KVM_LPAGE_MIXED_FLAG = 1 << 31
KVM_LPAGE_GUEST_INHIBIT_FLAG = 1 << 30


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
            self.kvm.mem.buf[page : page + 4096] = self.init_page
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


def mmu_topup_memory_caches(vcpu):
    """mmu_topup_memory_caches(): enough pages for a full walk of new tables (and their S-EPT pages)."""
    r = vcpu.mmu_shadow_page_cache.topup(PT64_ROOT_MAX_LEVEL)
    if r:
        return r
    if vcpu.kvm.has_mirrored_tdp:
        r = vcpu.mmu_external_spt_cache.topup(PT64_ROOT_MAX_LEVEL)
    return r


def kvm_mmu_max_mapping_level(kvm, slot, gfn, is_private):
    """The largest level the memslot and its backing allow at ``gfn``: the host's page size (for
    private memory the guest_memfd folio's, with the vendor's limit, gmem_max_mapping_level():
    4K for a VM without TDX's huge pages, as 6.16's kvm_gmem_get_pfn() gives order-0 folios),
    then lpage_info level by level: the huge page inside the slot and aligned alike, not mixed
    (KVM_LPAGE_MIXED_FLAG: all of it private, or all shared), not inhibited by the guest
    (KVM_LPAGE_GUEST_INHIBIT_FLAG)."""
    level = min(KVM_MAX_HUGEPAGE_LEVEL, slot.backing_level)
    if is_private:
        # kvm_max_private_mapping_level()
        level = min(level, kvm.x86_ops.gmem_max_mapping_level(kvm, gfn))
    while level > PG_LEVEL_4K:
        if is_private:
            disallowed = (
                not _gmem_lpage_allowed(slot, gfn, level)
                or not _all_private(kvm, gfn, level)
                or hugepage_test_guest_inhibit(kvm, slot, gfn, level)
            )
        else:
            # KVM_LPAGE_MIXED_FLAG: a shared huge page may not cover a private gfn.
            disallowed = not slot.lpage_allowed(gfn, level) or kvm.has_private_mem and _has_private(kvm, gfn, level)
        if disallowed:
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


def _all_private(kvm, gfn, level):
    """hugepage_has_attrs(PRIVATE): every gfn of the huge page around ``gfn`` is private."""
    pages = KVM_PAGES_PER_HPAGE(level)
    start = gfn & -pages
    kvm.touch("attributes", False)
    return kvm.private_gfns.covers(start, start + pages)


def _gmem_lpage_allowed(slot, gfn, level):
    """The huge page lies inside the slot and guest_memfd's offset is aligned like the gfn (a
    folio of that order can back it: kvm_gmem_get_pfn()'s max_order)."""
    pages = KVM_PAGES_PER_HPAGE(level)
    start = gfn & -pages
    if start < slot.base_gfn or start + pages > slot.base_gfn + slot.npages:
        return False
    return ((slot.base_gfn ^ (slot.gmem_addr >> 12)) & (pages - 1)) == 0


# -- KVM_LPAGE_GUEST_INHIBIT_FLAG (v5 40/45): one-way, set by TDX when the guest ACCEPTs below a mapping's level
def _lpage_key(slot, gfn, level):
    return slot.id, level, gfn >> (9 * (level - 1))


def _lpage_point(kvm, who, key, write):
    """lpage_info is shared state read without mmu_lock: a scheduling point, for the explorer."""
    kvm.touch(("lpage_info", key), write)
    sched = kvm.sched
    if sched is not None:
        sched.point(who, "lpage_info")


def hugepage_set_guest_inhibit(kvm, slot, gfn, level, who=None):
    """hugepage_set_guest_inhibit(): no mapping at ``level`` or above for the huge page around
    ``gfn``.  Never cleared: a vCPU tests it without mmu_lock (tdx_handle_mismatched_accept()),
    and a stale "set" would make it skip the split it needs."""
    key = _lpage_key(slot, gfn, level)
    _lpage_point(kvm, who, key, True)
    slot.lpage_info[key] = slot.lpage_info.get(key, 0) | KVM_LPAGE_GUEST_INHIBIT_FLAG


def hugepage_test_guest_inhibit(kvm, slot, gfn, level, who=None):
    """hugepage_test_guest_inhibit() (read without mmu_lock by TDX, under it by the fault)."""
    key = _lpage_key(slot, gfn, level)
    if who is not None:
        _lpage_point(kvm, who, key, False)
    else:
        kvm.touch(("lpage_info", key), False)
    return bool(slot.lpage_info.get(key, 0) & KVM_LPAGE_GUEST_INHIBIT_FLAG)


def hugepage_clear_guest_inhibit(kvm, slot, gfn, level, who=None):
    """Not upstream (the flag is one-way): only the guest-inhibit-cleared bug switch clears it."""
    key = _lpage_key(slot, gfn, level)
    _lpage_point(kvm, who, key, True)
    slot.lpage_info[key] = slot.lpage_info.get(key, 0) & ~KVM_LPAGE_GUEST_INHIBIT_FLAG


def kvm_mmu_hugepage_adjust(vcpu, fault):
    """Pick the goal level; align the pfn to it."""
    fault.huge_page_disallowed = fault.exec and vcpu.kvm.nx_huge_pages
    if fault.slot is None or fault.max_level == PG_LEVEL_4K:
        return
    fault.req_level = min(fault.max_level, kvm_mmu_max_mapping_level(vcpu.kvm, fault.slot, fault.gfn, fault.is_private))
    if fault.req_level == PG_LEVEL_4K or fault.huge_page_disallowed:
        return
    fault.goal_level = fault.req_level
    mask = KVM_PAGES_PER_HPAGE(fault.goal_level) - 1
    assert (fault.gfn & mask) == (fault.pfn & mask), "memslot backing misaligned for a huge page"
    fault.pfn &= ~mask


def kvm_mmu_faultin_pfn(vcpu, fault):
    """Find the memslot and the host page backing ``fault.gfn`` (kvm_mmu_faultin_pfn()).

    In upstream's order: snapshot the invalidation sequence; a fault whose private/shared
    kind disagrees with the gfn's attribute goes to userspace (KVM_EXIT_MEMORY_FAULT); no
    memslot is MMIO (a private fault with no memslot goes to userspace too); a memslot being
    deleted or moved (KVM_MEMSLOT_INVALID) makes the fault retry; then the pfn, from
    guest_memfd for a private fault (a slot without one cannot be private: KVM_EXIT_MEMORY_FAULT)
    and through the VMM's mapping for a shared one.  The memslot lookup is done under
    kvm->srcu (KVM_RUN holds it around the fault): the slot the fault found is not freed under it.

    Returns RET_PF_CONTINUE, RET_PF_RETRY, RET_PF_EMULATE for a write to a read-only slot
    (KVM_PFN_ERR_RO_FAULT: the access is emulated, which exits to userspace as MMIO), or a
    negative errno (-EFAULT, with kvm_run filled in for a memory fault exit).
    """
    kvm = vcpu.kvm
    slot = kvm.gfn_to_memslot(fault.gfn)
    fault.slot = slot
    # Snapshot the invalidation sequence before looking at attributes and the pfn (smp_rmb): an
    # invalidation that starts after this is caught by is_page_fault_stale() under mmu_lock.
    fault.mmu_seq = kvm.mmu_invalidate_seq
    if fault.is_private != kvm.mem_is_private(fault.gfn):
        # The access disagrees with the page's attribute: userspace decides
        # (kvm_mmu_prepare_memory_fault_exit, -EFAULT).
        vcpu.prepare_memory_fault_exit(fault)
        return -EFAULT
    if slot is None:
        # kvm_handle_noslot_fault(): a private access cannot be MMIO; a shared one is (the TDP MMU
        # installs an MMIO SPTE and the access is emulated).
        if fault.is_private:
            vcpu.prepare_memory_fault_exit(fault)
            return -EFAULT
        fault.pfn = 0
        return RET_PF_CONTINUE
    if slot.flags & KVM_MEMSLOT_INVALID:
        # The slot is being deleted or moved: retry until the new memslots are installed (a
        # yield: the guest faults again until then, and the task changing them must get to run).
        # The retries wait for that task's progress, which may take long (a zap of a whole root):
        # they are no livelock of this vCPU, and its watchdog does not count them.
        vcpu.budget = vcpu.exit_limit
        sched = kvm.sched
        if sched is not None:
            sched.point(vcpu.vcpu_id, "mmu_invalidate_retry")
        return RET_PF_RETRY
    if kvm.mmu_invalidate_retry_gfn_unsafe(fault.mmu_seq, fault.gfn):
        return _invalidate_retry(vcpu)
    if kvm.sched is not None:
        kvm.sched.point(vcpu.vcpu_id, "faultin_pfn")
    if fault.is_private and not slot.can_be_private:
        # kvm_mmu_faultin_pfn_private(): a private fault on a slot without guest_memfd.
        vcpu.prepare_memory_fault_exit(fault)
        return -EFAULT
    if fault.write and slot.readonly and not fault.is_private:
        return RET_PF_EMULATE
    pfn = kvm.faultin_pfn(slot, fault.gfn, fault.write, fault.is_private)
    if pfn is None:
        return -EFAULT
    if kvm.sched is not None:
        kvm.sched.point(vcpu.vcpu_id, "faultin_pfn_done")
    if kvm.mmu_invalidate_retry_gfn_unsafe(fault.mmu_seq, fault.gfn):
        return _invalidate_retry(vcpu)
    fault.pfn = pfn
    fault.map_writable = fault.is_private or not slot.readonly
    return RET_PF_CONTINUE


def _invalidate_retry(vcpu):
    """RET_PF_RETRY because an invalidation of the gfn runs: the vCPU waits for it to end
    (a yield: it refaults until then, and the invalidating task must get to run)."""
    kvm = vcpu.kvm
    if kvm.mmu_invalidate_in_progress:
        # Waiting for another task's invalidation, however long it takes (a conversion of
        # megabytes of a TD's memory): no livelock of this vCPU, not the watchdog's business.
        vcpu.budget = vcpu.exit_limit
    sched = kvm.sched
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
        # (a slot was added there), and so may one made while a change is in progress (the
        # generation is bumped when it ends): let the normal fault path replace it.
        kvm = vcpu.kvm
        if (
            kvm.memslots_gen_in_progress
            or get_mmio_spte_generation(spte) != kvm.memslots_generation & MMIO_SPTE_GEN_MASK
        ):
            return RET_PF_INVALID
        if kvm.checker is not None:
            kvm.checker.mmio_spte_taken(kvm, addr)
        return RET_PF_EMULATE
    # Not an MMIO SPTE (any more): another vCPU changed it since the CPU's walk.  Let the guest
    # fault again on the address (upstream's answer, not a KVM bug).
    return RET_PF_RETRY


class KvmMmu:
    """The VM-wide part of mmu.c: allocation for the MMU, zapping (kvm_mmu_zap_all_fast,
    kvm_arch_flush_shadow_memslot), the lockless walk, NX huge page recovery."""

    def alloc_page_for(self, cache_name):
        inj = self.inject
        if inj is not None and inj.should_fail("mmu_cache_alloc"):
            return None
        try:
            return self.host.alloc_kernel_page()
        except OutOfHostMemory:
            return None

    def is_addr_direct(self, gpa):
        """kvm_is_addr_direct(): shared GPAs (and every GPA of a non-TD) use the direct root."""
        bits = self.gfn_direct_bits
        return not bits or bool(gpa & (bits << 12))

    def update_page_stats(self, level, count):
        key = ("pages_4k", "pages_2m", "pages_1g", "pages_512g", "pages_256t")[level - 1]  # noqa
        self.stat[key] = self.stat.get(key, 0) + count

    # -- zapping (userspace-visible operations) ----------------------------------------------------------
    def zap_gfn_range(self, start, end, types=KVM_VALID_ROOTS):
        """Unmap [start, end) from the roots of ``types`` and flush, inside an invalidation
        (kvm_mmu_invalidate_begin/end around the zap, as the mmu_notifier does)."""
        self.invalidate_and_unmap([(start, end)], types)
        self.invalidate_end()

    def flush_shadow_memslot(self, slot):
        """kvm_arch_flush_shadow_memslot(): a default VM (KVM_X86_QUIRK_SLOT_ZAP_ALL, on by
        default) zaps everything the fast way; other VM types (a TD) zap the slot's range."""
        if self.vm_type == KVM_X86_DEFAULT_VM:
            self.kvm_mmu_zap_all_fast()
        else:
            self.kvm_mmu_zap_memslot(slot)

    def kvm_mmu_zap_memslot(self, slot):
        """kvm_mmu_zap_memslot(): under the write lock, unmap the slot's range from every root
        (private and shared; invalid roots too) and flush."""
        self.mmu_lock.write_lock()
        try:
            flush = self.tdp_mmu.unmap_gfn_range(slot.base_gfn, slot.base_gfn + slot.npages, KVM_VALID_ROOTS, False)
            self.stat["zaps"] += 1
            if flush:
                self.flush_remote_tlbs()
        finally:
            self.mmu_lock.write_unlock()

    def kvm_mmu_zap_all_fast(self):
        """kvm_mmu_zap_all_fast(): under the write lock, toggle mmu_valid_gen, invalidate the
        direct roots (the mirror cannot be zapped this way), and ask every vCPU to drop its
        obsolete root (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, kicking those in guest mode) in the
        same critical section; then zap the invalidated roots under the read lock.  (The shadow
        MMU's obsolete pages, kvm_zap_obsolete_pages(), do not exist in this TDP-only model.)"""
        self.mmu_lock.write_lock()
        try:
            self.mmu_valid_gen ^= 1
            self.trace_emit("kvm_mmu_zap_all_fast", msg=f"mmu_valid_gen {self.mmu_valid_gen}")
            self.tdp_mmu.invalidate_roots(KVM_DIRECT_ROOTS)
            self.kvm_make_all_cpus_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS)
            self.stat["zaps"] += 1
        finally:
            self.mmu_lock.write_unlock()
        self.tdp_mmu.zap_invalidated_roots(True)

    def get_leaf_spte(self, vcpu, gpa):
        """The SPTE at the lowest level reached for ``gpa`` in the root the address uses."""
        root = vcpu.root if self.is_addr_direct(gpa) else vcpu.mirror_root
        gfn = (gpa >> 12) & ~self.gfn_direct_bits
        # kvm_tdp_mmu_get_walk(): lockless, under RCU only (kvm_tdp_mmu_walk_lockless_begin()).
        who = self.rcu_reader()
        self.rcu.read_lock(who)
        try:
            it = TdpIter(self, root, PG_LEVEL_4K, gfn, self.tdp_mmu.gfn_root_bits(root))
            leaf = None
            for it in for_each_tdp_pte_min_level(it, gfn + 1):
                leaf = it.old_spte
            return leaf
        finally:
            self.rcu.read_unlock(who)

    def recover_nx_huge_pages(self, start_gfn, end_gfn):
        """kvm_recover_nx_huge_pages() for the TDP MMU, on the recovery worker (a host task):
        under mmu_lock for read (Linux 6.17; 6.16 takes it for write) and RCU, take each possible
        NX huge page of [start_gfn, end_gfn) off the list and zap the entry that points to it
        with a cmpxchg; faults may walk inside the table meanwhile, and RCU keeps it until they
        are out.  Upstream takes nx_lpage_splits / nx_huge_pages_recovery_ratio from the head of
        the list; here every one in the range.  Returns how many were zapped."""
        tdp = self.tdp_mmu
        lock = self.mmu_lock
        who = self.rcu_reader()
        zapped = 0
        flush = False
        lock.read_lock()
        self.rcu.read_lock(who)
        try:
            while True:
                self.touch("possible_nx")
                sp = next((sp for sp in tdp.possible_nx_huge_pages if start_gfn <= sp.gfn < end_gfn), None)
                if sp is None:
                    break
                if not sp.nx_huge_page_disallowed or sp.is_mirror:
                    self.warn(f"possible NX huge page {sp!r} not disallowed, or not direct")
                tdp.unaccount_nx_huge_page(sp)
                if tdp.zap_possible_nx_huge_page(sp, who):
                    zapped += 1
                    flush = True
                if self.need_resched():
                    # cond_resched_rwlock_read(), after the flush owed so far.
                    if flush:
                        self.flush_remote_tlbs()
                        flush = False
                    self.rcu.read_unlock(who)
                    lock.read_unlock()
                    self.cond_resched()
                    lock.read_lock()
                    self.rcu.read_lock(who)
            if flush:
                self.flush_remote_tlbs()
        finally:
            self.rcu.read_unlock(who)
            lock.read_unlock()
        self.trace_emit("kvm_nx_recover", msg=f"gfn {start_gfn:#x}-{end_gfn:#x}: {zapped} zapped")
        return zapped


class KvmVcpuMmu:
    """The vCPU part of mmu.c: roots (kvm_mmu_load/reload/unload) and the page fault
    (kvm_mmu_page_fault -> kvm_mmu_do_page_fault -> kvm_tdp_page_fault -> kvm_tdp_mmu_map)."""

    def kvm_mmu_hugepage_adjust(self, fault):
        """(tdp_mmu.py calls mmu.c's kvm_mmu_hugepage_adjust() through the vCPU: mmu_internal.py)"""
        kvm_mmu_hugepage_adjust(self, fault)

    def kvm_tdp_map_page(self, gpa, private=False):
        """kvm_tdp_map_page(): map ``gpa`` as a write fault, retrying while RET_PF_RETRY."""
        error_code = PFERR_WRITE_MASK | PFERR_GUEST_FINAL_MASK | (PFERR_PRIVATE_ACCESS if private else 0)
        for _ in range(100000):
            if self.kvm.vm_dead:
                return -EIO
            r = self.kvm_mmu_do_page_fault(gpa, error_code)
            if r < 0:
                return r
            if r in (RET_PF_FIXED, RET_PF_SPURIOUS, RET_PF_WRITE_PROTECTED):
                return 0
            if r == RET_PF_EMULATE:
                return -ENOENT
            if r != RET_PF_RETRY:
                return -EIO
        return -EIO

    # -- MMU ------------------------------------------------------------------------------------------
    def mmu_load(self):
        """kvm_mmu_load(): allocate the roots (mirror first for a TD) and load the EPT pointer."""
        tdp = self.kvm.tdp_mmu
        r = mmu_topup_memory_caches(self)
        if r:
            raise KvmIoctlError(-r, "cannot allocate the MMU roots")
        if self.kvm.has_mirrored_tdp:
            self.mirror_root = tdp.alloc_root(self, True)
        self.root = tdp.alloc_root(self, False)
        self.kvm.x86_ops.load_mmu_pgd(self, self.root.spt, self.root_level)

    def kvm_mmu_free_obsolete_roots(self):
        """kvm_mmu_free_obsolete_roots(): put an obsolete (invalid) root; the entry path loads
        a new one (kvm_mmu_reload() -> kvm_mmu_load(), which flushes the TLB locally)."""
        tdp = self.kvm.tdp_mmu
        for attr in ("root", "mirror_root"):
            root = getattr(self, attr)
            if root is not None and root.invalid:
                tdp.put_root(root)
                setattr(self, attr, None)

    def kvm_mmu_reload(self):
        """kvm_mmu_reload(): load the roots when a request dropped them."""
        if self.root is None or self.kvm.has_mirrored_tdp and self.mirror_root is None:
            tdp = self.kvm.tdp_mmu
            r = mmu_topup_memory_caches(self)
            if r:
                raise KvmIoctlError(-r, "cannot allocate the MMU roots")
            if self.kvm.has_mirrored_tdp and self.mirror_root is None:
                self.mirror_root = tdp.alloc_root(self, True)
            if self.root is None:
                self.root = tdp.alloc_root(self, False)
            self.kvm.x86_ops.load_mmu_pgd(self, self.root.spt, self.root_level)
            self.kvm.x86_ops.flush_tlb(self)
            self.kvm.trace_emit("kvm_tlb_flush", self.vcpu_id, vcpu_id=self.vcpu_id, kind="invept (new root)")

    def mmu_unload(self):
        tdp = self.kvm.tdp_mmu
        for attr in ("root", "mirror_root"):
            root = getattr(self, attr)
            if root is not None:
                tdp.put_root(root)
                setattr(self, attr, None)

    def free_caches(self):
        self.mmu_shadow_page_cache.free_all()
        self.mmu_external_spt_cache.free_all()

    def prepare_memory_fault_exit(self, fault):
        """kvm_mmu_prepare_memory_fault_exit() -> kvm_prepare_memory_fault_exit(): KVM_RUN fails
        with -EFAULT and says why in kvm_run.memory_fault (flags, gpa, size)."""
        flags = KVM_MEMORY_EXIT_FLAG_PRIVATE if fault.is_private else 0
        gpa = fault.gfn << 12
        self.exit_to_user(
            KVM_EXIT_MEMORY_FAULT,
            memory_fault=KvmMemoryFault(flags, gpa, 4096),
            gpa=gpa,
            size=4096,
            private=fault.is_private,
        )

    def kvm_mmu_page_fault(self, gpa, error_code):
        """Returns 1 to resume the guest, 0 after preparing a userspace exit, -EFAULT after
        preparing KVM_EXIT_MEMORY_FAULT (KVM_RUN fails with it)."""
        r = RET_PF_INVALID
        kvm = self.kvm
        # A software-protected VM has no hardware that says which accesses are private: the
        # gfn's attribute is the source of truth (except for reserved faults: emulated MMIO is
        # shared-only).
        if (
            not error_code & PFERR_RSVD_MASK
            and kvm.vm_type == KVM_X86_SW_PROTECTED_VM
            and kvm.mem_is_private(gpa >> 12)
        ):
            error_code |= PFERR_PRIVATE_ACCESS
        if error_code & PFERR_RSVD_MASK:
            r = handle_mmio_page_fault(self, gpa)
            if r == RET_PF_INVALID:
                error_code &= ~PFERR_RSVD_MASK  # a stale MMIO SPTE: fault it in normally
        if r == RET_PF_INVALID:
            r = self.kvm_mmu_do_page_fault(gpa, error_code)
        if r < 0:
            if r == -EFAULT and self.kvm_run is not None and self.kvm_run.exit_reason == KVM_EXIT_MEMORY_FAULT:
                return r  # -EFAULT with kvm_run filled in: userspace reads it
            raise KvmIoctlError(-r, f"page fault at gpa {gpa:#x} failed ({r})")
        if r != RET_PF_EMULATE:
            return 1
        # x86_emulate_instruction() asks the vendor first (kvm_check_emulate_insn()): a TD's
        # instructions cannot be read, so TDX answers X86EMUL_RETRY_INSTR and the guest runs
        # the access again (vt_check_emulate_instruction()): now over the MMIO SPTE just
        # installed, whose suppress-#VE bit is clear, so the CPU gives the TD a #VE and its
        # handler asks for the MMIO with TDG.VP.VMCALL<#VE.RequestMMIO>.
        if self.kvm.x86_ops.check_emulate_instruction(self) == X86EMUL_RETRY_INSTR:
            return 1
        # Emulation: this model has no instruction emulator, so the access goes to
        # userspace as MMIO, which is what KVM does for MMIO and read-only-slot writes.
        self.exit_to_user(KVM_EXIT_MMIO, phys_addr=gpa, is_write=bool(error_code & PFERR_WRITE_MASK))
        return 0

    def kvm_mmu_do_page_fault(self, gpa, error_code):
        kvm = self.kvm
        fault = KvmPageFault(gpa, error_code)
        fault.gfn = (gpa >> 12) & ~kvm.gfn_direct_bits
        self.stat["pf_taken"] += 1
        r = self.kvm_tdp_page_fault(fault)
        if r == RET_PF_FIXED:
            self.stat["pf_fixed"] += 1
            self.budget = self.exit_limit  # progress: the watchdog starts over
        elif r == RET_PF_EMULATE:
            self.stat["pf_emulate"] += 1
        elif r == RET_PF_SPURIOUS:
            self.stat["pf_spurious"] += 1
        elif r == RET_PF_RETRY:
            self.stat["pf_retry"] += 1
        self.last_pf_ret = r
        if kvm.tracer.enabled and r >= 0:
            kvm.trace_emit(
                "kvm_tdp_page_fault_done",
                self.vcpu_id,
                gfn=fault.gfn,
                level=fault.goal_level,
                root="mirror" if fault.is_private and kvm.has_mirrored_tdp else "direct",
                ret=RET_PF_NAMES[r],
            )
        return r

    def kvm_tdp_page_fault(self, fault):
        """kvm_tdp_mmu_page_fault(): top up, fault in, then map under the read lock unless stale."""
        kvm = self.kvm
        r = mmu_topup_memory_caches(self)
        if r:
            return r
        r = kvm_mmu_faultin_pfn(self, fault)
        if r != RET_PF_CONTINUE:
            return r
        stale = False
        kvm.mmu_lock.read_lock()
        try:
            if self.is_page_fault_stale(fault):
                kvm.trace_emit(
                    "kvm_page_fault_stale",
                    self.vcpu_id,
                    gfn=fault.gfn,
                    mmu_seq=fault.mmu_seq,
                    seq=kvm.mmu_invalidate_seq,
                    in_progress=kvm.mmu_invalidate_in_progress,
                )
                stale = True
                return RET_PF_RETRY
            return kvm.tdp_mmu.map(self, fault)
        finally:
            kvm.mmu_lock.read_unlock()
            if stale:
                if kvm.mmu_invalidate_in_progress:
                    self.budget = self.exit_limit  # (as in _invalidate_retry)
                if kvm.sched is not None:
                    kvm.sched.point(self.vcpu_id, "mmu_invalidate_retry")

    def is_page_fault_stale(self, fault):
        """is_page_fault_stale(): the root went obsolete, or an invalidation of this gfn ran
        (or runs) since the pfn was looked up: mapping it could map a page being taken away."""
        root = self.mirror_root if fault.is_private and self.kvm.has_mirrored_tdp else self.root
        if self.kvm.sched is not None:
            self.kvm.touch("roots_valid", False)
        if root is not None and root.invalid:
            return True
        if self.kvm.bugs.fault_ignores_invalidation:
            return False
        return fault.slot is not None and self.kvm.mmu_invalidate_retry_gfn(fault.mmu_seq, fault.gfn)
