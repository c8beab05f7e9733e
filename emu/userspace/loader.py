"""The ELF loader and the boot layout of a guest.

``load_elf(path)`` reads an x86-64 ELF (ours from emu.userspace.guests, or one from any
toolchain) into a GuestImage: the PT_LOAD segments, the entry point and the
symbols, with a symbolizer for addresses in traces.

``build_boot(image, mem_size, nvcpus, write_gpa)`` lays the image out in guest
physical memory and builds what a vCPU needs to start (shared/DESIGN.md,
"Guest ABI"):

    0 ............................ mem_size - LOADER_REGION ........ mem_size
    | the guest's: segments at     | loader: PML4, PDPTs, PDs ->  <- stacks |
    | their p_paddr, .bss zeroed   | (bump-allocated upwards)  (vCPU 0 top) |

The page tables identity-map all of guest memory with 2M pages, so a guest
starts with paging on and GVA = GPA.  The loader does not own memory: it
writes through ``write_gpa(gpa, data)``, which the VMM provides (plain copy
for a normal VM; for a TD, the pages written are the ones to TDH.MEM.PAGE.ADD,
listed in ``Boot.pages``).  Nothing is written unless every check passes.
"""

import bisect
import dataclasses
import io
import struct

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from emu.userspace.guestabi import LOADER_REGION, MEM_ALIGN, MIN_MEM_SIZE, STACK_SIZE

PAGE_SIZE = 0x1000
HUGE_PAGE_SIZE = 0x200000

# x86-64 paging-structure entry bits (Intel SDM Vol. 3A, 4-level paging).
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_PS = 1 << 7
PTE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF  # bits 51:12
TABLE_FLAGS = PTE_P | PTE_RW  # 0x03: non-leaf entries
HUGE_LEAF_FLAGS = PTE_P | PTE_RW | PTE_PS  # 0x83: 2M leaves
# No A/D bits are preset (the walker sets them), no U/S (the guest runs at
# CPL 0), no XD (the image's text may be anywhere).

LEVEL_SHIFTS = {4: 39, 3: 30, 2: 21}  # index shift per table level
GVA_BITS = 48  # 4-level paging
PA_LIMIT = 1 << 52  # architectural MAXPHYADDR cap

# ELF program-header flags
PF_X, PF_W, PF_R = 1, 2, 4


class LoadError(Exception):
    """A guest image that cannot be loaded; the message says why, in one line."""


# ---------------------------------------------------------------------------
# The image
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
    """One PT_LOAD segment: ``data`` (p_filesz bytes) goes to ``paddr``, then
    zeros up to ``memsz``."""

    paddr: int
    vaddr: int
    data: bytes
    memsz: int
    flags: int  # PF_R | PF_W | PF_X

    @property
    def end(self):
        return self.paddr + self.memsz

    def perms(self):
        return "".join(c if self.flags & bit else "-" for c, bit in (("r", PF_R), ("w", PF_W), ("x", PF_X)))

    def __repr__(self):
        return f"Segment(paddr={self.paddr:#x}, filesz={len(self.data):#x}, memsz={self.memsz:#x}, {self.perms()})"


