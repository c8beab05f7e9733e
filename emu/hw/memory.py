"""Host physical memory: one contiguous buffer that every vCPU's Unicorn maps.

HPA 0 is offset 0 of the buffer.  The buffer is an anonymous mmap, so pages
are committed by the host OS only when first written: a 4 GiB guest that
touches a few thousand pages costs a few thousand pages.

Two kinds of access:
- physical (``read64``/``write64``/``cmpxchg64``/``read``/``write``): what the
  hardware does (page walkers, the CPU itself, the TDX module in SEAM mode);
- host software (``host_*``): what KVM and the VMM do.  These honour the
  per-page access policy, which the TDX module uses to make its own pages
  and TD private pages unreachable to the host (TDX memory protection).
"""

import ctypes
import mmap
from itertools import compress

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
_U64 = (1 << 64) - 1
_ZERO_PAGE = bytes(PAGE_SIZE)


class HostAccessError(Exception):
    """Host software touched a page whose policy refuses it."""

    def __init__(self, hpa, write, owner):
        self.hpa, self.write, self.owner = hpa, write, owner
        super().__init__(f"host {'write to' if write else 'read of'} HPA {hpa:#x} refused: "
                         f"the page belongs to {owner}")


class OutOfHostMemory(Exception):
    pass


class HostMemory:
    """``size`` bytes of host physical memory (a multiple of 4 KiB)."""

    def __init__(self, size):
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"host memory size {size:#x} is not a positive multiple of 4 KiB")
        self.size = size
        self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.buf = memoryview(self._mm)
        self.base_address = self.address()
        # q[hpa >> 3] is the 64-bit little-endian word at hpa: the walkers use it directly.
        self.q = self.buf.cast("Q")
        # pfn -> owner name for pages host software may not touch.
        self.protected = {}
        # Bulk writes (write/zero of byte ranges) are logged by page: a vCPU entering the
        # guest drops its translated code if one of them hit a page it ran code from,
        # since the CPU would see the new bytes (Unicorn tracks only its own stores).
        self.generation = 0
        self.written = []            # (generation, first pfn, last pfn): at least the last WRITE_LOG writes
        self.sched = None            # (emu.checkers.dpor) the scheduler recording footprints, while it does

    # -- the address Unicorn maps (mem_map_ptr) --------------------------------------------------
    def address(self):
        return ctypes.addressof(ctypes.c_char.from_buffer(self._mm))

    def _check(self, hpa, n):
        if hpa < 0 or hpa + n > self.size:
            raise IndexError(f"HPA {hpa:#x}+{n:#x} is outside host memory (size {self.size:#x})")

    # -- physical access ----------------------------------------------------------------------------
    def read64(self, hpa):
        if hpa & 7:
            raise ValueError(f"unaligned 64-bit read at HPA {hpa:#x}")
        return self.q[hpa >> 3]

    def write64(self, hpa, value):
        if hpa & 7:
            raise ValueError(f"unaligned 64-bit write at HPA {hpa:#x}")
        self.q[hpa >> 3] = value & _U64

    def cmpxchg64(self, hpa, old, new):
        """Atomically replace ``old`` by ``new``; False (nothing written) when the word is not ``old``.

        vCPUs interleave only at scheduling points (never inside this call), so a
        compare-then-store in one Python call is atomic, as LOCK CMPXCHG is.
        """
        i = hpa >> 3
        q = self.q
        if q[i] != old:
            return False
        q[i] = new & _U64
        return True

    def xchg64(self, hpa, new):
        i = hpa >> 3
        old = self.q[i]
        self.q[i] = new & _U64
        return old

    def read(self, hpa, n):
        self._check(hpa, n)
        return bytes(self.buf[hpa:hpa + n])

    def write(self, hpa, data):
        self._check(hpa, len(data))
        self.buf[hpa:hpa + len(data)] = data
        self._log_write(hpa, len(data))

    def zero(self, hpa, n=PAGE_SIZE):
        self._check(hpa, n)
        self.buf[hpa:hpa + n] = _ZERO_PAGE if n == PAGE_SIZE else bytes(n)
        self._log_write(hpa, n)

    # The log keeps at least the last WRITE_LOG writes.  A vCPU that finds it lost some drops
    # all its translated code, so it must outlast what KVM writes between two entries of a
    # vCPU: a page fault that tops up the MMU caches zeroes some 80 pages.
    WRITE_LOG = 1024

    def _log_write(self, hpa, n):
        self.generation += 1
        log = self.written
        log.append((self.generation, hpa >> PAGE_SHIFT, (hpa + max(n, 1) - 1) >> PAGE_SHIFT))
        if self.sched is not None:
            fp = self.sched.fp
            if fp is not None:
                fp.writes.update(("page", pfn) for pfn in range(log[-1][1], log[-1][2] + 1))
        if len(log) > 2 * self.WRITE_LOG:
            del log[:len(log) - self.WRITE_LOG]

    def written_since(self, generation):
        """The (first pfn, last pfn) ranges written after ``generation``; None if the log lost some."""
        log = self.written
        k = self.generation - generation       # generations are consecutive: the last k entries
        if k > len(log):
            return None
        return [(a, b) for _, a, b in log[len(log) - k:]] if k > 0 else []

    # -- per-page access policy for host software ---------------------------------------------------
    def protect(self, pfn, owner):
        self.protected[pfn] = owner

    def unprotect(self, pfn):
        self.protected.pop(pfn, None)

    def check_host(self, hpa, n, write):
        if self.protected:
            for pfn in range(hpa >> PAGE_SHIFT, ((hpa + max(n, 1) - 1) >> PAGE_SHIFT) + 1):
                owner = self.protected.get(pfn)
                if owner is not None:
                    raise HostAccessError(pfn << PAGE_SHIFT, write, owner)

    def host_read(self, hpa, n):
        self.check_host(hpa, n, False)
        return self.read(hpa, n)

    def host_write(self, hpa, data):
        self.check_host(hpa, len(data), True)
        self.write(hpa, data)

    def host_read64(self, hpa):
        self.check_host(hpa, 8, False)
        return self.read64(hpa)

    def host_write64(self, hpa, value):
        self.check_host(hpa, 8, True)
        self.write64(hpa, value)

    def host_zero(self, hpa, n=PAGE_SIZE):
        self.check_host(hpa, n, True)
        self.zero(hpa, n)

    def resident_bytes(self):
        """Bytes of this buffer the host OS has committed (from /proc/self/smaps when available)."""
        return _rss_of_mapping(self.address(), self.size)


