"""PAMT: the Physical Address Metadata Table, one 16-byte entry per 4K page of the TDMR.

Kept in module memory (the host cannot read it).  Entry layout in this model:
  word 0: bits 7:0 page type (PT_*), bit 8 the entry lock, bits 10:9 page size
          (0 = 4K, 1 = 2M: each 4K entry of a 2M page says so), bits 63:12 owner (TDR PA)
  word 1: BEPOCH, the TD epoch when the page was blocked
"""

from .abi import PT_NDA, PAGE_TYPE_NAMES

PAMT_ENTRY_SIZE = 16
_PT_MASK = 0xFF
_LOCK = 1 << 8
_OWNER_MASK = ~0xFFF & ((1 << 64) - 1)


class Pamt:
    def __init__(self, mem, base, tdmr_base, tdmr_size):
        self.mem = mem
        self.base = base
        self.tdmr_base = tdmr_base
        self.tdmr_end = tdmr_base + tdmr_size
        # An index of the entries that are not PT_NDA (the table in memory stays the truth:
        # scan_owned_pages() reads it back), so checks need not scan every entry.
        self.index = {}

    def covers(self, hpa):
        return self.tdmr_base <= hpa < self.tdmr_end

    def _slot(self, hpa):
        return (self.base + ((hpa - self.tdmr_base) >> 12) * PAMT_ENTRY_SIZE) >> 3

    def page_type(self, hpa):
        return self.mem.q[self._slot(hpa)] & _PT_MASK

    def owner(self, hpa):
        return self.mem.q[self._slot(hpa)] & _OWNER_MASK

    def page_size(self, hpa):
        return (self.mem.q[self._slot(hpa)] >> 9) & 3

    def bepoch(self, hpa):
        return self.mem.q[self._slot(hpa) + 1]

    def set(self, hpa, pt, owner=0, size=0):
        i = self._slot(hpa)
        self.mem.q[i] = (self.mem.q[i] & _LOCK) | pt | (size << 9) | (owner & _OWNER_MASK)
        if pt == PT_NDA:
            self.index.pop(hpa, None)
        else:
            self.index[hpa] = (pt, owner & _OWNER_MASK)

    def set_bepoch(self, hpa, epoch):
        self.mem.q[self._slot(hpa) + 1] = epoch

    def try_lock(self, hpa):
        i = self._slot(hpa)
        v = self.mem.q[i]
        if v & _LOCK:
            return False
        self.mem.q[i] = v | _LOCK
        return True

    def unlock(self, hpa):
        i = self._slot(hpa)
        self.mem.q[i] &= ~_LOCK

    def describe(self, hpa):
        pt = self.page_type(hpa)
        name = PAGE_TYPE_NAMES.get(pt, str(pt))
        return name if pt == PT_NDA else f"{name} owner {self.owner(hpa):#x}"

    def owned_pages(self, owner=None):
        """(hpa, page type, owner) of every page not PT_NDA, sorted (from the index)."""
        return sorted((hpa, pt, o) for hpa, (pt, o) in self.index.items() if owner is None or o == owner)

    def scan_owned_pages(self, owner=None):
        """The same, read from the table in memory (slow: every entry)."""
        out = []
        q = self.mem.q
        first = self.base >> 3
        n = (self.tdmr_end - self.tdmr_base) >> 12
        for k in range(n):
            v = q[first + 2 * k]
            if v & _PT_MASK:
                o = v & _OWNER_MASK
                if owner is None or o == owner:
                    out.append((self.tdmr_base + (k << 12), v & _PT_MASK, o))
        return out
