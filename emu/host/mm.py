"""The VMM process's page tables: userspace memory behind host virtual addresses.

Guest RAM is the VMM's anonymous memory.  Its host virtual addresses (HVAs) go
through real x86-64 4-level page tables in host kernel memory (512 entries of 8
bytes, 4K leaves: P, RW, US and the frame), filled in on first touch, as the
kernel's fault handler does.  A range is first backed by the contiguous run that
``Host.mmap`` reserved, so an untouched or unmigrated page's HPA equals its HVA.

Page migration (``migrate``) is what moves a page: the mmu_notifier invalidation
of the range (KVM unmaps it), the PTEs become migration entries (a non-present
PTE with a software marker: a fault on one waits), the contents move to a new
page, the new PTE is installed, and the old page is poisoned and freed.
"""

from ..hw.memory import PAGE_SIZE

PTE_P, PTE_RW, PTE_US = 1 << 0, 1 << 1, 1 << 2
PTE_PFN = ((1 << 52) - 1) & ~0xFFF
MIGRATION_ENTRY = 1 << 61  # software bit of a non-present PTE: the page is being migrated
POISON = 0x6B  # slab's POISON_FREE, in every byte of a freed page

MIGRATING = -1  # hva_to_pfn(): the PTE is a migration entry (wait, then retry)


class HostMm:
    def __init__(self, host):
        self.host = host
        self.mem = host.mem
        self.tables = []  # every page-table page (kernel pages owned by this mm)
        self.pml4 = self._new_table()
        self.vmas = []  # (start, end) of mapped userspace ranges
        self.free_pages = []  # pages freed by migration, reused for the next one

    def _new_table(self):
        page = self.host.mm_pages.alloc_page()
        self.tables.append(page)
        return page

    def add_vma(self, start, size):
        self.vmas.append((start, start + size))

    def covers(self, start, end):
        """[start, end) lies inside one mapping."""
        return any(a <= start and end <= b for a, b in self.vmas)

    def _in_vma(self, hva):
        for a, b in self.vmas:
            if a <= hva < b:
                return True
        return False

    def _ptep(self, hva, create):
        """The address of the PTE of ``hva`` (creating the tables on the way), or None."""
        if self.mem.sched is not None:
            self.mem.sched.touch("hostmm", create)  # (emu.checkers.dpor)
        q = self.mem.q
        table = self.pml4
        for level in (4, 3, 2):
            entp = table + (((hva >> (12 + 9 * (level - 1))) & 511) << 3)
            e = q[entp >> 3]
            if not e & PTE_P:
                if not create:
                    return None
                child = self._new_table()
                q[entp >> 3] = child | PTE_P | PTE_RW | PTE_US
                e = q[entp >> 3]
            table = e & PTE_PFN
        return table + (((hva >> 12) & 511) << 3)

    def hva_to_pfn(self, hva):
        """get_user_pages() for one page: the pfn behind ``hva``, faulting it in on first touch;
        MIGRATING for a migration entry; None outside every mapping (-EFAULT)."""
        if not self._in_vma(hva):
            return None
        ptep = self._ptep(hva, True)
        pte = self.mem.q[ptep >> 3]
        if pte & PTE_P:
            return (pte & PTE_PFN) >> 12
        if pte & MIGRATION_ENTRY:
            return MIGRATING
        # First touch: the page of the range reserved for this mapping.
        self.mem.q[ptep >> 3] = (hva & ~0xFFF) | PTE_P | PTE_RW | PTE_US
        return hva >> 12

    def lookup(self, hva):
        """The pfn ``hva`` maps now, without faulting anything in (the identity if untouched)."""
        ptep = self._ptep(hva, False)
        pte = 0 if ptep is None else self.mem.q[ptep >> 3]
        if pte & PTE_P:
            return (pte & PTE_PFN) >> 12
        if pte & MIGRATION_ENTRY:
            return MIGRATING
        return hva >> 12

    def hva_to_hpa(self, hva):
        """The HPA of ``hva`` for a host access (the VMM's own reads and writes)."""
        pfn = self.hva_to_pfn(hva)
        if pfn is None or pfn == MIGRATING:
            return None
        return (pfn << 12) | (hva & 0xFFF)

    def migrating(self, hva):
        return self.lookup(hva) == MIGRATING

    # -- migration ----------------------------------------------------------------------------------
    def set_migration_entries(self, start, end):
        """try_to_migrate(): each present PTE of [start, end) becomes a migration entry; the old
        pfns, by HVA."""
        old = {}
        for hva in range(start, end, PAGE_SIZE):
            pfn = self.hva_to_pfn(hva)
            ptep = self._ptep(hva, True)
            self.mem.q[ptep >> 3] = MIGRATION_ENTRY | (pfn << 12)
            old[hva] = pfn
        return old

    def alloc_user_page(self):
        if self.mem.sched is not None:
            self.mem.sched.touch("hostmm")
        if self.free_pages:
            return self.free_pages.pop()
        return self.host.alloc_user_pages(1)

    def move_and_map(self, old):
        """move_to_new_folio() and remove_migration_ptes(): copy each page to a new one, map it;
        then the old pages are poisoned and freed.  The new pfns, by HVA."""
        mem = self.mem
        new = {}
        for hva, pfn in old.items():
            page = self.alloc_user_page()
            mem.write(page, mem.read(pfn << 12, PAGE_SIZE))
            mem.q[self._ptep(hva, True) >> 3] = page | PTE_P | PTE_RW | PTE_US
            new[hva] = page >> 12
        return new

    def free_old(self, old):
        mem = self.mem
        if mem.sched is not None:
            mem.sched.touch("hostmm")
        for pfn in old.values():
            mem.write(pfn << 12, bytes([POISON]) * PAGE_SIZE)
            self.free_pages.append(pfn << 12)
