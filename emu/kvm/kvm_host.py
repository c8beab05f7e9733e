"""Definitions KVM shares between its files (include/linux/kvm_host.h, arch/x86/include/asm/kvm_host.h):
errno values, vcpu->requests and vcpu->mode, struct kvm_memory_slot, and the kvm_run that KVM_RUN fills.
"""

from .spte import PG_LEVEL_4K, KVM_PAGES_PER_HPAGE
from .uapi import EXIT_NAMES, KVM_MEM_READONLY, KVM_MEM_GUEST_MEMFD, KVM_ENOSYS  # noqa: F401

EINVAL, EEXIST, EFAULT, EIO, ENOENT, ENOMEM = 22, 17, 14, 5, 2, 12

# vcpu->requests
KVM_REQ_TLB_FLUSH = 1 << 0
KVM_REQ_OUTSIDE_GUEST_MODE = 1 << 1
KVM_REQ_MMU_FREE_OBSOLETE_ROOTS = 1 << 2
KVM_REQ_VM_DEAD = 1 << 3  # kvm_vm_dead(): the next vcpu_enter_guest() fails with -EIO
# Requests after which the vCPU flushes its TLB before it enters again (a new root is loaded
# with a local flush: kvm_mmu_load()).
KVM_REQS_FLUSHING = KVM_REQ_TLB_FLUSH | KVM_REQ_MMU_FREE_OBSOLETE_ROOTS

# vcpu->mode
OUTSIDE_GUEST_MODE, IN_GUEST_MODE, EXITING_GUEST_MODE = 0, 1, 2
MODE_NAMES = ("OUTSIDE_GUEST_MODE", "IN_GUEST_MODE", "EXITING_GUEST_MODE")
GUEST_SLICE_BLOCKS = 4000  # the emulated preemption timer: translated blocks per guest slice


class KvmIoctlError(Exception):
    """An ioctl that fails with an errno (KVM_RUN returning -EFAULT, -ENOMEM, ...).  ``run`` is
    the kvm_run KVM filled in for userspace to look at (KVM_RUN's -EFAULT with
    KVM_EXIT_MEMORY_FAULT), else None."""

    def __init__(self, errno, msg, run=None):
        self.errno = errno
        self.run = run
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
        # guest_memfd backing of private pages (KVM_MEM_GUEST_MEMFD): the host address of the
        # slot's range of the file (its pages' HPAs: guest_memfd memory is never migrated)
        self.gmem_addr = gmem_addr
        if gmem_addr is not None:
            self.flags |= KVM_MEM_GUEST_MEMFD
        # slot->arch.lpage_info: per level (2M, 1G), per huge page, the disallow_lpage flags that are
        # kept rather than computed (KVM_LPAGE_GUEST_INHIBIT_FLAG); mixed attributes are computed.
        self.lpage_info = {}

    def copy(self):
        """kvm_copy_memslot(): the same slot, a new object (memslot changes are made on copies);
        slot->arch is copied as a whole, so the copy shares lpage_info."""
        new = KvmMemorySlot(
            self.id, self.base_gfn, self.npages, self.userspace_addr, self.flags, self.backing_level, self.gmem_addr
        )
        new.lpage_info = self.lpage_info
        return new

    @property
    def readonly(self):
        return bool(self.flags & KVM_MEM_READONLY)

    @property
    def can_be_private(self):
        """kvm_slot_can_be_private(): the slot has a guest_memfd."""
        return bool(self.flags & KVM_MEM_GUEST_MEMFD)

    def __repr__(self):
        return f"KvmMemorySlot({self.id}, gfn {self.base_gfn:#x}+{self.npages:#x}, flags {self.flags:#x})"

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


class KvmMemoryFault:
    """kvm_run.memory_fault: what KVM could not map (kvm_prepare_memory_fault_exit())."""

    __slots__ = ("flags", "gpa", "size")

    def __init__(self, flags, gpa, size):
        self.flags, self.gpa, self.size = flags, gpa, size

    def as_dict(self):
        return {"flags": self.flags, "gpa": self.gpa, "size": self.size}

    def __repr__(self):
        return f"KvmMemoryFault(flags={self.flags:#x}, gpa={self.gpa:#x}, size={self.size:#x})"


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
