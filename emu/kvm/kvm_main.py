"""struct kvm and the VM-wide code of virt/kvm/kvm_main.c: creating and killing a VM (KVM_BUG_ON,
kvm_vm_dead), memslots (KVM_SET_USER_MEMORY_REGION), the invalidation protocol shared by the
mmu_notifier, memory attributes and guest_memfd (kvm_mmu_invalidate_begin/end,
mmu_invalidate_retry_gfn), KVM_SET_MEMORY_ATTRIBUTES, hva_to_pfn, vCPU requests and kicks
(kvm_make_vcpus_request_mask, kvm_flush_remote_tlbs), and vCPU creation.

``KvmMain`` and ``KvmVcpuMain`` are the parts of ``emu.kvm.kvm.Kvm`` and ``KvmVcpu`` that
follow this file; the MMU's parts are in mmu.py, the run loop's in x86.py, VMX's in vmx.py.
"""

from ..hw.ept import MAXPHYADDR
from ..host.mm import MIGRATING
from ..trace import NULL_TRACER
from . import spte as spte_mod
from .attributes import GfnRanges
from .bugs import Bugs
from .kvm_host import (
    KvmIoctlError,
    KvmMemorySlot,
    EINVAL,
    EEXIST,
    EFAULT,
    KVM_REQ_OUTSIDE_GUEST_MODE,
    KVM_REQ_TLB_FLUSH,
    KVM_REQ_VM_DEAD,
    OUTSIDE_GUEST_MODE,
    IN_GUEST_MODE,
    EXITING_GUEST_MODE,
    GUEST_SLICE_BLOCKS,
)
from .locking import MmuLock
from .rcu import Rcu
from .srcu import Srcu
from .spte import PG_LEVEL_4K, PG_LEVEL_2M, MT_MASK_DEFAULT_VM, KVM_PAGES_PER_HPAGE
from .mmu_internal import KVM_MAX_HUGEPAGE_LEVEL
from .tdp_mmu import TdpMmu, KVM_DIRECT_ROOTS, KVM_MIRROR_ROOTS, KVM_VALID_ROOTS
from .uapi import (
    KVM_X86_DEFAULT_VM,
    KVM_X86_SW_PROTECTED_VM,
    KVM_X86_TDX_VM,
    KVM_MEMSLOT_INVALID,  # noqa: F401
    KVM_MEM_READONLY,
    KVM_MEM_GUEST_MEMFD,
    KVM_USER_MEM_SLOTS,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
)

# enum kvm_mr_change
KVM_MR_CREATE, KVM_MR_DELETE, KVM_MR_MOVE, KVM_MR_FLAGS_ONLY = range(4)
KVM_MR_NAMES = ("CREATE", "DELETE", "MOVE", "FLAGS_ONLY")
from .x86_ops import VmxX86Ops


