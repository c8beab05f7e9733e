"""PAMT: the Physical Address Metadata Table (src/common/memory_handlers/pamt_manager.c, pamt_manager.h).

Kept in module memory (the host cannot read it), in three levels as the TDX module has it: one
16-byte entry per 1G of the TDMR, one per 2M, one per 4K page, in three arrays one after the
other.  Entry layout (pamt_entry_t):

  word 0: bits 15:0 the entry lock (a sharex_hp lock: tdxmod.locks), bits 23:16 the page type
          (PT_*), bits 63:24 the owner (a TDR's PA) >> 12
  word 1: BEPOCH, the TD epoch when the page was blocked

A page's metadata is in the entry of its size: a 2M TD page is its 2M entry (PT_REG); its 4K
entries stay PT_NDA.  pamt_walk() finds it from any 4K address inside: it takes the 1G entry's
lock shared, then the 2M entry's (shared, or as asked when that is the leaf), then the 4K
entry's as asked, and stops at the first PT_REG entry or at the level asked for.  So a 4K
operation inside a 2M range holds the 2M entry shared and one on the whole 2M page holds it
exclusively (TDH.MEM.PAGE.DEMOTE and PROMOTE would take it so too).
"""

from .abi import PT_NDA, PT_REG, PAGE_TYPE_NAMES, TDX_SUCCESS
from . import locks as L

PAMT_ENTRY_SIZE = 16
_NO_HP = bytes(b & ~2 for b in range(256))  # a lock's low byte without host priority (bit 1)
PT_4KB, PT_2MB, PT_1GB = 0, 1, 2
_LOCK = 0xFFFF
_PT_SHIFT = 16
_PT_MASK = 0xFF << _PT_SHIFT
_OWNER_SHIFT = 24


