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

TD memory integrity: each 64-byte cache line remembers whether it was last
written with a TD's private key (its TD bit, ``td_lines``).  The TDX module
sets it where it writes with a TD's key (``td_write``); host software sees
it: a host read of such a line returns zeros, a host write of part of one is a
machine check (recorded, and handed to ``on_machine_check``), a host write of
whole lines makes them the host's again, and so does ``movdir64b`` (what KVM's
tdx_clear_page() does).  Physical accesses (the walkers, the CPU, the module)
never look at it: the TD's own accesses use its key, and the hot paths pay
nothing.
"""

import ctypes
import mmap
from itertools import compress

LINE_SIZE = 64  # a cache line: the TD bit's granule
LINES_PER_PAGE = 64
ALL_LINES = (1 << LINES_PER_PAGE) - 1
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)
_U64 = (1 << 64) - 1
_ZERO_PAGE = bytes(PAGE_SIZE)


class HostAccessError(Exception):
    """Host software touched a page whose policy refuses it."""

    def __init__(self, hpa, write, owner):
        self.hpa, self.write, self.owner = hpa, write, owner
        super().__init__(f"host {'write to' if write else 'read of'} HPA {hpa:#x} refused: the page belongs to {owner}")


class OutOfHostMemory(Exception):
    pass


def _lines_mask(off, n):
    """The lines of a page that bytes [off, off + n) of it touch."""
    first, last = off // LINE_SIZE, (off + n - 1) // LINE_SIZE
    return ((1 << (last + 1)) - 1) & ~((1 << first) - 1)


def _whole_lines_mask(off, n):
    """The lines of a page that bytes [off, off + n) cover entirely."""
    first, end = -(-off // LINE_SIZE), (off + n) // LINE_SIZE
    return ((1 << end) - 1) & ~((1 << first) - 1) if end > first else 0


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
        self.written = []  # (generation, first pfn, last pfn): at least the last WRITE_LOG writes
        self.sched = None  # (emu.checkers.dpor) the scheduler recording footprints, while it does
        # pfn -> the lines of the page whose TD bit is set (bit i: bytes 64 i .. 64 i + 63)
        self.td_lines = {}
        self.machine_checks = []  # (hpa, what): host writes that hit part of a TD line
        self.on_machine_check = None  # called (hpa, what) for each (the run-time checks report it)

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
        return bytes(self.buf[hpa : hpa + n])

    def write(self, hpa, data):
        self._check(hpa, len(data))
        self.buf[hpa : hpa + len(data)] = data
        self._log_write(hpa, len(data))

    def zero(self, hpa, n=PAGE_SIZE):
        self._check(hpa, n)
        self.buf[hpa : hpa + n] = _ZERO_PAGE if n == PAGE_SIZE else bytes(n)
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
            del log[: len(log) - self.WRITE_LOG]

    def written_since(self, generation):
        """The (first pfn, last pfn) ranges written after ``generation``; None if the log lost some."""
        log = self.written
        k = self.generation - generation  # generations are consecutive: the last k entries
        if k > len(log):
            return None
        return [(a, b) for _, a, b in log[len(log) - k :]] if k > 0 else []

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
        data = self.read(hpa, n)
        if self.td_lines:
            data = self._td_read(hpa, data)
        return data

    def host_write(self, hpa, data):
        self.check_host(hpa, len(data), True)
        if self.td_lines:
            self._td_host_write(hpa, len(data))
        self.write(hpa, data)

    def host_read64(self, hpa):
        self.check_host(hpa, 8, False)
        if self.td_lines and self.td_lines.get(hpa >> PAGE_SHIFT, 0) >> ((hpa & 0xFFF) // LINE_SIZE) & 1:
            return 0
        return self.read64(hpa)

    def host_write64(self, hpa, value):
        self.check_host(hpa, 8, True)
        if self.td_lines:
            self._td_host_write(hpa, 8)
        self.write64(hpa, value)

    def host_zero(self, hpa, n=PAGE_SIZE):
        self.check_host(hpa, n, True)
        if self.td_lines:
            self._td_host_write(hpa, n)
        self.zero(hpa, n)

    # -- the TD bit -------------------------------------------------------------------------------------
    def td_write(self, hpa, n=PAGE_SIZE):
        """Lines [hpa, hpa + n) were written with a TD's private key (by the TDX module)."""
        self._td_update(hpa, n, True)

    def movdir64b(self, hpa, n=PAGE_SIZE):
        """64-byte direct stores of zeros with the host key over [hpa, hpa + n) (whole lines):
        the lines are the host's again (tdx_clear_page())."""
        if hpa % LINE_SIZE or n % LINE_SIZE:
            raise ValueError(f"MOVDIR64B stores whole lines: {hpa:#x}+{n:#x}")
        self._td_update(hpa, n, False)
        self.zero(hpa, n)

    def td_line_count(self, pfn):
        return bin(self.td_lines.get(pfn, 0)).count("1")

    def _td_update(self, hpa, n, set_):
        while n > 0:
            pfn, off = hpa >> PAGE_SHIFT, hpa & 0xFFF
            k = min(n, PAGE_SIZE - off)
            m = _lines_mask(off, k)
            old = self.td_lines.get(pfn, 0)
            new = old | m if set_ else old & ~m
            if new:
                self.td_lines[pfn] = new
            else:
                self.td_lines.pop(pfn, None)
            hpa, n = hpa + k, n - k

    def _td_read(self, hpa, data):
        """A host read: the bytes of TD lines read as zeros."""
        out = bytearray(data)
        pos = 0
        while pos < len(out):
            a = hpa + pos
            pfn, off = a >> PAGE_SHIFT, a & 0xFFF
            k = min(len(out) - pos, PAGE_SIZE - off)
            mask = self.td_lines.get(pfn, 0) & _lines_mask(off, k)
            while mask:
                line = (mask & -mask).bit_length() - 1
                mask &= mask - 1
                lo = max(line * LINE_SIZE, off) - off + pos
                hi = min((line + 1) * LINE_SIZE, off + k) - off + pos
                out[lo:hi] = bytes(hi - lo)
            pos += k
        return bytes(out)

    def _td_host_write(self, hpa, n):
        """A host write: whole TD lines become the host's; part of one is a machine check."""
        while n > 0:
            pfn, off = hpa >> PAGE_SHIFT, hpa & 0xFFF
            k = min(n, PAGE_SIZE - off)
            td = self.td_lines.get(pfn, 0)
            if td & _lines_mask(off, k):
                partial = td & _lines_mask(off, k) & ~_whole_lines_mask(off, k)
                if partial:
                    line = (partial & -partial).bit_length() - 1
                    where = (pfn << PAGE_SHIFT) + line * LINE_SIZE
                    what = (
                        f"machine check: a host write of {k} bytes at HPA {hpa:#x} covers part of the "
                        f"cache line at {where:#x}, which holds a TD's integrity bit"
                    )
                    self.machine_checks.append((where, what))
                    if self.on_machine_check is not None:
                        self.on_machine_check(where, what)
                left = td & ~_whole_lines_mask(off, k)  # a line written in part stays poisoned
                if left:
                    self.td_lines[pfn] = left
                else:
                    del self.td_lines[pfn]
            hpa, n = hpa + k, n - k

    def resident_bytes(self):
        """Bytes of this buffer the host OS has committed (from /proc/self/smaps when available)."""
        return _rss_of_mapping(self.address(), self.size)


_INDICES = range(512)
_rows = {}  # (buffer address, table, empty) -> (the table's bytes, its entries)


def table_entries(mem, table, empty):
    """(index, value) of every entry of the 4 KiB table at HPA ``table`` but those holding
    ``empty`` (what a new table is filled with: most of its 512 entries), for the checkers'
    walks of whole trees.  The entries are found in C (map, compress), and kept with the
    page's bytes: a page read again with the same bytes costs a 4 KiB compare.  After
    each explored run every table is read again, and most did not change.  The cache
    lives outside the model's objects, so runs that restore the snapshot in place
    (emu.checkers.inplace) keep it; the bytes make it right whatever happened since."""
    raw = mem._mm[table : table + PAGE_SIZE]
    key = (mem.base_address, table, empty)
    hit = _rows.get(key)
    if hit is not None and hit[0] == raw:
        return hit[1]
    i0 = table >> 3
    row = mem.q[i0 : i0 + 512].tolist()
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
        self.freed = set()  # pages on the free list (a checker reads through them at its peril)
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
