"""The VM and its vCPUs, shaped like KVM's userspace API (and KVM selftests).

    kvm = Kvm(host, KVM_X86_DEFAULT_VM)
    kvm.set_user_memory_region(0, 0, gpa, size, hva)
    vcpu = kvm.create_vcpu(0); vcpu.set_regs({...})
    run = vcpu.run()        # KVM_RUN: returns a KvmRun with exit_reason, as kvm_run does

EPT violations are handled inside run(), as KVM handles them in the kernel;
only what KVM would hand to userspace comes out.
"""

import zlib

from ..hw.ept import MAXPHYADDR
from ..hw.exits import EXIT_REASON_EPT_VIOLATION, EXIT_REASON_EPT_MISCONFIG, EXIT_REASON_EXCEPTION_NMI, VECTOR_NAMES
from ..hw.ept import decode_qualification, EPT_VIOLATION_ACC_READ, EPT_VIOLATION_ACC_WRITE, \
    EPT_VIOLATION_ACC_INSTR, EPT_VIOLATION_GVA_IS_VALID, EPT_VIOLATION_GVA_TRANSLATED
from ..hw.vcpu import Vcpu
from .attributes import GfnRanges
from ..hw.memory import OutOfHostMemory
from ..trace import NULL_TRACER
from ..userspace import guestabi
from . import mmu as mmu_mod
from .mmu import (KvmMmuMemoryCache, KvmPageFault, PFERR_WRITE_MASK, PFERR_USER_MASK, PFERR_FETCH_MASK,
                  PFERR_PRESENT_MASK, PFERR_GUEST_FINAL_MASK, PFERR_GUEST_PAGE_MASK, PFERR_PRIVATE_ACCESS,
                  PFERR_RSVD_MASK)
from .rcu import Rcu
from .spte import SHADOW_NONPRESENT_VALUE, PG_LEVEL_4K, MT_MASK_DEFAULT_VM, KVM_PAGES_PER_HPAGE
from . import spte as spte_mod
from .tdp_iter import TdpIter, for_each_tdp_pte_min_level
from .tdp_mmu import (TdpMmu, RET_PF_RETRY, RET_PF_EMULATE, RET_PF_INVALID, RET_PF_FIXED, RET_PF_SPURIOUS,
                      RET_PF_CONTINUE, RET_PF_WRITE_PROTECTED, RET_PF_NAMES, KVM_DIRECT_ROOTS, KVM_MIRROR_ROOTS,
                      KVM_ALL_ROOTS, KVM_VALID_ROOTS)
from .x86_ops import VmxX86Ops, X86EMUL_RETRY_INSTR
from .bugs import Bugs
from ..host.mm import MIGRATING

from .uapi import *  # noqa: F401,F403  (KVM_X86_*_VM, KVM_MEM_READONLY, KVM_EXIT_*)
from .uapi import KVM_MEMSLOT_INVALID

KVM_ENOSYS = 1000
EINVAL, EEXIST, EFAULT, EIO, ENOENT = 22, 17, 14, 5, 2

# vcpu->requests
KVM_REQ_TLB_FLUSH = 1 << 0
KVM_REQ_OUTSIDE_GUEST_MODE = 1 << 1
KVM_REQ_MMU_FREE_OBSOLETE_ROOTS = 1 << 2
# Requests after which the vCPU flushes its TLB before it enters again (a new root is loaded
# with a local flush: kvm_mmu_load()).
KVM_REQS_FLUSHING = KVM_REQ_TLB_FLUSH | KVM_REQ_MMU_FREE_OBSOLETE_ROOTS

# vcpu->mode
OUTSIDE_GUEST_MODE, IN_GUEST_MODE, EXITING_GUEST_MODE = 0, 1, 2
MODE_NAMES = ("OUTSIDE_GUEST_MODE", "IN_GUEST_MODE", "EXITING_GUEST_MODE")
GUEST_SLICE_BLOCKS = 4000         # the emulated preemption timer: translated blocks per guest slice


class KvmIoctlError(Exception):
    """An ioctl that fails with an errno (KVM_RUN returning -EFAULT, -ENOMEM, ...)."""

    def __init__(self, errno, msg):
        self.errno = errno
        super().__init__(msg)


class KvmMemorySlot:
    """struct kvm_memory_slot: guest frames [base_gfn, base_gfn + npages) at host address userspace_addr.

    ``backing_level`` is the page size of the host memory behind it (1 = 4K pages,
    2 = 2M and 3 = 1G hugetlbfs-like pages): KVM maps huge pages only where the
    backing is at least as large.
    """

    def __init__(self, id, base_gfn, npages, userspace_addr, flags, backing_level=PG_LEVEL_4K, gmem_addr=None):
        self.id, self.base_gfn, self.npages = id, base_gfn, npages
        self.userspace_addr, self.flags, self.backing_level = userspace_addr, flags, backing_level
        self.gmem_addr = gmem_addr            # guest_memfd backing of private pages (TDX)

    @property
    def readonly(self):
        return bool(self.flags & KVM_MEM_READONLY)

    def contains(self, gfn):
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def lpage_allowed(self, gfn, level):
        """The huge page around ``gfn`` lies inside the slot, and the slot's GPA and host
        address are aligned alike (otherwise KVM disallows huge pages in the whole slot)."""
        pages = KVM_PAGES_PER_HPAGE(level)
        start = gfn & -pages
        if start < self.base_gfn or start + pages > self.base_gfn + self.npages:
            return False
        return ((self.base_gfn ^ (self.userspace_addr >> 12)) & (pages - 1)) == 0


class KvmRun:
    """struct kvm_run as userspace reads it after KVM_RUN."""

    def __init__(self, exit_reason, **fields):
        self.exit_reason = exit_reason
        self.__dict__.update(fields)

    @property
    def name(self):
        return EXIT_NAMES.get(self.exit_reason, str(self.exit_reason))

    def __repr__(self):
        extra = {k: v for k, v in self.__dict__.items() if k != "exit_reason"}
        return f"KvmRun({self.name}, {extra})"