@dataclasses.dataclass
class GuestImage:
    path: str
    entry: int
    segments: list  # [Segment], in program-header order
    symbols: list  # sorted [(addr, size, name)]
    # For symbolize: one preferred name per address, with its size and the
    # end of its section, so that an address past the end of the image (a
    # stack address, say) is not blamed on the image's last label.
    _sym_addrs: list = dataclasses.field(default_factory=list, repr=False)
    _sym_info: list = dataclasses.field(default_factory=list, repr=False)

    def symbolize(self, addr):
        """ "name+0x12" for the nearest symbol at or below addr ("name+0x0" at
        the symbol itself); None when no symbol covers addr."""
        i = bisect.bisect_right(self._sym_addrs, addr) - 1
        if i < 0:
            return None
        sym_addr, size, name, sec_end = self._sym_info[i]
        inside = addr == sym_addr or addr < sec_end or addr < sym_addr + size
        if not inside:
            return None
        return f"{name}+{addr - sym_addr:#x}"

    def symbol(self, name):
        """Address of the symbol called ``name``; KeyError if there is none."""
        for addr, _size, sym_name in self.symbols:
            if sym_name == name:
                return addr
        raise KeyError(name)

    def read(self, vaddr, n):
        """``n`` bytes at guest-virtual ``vaddr`` as the image loads them (.bss reads as
        zeros); None unless one segment holds them all."""
        for seg in self.segments:
            off = vaddr - seg.vaddr
            if 0 <= off and off + n <= seg.memsz:
                return (seg.data[off : off + n]).ljust(n, b"\0")
        return None

    def read_cstring(self, vaddr, limit=512):
        """The NUL-terminated string at ``vaddr`` in the image (at most ``limit`` bytes,
        decoded leniently); None when vaddr is not in the image."""
        for seg in self.segments:
            off = vaddr - seg.vaddr
            if 0 <= off < seg.memsz:
                raw = seg.data[off : off + limit].split(b"\0", 1)[0]
                return raw.decode("utf-8", "replace")
        return None

    def image_range(self):
        """[lowest paddr, highest paddr end) over the loaded segments."""
        return (min(s.paddr for s in self.segments), max(s.end for s in self.segments))