def pamt_size(tdmr_size):
    """Bytes of PAMT for a TDMR of ``tdmr_size`` bytes (all three levels), in whole pages."""
    n = (tdmr_size >> 12) + -(-tdmr_size >> 21) + -(-tdmr_size >> 30)
    return -(-n * PAMT_ENTRY_SIZE // 4096) * 4096


class Pamt:
    def __init__(self, mem, base, tdmr_base, tdmr_size):
        self.mem = mem
        self.base = base
        self.tdmr_base = tdmr_base
        self.tdmr_end = tdmr_base + tdmr_size
        n4k = tdmr_size >> 12
        n2m = -(-tdmr_size >> 21)
        # word index (8-byte units) of each level's first entry
        self._first = (base >> 3, (base + n4k * PAMT_ENTRY_SIZE) >> 3, (base + (n4k + n2m) * PAMT_ENTRY_SIZE) >> 3)
        self.size = pamt_size(tdmr_size)
        # An index of the entries that are not PT_NDA: head HPA -> (page type, owner, size) (the
        # table in memory stays the truth: scan_owned_pages() reads it back), so checks need not
        # scan every entry.
        self.index = {}
        # (emu.checkers.dpor) touch(key, write): what a lock operation shares, given by the module,
        # and the module itself: only under its scheduler (module.sched) does anything record it,
        # so only then do the lock operations (a dozen a private page) work out what they share.
        self.touch = None
        self.module = None

    def covers(self, hpa):
        return self.tdmr_base <= hpa < self.tdmr_end

    def _slot(self, hpa, level=PT_4KB):
        return self._first[level] + (((hpa - self.tdmr_base) >> (12 + 9 * level)) << 1)

    def leaf_level(self, hpa):
        """The level pamt_walk() stops at for ``hpa`` when walking to 4K: the first PT_REG entry."""
        q = self.mem.q
        for level in (PT_1GB, PT_2MB):
            if (q[self._slot(hpa, level)] & _PT_MASK) >> _PT_SHIFT == PT_REG:
                return level
        return PT_4KB

    # -- metadata (of the leaf entry: the page's size) ---------------------------------------------
    def page_type(self, hpa):
        return (self.mem.q[self._slot(hpa, self.leaf_level(hpa))] & _PT_MASK) >> _PT_SHIFT

    def owner(self, hpa):
        return (self.mem.q[self._slot(hpa, self.leaf_level(hpa))] >> _OWNER_SHIFT) << 12

    def page_size(self, hpa):
        return self.leaf_level(hpa)

    def bepoch(self, hpa):
        return self.mem.q[self._slot(hpa, self.leaf_level(hpa)) + 1]

    def set(self, hpa, pt, owner=0, size=PT_4KB):
        """The entry of the ``size`` page at ``hpa``: page type and owner (its lock is kept)."""
        i = self._slot(hpa, size)
        q = self.mem.q
        q[i] = (q[i] & _LOCK) | (pt << _PT_SHIFT) | ((owner >> 12) << _OWNER_SHIFT)
        head = hpa & ~((4096 << (9 * size)) - 1)
        if pt == PT_NDA:
            self.index.pop(head, None)
        else:
            self.index[head] = (pt, owner & ~0xFFF, size)

    def set_bepoch(self, hpa, epoch, size=None):
        self.mem.q[self._slot(hpa, self.leaf_level(hpa) if size is None else size) + 1] = epoch

    def is_2mb_range_free(self, hpa):
        """pamt_is_2mb_range_free(): every 4K entry of the 2M range is PT_NDA."""
        q = self.mem.q
        first = self._slot(hpa & ~0x1FFFFF)
        return not any(q[first + 2 * k] & _PT_MASK for k in range(512))

    # -- locks -------------------------------------------------------------------------------------
    def lock_word(self, hpa, level=PT_4KB):
        return self.mem.q[self._slot(hpa, level)] & _LOCK

    def _acquire(self, hpa, level, lock_type, is_guest, i=None):
        """The lock of the entry at ``level`` (word index ``i``, when the caller has it)."""
        if i is None:
            i = self._slot(hpa, level)
        q = self.mem.q
        old = q[i] & _LOCK
        new, status = L.sharex_hp_acquire(old, lock_type, is_guest)
        q[i] = (q[i] & ~_LOCK) | new
        if self.touch is not None and self.module.sched is not None:
            self._touched(hpa, level, lock_type == L.TDX_LOCK_EXCLUSIVE or not L.is_a_read(old, new, status))
        return status

    def _release(self, hpa, level, lock_type):
        i = self._slot(hpa, level)
        q = self.mem.q
        q[i] = (q[i] & ~_LOCK) | L.sharex_hp_release(q[i] & _LOCK, lock_type)
        if self.touch is not None and self.module.sched is not None:
            self._touched(hpa, level, lock_type == L.TDX_LOCK_EXCLUSIVE)

    def _promote(self, hpa, level):
        i = self._slot(hpa, level)
        q = self.mem.q
        new, status = L.sharex_hp_promote(q[i] & _LOCK)
        q[i] = (q[i] & ~_LOCK) | new
        if self.touch is not None and self.module.sched is not None:
            self._touched(hpa, level, True)
        return status

    def _touched(self, hpa, level, write):
        self.touch(("pamt", level, hpa >> (12 + 9 * level)), write)

    def walk(self, hpa, lock_type, leaf_size=PT_4KB, walk_to_leaf_size=True, is_guest=False):
        """pamt_walk(): (status, level of the entry found, locked as ``lock_type``).  The levels
        above it are held shared; pamt_unwalk() releases all.  On a failure nothing is held."""
        target = leaf_size if walk_to_leaf_size else PT_4KB
        q = self.mem.q
        i = self._slot(hpa, PT_1GB)
        st = self._acquire(hpa, PT_1GB, L.TDX_LOCK_SHARED, is_guest, i)
        if st != TDX_SUCCESS:
            return st, None
        if (q[i] & _PT_MASK) >> _PT_SHIFT == PT_REG or target == PT_1GB:
            if lock_type == L.TDX_LOCK_EXCLUSIVE:
                st = self._promote(hpa, PT_1GB)
                if st != TDX_SUCCESS:
                    self._release(hpa, PT_1GB, L.TDX_LOCK_SHARED)
                    return st, None
            return TDX_SUCCESS, PT_1GB
        i = self._slot(hpa, PT_2MB)
        st = self._acquire(hpa, PT_2MB, L.TDX_LOCK_SHARED, is_guest, i)
        if st != TDX_SUCCESS:
            self._release(hpa, PT_1GB, L.TDX_LOCK_SHARED)
            return st, None
        if (q[i] & _PT_MASK) >> _PT_SHIFT == PT_REG or target == PT_2MB:
            if lock_type == L.TDX_LOCK_EXCLUSIVE:
                st = self._promote(hpa, PT_2MB)
                if st != TDX_SUCCESS:
                    self._release(hpa, PT_2MB, L.TDX_LOCK_SHARED)
                    self._release(hpa, PT_1GB, L.TDX_LOCK_SHARED)
                    return st, None
            return TDX_SUCCESS, PT_2MB
        st = self._acquire(hpa, PT_4KB, lock_type, is_guest)
        if st != TDX_SUCCESS:
            self._release(hpa, PT_2MB, L.TDX_LOCK_SHARED)
            self._release(hpa, PT_1GB, L.TDX_LOCK_SHARED)
            return st, None
        return TDX_SUCCESS, PT_4KB

    def unwalk(self, hpa, lock_type, level):
        """pamt_unwalk()"""
        self._release(hpa, level, lock_type)
        for upper in range(level + 1, PT_1GB + 1):
            self._release(hpa, upper, L.TDX_LOCK_SHARED)

    def implicit_lock(self, hpa, level, lock_type):
        """pamt_implicit_get_and_lock(): the entry at ``level`` only (the caller knows the page's
        size from a structure it holds locked: the TDR of a TDVPR, the S-EPT leaf of a page)."""
        return self._acquire(hpa, level, lock_type, False)

    def implicit_unlock(self, hpa, level, lock_type):
        """pamt_implicit_release_lock()"""
        self._release(hpa, level, lock_type)

    def try_lock(self, hpa, level=PT_4KB):
        """(tests) an entry's lock taken exclusively, as another CPU would hold it."""
        return self._acquire(hpa, level, L.TDX_LOCK_EXCLUSIVE, False) == TDX_SUCCESS

    def unlock(self, hpa, level=PT_4KB):
        self._release(hpa, level, L.TDX_LOCK_EXCLUSIVE)

    # -- inspection --------------------------------------------------------------------------------
    def describe(self, hpa):
        pt = self.page_type(hpa)
        name = PAGE_TYPE_NAMES.get(pt, str(pt))
        return name if pt == PT_NDA else f"{name} owner {self.owner(hpa):#x}"

    def owned_pages(self, owner=None):
        """(hpa, page type, owner) of every page not PT_NDA, sorted (from the index); a 2M page
        once, at its first 4K page."""
        return sorted((hpa, pt, o) for hpa, (pt, o, _) in self.index.items() if owner is None or o == owner)

    def bepoch_of(self, hpa, size):
        """(invariants) the BEPOCH of the ``size`` entry at ``hpa``, with no walk."""
        return self.mem.q[self._slot(hpa, size) + 1]

    def any_lock_held(self):
        """(invariants) whether any entry's lock, at any level, is held (host priority alone is not
        a lock): the lock is the low 16 bits of each 16-byte entry, read in C."""
        raw = bytes(self.mem.buf[self.base : self.base + self.size])
        low, high = raw[0::16], raw[1::16]
        return bool(low.translate(_NO_HP).strip(b"\x00") or high.strip(b"\x00"))

    def _words(self, level):
        """Word 0 of every entry of one level (read in C: a strided slice of the table)."""
        n = -(-(self.tdmr_end - self.tdmr_base) >> (12 + 9 * level))
        first = self._first[level]
        return self.mem.q[first : first + 2 * n : 2].tolist()

    def scan_owned_pages(self, owner=None):
        """The same, read from the table in memory (slow: every entry)."""
        out = []
        for level in (PT_4KB, PT_2MB, PT_1GB):
            for k, v in enumerate(self._words(level)):
                pt = (v & _PT_MASK) >> _PT_SHIFT
                if pt:
                    o = (v >> _OWNER_SHIFT) << 12
                    if owner is None or o == owner:
                        out.append((self.tdmr_base + (k << (12 + 9 * level)), pt, o))
        return sorted(out)

    def locks_held(self):
        """(invariants) (hpa, level, lock word) of every PAMT entry whose lock is not free
        (host priority alone is not a lock)."""
        out = []
        busy = _LOCK & ~L.SHAREX_HP_HOST_PRIORITY
        for level in (PT_4KB, PT_2MB, PT_1GB):
            for k, v in enumerate(self._words(level)):
                if v & busy:
                    out.append((self.tdmr_base + (k << (12 + 9 * level)), level, v & _LOCK))
        return out
