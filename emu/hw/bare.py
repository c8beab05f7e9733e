"""A bare host for testing the hardware layer alone: an EPT built on demand.

Guest memory [0, size) is host memory [base, base + size).  Each EPT violation
inside guest memory maps its 4K page RWX/WB (building missing tables), which
makes every first touch of a page visible as an exit, without KVM.  It is the
hardware tests' fixture; the real hypervisor is emu.kvm.
"""

from .ept import EPT_RWX, MT_WB, EPT_MT_SHIFT, EPT_PS, ADDR_MASK, make_eptp, walk, EptTranslation
from .exits import EXIT_REASON_EPT_VIOLATION
from .memory import HostMemory, PageAllocator, PAGE_SIZE


class BareHost:
    def __init__(self, guest_size, levels=4, ad=True, table_pages=1024):
        self.guest_size = guest_size
        self.mem = HostMemory(guest_size + table_pages * PAGE_SIZE)
        self.base = 0
        self.alloc = PageAllocator(self.mem, guest_size, self.mem.size)
        self.levels = levels
        self.root = self.alloc.alloc_page()
        self.eptp = make_eptp(self.root, levels=levels, ad=ad)
        self.violations = []

    def write_gpa(self, gpa, data):
        self.mem.write(self.base + gpa, data)

    def read_gpa(self, gpa, n):
        return self.mem.read(self.base + gpa, n)

    def map_4k(self, gpa, perms=EPT_RWX, memtype=MT_WB):
        """Install a 4K leaf for ``gpa`` (missing tables are allocated, RWX non-leaf entries)."""
        table = self.root
        for level in range(self.levels, 1, -1):
            ptr = table + (((gpa >> (12 + 9 * (level - 1))) & 511) << 3)
            e = self.mem.read64(ptr)
            if not e & EPT_RWX:
                child = self.alloc.alloc_page()
                e = child | EPT_RWX
                self.mem.write64(ptr, e)
            assert not e & EPT_PS
            table = e & ADDR_MASK
        self.mem.write64(
            table + (((gpa >> 12) & 511) << 3), ((self.base + gpa) & ~0xFFF) | perms | (memtype << EPT_MT_SHIFT)
        )

    def handle(self, exit):
        """Map the page of an EPT violation inside guest memory; False for any other exit."""
        if exit.reason != EXIT_REASON_EPT_VIOLATION or exit.gpa >= self.guest_size:
            return False
        if walk(self.mem, self.eptp, exit.gpa, 1, set_ad=False).__class__ is EptTranslation:
            return False  # mapped already: a permission violation, not ours to fix
        self.violations.append(exit)
        self.map_4k(exit.gpa)
        return True

    def run(self, vcpu, max_exits=100000):
        """Run ``vcpu`` until an exit this host does not handle; return that exit."""
        for _ in range(max_exits):
            exit = vcpu.run()
            if not self.handle(exit):
                return exit
        raise RuntimeError("too many exits")