def load_elf(path):
    """Read an x86-64 ELF executable.  Raises LoadError with one clear
    message for anything that is not one, or is damaged."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise LoadError(f"{path}: cannot read: {e.strerror or e}") from None
    if raw[:4] != b"\x7fELF":
        raise LoadError(f"{path} is not an ELF file")
    try:
        elf = ELFFile(io.BytesIO(raw))
        return _read_image(path, elf, len(raw))
    except LoadError:
        raise
    except (ELFError, struct.error, ValueError, IndexError, KeyError, AssertionError) as e:
        # pyelftools reports a truncated or damaged file with any of these
        raise LoadError(f"{path}: corrupt ELF file ({e or type(e).__name__})") from None


def _read_image(path, elf, file_size):
    if elf.elfclass != 64 or not elf.little_endian:
        raise LoadError(
            f"{path}: not a 64-bit little-endian ELF "
            f"(class {elf.elfclass}, {'little' if elf.little_endian else 'big'}-endian)"
        )
    if elf["e_machine"] != "EM_X86_64":
        raise LoadError(f"{path}: ELF for {elf['e_machine']}, not x86-64 (EM_X86_64)")
    etype = elf["e_type"]
    if etype == "ET_REL":
        raise LoadError(f"{path}: a relocatable object (.o), not an executable: link it first")
    if etype not in ("ET_EXEC", "ET_DYN"):
        raise LoadError(f"{path}: ELF type {etype}, not an executable")

    for ph in elf.iter_segments():
        # A guest runs on bare (virtual) hardware: nobody there loads shared libraries or
        # relocates a position-independent image.
        if ph["p_type"] == "PT_INTERP":
            interp = ph.data().rstrip(b"\0").decode("utf-8", "replace")
            raise LoadError(
                f"{path}: a dynamically linked program (it asks for the interpreter {interp}): a guest "
                f"must be a static, freestanding executable (e.g. gcc -static -nostdlib)"
            )
        if ph["p_type"] == "PT_DYNAMIC":
            raise LoadError(
                f"{path}: not a static executable (it has a PT_DYNAMIC segment: it needs relocating "
                f"or shared libraries): link it with -static -nostdlib (not -static-pie)"
            )
    segments = []
    for idx, ph in enumerate(elf.iter_segments()):
        if ph["p_type"] != "PT_LOAD" or ph["p_memsz"] == 0:
            continue  # an empty PT_LOAD loads nothing
        where = f"{path}: PT_LOAD segment {idx} (paddr {ph['p_paddr']:#x})"
        filesz, memsz = ph["p_filesz"], ph["p_memsz"]
        if filesz > memsz:
            raise LoadError(f"{where}: corrupt: p_filesz {filesz:#x} > p_memsz {memsz:#x}")
        if ph["p_offset"] + filesz > file_size:
            raise LoadError(f"{where}: corrupt: its data runs past the end of the file")
        if ph["p_vaddr"] != ph["p_paddr"]:
            # The loader's map is the identity: code linked to run at another
            # virtual address would fault at its first instruction.
            raise LoadError(
                f"{where}: p_vaddr {ph['p_vaddr']:#x} differs from p_paddr; "
                f"guests run on an identity map and need p_vaddr == p_paddr"
            )
        data = ph.data()
        segments.append(
            Segment(paddr=ph["p_paddr"], vaddr=ph["p_vaddr"], data=bytes(data), memsz=memsz, flags=ph["p_flags"])
        )
    if not segments:
        raise LoadError(f"{path}: no PT_LOAD segment: nothing to load")

    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if b.paddr < a.end:
            raise LoadError(f"{path}: PT_LOAD segments overlap: {a.paddr:#x}-{a.end:#x} and {b.paddr:#x}-{b.end:#x}")

    entry = elf["e_entry"]
    if not any(s.paddr <= entry < s.end for s in segments):
        raise LoadError(f"{path}: entry point {entry:#x} is outside every PT_LOAD segment")

    image = GuestImage(path=path, entry=entry, segments=segments, symbols=[])
    _read_symbols(elf, image)
    return image


# Symbol types worth a name in a trace: functions, data objects and plain
# labels (an assembler label such as `touch_loop` is STT_NOTYPE).
_SYM_TYPES = {"STT_FUNC": 0, "STT_OBJECT": 0, "STT_NOTYPE": 1}


def _read_symbols(elf, image):
    symtab = elf.get_section_by_name(".symtab")
    if not isinstance(symtab, SymbolTableSection):
        return  # stripped: no names, symbolize() gives None
    sections = list(elf.iter_sections())
    best = {}  # addr -> (rank, name, size, section end)
    symbols = []
    for sym in symtab.iter_symbols():
        stype = sym["st_info"]["type"]
        shndx = sym["st_shndx"]
        if stype not in _SYM_TYPES or not sym.name or not isinstance(shndx, int):
            continue  # section/file symbols, .equ constants (SHN_ABS), undefined
        if shndx >= len(sections):
            continue
        sec = sections[shndx]
        if not sec["sh_flags"] & SH_FLAGS.SHF_ALLOC:
            continue  # not in the loaded image
        addr, size = sym["st_value"], sym["st_size"]
        symbols.append((addr, size, sym.name))
        # Among names for one address prefer a typed symbol (FUNC/OBJECT) to a
        # label, a name of the program to a linker-made one (__bss_start...),
        # and a global to a local.
        rank = (_SYM_TYPES[stype], sym.name.startswith("__"), sym["st_info"]["bind"] == "STB_LOCAL", sym.name)
        sec_end = sec["sh_addr"] + sec["sh_size"]
        if addr not in best or rank < best[addr][0]:
            best[addr] = (rank, sym.name, size, sec_end)
    symbols.sort()
    image.symbols = symbols
    image._sym_addrs = sorted(best)
    image._sym_info = [(a, best[a][2], best[a][1], best[a][3]) for a in image._sym_addrs]


# ---------------------------------------------------------------------------
# The boot layout
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Boot:
    """What build_boot laid out: the CR3 and registers each vCPU starts with,
    and which guest pages the loader wrote."""

    entry: int
    mem_size: int
    nvcpus: int
    cr3: int  # GPA of the PML4
    page_table_gpas: list  # GPAs of every paging-structure page, sorted
    pages: list  # every 4K GPA written: segments, tables, stacks
    loader_base: int  # mem_size - LOADER_REGION

    def stack_range(self, i):
        """[low, high) GPAs of vCPU i's stack (high is its initial RSP)."""
        self._check_vcpu(i)
        top = self.mem_size - i * STACK_SIZE
        return (top - STACK_SIZE, top)

    def regs(self, i):
        """Initial registers of vCPU i (guest state besides 64-bit mode)."""
        self._check_vcpu(i)
        return {"rip": self.entry, "rsp": self.stack_range(i)[1], "rdi": i, "rsi": self.nvcpus, "cr3": self.cr3}

    def _check_vcpu(self, i):
        if not 0 <= i < self.nvcpus:
            raise IndexError(f"vCPU {i} out of range (the VM has {self.nvcpus})")