class KvmMain:
    """struct kvm: one VM."""

    vcpu_class = None  # struct kvm_vcpu as assembled (emu.kvm.kvm.KvmVcpu)

    def __init__(self, host, vm_type=KVM_X86_DEFAULT_VM, tracer=None, x86_ops=None):
        self.host = host
        self.mem = host.mem
        self.vm_type = vm_type
        self.tracer = tracer or NULL_TRACER
        self.sched = None  # the deterministic scheduler, when several vCPUs interleave
        self.inject = None  # the fault-injection plan, when one is active
        self.x86_ops = x86_ops or VmxX86Ops()
        self.memslots = []  # the active memslots (kvm->memslots[0]): a new list per change
        self.inactive_memslots = None  # the set being prepared (kvm_replace_memslot())
        self.memslots_generation = 0  # bumped by every memslot change (MMIO SPTEs record it)
        # KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS in the active memslots' generation: set from the
        # swap until every reader of the old memslots has left kvm->srcu.
        self.memslots_gen_in_progress = False
        self.slots_locked = False  # kvm->slots_lock
        self.srcu = Srcu(self)  # kvm->srcu: memslot readers
        self.private_gfns = GfnRanges()  # KVM_MEMORY_ATTRIBUTE_PRIVATE (kvm->mem_attr_array)
        self.mmu_invalidate_seq = 0
        self.mmu_invalidate_in_progress = 0
        self.mmu_invalidate_range_start = self.mmu_invalidate_range_end = None
        self.vcpus = []
        self.stat = {
            "pages_4k": 0,
            "pages_2m": 0,
            "pages_1g": 0,
            "remote_tlb_flush": 0,
            "remote_tlb_flush_requests": 0,
            "zaps": 0,
            "kvm_bug_on": 0,
            "nx_lpage_splits": 0,
        }
        self.vm_bugged = False
        self.vm_dead = False
        self.bug_reason = None
        self.warnings = []
        self.bugs = Bugs()  # realistic bugs, switched in one at a time (emu/kvm/bugs.py)
        self.flush_owed = False  # a zap's TLB flush has not completed yet
        self.tables_generation = 0  # (the checker's) bumped by every change of a present SPTE
        self.tables_checked = -1
        self.violations = []  # broken invariants the checker saw during the run
        # KVM_CAP_EXIT_HYPERCALL (kvm->arch.hypercall_exit_enabled): the hypercall numbers that
        # exit to userspace with KVM_EXIT_HYPERCALL.  Upstream allows KVM_HC_MAP_GPA_RANGE only;
        # the VMM adds the guest runtime's own calls (emu.userspace.guestabi.EMU_USERSPACE_HCS).
        self.hypercall_exit_enabled = set()
        self.checker = None  # the run-time checks (emu.checkers.check.install), or None
        self.on_checker_violation = None  # the VMM's: stop the run (a guest may spin forever after a bug)
        self.slice_blocks = GUEST_SLICE_BLOCKS
        self.mmu_lock = MmuLock(self)
        self.rcu = Rcu(self)
        self.mmu_valid_gen = 0  # kvm->arch.mmu_valid_gen (toggled by kvm_mmu_zap_all_fast)
        self.tdp_mmu = TdpMmu(self)
        self.gfn_direct_bits = 0
        self.nx_huge_pages = False
        self.has_mirrored_tdp = vm_type == KVM_X86_TDX_VM
        # kvm_arch_has_private_mem(): memory attributes and guest_memfd-backed private memory.
        self.has_private_mem = vm_type in (KVM_X86_SW_PROTECTED_VM, KVM_X86_TDX_VM)
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
        """kvm_vm_bugged(): the VM is bugged, and dead (kvm_vm_dead())."""
        self.stat["kvm_bug_on"] += 1
        if not self.vm_dead:
            self.bug_reason = f"KVM_BUG_ON: {what}"
        self.vm_bugged = True
        self.trace_emit("kvm_bug_on", msg=what)
        self._vm_dead()

    def soft_lockup(self, what):
        """The host's soft-lockup detector (kernel/watchdog.c) on a CPU spinning in KVM without
        scheduling: "BUG: soft lockup".  The model cannot leave the CPU stuck, so the VM stops
        with it (the run reports it rather than hanging)."""
        self.trace_emit("soft_lockup", msg=what)
        self.kvm_vm_dead(f"BUG: soft lockup - {what}")

    def kvm_vm_dead(self, why):
        """kvm_vm_dead(): no KVM bug, but the VM cannot go on (e.g. the guest broke the TDX rules)."""
        if not self.vm_dead:
            self.bug_reason = why
        self.trace_emit("kvm_vm_dead", msg=why)
        self._vm_dead()

    def _vm_dead(self):
        """kvm->vm_dead, and KVM_REQ_VM_DEAD to every vCPU with a kick: a vCPU running guest code
        (spinning, say, while another one hit the KVM_BUG_ON) leaves guest mode, and its next
        vcpu_enter_guest() fails with -EIO, as every vCPU ioctl does from now on.  Upstream's
        request also waits for the IPIs to be taken (KVM_REQUEST_WAIT); the model does not wait
        (nothing the dying VM does depends on it, and a wait would add a scheduling point to
        every KVM_BUG_ON)."""
        self.vm_dead = True
        self.touch_all()
        self.kvm_make_all_cpus_request(KVM_REQ_VM_DEAD, wait=False)

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
    def set_user_memory_region(
        self, slot, flags, guest_phys_addr, memory_size, userspace_addr, backing_level=PG_LEVEL_4K, gmem_addr=None
    ):
        """KVM_SET_USER_MEMORY_REGION(2) (kvm_set_memory_region()): create a slot, delete one
        (memory_size 0), move one (same slot, size and hva at another GPA), or change its flags.
        ``gmem_addr`` (the slot's range of a guest_memfd, KVM_MEM_GUEST_MEMFD) gives it private
        pages.  Refusals raise KvmIoctlError with upstream's errno."""
        if gmem_addr is not None:
            flags |= KVM_MEM_GUEST_MEMFD
        if guest_phys_addr % 4096 or memory_size % 4096 or userspace_addr % 4096:
            raise KvmIoctlError(EINVAL, "memory region not page aligned")
        if not 0 <= slot < KVM_USER_MEM_SLOTS:
            raise KvmIoctlError(EINVAL, f"memslot id {slot} out of range (0 to {KVM_USER_MEM_SLOTS - 1})")
        # check_memory_region_flags(): guest_memfd needs a VM with private memory.
        valid = KVM_MEM_READONLY | (KVM_MEM_GUEST_MEMFD if self.has_private_mem else 0)
        if flags & ~valid:
            raise KvmIoctlError(
                EINVAL,
                f"memslot flags {flags:#x} not supported by this VM type"
                + (" (KVM_MEM_GUEST_MEMFD needs a VM with private memory)" if flags & KVM_MEM_GUEST_MEMFD else ""),
            )
        if flags & KVM_MEM_GUEST_MEMFD and flags & KVM_MEM_READONLY:
            # Writes to a read-only slot are emulated MMIO, which private memory cannot be.
            raise KvmIoctlError(EINVAL, "KVM_MEM_GUEST_MEMFD and KVM_MEM_READONLY do not combine")
        if flags & KVM_MEM_GUEST_MEMFD and gmem_addr is None:
            raise KvmIoctlError(EINVAL, "KVM_MEM_GUEST_MEMFD without a guest_memfd")
        if guest_phys_addr + memory_size > self.max_gfn_exclusive << 12:
            raise KvmIoctlError(EINVAL, "memory region beyond the guest physical address space")
        self.slots_lock_acquire()
        try:
            old = next((s for s in self.memslots if s.id == slot), None)
            if memory_size == 0:
                if old is None:
                    raise KvmIoctlError(EINVAL, f"no memslot {slot}")
                return self.kvm_set_memslot(old, None, KVM_MR_DELETE)
            base, npages = guest_phys_addr >> 12, memory_size >> 12
            if old is None:
                change = KVM_MR_CREATE
                new = KvmMemorySlot(slot, base, npages, userspace_addr, flags, backing_level, gmem_addr)
            else:
                # Modify an existing slot.  Private memslots are immutable: they can only be deleted.
                if flags & KVM_MEM_GUEST_MEMFD:
                    raise KvmIoctlError(
                        EINVAL, f"memslot {slot} has a guest_memfd: it cannot be modified, only deleted"
                    )
                if (
                    userspace_addr != old.userspace_addr
                    or npages != old.npages
                    or (flags ^ old.flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD)
                ):
                    raise KvmIoctlError(EINVAL, f"memslot {slot} exists with another size, host address or kind")
                if base != old.base_gfn:
                    change = KVM_MR_MOVE
                elif flags != old.flags:
                    change = KVM_MR_FLAGS_ONLY
                else:
                    return None  # nothing to change
                new = old.copy()
                new.base_gfn, new.flags = base, flags
            if change in (KVM_MR_CREATE, KVM_MR_MOVE):
                for s in self.memslots:
                    if s.id != slot and base < s.base_gfn + s.npages and s.base_gfn < base + npages:
                        raise KvmIoctlError(EEXIST, f"memslot overlaps slot {s.id}")
            if change == KVM_MR_CREATE:
                if not self.host.mm.covers(userspace_addr, userspace_addr + memory_size):
                    raise KvmIoctlError(EFAULT, "userspace_addr outside the VMM's mapped memory")
                if self.has_mirrored_tdp and gmem_addr is None:
                    raise KvmIoctlError(EINVAL, "a TD's memslot needs guest_memfd backing for its private pages")
            return self.kvm_set_memslot(old, new, change)
        finally:
            self.slots_lock_release()

    def slots_lock_acquire(self):
        """kvm->slots_lock: one memslot change at a time (a host task waits for another's)."""
        self.touch("slots_lock")
        if self.slots_locked:
            sched = self.sched
            if sched is None or sched.current is None:
                raise AssertionError("slots_lock contended without a scheduler")
            sched.wait_until(lambda: not self.slots_locked, what="lock_wait")
        self.slots_locked = True

    def slots_lock_release(self):
        self.touch("slots_lock")
        self.slots_locked = False

    def kvm_set_memslot(self, old, new, change):
        """kvm_set_memslot().  For DELETE and MOVE the old slot is first replaced by a copy marked
        KVM_MEMSLOT_INVALID (kvm_invalidate_memslot()): once that copy is active and every
        reader that could have seen the old slot has left kvm->srcu (kvm_swap_active_memslots()
        waits in synchronize_srcu()), no fault can map a page of the old slot any more (a fault
        that finds the INVALID slot retries), so kvm_arch_flush_shadow_memslot() removes every
        mapping for good.  Then the final memslots are installed (another swap and wait)."""
        self.touch_all()  # (emu.checkers.dpor) memslots are read on every path
        if change in (KVM_MR_DELETE, KVM_MR_MOVE):
            self.trace_emit(
                "kvm_set_memslot",
                msg=f"{KVM_MR_NAMES[change]} slot {old.id} gfn {old.base_gfn:#x}"
                f"+{old.npages:#x}" + (f" to gfn {new.base_gfn:#x}" if new is not None else ""),
            )
            invalid = old.copy()
            invalid.flags |= KVM_MEMSLOT_INVALID
            self.kvm_replace_memslot(old, invalid)
            self.kvm_swap_active_memslots()
            # From here no new mapping of the old slot can be made: zap what there is (the slot
            # as the active memslots hold it now: the INVALID copy, the same range).
            self.flush_shadow_memslot(invalid)
            if self.sched is not None:
                self.sched.point(None, "memslot_flushed")
            if change == KVM_MR_DELETE:
                self.kvm_replace_memslot(invalid, None)
            else:
                self.kvm_replace_memslot(invalid, new)
            self.kvm_swap_active_memslots()
            if self.checker is not None:
                self.checker.memslot_removed(self, old)
        elif change == KVM_MR_CREATE:
            self.kvm_replace_memslot(None, new)
            self.kvm_swap_active_memslots()
        else:  # KVM_MR_FLAGS_ONLY
            self.kvm_replace_memslot(old, new)
            self.kvm_swap_active_memslots()
        return None

    def kvm_replace_memslot(self, old, new):
        """The inactive set: the active one with ``old`` replaced by ``new`` (either may be None).
        Readers keep the set they looked up; the swap makes the new one active."""
        slots = list(self.memslots)
        if old is None:
            slots.append(new)
        elif new is None:
            slots.remove(old)
        else:
            slots[slots.index(old)] = new
        self.inactive_memslots = slots

    def kvm_swap_active_memslots(self):
        """kvm_swap_active_memslots(): publish the inactive memslots (rcu_assign_pointer) with the
        old generation marked KVM_MEMSLOT_GEN_UPDATE_IN_PROGRESS, wait for the readers of the old
        set (synchronize_srcu(&kvm->srcu)), and only then bump the generation.

        The order matters for MMIO SPTEs: a fault that looked up the old memslots (a GFN with no
        slot) may make its MMIO SPTE while the wait is on, with the generation it reads then.
        That must be the old one, which the bump then makes stale, or the SPTE would outlive the
        new slot at the same GFN and the guest take its RAM for MMIO for good (the bug fixed by
        "kvm: fix potentially corrupt mmio cache", 2014).  check_mmio_spte() takes no MMIO SPTE
        as current while the update is in progress."""
        self.memslots = self.inactive_memslots
        self.inactive_memslots = None
        if self.bugs.mmio_gen_before_srcu_wait:
            self.memslots_generation += 1  # bug switch: the new generation while readers of the old set run
        else:
            self.memslots_gen_in_progress = True
        if not self.bugs.memslot_no_srcu_wait:  # (bug switch: readers of the old slot are not waited for)
            self.srcu.synchronize_srcu_expedited()
        if not self.bugs.mmio_gen_before_srcu_wait:
            self.memslots_generation += 1
            self.memslots_gen_in_progress = False

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

    def invalidate_and_unmap(self, ranges, types, also_invalidate=()):
        """Under the write lock: kvm_mmu_invalidate_begin(), each gfn range added and unmapped
        from the roots of ``types``, then the TLB flush.  The invalidation lasts until
        invalidate_end(): a fault on those gfns (and on ``also_invalidate``'s) retries meanwhile."""
        self.mmu_lock.write_lock()
        try:
            self.kvm_mmu_invalidate_begin()
            for start, end in also_invalidate:
                self.kvm_mmu_invalidate_range_add(start, end)
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
        if self.sched is not None:
            self.touch("mmu_invalidate", False)
        if self.mmu_invalidate_in_progress:
            start, end = self.mmu_invalidate_range_start, self.mmu_invalidate_range_end
            # A begin with no range added yet covers everything (the range is INVALID_GPA).
            if start is None or start <= gfn < end:
                return True
        return self.mmu_invalidate_seq != mmu_seq

    # Read without mmu_lock (the early check in kvm_mmu_faultin_pfn): the same test here.
    mmu_invalidate_retry_gfn_unsafe = mmu_invalidate_retry_gfn

    def kvm_vm_ioctl_set_mem_attributes(self, address, size, attributes, flags=0):
        """KVM_SET_MEMORY_ATTRIBUTES: the ioctl's checks, then kvm_vm_set_mem_attributes().  Only
        KVM_MEMORY_ATTRIBUTE_PRIVATE exists, and only in a VM with private memory
        (kvm_supported_mem_attributes()): a default VM refuses it with -EINVAL."""
        supported = KVM_MEMORY_ATTRIBUTE_PRIVATE if self.has_private_mem else 0
        if flags:
            raise KvmIoctlError(EINVAL, "KVM_SET_MEMORY_ATTRIBUTES: flags must be 0")
        if attributes & ~supported:
            raise KvmIoctlError(
                EINVAL,
                f"KVM_SET_MEMORY_ATTRIBUTES: attributes {attributes:#x} not supported "
                f"by this VM type" + ("" if self.has_private_mem else " (a default VM has no private memory)"),
            )
        if size == 0 or address + size < address or (address | size) & 0xFFF:
            raise KvmIoctlError(
                EINVAL, f"KVM_SET_MEMORY_ATTRIBUTES: bad range {address:#x}+{size:#x} (page-aligned, non-empty)"
            )
        if (address + size) >> 12 > self.max_gfn_exclusive:
            raise KvmIoctlError(EINVAL, "KVM_SET_MEMORY_ATTRIBUTES: range beyond the guest physical address space")
        self.set_memory_attributes(
            address >> 12, (address + size) >> 12, private=bool(attributes & KVM_MEMORY_ATTRIBUTE_PRIVATE)
        )

    def set_memory_attributes(self, start_gfn, end_gfn, private):
        """kvm_vm_set_mem_attributes(): mark [start, end) private or shared.

        As upstream: under mmu_lock, kvm_mmu_invalidate_begin() and the pre-set handler
        (kvm_arch_pre_set_memory_attributes(): going private zaps the shared mappings, going
        shared the private ones, which for a TD are BLOCKed, TRACKed and REMOVEd; a VM without
        a mirror root has both in its direct root) with a flush; then the attributes are
        stored; then, under mmu_lock again, the post-set handler and kvm_mmu_invalidate_end().
        A fault that read the old attribute cannot map it: the invalidation was in progress,
        or its sequence moved.  The invalidation also covers the huge pages around the range
        (upstream adds the head and tail huge pages): a fault next to the range must not map a
        huge page that the new attribute splits."""
        have = self.private_gfns
        if have.covers(start_gfn, end_gfn) if private else not have.intersects(start_gfn, end_gfn):
            return  # nothing to do: the range has these attributes
        self.trace_emit(
            "kvm_set_memory_attributes", msg=f"gfn {start_gfn:x}-{end_gfn:x} {'private' if private else 'shared'}"
        )
        # kvm_arch_gmem_convert() (v5 43-44/45): TDX splits the huge private pages the range cuts
        # before they are zapped, so that exactly the range goes.
        r = self.x86_ops.gmem_convert(self, start_gfn, end_gfn, private)
        if r:
            raise KvmIoctlError(-r, f"converting gfn {start_gfn:#x}-{end_gfn:#x}: splitting failed ({r})")
        if not self.has_mirrored_tdp:
            types = KVM_DIRECT_ROOTS  # kvm_gfn_range_filter_to_root_types(): one root for all
        else:
            types = KVM_DIRECT_ROOTS if private else KVM_MIRROR_ROOTS
        ranges = [(start_gfn, end_gfn)] if self.has_private_mem else []
        around = self._hugepages_around(start_gfn, end_gfn) if ranges else []
        self.invalidate_and_unmap(ranges, types, around)
        if self.sched is not None:
            self.sched.point(None, "set_attributes")
        self.touch_all()  # attributes are read on many paths: count it as global
        if private:
            self.private_gfns.add(start_gfn, end_gfn)
        else:
            self.private_gfns.remove(start_gfn, end_gfn)
        if ranges and self.checker is not None:
            # (still inside the invalidation: no fault can have mapped the range again)
            self.checker.range_unmapped(self, start_gfn, end_gfn, types, "KVM_SET_MEMORY_ATTRIBUTES")
        self.invalidate_end()

    def _hugepages_around(self, start_gfn, end_gfn):
        """kvm_arch_pre_set_memory_attributes(): the head and tail huge pages of the range that
        may be mapped huge now (inside their memslot, backed by pages that large, with no private
        GFN: a shared mapping), which a fault next to the range could map while the attributes
        change: they join the invalidation."""
        out = []
        for level in range(PG_LEVEL_2M, KVM_MAX_HUGEPAGE_LEVEL + 1):
            pages = KVM_PAGES_PER_HPAGE(level)
            for gfn in {start_gfn & -pages, (end_gfn - 1) & -pages}:
                slot = self.gfn_to_memslot(gfn)
                if (
                    slot is not None
                    and slot.backing_level >= level
                    and slot.lpage_allowed(gfn, level)
                    and not self.private_gfns.intersects(gfn, gfn + pages)
                ):
                    out.append((gfn, gfn + pages))
        return out

    def mmu_notifier_invalidate_range_start(self, hva_start, hva_end):
        """kvm_mmu_notifier_invalidate_range_start(): the gfns of every memslot behind the hva
        range are unmapped (shared mappings only: private memory is not behind an hva) inside
        an invalidation that lasts until _end."""
        ranges = []
        for slot in self.memslots:
            a = max(hva_start, slot.userspace_addr)
            b = min(hva_end, slot.userspace_addr + (slot.npages << 12))
            if a < b:
                ranges.append(
                    (
                        slot.base_gfn + ((a - slot.userspace_addr) >> 12),
                        slot.base_gfn + ((b - slot.userspace_addr + 0xFFF) >> 12),
                    )
                )
        self.invalidate_and_unmap(ranges, KVM_DIRECT_ROOTS)

    def mmu_notifier_invalidate_range_end(self):
        self.invalidate_end()

    def mem_is_private(self, gfn):
        """kvm_mem_is_private(): the gfn has KVM_MEMORY_ATTRIBUTE_PRIVATE (never in a VM without
        private memory)."""
        if not self.has_private_mem:
            return False
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
            return self.kvm_gmem_get_pfn(slot, gfn)
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
            self.touch(("task", v.vcpu_id))  # (emu.checkers.dpor) its requests, its mode, its IPI
            v.requests |= req
            mode = v.mode
            if mode == IN_GUEST_MODE:
                v.mode = EXITING_GUEST_MODE
            if (mode != OUTSIDE_GUEST_MODE) if wait else (mode == IN_GUEST_MODE):
                if self.bugs.kick_misses_running_vcpu and v.hw is not None and v.hw.in_guest:
                    continue  # bug switch: the IPI never reaches a vCPU running guest code
                if v.hw is not None:
                    v.hw.kick()
                    targets.append(v)
        if wait and targets:
            sched = self.sched
            pred = lambda: not any(t.hw.intr_pending for t in targets)  # noqa: E731
            if sched is not None:
                sched.wait_until(pred, what="ipi_wait")
            else:
                raise AssertionError("a vCPU in guest mode without a scheduler")
        return targets

    # -- the checker's hooks (emu.checkers.check.install arms them; the model imports no checker) ---------
    def check_guest_tlbs(self, when, vcpus=None, entering=False):
        """No vCPU in guest mode uses a translation the tables no longer give (the check runs
        when one is installed in ``self.checker``)."""
        c = self.checker
        if c is not None:
            c.guest_tlbs(self, when, vcpus, entering)

    def check_page_freed(self, pfn, what):
        """The host frees page ``pfn``: nothing may still map or cache it (when a checker is installed)."""
        c = self.checker
        if c is not None:
            c.page_freed(self, pfn, what)

    def check_td_page_freed(self, hpa, what):
        """The host frees page ``hpa`` that a TD had: no cache line may still hold its TD bit
        (when a checker is installed).  ``what`` names the KVM path."""
        c = self.checker
        if c is not None:
            c.td_page_freed(self, hpa, what)

    def checker_violation(self, what):
        """A broken invariant seen while the run goes on: the run fails with it (first one wins)."""
        self.violations.append(what)
        self.trace_emit("checker_violation", msg=what)
        if self.on_checker_violation is not None:
            self.on_checker_violation()

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
            return  # delivered with the next flush
        targets = self.kvm_make_all_cpus_request(KVM_REQ_TLB_FLUSH)
        self.touch("flush")
        self.flush_owed = False
        self.check_guest_tlbs("after kvm_flush_remote_tlbs() returned")
        self.stat["remote_tlb_flush"] += 1
        self.trace_emit("kvm_flush_remote_tlbs", vcpus=len(self.vcpus), kicked=[t.vcpu_id for t in targets])

    def flush_remote_tlbs_gfn(self, gfn, level):
        self.flush_remote_tlbs()

    # -- vCPUs --------------------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id):
        if any(v.vcpu_id == vcpu_id for v in self.vcpus):
            raise KvmIoctlError(EEXIST, f"vCPU {vcpu_id} exists")
        v = self.vcpu_class(self, vcpu_id)
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


class KvmVcpuMain:
    """The vCPU side of kvm_main.c: kicks (kvm_vcpu_kick) and signals."""

    def kick_outside_guest_mode(self):
        """KVM_REQ_OUTSIDE_GUEST_MODE for this vCPU: kicked out of guest mode, and waited for."""
        self.kvm.kvm_make_vcpus_request([self], KVM_REQ_OUTSIDE_GUEST_MODE)

    def kick_signal(self):
        """A signal to the vCPU's thread (userspace stopping the VM): KVM_RUN returns -EINTR;
        a vCPU in guest mode is kicked out first."""
        self.kvm.touch(("task", self.vcpu_id))
        self.send_signal()

    def send_signal(self):
        """kick_signal() from another thread (the VMM's signal and timeout watchdog): no
        footprint (the running step's is the main thread's), and a vCPU running guest code in
        Unicorn leaves it (emu.hw.vcpu.Vcpu.kick)."""
        self.signal_pending = True
        # kvm_vcpu_kick(): IN_GUEST_MODE (on its way in, past its last look at requests) is
        # enough for the IPI, which the entry then takes at once.
        if self.hw is not None and (self.hw.in_guest or self.mode == IN_GUEST_MODE):
            self.hw.kick()