class MmuLock:
    """kvm->mmu_lock, x86's queued rwlock: faults hold it for read, zaps for write.

    Writers are preferred: once a writer waits, new readers queue behind it (a fault
    stream cannot starve a zap).  Under the scheduler a task that cannot take it waits
    (the others run meanwhile)."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.readers = 0
        self.writer = False
        self.writers_waiting = 0

    def _touch(self, write):
        # (emu.checkers.dpor) two readers' lock and unlock commute; a writer's do not.
        self.kvm.touch("mmu_lock", write)

    def read_lock(self):
        self._touch(False)
        if self.writer or self.writers_waiting:
            self._wait(lambda: not self.writer and not self.writers_waiting)
        self.readers += 1

    def read_unlock(self):
        self._touch(False)
        self.readers -= 1

    def write_lock(self):
        self._touch(True)
        if self.writer or self.readers:
            self.writers_waiting += 1
            try:
                self._wait(lambda: not self.writer and not self.readers)
            finally:
                self.writers_waiting -= 1
        self.writer = True

    def _wait(self, pred):
        sched = self.kvm.sched
        if sched is None:
            raise AssertionError("mmu_lock contended without a scheduler")
        sched.wait_until(pred, what="lock_wait")

    def write_unlock(self):
        self._touch(True)
        self.writer = False


class Kvm:
    """struct kvm: one VM."""

    def __init__(self, host, vm_type=KVM_X86_DEFAULT_VM, tracer=None, x86_ops=None):
        self.host = host
        self.mem = host.mem
        self.vm_type = vm_type
        self.tracer = tracer or NULL_TRACER
        self.sched = None                 # the deterministic scheduler, when several vCPUs interleave
        self.inject = None                # the fault-injection plan, when one is active
        self.x86_ops = x86_ops or VmxX86Ops()
        self.memslots = []
        self.memslots_generation = 0      # bumped by every memslot change (MMIO SPTEs record it)
        self.private_gfns = GfnRanges()   # KVM_MEMORY_ATTRIBUTE_PRIVATE (kvm->mem_attr_array)
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = self.mmu_invalidate_range_end = None
        self.vcpus = []
        self.stat = {"pages_4k": 0, "pages_2m": 0, "pages_1g": 0, "remote_tlb_flush": 0,
                     "remote_tlb_flush_requests": 0, "zaps": 0, "kvm_bug_on": 0,
                     "nx_lpage_splits": 0}
        self.vm_bugged = False
        self.vm_dead = False
        self.bug_reason = None
        self.warnings = []
        self.bugs = Bugs()                # realistic bugs, switched in one at a time (emu/kvm/bugs.py)
        self.flush_owed = False           # a zap's TLB flush has not completed yet
        self.tables_generation = 0        # (the checker's) bumped by every change of a present SPTE
        self.tables_checked = -1
        self.violations = []              # broken invariants the checker saw during the run
        self.slice_blocks = GUEST_SLICE_BLOCKS
        self.mmu_lock = MmuLock(self)
        self.rcu = Rcu(self)
        self.mmu_valid_gen = 0            # kvm->arch.mmu_valid_gen (toggled by kvm_mmu_zap_all_fast)
        self.tdp_mmu = TdpMmu(self)
        self.gfn_direct_bits = 0
        self.nx_huge_pages = False
        self.has_mirrored_tdp = vm_type == KVM_X86_TDX_VM
        self.mt_mask = MT_MASK_DEFAULT_VM
        # kvm->arch.shadow_mmio_value: the EPT misconfig value; TDX sets 0 (tdx_vm_init()).
        self.shadow_mmio_value = spte_mod.shadow_mmio_value
        self.root_level = 4
        # kvm_mmu_max_gfn() + 1: GFNs the TDP MMU may map (shadow_phys_bits = MAXPHYADDR)
        self.max_gfn_exclusive = 1 << (MAXPHYADDR - 12)
        self.x86_ops.vm_init(self)

    # -- errors ------------------------------------------------------------------------------------------
    def KVM_BUG_ON(self, cond, what):
        """KVM_BUG_ON(): a KVM bug was detected; the VM is marked bugged (and dead)."""
        if cond:
            self.kvm_bug(what)
        return bool(cond)

    def kvm_bug(self, what):
        self.stat["kvm_bug_on"] += 1
        if not self.vm_dead:
            self.bug_reason = f"KVM_BUG_ON: {what}"
        self.vm_bugged = True
        self.vm_dead = True
        self.touch_all()
        self.trace_emit("kvm_bug_on", msg=what)

    def kvm_vm_dead(self, why):
        """kvm_vm_dead(): no KVM bug, but the VM cannot go on (e.g. the guest broke the TDX rules)."""
        if not self.vm_dead:
            self.bug_reason = why
        self.vm_dead = True
        self.touch_all()
        self.trace_emit("kvm_vm_dead", msg=why)

    def touch(self, key, write=True):
        """(emu.checkers.dpor) the running step touches ``key`` of this VM's shared state (when the
        scheduler records footprints: a scheduler of a test may not)."""
        if getattr(self.sched, "fp", None) is not None:
            self.sched.touch(key, write)

    def touch_all(self, write=True):
        """(emu.checkers.dpor) the running step depends on everything (a dead VM changes every path)."""
        if getattr(self.sched, "fp", None) is not None:
            self.sched.touch_all(write)

    def warn(self, what):
        self.warnings.append(what)
        self.trace_emit("kvm_warn", msg=what)

    def leak_page(self, hpa, why):
        self.host.leaked.append((hpa, why))
        self.trace_emit("kvm_page_leaked", msg=f"hpa {hpa:#x}: {why}")

    def trace_emit(self, name, vcpu=-1, **fields):
        t = self.tracer
        if t.enabled:
            t.emit(name, vcpu, **fields)

    def lockdep_assert_held_read(self):
        assert self.mmu_lock.readers or self.mmu_lock.writer, "mmu_lock not held"

    def lockdep_assert_held_write(self):
        assert self.mmu_lock.writer, "mmu_lock not held for write"

    def need_resched(self):
        return self.sched is not None and self.sched.need_resched()

    def rcu_reader(self):
        """Who reads under RCU: the running task (a vCPU or a host task), or the caller outside any."""
        sched = self.sched
        cur = getattr(sched, "current", None)
        return None if cur is None else cur.name

    def cond_resched(self):
        if self.sched is not None:
            self.sched.point(None, "cond_resched")

    # -- memory ------------------------------------------------------------------------------------------
    def set_user_memory_region(self, slot, flags, guest_phys_addr, memory_size, userspace_addr,
                               backing_level=PG_LEVEL_4K, gmem_addr=None):
        """KVM_SET_USER_MEMORY_REGION: add a slot, or delete it with memory_size 0."""
        if guest_phys_addr % 4096 or memory_size % 4096 or userspace_addr % 4096:
            raise KvmIoctlError(EINVAL, "memory region not page aligned")
        old = next((s for s in self.memslots if s.id == slot), None)
        self.touch_all()                      # (emu.checkers.dpor) memslots are read on every path
        if memory_size == 0:
            if old is None:
                raise KvmIoctlError(EINVAL, f"no memslot {slot}")
            # kvm_invalidate_memslot(): faults on the slot retry while it is zapped, then it goes.
            old.flags |= KVM_MEMSLOT_INVALID
            self.memslots_generation += 1
            self.flush_shadow_memslot(old)
            self.memslots.remove(old)
            self.memslots_generation += 1
            return
        if old is not None:
            raise KvmIoctlError(EEXIST, f"memslot {slot} exists (moving slots is not modelled)")
        base, npages = guest_phys_addr >> 12, memory_size >> 12
        for s in self.memslots:
            if base < s.base_gfn + s.npages and s.base_gfn < base + npages:
                raise KvmIoctlError(EEXIST, f"memslot overlaps slot {s.id}")
        if not self.host.mm.covers(userspace_addr, userspace_addr + memory_size):
            raise KvmIoctlError(EFAULT, "userspace_addr outside the VMM's mapped memory")
        if self.has_mirrored_tdp and gmem_addr is None:
            raise KvmIoctlError(EINVAL, "a TD's memslot needs guest_memfd backing for its private pages")
        self.memslots.append(KvmMemorySlot(slot, base, npages, userspace_addr, flags, backing_level, gmem_addr))
        self.memslots_generation += 1

    # -- the invalidation protocol (mmu_notifier, memory attributes, guest_memfd) -----------------------
    def kvm_mmu_invalidate_begin(self):
        """kvm_mmu_invalidate_begin() under mmu_lock: faults that race it must retry."""
        self.touch("mmu_invalidate")
        self.mmu_invalidate_in_progress += 1
        if self.mmu_invalidate_in_progress == 1:
            self.mmu_invalidate_range_start = self.mmu_invalidate_range_end = None

    def kvm_mmu_invalidate_range_add(self, start, end):
        self.touch("mmu_invalidate")
        if self.mmu_invalidate_range_start is None:
            self.mmu_invalidate_range_start, self.mmu_invalidate_range_end = start, end
        else:
            # Fold every range into one (as upstream does): over-invalidating is safe.
            self.mmu_invalidate_range_start = min(self.mmu_invalidate_range_start, start)
            self.mmu_invalidate_range_end = max(self.mmu_invalidate_range_end, end)

    def kvm_mmu_invalidate_end(self):
        """kvm_mmu_invalidate_end(): bump the sequence before dropping in_progress, so a fault
        that saw in_progress drop also sees the new sequence."""
        self.touch("mmu_invalidate")
        self.mmu_invalidate_seq += 1
        self.mmu_invalidate_in_progress -= 1
        self.KVM_BUG_ON(self.mmu_invalidate_in_progress < 0, "mmu_invalidate_in_progress < 0")

    def invalidate_and_unmap(self, ranges, types):
        """Under the write lock: kvm_mmu_invalidate_begin(), each gfn range added and unmapped
        from the roots of ``types``, then the TLB flush.  The invalidation lasts until
        invalidate_end(): a fault on those gfns retries meanwhile."""
        self.mmu_lock.write_lock()
        try:
            self.kvm_mmu_invalidate_begin()
            flush = False
            for start, end in ranges:
                self.kvm_mmu_invalidate_range_add(start, end)
                flush = self.tdp_mmu.unmap_gfn_range(start, end, types, flush)
            if ranges:
                self.stat["zaps"] += 1
            if flush:
                self.flush_remote_tlbs()
        finally:
            self.mmu_lock.write_unlock()

    def invalidate_end(self):
        self.mmu_lock.write_lock()
        try:
            self.kvm_mmu_invalidate_end()
        finally:
            self.mmu_lock.write_unlock()

    def mmu_invalidate_retry_gfn(self, mmu_seq, gfn):
        self.touch("mmu_invalidate", False)
        if self.mmu_invalidate_in_progress:
            start, end = self.mmu_invalidate_range_start, self.mmu_invalidate_range_end
            # A begin with no range added yet covers everything (the range is INVALID_GPA).
            if start is None or start <= gfn < end:
                return True
        return self.mmu_invalidate_seq != mmu_seq

    # Read without mmu_lock (the early check in kvm_mmu_faultin_pfn): the same test here.
    mmu_invalidate_retry_gfn_unsafe = mmu_invalidate_retry_gfn

    def set_memory_attributes(self, start_gfn, end_gfn, private):
        """KVM_SET_MEMORY_ATTRIBUTES (kvm_vm_set_mem_attributes()): mark [start, end) private or shared.

        As upstream: under mmu_lock, kvm_mmu_invalidate_begin() and the pre-set handler
        (kvm_arch_pre_set_memory_attributes(): going private zaps the shared mappings, going
        shared the private ones, which for a TD are BLOCKed, TRACKed and REMOVEd) with a
        flush; then the attributes are stored; then, under mmu_lock again, the post-set
        handler and kvm_mmu_invalidate_end().  A fault that read the old attribute cannot
        map it: the invalidation was in progress, or its sequence moved."""
        have = self.private_gfns
        if have.covers(start_gfn, end_gfn) if private else not have.intersects(start_gfn, end_gfn):
            return                          # nothing to do: the range has these attributes
        self.trace_emit("kvm_set_memory_attributes", msg=f"gfn {start_gfn:x}-{end_gfn:x} "
                        f"{'private' if private else 'shared'}")
        self.invalidate_and_unmap([(start_gfn, end_gfn)] if self.has_mirrored_tdp else [],
                                  KVM_DIRECT_ROOTS if private else KVM_MIRROR_ROOTS)
        if self.sched is not None:
            self.sched.point(None, "set_attributes")
        self.touch_all()                    # attributes are read on many paths: count it as global
        if private:
            self.private_gfns.add(start_gfn, end_gfn)
        else:
            self.private_gfns.remove(start_gfn, end_gfn)
        self.invalidate_end()

    def mmu_notifier_invalidate_range_start(self, hva_start, hva_end):
        """kvm_mmu_notifier_invalidate_range_start(): the gfns of every memslot behind the hva
        range are unmapped (shared mappings only: private memory is not behind an hva) inside
        an invalidation that lasts until _end."""
        ranges = []
        for slot in self.memslots:
            a = max(hva_start, slot.userspace_addr)
            b = min(hva_end, slot.userspace_addr + (slot.npages << 12))
            if a < b:
                ranges.append((slot.base_gfn + ((a - slot.userspace_addr) >> 12),
                               slot.base_gfn + ((b - slot.userspace_addr + 0xFFF) >> 12)))
        self.invalidate_and_unmap(ranges, KVM_DIRECT_ROOTS)

    def mmu_notifier_invalidate_range_end(self):
        self.invalidate_end()

    def check_page_freed(self, pfn, what):
        """The checker, when the host frees a page: no SPTE maps it, no vCPU running guest code
        (or about to) caches it."""
        for root in self.tdp_mmu.roots:
            if root.invalid or root.is_mirror:
                continue
            for gfn, level, spte in self.tdp_mmu.leaves(root):
                first = (spte >> 12) & ((1 << 40) - 1)
                if first <= pfn < first + (1 << (9 * (level - 1))):
                    self.checker_violation(f"{what}: pfn {pfn:#x} freed while gfn {gfn:#x} still maps it")
                    return
        for v in self.vcpus:
            hw = v.hw
            if hw is None or not hw.in_guest and (v.mode == OUTSIDE_GUEST_MODE or v.requests & KVM_REQS_FLUSHING):
                continue
            if any(hpa >> 12 == pfn for hpa, _, _, _ in hw.gpa_cache.values()):
                self.checker_violation(f"{what}: pfn {pfn:#x} freed while vCPU {v.vcpu_id} in guest mode "
                                       f"still caches a translation to it")
                return

    def kvm_gmem_punch_hole(self, start_gfn, end_gfn):
        """fallocate(PUNCH_HOLE) on guest_memfd: kvm_gmem_invalidate_begin() unmaps the private
        mappings of the range under an invalidation, the pages are truncated (their contents
        dropped), then kvm_gmem_invalidate_end()."""
        self.invalidate_and_unmap([(start_gfn, end_gfn)], KVM_MIRROR_ROOTS)
        for gfn in range(start_gfn, end_gfn):
            slot = self.gfn_to_memslot(gfn)
            if slot is not None and slot.gmem_addr is not None:
                self.mem.host_zero(self.x86_ops.gmem_get_pfn(self, slot, gfn) << 12)
        self.invalidate_end()

    def mem_is_private(self, gfn):
        self.touch("attributes", False)
        return gfn in self.private_gfns

    def gfn_to_memslot(self, gfn):
        for s in self.memslots:
            if s.base_gfn <= gfn < s.base_gfn + s.npages:
                return s
        return None

    def faultin_pfn(self, slot, gfn, write, is_private):
        """The host pfn behind ``gfn`` (None if the backing cannot be had)."""
        inj = self.inject
        if inj is not None and inj.should_fail("backing_alloc"):
            return None
        if is_private:
            return self.x86_ops.gmem_get_pfn(self, slot, gfn)
        # hva_to_pfn(): through the VMM's page tables; a page being migrated is waited for.
        hva = slot.userspace_addr + ((gfn - slot.base_gfn) << 12)
        mm = self.host.mm
        pfn = mm.hva_to_pfn(hva)
        while pfn == MIGRATING:
            if self.sched is None:
                return None
            self.sched.wait_until(lambda: not mm.migrating(hva), what="migration_wait")
            pfn = mm.hva_to_pfn(hva)
        return pfn

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

    # -- TLB -----------------------------------------------------------------------------------------------
    def kvm_make_vcpus_request(self, vcpus, req, wait=True):
        """kvm_make_vcpus_request_mask(): set ``req`` on each vCPU and IPI those in guest mode.

        kvm_request_needs_ipi(): the mode goes IN_GUEST_MODE -> EXITING_GUEST_MODE (a
        cmpxchg); a vCPU that was in guest mode, or (for a request that waits) on its way
        in with interrupts off, gets the IPI.  With ``wait`` (KVM_REQUEST_WAIT) the caller
        waits until every IPI was taken: each target has left guest mode and will see the
        request before it enters again.  A vCPU outside guest mode needs no IPI: its entry
        path checks requests after it sets IN_GUEST_MODE."""
        targets = []
        sched = self.sched
        for v in vcpus:
            self.touch(("task", v.vcpu_id))           # (emu.checkers.dpor) its requests, its mode, its IPI
            v.requests |= req
            mode = v.mode
            if mode == IN_GUEST_MODE:
                v.mode = EXITING_GUEST_MODE
            if (mode != OUTSIDE_GUEST_MODE) if wait else (mode == IN_GUEST_MODE):
                if self.bugs.kick_misses_running_vcpu and v.hw is not None and v.hw.in_guest:
                    continue                  # bug switch: the IPI never reaches a vCPU running guest code
                if v.hw is not None:
                    v.hw.kick()
                    targets.append(v)
        if wait and targets:
            sched = self.sched
            pred = lambda: not any(t.hw.intr_pending for t in targets)   # noqa: E731
            if sched is not None:
                sched.wait_until(pred, what="ipi_wait")
            else:
                raise AssertionError("a vCPU in guest mode without a scheduler")
        return targets

    def check_guest_tlbs(self, when, vcpus=None, entering=False):
        """The checker, not KVM: no vCPU in guest mode may use a translation the tables no longer
        give once no flush is owed (every zap's flush, or the TD's TRACK and kick, completed).
        A vCPU outside guest mode may: it flushes before it enters, if a request is pending."""
        self.touch("flush", False)
        if self.flush_owed or self.tables_checked == self.tables_generation and vcpus is None:
            return
        if vcpus is None:
            self.touch_all(False)             # (emu.checkers.dpor) it reads every vCPU's TLB and every table
        else:
            for v in vcpus:                   # (emu.checkers.dpor) the entries behind their TLBs
                v.touch_tlb()
        from ..checkers.check import stale_translations
        for v in self.vcpus if vcpus is None else vcpus:
            if v.hw is None or not entering and not v.hw.in_guest and (v.mode == OUTSIDE_GUEST_MODE
                                                                          or v.requests & KVM_REQS_FLUSHING):
                continue                      # not running guest code, or will flush before it does
            for problem in stale_translations(self, v)[:1]:
                self.checker_violation(f"{when}: {problem} while in guest mode")
        if vcpus is None:
            self.tables_checked = self.tables_generation

    def checker_violation(self, what):
        """A broken invariant seen while the run goes on: the run fails with it (first one wins)."""
        self.violations.append(what)
        self.trace_emit("checker_violation", msg=what)

    def kvm_make_all_cpus_request(self, req, wait=True):
        return self.kvm_make_vcpus_request(self.vcpus, req, wait)

    def flush_remote_tlbs(self):
        """kvm_flush_remote_tlbs(): KVM_REQ_TLB_FLUSH to every vCPU, kicking those in guest mode.

        Once this returns, no vCPU runs guest code with a translation the caller removed:
        vCPUs in guest mode were sent an IPI and have exited; the others process the request
        before they next enter (vcpu_enter_guest checks requests after setting IN_GUEST_MODE).
        """
        self.stat["remote_tlb_flush_requests"] += 1
        inj = self.inject
        if inj is not None and inj.should_fail("tlb_flush"):
            self.trace_emit("kvm_flush_remote_tlbs", msg="delayed (injected)")
            return                            # delivered with the next flush
        targets = self.kvm_make_all_cpus_request(KVM_REQ_TLB_FLUSH)
        self.touch("flush")
        self.flush_owed = False
        self.check_guest_tlbs("after kvm_flush_remote_tlbs() returned")
        self.stat["remote_tlb_flush"] += 1
        self.trace_emit("kvm_flush_remote_tlbs", vcpus=len(self.vcpus), kicked=[t.vcpu_id for t in targets])

    def flush_remote_tlbs_gfn(self, gfn, level):
        self.flush_remote_tlbs()

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
            flush = self.tdp_mmu.unmap_gfn_range(slot.base_gfn, slot.base_gfn + slot.npages, KVM_VALID_ROOTS,
                                                 False)
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

    # -- vCPUs --------------------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id):
        if any(v.vcpu_id == vcpu_id for v in self.vcpus):
            raise KvmIoctlError(EEXIST, f"vCPU {vcpu_id} exists")
        v = KvmVcpu(self, vcpu_id)
        self.vcpus.append(v)
        self.x86_ops.vcpu_create(v)
        return v

    def destroy(self):
        """kvm_destroy_vm(): drop vCPU roots, zap every root, free every page."""
        self.x86_ops.vm_destroy_begin(self)
        for v in self.vcpus:
            v.mmu_unload()
        # kvm_mmu_uninit_tdp_mmu(): invalidate all roots (the mirror too) and zap them exclusively.
        self.mmu_lock.write_lock()
        try:
            self.tdp_mmu.invalidate_roots(KVM_VALID_ROOTS)
        finally:
            self.mmu_lock.write_unlock()
        self.tdp_mmu.zap_invalidated_roots(False)
        self.rcu.barrier()
        for v in self.vcpus:
            v.free_caches()
        self.x86_ops.vm_free(self)




class KvmVcpu:
    """struct kvm_vcpu (x86, VMX/TDX): the run loop and exit handling."""

    def __init__(self, kvm, vcpu_id):
        self.kvm = kvm
        self.vcpu_id = vcpu_id
        # The CPU context: KVM's own for a VMX vCPU; for a TD the module's (set by vcpu_create).
        self.hw = None if kvm.has_mirrored_tdp else Vcpu(kvm.mem, vcpu_id)
        if self.hw is not None:
            # vmx_update_exception_bitmap() with EPT: #PF is not intercepted; #UD, #DB, #AC, #MC are.
            self.hw.exception_bitmap = (1 << 6) | (1 << 1) | (1 << 17) | (1 << 18)
        if self.hw is not None and kvm.tracer.enabled:
            self.hw.set_tracer(kvm.tracer)
        self.root = None
        self.mirror_root = None
        self.root_level = kvm.root_level
        self.requests = 0
        self.mode = OUTSIDE_GUEST_MODE
        self.mmu_shadow_page_cache = KvmMmuMemoryCache(kvm, "mmu_shadow_page_cache", SHADOW_NONPRESENT_VALUE)
        self.mmu_external_spt_cache = KvmMmuMemoryCache(kvm, "mmu_external_spt_cache")
        self.stat = {"exits": 0, "ept_violations": 0, "ept_misconfigs": 0, "pf_taken": 0, "pf_fixed": 0,
                     "pf_spurious": 0, "pf_emulate": 0, "pf_retry": 0, "pf_mmio_spte_created": 0,
                     "hypercalls": 0, "halt_exits": 0, "tlb_flush": 0}
        self.arch = None                  # per-vendor vCPU state (struct vcpu_tdx for a TD)
        self.last_pf_ret = None           # the RET_PF_* of the last fault (TDX's local retry)
        self.complete_userspace_io = None
        self.kvm_run = None
        # The VMM's watchdog: a KVM_RUN that takes this many exits (and local fault retries)
        # without a fault that fixed anything gets a signal (a livelocked fault, e.g. a
        # cmpxchg that always loses, a module that always says BUSY).
        self.exit_limit = 2000
        self.budget = self.exit_limit
        self.signal_pending = False

    # -- registers ------------------------------------------------------------------------------------------
    def get_regs(self):
        return self.kvm.x86_ops.get_regs(self)

    def set_regs(self, regs):
        self.kvm.x86_ops.set_regs(self, regs)

    def tick(self):
        """One VM exit (or local fault retry) of this KVM_RUN: the watchdog counts them."""
        self.budget -= 1
        if self.budget < 0:
            self.signal_pending = True

    def kick_outside_guest_mode(self):
        """KVM_REQ_OUTSIDE_GUEST_MODE for this vCPU: kicked out of guest mode, and waited for."""
        self.kvm.kvm_make_vcpus_request([self], KVM_REQ_OUTSIDE_GUEST_MODE)

    def kick_signal(self):
        """A signal to the vCPU's thread (userspace stopping the VM): KVM_RUN returns -EINTR;
        a vCPU in guest mode is kicked out first."""
        self.kvm.touch(("task", self.vcpu_id))
        self.signal_pending = True
        if self.hw is not None and self.hw.in_guest:
            self.hw.kick()

    def kvm_vcpu_exit_request(self):
        """kvm_vcpu_exit_request(): the last look before entering, with IN_GUEST_MODE set."""
        return self.mode == EXITING_GUEST_MODE or bool(self.requests)

    def touch_guest(self):
        """(emu.checkers.dpor) What guest code may have touched in the step that ends: every page its
        TLB maps (written, for all we know), the EPT entries behind them, and in a TD the
        S-EPT (the TDX module's state)."""
        sched = self.kvm.sched
        if getattr(sched, "fp", None) is None:
            return
        hw = self.hw
        crc, buf = hw.page_crc, hw.mem.buf
        for hpa in set(hw.tlb_shadow.values()):
            # Written if its contents changed since this vCPU last looked (a write of the same
            # value commutes with reads, and a write of another value conflicts anyway).
            c = zlib.crc32(buf[hpa:hpa + 4096])
            if crc is None or crc.get(hpa) != c:
                sched.touch(("page", hpa >> 12))
                if crc is not None:
                    crc[hpa] = c
            else:
                sched.touch(("page", hpa >> 12), False)
        self.touch_tlb()

    def touch_tlb(self):
        """(emu.checkers.dpor) The tables behind this vCPU's cached translations are read: the EPT
        entries on their paths, and in a TD the S-EPT entries of its private GPAs."""
        sched, hw = self.kvm.sched, self.hw
        if getattr(sched, "fp", None) is None or hw is None:
            return
        for sptep in hw.ept_entries():
            sched.touch(("spte", sptep), False)
        if hw.secure_eptp is not None:
            keys = self.kvm.x86_ops.module.sept_keys
            for gpage in hw.gpa_cache:
                if not (gpage << 12) & hw.shared_mask:
                    for key in keys(gpage << 12, -1)[0]:
                        sched.touch(key, False)

    def _guest_point(self, kind):
        """Between two guest slices: still in guest mode; the others may run (a yield)."""
        kvm = self.kvm
        self.touch_guest()
        if not kvm.flush_owed and self.hw.checked_generation != kvm.tables_generation:
            self.hw.checked_generation = kvm.tables_generation
            kvm.check_guest_tlbs(f"vCPU {self.vcpu_id} between two guest slices", [self])
        kvm.sched.point(self.vcpu_id, kind)

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
        r = mmu_mod.mmu_topup_memory_caches(self)
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
            r = mmu_mod.mmu_topup_memory_caches(self)
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
        """kvm_mmu_prepare_memory_fault_exit(): KVM_RUN fails with -EFAULT and says why in kvm_run."""
        self.exit_to_user(KVM_EXIT_MEMORY_FAULT, gpa=fault.gfn << 12, size=4096, private=fault.is_private)

    def kvm_mmu_page_fault(self, gpa, error_code):
        """Returns 1 to resume the guest, 0 after preparing a userspace exit."""
        kvm = self.kvm
        r = RET_PF_INVALID
        if error_code & PFERR_RSVD_MASK:
            r = mmu_mod.handle_mmio_page_fault(self, gpa)
            if r == RET_PF_INVALID:
                error_code &= ~PFERR_RSVD_MASK    # a stale MMIO SPTE: fault it in normally
        if r == RET_PF_INVALID:
            r = self.kvm_mmu_do_page_fault(gpa, error_code)
        if r < 0:
            if r == -EFAULT and self.kvm_run is not None and self.kvm_run.exit_reason == KVM_EXIT_MEMORY_FAULT:
                return 0                      # -EFAULT with kvm_run filled in: userspace reads it
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
            self.budget = self.exit_limit     # progress: the watchdog starts over
        elif r == RET_PF_EMULATE:
            self.stat["pf_emulate"] += 1
        elif r == RET_PF_SPURIOUS:
            self.stat["pf_spurious"] += 1
        elif r == RET_PF_RETRY:
            self.stat["pf_retry"] += 1
        self.last_pf_ret = r
        if kvm.tracer.enabled and r >= 0:
            kvm.trace_emit("kvm_tdp_page_fault_done", self.vcpu_id, gfn=fault.gfn, level=fault.goal_level,
                           root="mirror" if fault.is_private and kvm.has_mirrored_tdp else "direct",
                           ret=RET_PF_NAMES[r])
        return r

    def kvm_tdp_page_fault(self, fault):
        """kvm_tdp_mmu_page_fault(): top up, fault in, then map under the read lock unless stale."""
        kvm = self.kvm
        r = mmu_mod.mmu_topup_memory_caches(self)
        if r:
            return r
        r = mmu_mod.kvm_mmu_faultin_pfn(self, fault)
        if r != RET_PF_CONTINUE:
            return r
        stale = False
        kvm.mmu_lock.read_lock()
        try:
            if self.is_page_fault_stale(fault):
                kvm.trace_emit("kvm_page_fault_stale", self.vcpu_id, gfn=fault.gfn, mmu_seq=fault.mmu_seq,
                               seq=kvm.mmu_invalidate_seq, in_progress=kvm.mmu_invalidate_in_progress)
                stale = True
                return RET_PF_RETRY
            return kvm.tdp_mmu.map(self, fault)
        finally:
            kvm.mmu_lock.read_unlock()
            if stale and kvm.sched is not None:
                kvm.sched.point(self.vcpu_id, "mmu_invalidate_retry")

    def is_page_fault_stale(self, fault):
        """is_page_fault_stale(): the root went obsolete, or an invalidation of this gfn ran
        (or runs) since the pfn was looked up: mapping it could map a page being taken away."""
        root = self.mirror_root if fault.is_private and self.kvm.has_mirrored_tdp else self.root
        self.kvm.touch("roots_valid", False)
        if root is not None and root.invalid:
            return True
        if self.kvm.bugs.fault_ignores_invalidation:
            return False
        return fault.slot is not None and self.kvm.mmu_invalidate_retry_gfn(fault.mmu_seq, fault.gfn)

    # -- running ------------------------------------------------------------------------------------------
    def exit_to_user(self, reason, **fields):
        self.kvm_run = KvmRun(reason, **fields)
        self.kvm.trace_emit("kvm_userspace_exit", self.vcpu_id, reason=EXIT_NAMES.get(reason, reason))

    def run(self):
        """KVM_RUN"""
        kvm = self.kvm
        if kvm.vm_dead:
            # kvm_vcpu_ioctl(): every vCPU ioctl of a dead VM fails with -EIO.
            raise self.vm_dead_error()
        if self.root is None:
            self.mmu_load()
        cui, self.complete_userspace_io = self.complete_userspace_io, None
        prev, self.kvm_run = self.kvm_run, None
        if cui is not None and cui(self, prev) == 0:
            self.complete_userspace_io = getattr(self.kvm_run, "complete", None)
            return self.kvm_run               # the completion went straight back to userspace
        hw = self.hw
        tracer = kvm.tracer
        sched = kvm.sched
        self.budget = self.exit_limit
        while True:
            self.tick()
            if self.signal_pending:
                # A signal: KVM_RUN returns -EINTR with KVM_EXIT_INTR for userspace to look at.
                self.signal_pending = False
                why = (f"{self.exit_limit} VM exits and fault retries in a row fixed nothing" if self.budget < 0
                       else "a signal from userspace")
                return KvmRun(KVM_EXIT_INTR, reason=why)
            if self.requests:
                self.process_requests()
                if self.root is None:
                    self.kvm_mmu_reload()
            if tracer.enabled:
                tracer.vcpu = self.vcpu_id
                kvm.trace_emit("kvm_entry", self.vcpu_id, vcpu_id=self.vcpu_id,
                               rip=hw.reg("rip") if not kvm.has_mirrored_tdp else 0)
            if sched is not None:
                sched.point(self.vcpu_id, "vm_entry")
            # vcpu_enter_guest(): interrupts off, IN_GUEST_MODE, then the last look at requests.
            # A remote request made before the mode store is seen here; one made after it
            # finds IN_GUEST_MODE and kicks (kvm_make_vcpus_request).
            self.mode = IN_GUEST_MODE
            if sched is not None:
                sched.point(self.vcpu_id, "guest_mode")
            if self.kvm_vcpu_exit_request() and not kvm.bugs.entry_ignores_requests:
                self.mode = OUTSIDE_GUEST_MODE
                hw.intr_pending = False           # local_irq_enable(): the IPI is taken
                continue
            if sched is not None:
                hw.guest_point = self._guest_point
                record = getattr(sched, "record", False)
                hw.on_leave = self.touch_guest if record else None
                if record and hw.page_crc is None:
                    hw.page_crc = {}
                if record and hw.ve_gpas is None:
                    hw.ve_gpas = []
                hw.slice_blocks = kvm.slice_blocks if sched.others_live() else 0
                if not kvm.flush_owed and hw.checked_generation != kvm.tables_generation:
                    # The checker: what this vCPU caches must hold as it enters the guest.
                    hw.checked_generation = kvm.tables_generation
                    kvm.check_guest_tlbs(f"vCPU {self.vcpu_id} entering the guest", [self], entering=True)
            slices = hw.slices
            exit = kvm.x86_ops.vcpu_run(self)
            if hw.slices != slices:
                self.budget = self.exit_limit     # the guest ran whole slices: it makes progress
            self.mode = OUTSIDE_GUEST_MODE
            hw.intr_pending = False               # local_irq_enable() after the exit: IPIs taken
            self.stat["exits"] += 1
            if tracer.enabled:
                self.trace_exit(exit)
            if sched is not None:
                sched.point(self.vcpu_id, "vm_exit")
            r = kvm.x86_ops.handle_exit(self, exit)
            if kvm.vm_dead and self.kvm_run is None:
                # KVM_REQ_VM_DEAD (kvm_vm_dead() / kvm_vm_bugged() request it of every vCPU):
                # vcpu_enter_guest() returns -EIO before the next entry.
                raise self.vm_dead_error()
            if r <= 0:
                return self.kvm_run

    def vm_dead_error(self):
        return KvmIoctlError(EIO, f"the VM is dead ({self.kvm.bug_reason}) (-EIO)")

    def process_requests(self):
        if self.requests & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS:
            self.kvm_mmu_free_obsolete_roots()
        if self.requests & KVM_REQ_TLB_FLUSH:
            self.stat["tlb_flush"] += 1
            self.kvm.x86_ops.flush_tlb(self)
            self.kvm.trace_emit("kvm_tlb_flush", self.vcpu_id, vcpu_id=self.vcpu_id, kind="invept")
        self.requests = 0

    def trace_exit(self, exit):
        """kvm_exit, with the exit decoded: GPA, GLA, the qualification in words, and the
        faulting instruction disassembled and symbolized from the guest's ELF."""
        fields = {"vcpu_id": self.vcpu_id, "reason": exit.name, "rip": exit.rip, "info1": exit.qualification,
                  "info2": 0, "error_code": exit.error_code or 0}
        detail = ""
        if exit.reason in (EXIT_REASON_EPT_VIOLATION, EXIT_REASON_EPT_MISCONFIG):
            fields["gpa"] = exit.gpa
            if exit.gla is not None:
                fields["gla"] = exit.gla
            if exit.reason == EXIT_REASON_EPT_VIOLATION:
                fields["qualification"] = decode_qualification(exit.qualification)
                detail = f" gpa {exit.gpa:#x}" + (f" gla {exit.gla:#x}" if exit.gla is not None else "") + \
                    f" [{fields['qualification']}]"
            else:
                fields["misconfig"] = exit.misconfig
                detail = f" gpa {exit.gpa:#x} ({exit.misconfig})"
        elif exit.reason == EXIT_REASON_EXCEPTION_NMI:
            fields["vector"] = VECTOR_NAMES.get(exit.vector, exit.vector)
            detail = f" {fields['vector']}"
        if self.hw is not None and not self.kvm.has_mirrored_tdp and exit.reason >= 0:
            insn = self.disassemble(exit.rip)
            sym = self.kvm.tracer.symbolize(exit.rip) if self.kvm.tracer.symbolize else None
            fields["insn"] = insn
            fields["where"] = sym or f"{exit.rip:#x}"
            detail += f" {fields['where']}: {insn}"
        fields["detail"] = detail
        self.kvm.trace_emit("kvm_exit", self.vcpu_id, **fields)

    def skip_emulated_instruction(self, exit):
        self.hw.set_reg("rip", exit.rip + exit.insn_len)

    # -- VMX exit handlers ----------------------------------------------------------------------------------
    def handle_ept_violation(self, exit):
        self.stat["ept_violations"] += 1
        return self.vmx_handle_ept_violation(exit.gpa, exit.qualification, exit.rip)

    def vmx_handle_ept_violation(self, gpa, q, rip):
        """__vmx_handle_ept_violation(): the page-fault error code from the qualification."""
        error_code = PFERR_USER_MASK if q & EPT_VIOLATION_ACC_READ else 0
        if q & EPT_VIOLATION_ACC_WRITE:
            error_code |= PFERR_WRITE_MASK
        if q & EPT_VIOLATION_ACC_INSTR:
            error_code |= PFERR_FETCH_MASK
        if q & 0x38:                                   # EPT_VIOLATION_PROT_MASK: the entry was present
            error_code |= PFERR_PRESENT_MASK
        if q & EPT_VIOLATION_GVA_IS_VALID:
            error_code |= PFERR_GUEST_FINAL_MASK if q & EPT_VIOLATION_GVA_TRANSLATED else PFERR_GUEST_PAGE_MASK
        if not self.kvm.is_addr_direct(gpa):
            error_code |= PFERR_PRIVATE_ACCESS
        if self.kvm.tracer.enabled:
            self.kvm.trace_emit("kvm_page_fault", self.vcpu_id, vcpu_id=self.vcpu_id, rip=rip, address=gpa,
                                error_code=error_code)
        return self.kvm_mmu_page_fault(gpa, error_code)

    def handle_ept_misconfig(self, exit):
        self.stat["ept_misconfigs"] += 1
        return self.kvm_mmu_page_fault(exit.gpa, PFERR_RSVD_MASK)

    def handle_hypercall(self, exit, nr, args):
        """kvm_emulate_hypercall(): the project's calls (report, fail, sync, assert) go to userspace
        (as KVM_HC_MAP_GPA_RANGE does); anything else returns -KVM_ENOSYS."""
        self.stat["hypercalls"] += 1
        self.skip_emulated_instruction(exit)
        self.kvm.trace_emit("kvm_hypercall", self.vcpu_id,
                            msg=f"nr {nr:#x} a0 {args[0]:#x} a1 {args[1]:#x} a2 {args[2]:#x} a3 {args[3]:#x}")
        if nr in guestabi.EMU_USERSPACE_HCS:
            self.exit_to_user(KVM_EXIT_HYPERCALL, nr=nr, args=list(args), ret=0)
            return 0
        self.hw.set_reg("rax", (-KVM_ENOSYS) & ((1 << 64) - 1))
        return 1

    def handle_exception_nmi(self, exit):
        """handle_exception_nmi(): an exception the exception bitmap intercepts (#UD: handle_ud(),
        #DB, #AC, #MC) is queued back to the guest (kvm_queue_exception()), to be delivered
        through its IDT at the next entry.  An emulator failure (no vector to give the guest)
        shuts the vCPU down."""
        if exit.misconfig is not None:
            return self.handle_triple_fault(exit)
        self.hw.inject_event(exit.vector, exit.error_code)
        return 1

    def handle_triple_fault(self, exit):
        """handle_triple_fault(): KVM_EXIT_SHUTDOWN.  The model keeps the exception that started
        it (vector, error code, CR2, RIP, instruction) and why delivery failed, for the report."""
        from unicorn import x86_const as X
        insn = self.disassemble(exit.rip)
        self.exit_to_user(KVM_EXIT_SHUTDOWN, vector=exit.vector, error_code=exit.error_code, cr2=exit.cr2,
                          rip=exit.rip, insn=insn, why=exit.misconfig,
                          no_idt=self.hw.uc.reg_read(X.UC_X86_REG_IDTR)[2] == 0)
        return 0

    def gpa_to_hva(self, gpa, access=None):
        """The host address KVM reads guest-physical ``gpa`` with, through the memslots and the
        VMM's page tables (independent of EPT): an HPA; None outside every slot."""
        slot = self.kvm.gfn_to_memslot(gpa >> 12)
        if slot is None:
            return None
        return self.kvm.host.mm.hva_to_hpa(slot.userspace_addr + ((gpa >> 12) - slot.base_gfn) * 4096
                                           + (gpa & 0xFFF))

    def read_guest_virt(self, gva, n):
        """kvm_read_guest_virt(): walk the guest's page tables in software, read through the memslots."""
        from ..hw.paging import probe
        mem = self.kvm.mem
        out = bytearray()
        cr3 = self.hw.reg("cr3")
        while n > 0:
            gpa = probe(mem.q, self.gpa_to_hva, cr3, gva)
            hva = None if gpa is None else self.gpa_to_hva(gpa)
            if hva is None:
                break
            chunk = min(n, 0x1000 - (gva & 0xFFF))
            out += mem.host_read(hva, chunk)
            gva += chunk
            n -= chunk
        return bytes(out)

    def disassemble(self, rip):
        from ..disasm import disassemble_one
        return disassemble_one(self.read_guest_virt(rip, 16), rip)