class _TableBuilder:
    """4-level paging structures with 2M leaves, built in Python pages and
    allocated upwards from ``base``; written out by build_boot."""

    def __init__(self, base):
        self.next = base
        self.pages = {}  # gpa -> bytearray(4096)
        self.pml4 = self._alloc()

    def _alloc(self):
        gpa = self.next
        self.next += PAGE_SIZE
        self.pages[gpa] = bytearray(PAGE_SIZE)
        return gpa

    def _entry(self, table, index):
        return struct.unpack_from("<Q", self.pages[table], index * 8)[0]

    def _set(self, table, index, value):
        struct.pack_into("<Q", self.pages[table], index * 8, value)

    def map_2m(self, gva, gpa):
        """Map one 2M page; return False if the GVA is already mapped."""
        table = self.pml4
        for level in (4, 3):
            index = (gva >> LEVEL_SHIFTS[level]) & 511
            entry = self._entry(table, index)
            if not entry & PTE_P:
                entry = self._alloc() | TABLE_FLAGS
                self._set(table, index, entry)
            table = entry & PTE_ADDR_MASK
        index = (gva >> LEVEL_SHIFTS[2]) & 511
        if self._entry(table, index) & PTE_P:
            return False
        self._set(table, index, gpa | HUGE_LEAF_FLAGS)
        return True


def _pages_of(start, end):
    return range(start & ~(PAGE_SIZE - 1), end, PAGE_SIZE)


def _canonical(gva):
    top = gva >> (GVA_BITS - 1)
    return top == 0 or top == (1 << (64 - GVA_BITS + 1)) - 1


