"""The host machine: its physical memory and who allocates it.

Host physical memory is split in two: the kernel's pages (KVM's page tables,
the pages KVM hands the TDX module) and userspace memory (the VMM's guest RAM,
guest_memfd).  Userspace memory is reached through the VMM's page tables
(emu/host/mm.py): a range starts out backed by the run of HPAs equal to its HVAs,
and page migration moves pages elsewhere.
"""

from ..hw.memory import HostMemory, PageAllocator, OutOfHostMemory, PAGE_SIZE
from .mm import HostMm
from tdxmod.pamt import pamt_size as tdx_pamt_size

MiB = 1 << 20
GiB = 1 << 30
MIGRATION_RESERVE = 8 * MiB


class Host:
    def __init__(self, user_size, kernel_size=None, tdx=False):
        user_size = -(-user_size // PAGE_SIZE) * PAGE_SIZE
        if kernel_size is None:
            # Page tables for every 4K page of guest memory would take 1/512 of it, twice over for a TD
            # (mirror + S-EPT); the rest is headroom.  The buffer is lazily committed.
            kernel_size = 64 * MiB + user_size // 128
        kernel_size = -(-kernel_size // PAGE_SIZE) * PAGE_SIZE
        # Headroom for the pages page migration moves guest RAM to (lazily committed, so free).
        user_size += MIGRATION_RESERVE
        self.kernel_base = 0
        self.user_base = kernel_size
        tdmr_size = kernel_size + user_size
        # With TDX, the PAMT (16 bytes per 1G, 2M and 4K of the TDMR, all of memory here) sits above it.
        pamt_size = tdx_pamt_size(tdmr_size) if tdx else 0
        self.mem = HostMemory(tdmr_size + pamt_size)
        # The top of the kernel's memory holds the VMM's page tables (emu/host/mm.py), allocated
        # apart from the pages KVM and the TDX module use, so KVM's accounting stays KVM's.
        mm_size = -(-(user_size // 512 + 16 * PAGE_SIZE) // PAGE_SIZE) * PAGE_SIZE
        self.kernel = PageAllocator(self.mem, PAGE_SIZE, kernel_size - mm_size)  # HPA 0 is never handed out
        self.mm_pages = PageAllocator(self.mem, kernel_size - mm_size, kernel_size)
        self.user_next = self.user_base
        self.user_end = tdmr_size
        self.leaked = []  # (hpa, why): pages deliberately leaked, as KVM leaks them
        self.mm = HostMm(self)  # the VMM process's page tables for its userspace memory
        self.tdx_module = None
        if tdx:
            from tdxmod.module import TdxModule
            from ..hw.vcpu import Vcpu

            self.tdx_module = TdxModule(self.mem, tdmr_size, 0, tdmr_size)
            module = self.tdx_module

            def make_cpu(index):
                cpu = Vcpu(self.mem, index)
                if module.tracer is not None and module.tracer.enabled:
                    cpu.set_tracer(module.tracer)
                return cpu

            module.make_cpu = make_cpu
            for pfn in range(tdmr_size >> 12, (tdmr_size + pamt_size) >> 12):
                self.mem.protect(pfn, "the TDX module (PAMT)")

    def alloc_kernel_page(self):
        return self.kernel.alloc_page()

    def free_kernel_page(self, hpa):
        self.kernel.free_page(hpa)

    def mmap(self, size, align=PAGE_SIZE):
        """Userspace memory: ``size`` bytes at an ``align``-aligned host virtual address.  Its
        pages are the run of HPAs equal to the HVAs until page migration moves one."""
        start = -(-self.user_next // align) * align
        if start + size > self.user_end - MIGRATION_RESERVE:
            raise OutOfHostMemory(f"cannot map {size >> 20} MiB of guest memory")
        self.user_next = start + size
        self.mm.add_vma(start, size)
        return start

    def alloc_user_pages(self, n):
        """Fresh pages for page migration, from the headroom above every mapping."""
        if self.user_next + n * PAGE_SIZE > self.user_end:
            raise OutOfHostMemory("no free host memory to migrate pages to")
        if self.mem.sched is not None:
            self.mem.sched.touch(("alloc", "user"), False)
        hpa = self.user_next
        self.user_next += n * PAGE_SIZE
        return hpa