_INDICES = range(512)
_rows = {}                   # (buffer address, table, empty) -> (the table's bytes, its entries)


def table_entries(mem, table, empty):
    """(index, value) of every entry of the 4 KiB table at HPA ``table`` but those holding
    ``empty`` (what a new table is filled with: most of its 512 entries), for the checkers'
    walks of whole trees.  The entries are found in C (map, compress), and kept with the
    page's bytes: a page read again with the same bytes costs a 4 KiB compare.  After
    each explored run every table is read again, and most did not change.  The cache
    lives outside the model's objects, so runs that restore the snapshot in place
    (emu.checkers.inplace) keep it; the bytes make it right whatever happened since."""
    raw = mem._mm[table:table + PAGE_SIZE]
    key = (mem.base_address, table, empty)
    hit = _rows.get(key)
    if hit is not None and hit[0] == raw:
        return hit[1]
    i0 = table >> 3
    row = mem.q[i0:i0 + 512].tolist()
    out = [(i, row[i]) for i in compress(_INDICES, map(empty.__ne__, row))]
    if len(_rows) > 65536:
        _rows.clear()
    _rows[key] = (raw, out)
    return out


class PageAllocator:
    """The host kernel's page allocator over [base, limit) of host memory.

    Single pages come from a free list (LIFO, like the per-CPU page lists), runs
    of contiguous pages from a bump pointer.  Every page handed out is zeroed.
    """

    def __init__(self, mem, base, limit):
        assert base % PAGE_SIZE == 0 and limit % PAGE_SIZE == 0 and base <= limit <= mem.size
        self.mem = mem
        self.base, self.limit = base, limit
        self.next = base
        self.free_list = []
        self.freed = set()           # pages on the free list (a checker reads through them at its peril)
        self.in_use = 0

    def alloc_page(self):
        if self.mem.sched is not None:
            # (emu.checkers.dpor) Two allocations in either order give the same state up to which page
            # is which; a free before an allocation may hand that page out, after it not.
            self.mem.sched.touch(("alloc", self.base), False)
        if self.free_list:
            hpa = self.free_list.pop()
            self.freed.discard(hpa)
        elif self.next < self.limit:
            hpa = self.next
            self.next += PAGE_SIZE
        else:
            raise OutOfHostMemory(f"host page allocator exhausted ({(self.limit - self.base) >> 10} KiB)")
        self.mem.zero(hpa)
        self.in_use += 1
        return hpa

    def alloc_range(self, npages):
        """``npages`` contiguous pages (left untouched: fresh anonymous memory is already zero)."""
        size = npages << PAGE_SHIFT
        if self.mem.sched is not None:
            self.mem.sched.touch(("alloc", self.base), False)
        if self.next + size > self.limit:
            raise OutOfHostMemory(f"cannot allocate {size >> 10} KiB of contiguous host memory")
        hpa = self.next
        self.next += size
        self.in_use += npages
        return hpa

    def free_page(self, hpa):
        assert hpa % PAGE_SIZE == 0 and self.base <= hpa < self.limit, hex(hpa)
        if self.mem.sched is not None:
            self.mem.sched.touch(("alloc", self.base))
        self.free_list.append(hpa)
        self.freed.add(hpa)
        self.in_use -= 1


def _rss_of_mapping(addr, size):
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < addr + size and hi > addr
        elif inside and head == "Rss:":
            total += int(line.split()[1]) * 1024
    return total