def build_boot(image, mem_size, nvcpus, write_gpa, extra_maps=()):
    """Load ``image`` into guest memory of ``mem_size`` bytes for ``nvcpus``
    vCPUs, writing through ``write_gpa(gpa, data)``; return a Boot.

    ``extra_maps``: (gva, gpa, size) triples, all 2M-aligned, mapped with 2M
    pages besides the identity map (e.g. a TD's shared-memory window, whose
    GPAs have the shared bit set and so lie outside the identity map).
    """
    if not isinstance(mem_size, int) or mem_size % MEM_ALIGN:
        raise LoadError(f"guest memory size {mem_size!r} is not a multiple of 2 MiB")
    if mem_size < MIN_MEM_SIZE:
        raise LoadError(
            f"guest memory size {mem_size >> 20} MiB is too small: the loader needs at least {MIN_MEM_SIZE >> 20} MiB"
        )
    if mem_size > 1 << (GVA_BITS - 1):
        raise LoadError(f"guest memory size {mem_size:#x} does not fit in the lower half of a 4-level address space")
    if not isinstance(nvcpus, int) or nvcpus < 1:
        raise LoadError(f"number of vCPUs must be at least 1 (got {nvcpus!r})")

    loader_base = mem_size - LOADER_REGION
    for n, seg in enumerate(image.segments):
        if seg.end > mem_size:
            raise LoadError(
                f"{image.path}: segment {n} ({seg.paddr:#x}-{seg.end:#x}, "
                f"{seg.perms()}) lies beyond guest memory ({mem_size >> 20} MiB)"
            )
        if seg.end > loader_base:
            raise LoadError(
                f"{image.path}: segment {n} ({seg.paddr:#x}-{seg.end:#x}, "
                f"{seg.perms()}) reaches into the loader's top 4 MiB "
                f"({loader_base:#x}-{mem_size:#x}); give the guest more memory "
                f"or link it lower"
            )

    # Page tables: the identity map of all memory, then the extra maps.
    tables = _TableBuilder(loader_base)
    for gpa in range(0, mem_size, HUGE_PAGE_SIZE):
        tables.map_2m(gpa, gpa)
    for gva, gpa, size in extra_maps:
        what = f"extra mapping gva {gva:#x} -> gpa {gpa:#x} size {size:#x}"
        if min(gva, gpa) < 0 or (gva | gpa | size) % HUGE_PAGE_SIZE or size <= 0:
            raise LoadError(f"{what}: gva, gpa and size must be 2 MiB-aligned and size > 0")
        if not (_canonical(gva) and _canonical(gva + size - 1) and (gva >> 47) == ((gva + size - 1) >> 47)):
            raise LoadError(f"{what}: not a canonical 48-bit address range")
        if gpa + size > PA_LIMIT:
            raise LoadError(f"{what}: gpa beyond the 52-bit physical address limit")
        for off in range(0, size, HUGE_PAGE_SIZE):
            if not tables.map_2m((gva + off) & ((1 << GVA_BITS) - 1), gpa + off):
                raise LoadError(
                    f"{what}: gva {gva + off:#x} is already mapped "
                    f"(by the identity map of guest memory or another extra mapping)"
                )

    # Stacks come down from the top of memory; the tables must not reach them.
    stacks_base = mem_size - nvcpus * STACK_SIZE
    if tables.next > stacks_base:
        raise LoadError(
            f"{nvcpus} vCPU stacks of {STACK_SIZE >> 10} KiB and "
            f"{len(tables.pages)} page-table pages do not fit in the loader's "
            f"{LOADER_REGION >> 20} MiB"
        )

    # All checks passed: write.
    pages = set()
    for seg in image.segments:
        if seg.data:
            write_gpa(seg.paddr, seg.data)
        bss = seg.memsz - len(seg.data)
        if bss:
            # Zero .bss explicitly: the VMM's memory may not start out zeroed,
            # and for a TD these pages must be added with their contents.
            write_gpa(seg.paddr + len(seg.data), bytes(bss))
        pages.update(_pages_of(seg.paddr, seg.end))
    for gpa in sorted(tables.pages):
        write_gpa(gpa, bytes(tables.pages[gpa]))
    pages.update(tables.pages)
    write_gpa(stacks_base, bytes(mem_size - stacks_base))
    pages.update(_pages_of(stacks_base, mem_size))

    return Boot(
        entry=image.entry,
        mem_size=mem_size,
        nvcpus=nvcpus,
        cr3=tables.pml4,
        page_table_gpas=sorted(tables.pages),
        pages=sorted(pages),
        loader_base=loader_base,
    )


def decode_map(read64, cr3, gva):
    """Walk 4-level guest page tables through ``read64(gpa)``: return
    (gpa, page size) for gva, or None if it is not mapped.  For tests and
    debugging output, not for the emulated CPU (emu.hw has the real walker)."""
    table = cr3 & PTE_ADDR_MASK
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        entry = read64(table + ((gva >> shift) & 511) * 8)
        if not entry & PTE_P:
            return None
        size = 1 << shift
        if level == 1 or (level in (2, 3) and entry & PTE_PS):
            base = entry & PTE_ADDR_MASK & ~(size - 1)
            return base | (gva & (size - 1)), size
        table = entry & PTE_ADDR_MASK
    return None
