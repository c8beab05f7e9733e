"""Tests of the guest toolchain: emu.userspace.guests (building and finding guests),
emu.userspace.loader (ELF loading and the boot layout) and the guests themselves, run on
MiniVm below.

MiniVm is deliberately not emu.hw: no EPT and no VM exits besides the
hypercalls, one flat guest-physical memory shared by all vCPUs, and a plain
4-level guest page walk in Unicorn's TLB-fill hook.  It checks the guests, the
runtime and the boot state on their own, so that a bug in them does not first
show up as a mystery in the EPT/KVM layers (and the other way round).  With
``td=True`` it answers CPUID leaf 0x21 with "IntelTDX    " and handles the
TDCALL leaves the runtime uses, so the runtime's TD paths run too.
"""

import ctypes
import mmap
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest
from unicorn import (
    Uc,
    UcError,
    UC_ARCH_X86,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_HOOK_TLB_FILL,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INSN,
    UC_TLB_VIRTUAL,
)
from unicorn import x86_const as X

from emu.userspace import guestabi, guests, loader
from emu.userspace.guests import GuestError
from emu.userspace.loader import LoadError

MiB = 1 << 20
HUGE = 2 * MiB

# ---------------------------------------------------------------------------
# MiniVm: a minimal machine to run guests on
# ---------------------------------------------------------------------------

_VMCALL = guestabi.VMCALL_BYTES
_TDCALL = guestabi.TDCALL_BYTES
MSR_EFER = 0xC0000080
BOOT_EFER = (1 << 8) | (1 << 10)  # LME | LMA
BOOT_CR0 = (1 << 31) | (1 << 16) | 0x33  # PG WP NE ET MP PE
CR4_PAE = 1 << 5
TDX_PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000
TDX_PAGE_SIZE_MISMATCH = 0xC0000B0B00000000
TDX_OPERAND_BUSY = 0x8000020000000000

REG = {
    n: getattr(X, "UC_X86_REG_" + n.upper())
    for n in (
        "rax",
        "rbx",
        "rcx",
        "rdx",
        "rsi",
        "rdi",
        "rbp",
        "rsp",
        "r8",
        "r9",
        "r10",
        "r11",
        "r12",
        "r13",
        "r14",
        "r15",
        "rip",
        "rflags",
        "cr3",
    )
}


class GuestFault(Exception):
    pass


class MiniVm:
    def __init__(self, mem_size, td=False):
        self.mem_size = mem_size
        self.td = td
        self.buf = mmap.mmap(-1, mem_size)  # shared by every vCPU's Uc
        self._ptr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.reports = {}  # vCPU -> [values]
        self.fails = {}  # vCPU -> code
        self.accepted_4k = set()  # GPAs accepted with TDG.MEM.PAGE.ACCEPT
        self.accepted_2m = set()
        self.accept_log = []  # (gpa, level, status)
        self.busy_once = set()  # (gpa, level) to answer BUSY once
        self.hypercalls = []  # (vcpu, kind, regs) in order
        self.final_regs = {}
        self.td_halted = set()  # vCPUs that halted with TDG.VP.VMCALL<Instruction.HLT>

    # memory, as the loader's write_gpa callback and for tests
    def write_gpa(self, gpa, data):
        assert 0 <= gpa and gpa + len(data) <= self.mem_size, hex(gpa)
        self.buf[gpa : gpa + len(data)] = data

    def read_gpa(self, gpa, n):
        return bytes(self.buf[gpa : gpa + n])

    def read64(self, gpa):
        return struct.unpack_from("<Q", self.buf, gpa)[0]

    def boot(self, image, nvcpus, extra_maps=()):
        self.boot_info = loader.build_boot(image, self.mem_size, nvcpus, self.write_gpa, extra_maps)
        return self.boot_info

    # a guest walk: 4-level paging, 2M and 1G pages, no permission checks
    def translate(self, cr3, gva):
        res = loader.decode_map(self.read64, cr3, gva)
        if res is None or res[0] >= self.mem_size:
            return None
        return res[0]

    def run(self, nvcpus=None, max_insns=5_000_000):
        """Run every vCPU, one after the other, until it halts."""
        boot = self.boot_info
        for i in range(boot.nvcpus if nvcpus is None else nvcpus):
            self._run_vcpu(i, boot.regs(i), max_insns)
        return self

    def _run_vcpu(self, i, regs, max_insns):
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map_ptr(0, self.mem_size, UC_PROT_ALL, self._ptr)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | CR4_PAE)
        uc.msr_write(MSR_EFER, BOOT_EFER)
        uc.reg_write(X.UC_X86_REG_CR0, BOOT_CR0)  # with PG set, `mov cr3` flushes the TLB
        for name in ("rsp", "rdi", "rsi", "cr3"):
            uc.reg_write(REG[name], regs[name])
        fault = []

        def tlb_fill(uc, vaddr, access, entry, _):
            gpa = self.translate(uc.reg_read(X.UC_X86_REG_CR3), vaddr)
            if gpa is None:
                fault.append(vaddr)
                return False
            entry.paddr = gpa & ~0xFFF
            entry.perms = UC_PROT_ALL
            return True

        def insn_invalid(uc, _):
            rip = uc.reg_read(X.UC_X86_REG_RIP)
            gpa = self.translate(uc.reg_read(X.UC_X86_REG_CR3), rip)
            code = self.read_gpa(gpa, 4)
            if code[:3] == _VMCALL:
                self._vmcall(i, uc)
                uc.reg_write(X.UC_X86_REG_RIP, rip + 3)
            elif code == _TDCALL and self.td:
                self._tdcall(i, uc)
                uc.reg_write(X.UC_X86_REG_RIP, rip + 4)
            else:
                return False
            return True

        def cpuid(uc, _):
            if self.td and uc.reg_read(X.UC_X86_REG_EAX) == guestabi.TDX_CPUID_LEAF:
                v = guestabi.TDX_CPUID_VENDOR
                ebx, edx, ecx = (struct.unpack_from("<I", v, k)[0] for k in (0, 4, 8))
                for r, val in (
                    (X.UC_X86_REG_RAX, 0),
                    (X.UC_X86_REG_RBX, ebx),
                    (X.UC_X86_REG_RCX, ecx),
                    (X.UC_X86_REG_RDX, edx),
                ):
                    uc.reg_write(r, val)
                return 1
            return 0

        uc.hook_add(UC_HOOK_TLB_FILL, tlb_fill)
        uc.hook_add(UC_HOOK_INSN_INVALID, insn_invalid)
        uc.hook_add(UC_HOOK_INSN, cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        try:
            uc.emu_start(regs["rip"], 0, count=max_insns)
        except UcError as e:
            rip = uc.reg_read(X.UC_X86_REG_RIP)
            raise GuestFault(f"vCPU {i}: {e} at rip {rip:#x}, unmapped gva {fault}") from None
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        gpa = self.translate(uc.reg_read(X.UC_X86_REG_CR3), rip - 1)
        if i not in self.td_halted and (gpa is None or self.read_gpa(gpa, 1) != b"\xf4"):
            raise GuestFault(f"vCPU {i} stopped at {rip:#x} without HLT (instruction limit {max_insns}?)")
        self.final_regs[i] = {n: uc.reg_read(r) for n, r in REG.items()}

    def _vmcall(self, i, uc):
        rax, rbx = uc.reg_read(X.UC_X86_REG_RAX), uc.reg_read(X.UC_X86_REG_RBX)
        self.hypercalls.append((i, "vmcall", {"rax": rax, "rbx": rbx}))
        if rax == guestabi.EMU_HC_REPORT:
            self.reports.setdefault(i, []).append(rbx)
        elif rax == guestabi.EMU_HC_FAIL:
            self.fails[i] = rbx
        else:
            raise GuestFault(f"vCPU {i}: unknown VMCALL {rax:#x}")
        # Scribble over what a VMM may change, to show the runtime restores it.
        uc.reg_write(X.UC_X86_REG_RAX, 0xDEAD)
        uc.reg_write(X.UC_X86_REG_RBX, 0xDEAD)

    def _accept(self, gpa, level):
        """TDG.MEM.PAGE.ACCEPT as far as the runtime can tell: a page accepted
        before is PAGE_ALREADY_ACCEPTED, a 2M accept over 4K-accepted pages
        is PAGE_SIZE_MISMATCH, and a GPA in ``busy_once`` is BUSY once."""
        if (gpa, level) in self.busy_once:
            self.busy_once.discard((gpa, level))
            status = TDX_OPERAND_BUSY
        elif level == 1:
            if gpa in self.accepted_2m:
                status = TDX_PAGE_ALREADY_ACCEPTED
            elif any(p in self.accepted_4k for p in range(gpa, gpa + 0x200000, 0x1000)):
                status = TDX_PAGE_SIZE_MISMATCH
            else:
                self.accepted_2m.add(gpa)
                status = 0
        elif gpa & ~0x1FFFFF in self.accepted_2m or gpa in self.accepted_4k:
            status = TDX_PAGE_ALREADY_ACCEPTED
        else:
            self.accepted_4k.add(gpa)
            status = 0
        self.accept_log.append((gpa, level, status))
        return status

    def _tdcall(self, i, uc):
        rd = {n: uc.reg_read(REG[n]) for n in ("rax", "rcx", "r10", "r11", "r12")}
        self.hypercalls.append((i, "tdcall", rd))
        if rd["rax"] == guestabi.TDG_VP_VMCALL:
            if rd["rcx"] != guestabi.TDVMCALL_EXPOSE_REGS:
                raise GuestFault(f"vCPU {i}: TDG.VP.VMCALL exposes {rd['rcx']:#x}")
            if rd["r10"] == guestabi.EMU_HC_REPORT:
                self.reports.setdefault(i, []).append(rd["r11"])
            elif rd["r10"] == 0 and rd["r11"] == guestabi.GHCI_INSTRUCTION_HLT:
                self.td_halted.add(i)
                uc.emu_stop()
            elif rd["r10"] == 0 and rd["r11"] == guestabi.GHCI_REPORT_FATAL_ERROR:
                self.fails[i] = rd["r12"]
            else:
                raise GuestFault(f"vCPU {i}: unknown TDG.VP.VMCALL {rd}")
            status = 0
        elif rd["rax"] == guestabi.TDG_MEM_PAGE_ACCEPT:
            status = self._accept(rd["rcx"] & ~0xFFF, rd["rcx"] & 7)
        else:
            raise GuestFault(f"vCPU {i}: unknown TDCALL leaf {rd['rax']}")
        uc.reg_write(X.UC_X86_REG_RAX, status)
        for n in ("rcx", "r10", "r11", "r12"):
            uc.reg_write(REG[n], 0xDEAD)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


class FakeMemory:
    """Guest memory as a bytearray, filled with a poison byte so that what
    the loader did not write (and .bss it forgot to zero) shows."""

    POISON = 0xA5

    def __init__(self, size):
        self.buf = bytearray([self.POISON]) * size
        self.writes = []

    def write_gpa(self, gpa, data):
        assert 0 <= gpa and gpa + len(data) <= len(self.buf), f"write outside memory at {gpa:#x}"
        self.buf[gpa : gpa + len(data)] = data
        self.writes.append((gpa, len(data)))

    def read64(self, gpa):
        return struct.unpack_from("<Q", self.buf, gpa)[0]


class SparseMemory:
    """Guest memory of any size, keeping only the pages written."""

    def __init__(self):
        self.pages = {}

    def write_gpa(self, gpa, data):
        for off in range(0, len(data), 0x1000):
            chunk = data[off : off + 0x1000]
            if any(chunk) or (gpa + off) in self.pages:
                self.pages[gpa + off] = bytes(chunk)

    def read64(self, gpa):
        page = self.pages.get(gpa & ~0xFFF, bytes(0x1000))
        return struct.unpack_from("<Q", page, gpa & 0xFFF)[0]


def image_of(name):
    return loader.load_elf(guests.resolve(name))


def write_source(tmp_path, name, body):
    src = tmp_path / name
    src.write_text('.intel_syntax noprefix\n.include "emu.inc"\n' + body)
    return src


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & (1 << 64) - 1
    return h


def touch_expect(i, n, pages=32):
    mine = list(range(i, pages, n))
    return [len(mine), sum(p * 0x1000 + 0x5A for p in mine)]


@pytest.fixture(autouse=True)
def _remove_external_builds():
    """Guests built from a test's tmp_path land in build/guest/ext-*; remove
    the ones a test made so that test runs do not pile them up."""
    before = set(guests.BUILD_DIR.glob("ext-*"))
    yield
    for path in set(guests.BUILD_DIR.glob("ext-*")) - before:
        path.unlink(missing_ok=True)


needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


# ---------------------------------------------------------------------------
# Building and finding guests
# ---------------------------------------------------------------------------


def test_names_lists_the_guests():
    assert {"hello", "touch", "pagewalk"} <= set(guests.names())
    assert guests.names() == sorted(guests.names())


@pytest.mark.parametrize("name", guests.names())
def test_each_guest_builds_and_loads(name):
    elf = guests.resolve(name)
    assert elf == guests.BUILD_DIR / f"{name}.elf" and elf.is_file()
    image = loader.load_elf(elf)
    assert image.entry == image.symbol("_start")
    lo, hi = image.image_range()
    assert lo == guestabi.GUEST_LOAD_BASE and hi <= 2 * MiB
    for seg in image.segments:
        assert seg.paddr == seg.vaddr and seg.paddr % 0x1000 == 0
        assert not (seg.flags & loader.PF_W and seg.flags & loader.PF_X), "W+X segment"
    assert any(s.flags & loader.PF_X for s in image.segments)
    # the runtime is linked in
    for sym in ("emu_report", "emu_fail", "emu_is_td", "emu_accept"):
        image.symbol(sym)


def test_build_is_incremental_and_external_names(tmp_path):
    src = write_source(tmp_path, "mine.S", ".globl _start\n_start:\n    EXIT\n")
    elf = guests.build(src)
    assert elf.parent == guests.cache_dir() / "guest" / guests.checkout_key()  # out of the tree: the cache directory
    assert re.fullmatch(r"ext-mine-[0-9a-f]{8}\.elf", elf.name)
    first = elf.stat().st_mtime_ns
    assert guests.build(src) == elf and elf.stat().st_mtime_ns == first  # up to date
    # a newer source is rebuilt
    future = time.time() + 5
    os.utime(src, (future, future))
    guests.build(src)
    assert elf.stat().st_mtime_ns > first
    # the same stem elsewhere gets another ELF
    other = tmp_path / "sub"
    other.mkdir()
    src2 = write_source(other, "mine.S", ".globl _start\n_start:\n    EXIT\n")
    assert guests.build(src2) != elf


def test_resolve_accepts_paths_to_source_and_elf(tmp_path):
    src = write_source(tmp_path, "p.S", ".globl _start\n_start:\n    EXIT\n")
    elf = guests.resolve(str(src))
    assert elf.is_file()
    copy = tmp_path / "copied-guest"  # an ELF needs no particular name
    shutil.copy(elf, copy)
    assert guests.resolve(str(copy)) == copy


def test_assembler_error_is_a_guest_error_with_the_message(tmp_path):
    src = write_source(tmp_path, "broken.S", ".globl _start\n_start:\n    frobnicate rax, 1\n")
    with pytest.raises(GuestError) as ei:
        guests.build(src)
    msg = str(ei.value)
    assert "assembling" in msg and "broken.S:5" in msg and "frobnicate" in msg
    assert "\n" not in msg


def test_linker_error_is_a_guest_error(tmp_path):
    src = write_source(tmp_path, "undef.S", ".globl _start\n_start:\n    call no_such_function\n")
    with pytest.raises(GuestError, match=r"linking .*undefined reference to `no_such_function'"):
        guests.build(src)


def test_unknown_name_lists_the_guests():
    with pytest.raises(GuestError) as ei:
        guests.resolve("no_such_guest")
    msg = str(ei.value)
    assert "unknown guest 'no_such_guest'" in msg
    for name in ("hello", "pagewalk", "touch"):
        assert name in msg


def test_a_file_that_is_neither_elf_nor_source_is_refused(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("not a guest\n")
    with pytest.raises(GuestError, match=r"notes\.txt is not an ELF file, assembler source \(\.S\) or C source"):
        guests.resolve(str(junk))
    with pytest.raises(GuestError, match="no such file"):
        guests.resolve(str(tmp_path / "missing.S"))
    with pytest.raises(LoadError, match="is not an ELF file"):
        loader.load_elf(junk)


def test_missing_binutils_is_one_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing in it
    with pytest.raises(GuestError) as ei:
        guests.check_binutils()
    assert str(ei.value) == (
        "GNU as/ld not found: guests are assembled with binutils; install it: apt-get install binutils"
    )


def test_cli_build_and_its_error_exit(tmp_path):
    repo = guests.REPO
    res = subprocess.run(
        [sys.executable, "-m", "emu.userspace.guests", "build"], cwd=repo, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == guests.names()
    # without binutils on PATH: exit 2 and one line on stderr
    res = subprocess.run(
        [sys.executable, "-m", "emu.userspace.guests", "build"],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(tmp_path)},
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "GNU as/ld not found" in res.stderr
    assert "Traceback" not in res.stderr


def test_emu_inc_constants_match_guestabi():
    text = (guests.LIB_DIR / "emu.inc").read_text()
    equs = {m.group(1): int(m.group(2), 0) for m in re.finditer(r"^\.equ\s+(\w+),\s*(0x[0-9a-fA-F]+|\d+)", text, re.M)}
    shared = [n for n in equs if hasattr(guestabi, n)]
    assert {
        "EMU_HC_REPORT",
        "EMU_HC_FAIL",
        "GHCI_REPORT_FATAL_ERROR",
        "GHCI_INSTRUCTION_HLT",
        "TDVMCALL_EXPOSE_REGS",
        "TDG_VP_VMCALL",
        "TDG_MEM_PAGE_ACCEPT",
    } <= set(shared)
    for n in shared:
        assert equs[n] == getattr(guestabi, n), n


# ---------------------------------------------------------------------------
# The loader: images
# ---------------------------------------------------------------------------


def test_symbolize_names_touch_loop():
    image = image_of("touch")
    loop = image.symbol("touch_loop")
    assert image.symbolize(loop + 0x7) == "touch_loop+0x7"
    assert image.symbolize(loop) == "touch_loop+0x0"
    area = image.symbol("touch_area")
    assert image.symbolize(area + 0x3008) == "touch_area+0x3008"
    assert image.symbolize(guestabi.GUEST_LOAD_BASE - 1) is None
    assert image.symbolize(0x7FF000) is None  # a stack address
    # the symbol list holds functions and labels, not .equ constants
    names = {n for _a, _s, n in image.symbols}
    assert {"_start", "touch_loop", "emu_report", "touch_area"} <= names
    assert "TOUCH_PAGES" not in names and "EMU_HC_REPORT" not in names
    assert image.symbols == sorted(image.symbols)


def _patched(tmp_path, name, edit):
    data = bytearray(guests.resolve("hello").read_bytes())
    edit(data)
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def test_load_errors_are_one_clear_message(tmp_path):
    # not x86-64: e_machine (offset 18) = EM_386
    other_arch = _patched(tmp_path, "i386.elf", lambda d: struct.pack_into("<H", d, 18, 3))
    with pytest.raises(LoadError, match="not x86-64"):
        loader.load_elf(other_arch)

    # no PT_LOAD: turn every program header into PT_NOTE
    def no_load(d):
        (phoff,) = struct.unpack_from("<Q", d, 32)
        phentsize, phnum = struct.unpack_from("<HH", d, 54)
        for k in range(phnum):
            struct.pack_into("<I", d, phoff + k * phentsize, 4)

    with pytest.raises(LoadError, match="no PT_LOAD"):
        loader.load_elf(_patched(tmp_path, "noload.elf", no_load))

    # truncated: the segments' data is missing
    truncated = tmp_path / "truncated.elf"
    truncated.write_bytes(guests.resolve("hello").read_bytes()[:300])
    with pytest.raises(LoadError, match="corrupt"):
        loader.load_elf(truncated)

    # damaged program-header table offset
    with pytest.raises(LoadError, match="corrupt"):
        loader.load_elf(_patched(tmp_path, "badphoff.elf", lambda d: struct.pack_into("<Q", d, 32, 1 << 40)))

    with pytest.raises(LoadError, match="cannot read"):
        loader.load_elf(tmp_path / "absent.elf")


def test_relocatable_object_is_refused():
    obj = guests.BUILD_DIR / "hello.o"
    guests.resolve("hello")
    with pytest.raises(LoadError, match="relocatable object"):
        loader.load_elf(obj)


# ---------------------------------------------------------------------------
# The loader: boot layout
# ---------------------------------------------------------------------------


def test_segments_land_at_their_paddr_and_bss_is_zeroed():
    image = image_of("touch")
    mem = FakeMemory(8 * MiB)
    boot = loader.build_boot(image, 8 * MiB, 2, mem.write_gpa)
    for seg in image.segments:
        assert mem.buf[seg.paddr : seg.paddr + len(seg.data)] == seg.data
        assert not any(mem.buf[seg.paddr + len(seg.data) : seg.end]), ".bss not zeroed"
        for page in range(seg.paddr & ~0xFFF, seg.end, 0x1000):
            assert page in boot.pages
    area = image.symbol("touch_area")
    assert mem.buf[area : area + 32 * 0x1000] == bytes(32 * 0x1000)
    # nothing else below the loader region was touched
    lo, hi = image.image_range()
    assert mem.buf[hi] == FakeMemory.POISON and mem.buf[lo - 1] == FakeMemory.POISON


def test_identity_map_decodes_with_2m_pages():
    mem_size = 8 * MiB
    image = image_of("hello")
    mem = FakeMemory(mem_size)
    boot = loader.build_boot(image, mem_size, 3, mem.write_gpa)
    top = mem_size - guestabi.LOADER_REGION
    assert top <= boot.cr3 < mem_size and boot.cr3 % 0x1000 == 0
    for gva in (0, 0x1234, image.entry, HUGE - 8, HUGE, 5 * MiB + 0x777, mem_size - 1):
        assert loader.decode_map(mem.read64, boot.cr3, gva) == (gva, HUGE), hex(gva)
    assert loader.decode_map(mem.read64, boot.cr3, mem_size) is None
    assert loader.decode_map(mem.read64, boot.cr3, 1 << 40) is None
    # exact entry bits: P|RW for tables, P|RW|PS for leaves; no A/D, no U/S
    pml4e = mem.read64(boot.cr3)
    assert pml4e & 0xFFF == 0x3
    pdpte = mem.read64(pml4e & ~0xFFF)
    assert pdpte & 0xFFF == 0x3
    pde = mem.read64((pdpte & ~0xFFF) + 8)
    assert pde == HUGE | 0x83
    # every table page is in the loader region and listed
    assert boot.cr3 in boot.page_table_gpas
    for gpa in boot.page_table_gpas:
        assert top <= gpa < mem_size and gpa in boot.pages


def test_stacks_and_registers():
    mem_size = 16 * MiB
    mem = FakeMemory(mem_size)
    boot = loader.build_boot(image_of("hello"), mem_size, 4, mem.write_gpa)
    stack = guestabi.STACK_SIZE
    for i in range(4):
        lo, hi = boot.stack_range(i)
        assert (lo, hi) == (mem_size - (i + 1) * stack, mem_size - i * stack)
        assert not any(mem.buf[lo:hi])
        assert all(p in boot.pages for p in range(lo, hi, 0x1000))
        assert boot.regs(i) == {"rip": boot.entry, "rsp": hi, "rdi": i, "rsi": 4, "cr3": boot.cr3}
        assert hi % 16 == 0
    assert max(boot.page_table_gpas) < boot.stack_range(3)[0]
    assert boot.pages == sorted(set(boot.pages))
    with pytest.raises(IndexError):
        boot.regs(4)


def test_identity_map_of_more_than_one_gib():
    mem_size = 5 * 1024 * MiB + 4 * MiB  # several PDs, a partial last one
    mem = SparseMemory()
    boot = loader.build_boot(image_of("hello"), mem_size, 1, mem.write_gpa)
    for gva in (0, 1 << 30, (3 << 30) + 0x123456, mem_size - 1):
        assert loader.decode_map(mem.read64, boot.cr3, gva) == (gva, HUGE)
    assert loader.decode_map(mem.read64, boot.cr3, mem_size) is None
    assert len(boot.page_table_gpas) == 1 + 1 + 6  # PML4, PDPT, 6 PDs


def test_extra_maps():
    mem = FakeMemory(8 * MiB)
    shared = 1 << 47
    window_gva = 0xFFFF_8000_0000_0000  # upper canonical half
    boot = loader.build_boot(
        image_of("hello"), 8 * MiB, 1, mem.write_gpa, extra_maps=[(window_gva, shared, 4 * MiB), (1 << 40, 0, HUGE)]
    )
    assert loader.decode_map(mem.read64, boot.cr3, window_gva + 0x201234) == (shared + 0x201234, HUGE)
    assert loader.decode_map(mem.read64, boot.cr3, (1 << 40) + 5) == (5, HUGE)
    assert loader.decode_map(mem.read64, boot.cr3, 0x123) == (0x123, HUGE)
    for bad, why in [
        ((0x400000, 0, HUGE), "already mapped"),
        ((1 << 40, 0x1000, HUGE), "2 MiB-aligned"),
        ((1 << 47, 0, HUGE), "canonical"),
    ]:
        with pytest.raises(LoadError, match=why):
            loader.build_boot(image_of("hello"), 8 * MiB, 1, FakeMemory(8 * MiB).write_gpa, extra_maps=[bad])


def _image_with_segment(paddr, memsz):
    seg = loader.Segment(paddr=paddr, vaddr=paddr, data=b"\xf4", memsz=memsz, flags=5)
    return loader.GuestImage(path="synthetic.elf", entry=paddr, segments=[seg], symbols=[])


def test_segment_in_the_top_4mib_is_a_load_error():
    mem = FakeMemory(8 * MiB)
    with pytest.raises(LoadError, match=r"segment 0 .*reaches into the loader's top 4 MiB"):
        loader.build_boot(_image_with_segment(4 * MiB, 0x1000), 8 * MiB, 1, mem.write_gpa)
    with pytest.raises(LoadError, match="reaches into the loader's top 4 MiB"):
        # starts below, ends inside
        loader.build_boot(_image_with_segment(4 * MiB - 0x1000, 0x2000), 8 * MiB, 1, mem.write_gpa)
    with pytest.raises(LoadError, match="beyond guest memory"):
        loader.build_boot(_image_with_segment(8 * MiB, 0x1000), 8 * MiB, 1, mem.write_gpa)
    assert mem.writes == []  # nothing written on error
    # just below the region is fine
    loader.build_boot(_image_with_segment(4 * MiB - 0x1000, 0x1000), 8 * MiB, 1, mem.write_gpa)


@pytest.mark.parametrize(
    "mem_size,nvcpus,why",
    [
        (9 * MiB, 1, "multiple of 2 MiB"),
        (6 * MiB, 1, "too small"),
        (8 * MiB, 0, "at least 1"),
        (8 * MiB, 300, "do not fit"),
    ],
)
def test_bad_boot_parameters(mem_size, nvcpus, why):
    with pytest.raises(LoadError, match=why):
        loader.build_boot(image_of("hello"), mem_size, nvcpus, FakeMemory(16 * MiB).write_gpa)


C_GUEST = r"""
/* A guest from another toolchain: no runtime, raw hypercalls. */
static void report(unsigned long value)
{
    __asm__ volatile("vmcall" : : "a"(0x454d0001UL), "b"(value) : "memory");
}

static unsigned long counter;           /* .bss */
static unsigned long seed = 7;          /* .data */

void _start(unsigned long cpu, unsigned long ncpus)
{
    counter += seed * 100 + cpu * 10 + ncpus;
    report(counter);
    for (;;)
        __asm__ volatile("hlt");
}
"""


@needs_gcc
def test_gcc_static_elf_loads_at_lds_default_address(tmp_path):
    src = tmp_path / "cguest.c"
    src.write_text(C_GUEST)
    elf = tmp_path / "cguest"
    subprocess.run(
        ["gcc", "-static", "-nostdlib", "-ffreestanding", "-fno-pic", "-O1", "-mno-red-zone", "-o", str(elf), str(src)],
        check=True,
        capture_output=True,
    )
    assert guests.resolve(str(elf)) == elf
    image = loader.load_elf(elf)
    assert image.image_range()[0] == 0x400000
    assert image.symbolize(image.entry) == "_start+0x0"
    # at 8 MiB it sits in the loader's region, which the error explains
    with pytest.raises(LoadError, match="reaches into the loader's top 4 MiB"):
        loader.build_boot(image, 8 * MiB, 1, FakeMemory(8 * MiB).write_gpa)
    vm = MiniVm(16 * MiB)
    vm.boot(image, 2)
    vm.run()
    # .bss started at 0 and .data at 7; the vCPUs share memory and MiniVm
    # runs them one after the other
    assert vm.reports == {0: [702], 1: [702 + 700 + 10 + 2]}


# ---------------------------------------------------------------------------
# The guests and the runtime, run on MiniVm (plain VM and TD flavours)
# ---------------------------------------------------------------------------

flavours = pytest.mark.parametrize("td", [False, True], ids=["vm", "td"])


def run_guest(guest, nvcpus, td, mem_size=16 * MiB):
    image = guest if isinstance(guest, loader.GuestImage) else image_of(guest)
    vm = MiniVm(mem_size, td=td)
    vm.boot(image, nvcpus)
    vm.run()
    return vm, image


@flavours
def test_hello_reports_the_fnv1a_hash(td):
    vm, _ = run_guest("hello", 3, td)
    h = fnv1a64(b"hello, EPT")
    assert vm.reports == {0: [h], 1: [h], 2: [h]} and vm.fails == {}
    kinds = {kind for _i, kind, _r in vm.hypercalls}
    assert kinds == ({"tdcall"} if td else {"vmcall"})


@flavours
@pytest.mark.parametrize("nvcpus", [1, 3])
def test_touch_reports_pages_and_checksum(td, nvcpus):
    vm, image = run_guest("touch", nvcpus, td)
    assert vm.fails == {}
    assert vm.reports == {i: touch_expect(i, nvcpus) for i in range(nvcpus)}
    # each page got its pattern and its stub (movabs rax, index; ret)
    area = image.symbol("touch_area")
    for page in range(32):
        base = area + page * 0x1000
        assert vm.read64(base) == page * 0x1000 + 0x5A
        assert vm.read_gpa(base + 0x800, 11) == b"\x48\xb8" + struct.pack("<Q", page) + b"\xc3"


def test_touch_fails_on_a_dirty_page():
    image = image_of("touch")
    vm = MiniVm(16 * MiB)
    vm.boot(image, 1)
    vm.write_gpa(image.symbol("touch_area") + 5 * 0x1000, b"\x01")  # after the loader
    vm.run()
    assert vm.fails == {0: 2} and vm.reports == {}  # FAIL_NOT_ZERO


@flavours
def test_pagewalk_reads_through_its_own_tables(td):
    vm, image = run_guest("pagewalk", 2, td, mem_size=8 * MiB)
    assert vm.fails == {}
    pml4 = image.symbol("pt_pool")
    assert vm.reports == {0: [pml4] + [0x4B1DFACE00000000 + k for k in (1, 2, 3, 4)]}
    assert vm.final_regs[0]["cr3"] == pml4
    assert vm.final_regs[1]["cr3"] == vm.boot_info.cr3  # vCPU 1 just exits
    # its tables map what the header says
    walk = lambda gva: loader.decode_map(vm.read64, pml4, gva)
    data = image.symbol("alias_data")
    assert walk(0x40000000 + 0x2010) == (data + 0x2010, 0x1000)
    assert walk(0x80000000 + 0x1238) == (0x200000 + 0x1238, HUGE)
    assert walk(image.entry) == (image.entry, HUGE)
    rsp0 = vm.boot_info.regs(0)["rsp"] - 8
    assert walk(rsp0) == (rsp0, HUGE)
    assert vm.read64(0x201238) == 0x4B1DFACE00000003
    # in a TD it accepted its 2M window (the rest is the loaded image)
    assert vm.accept_log == ([(0x200000, 1, 0)] if td else [])


PRESERVED = {
    "rax": 0x1111111111111111,
    "rbx": 0x2222222222222222,
    "rcx": 0x3333333333333333,
    "rdx": 0x4444444444444444,
    "rsi": 0x5555555555555555,
    "rdi": 0x6666666666666666,
    "rbp": 0x7777777777777777,
    "r8": 0x8888888888888888,
    "r9": 0x9999999999999999,
    "r10": 0xAAAAAAAAAAAAAAAA,
    "r11": 0xBBBBBBBBBBBBBBBB,
    "r12": 0xCCCCCCCCCCCCCCCC,
    "r13": 0xDDDDDDDDDDDDDDDD,
    "r14": 0xEEEEEEEEEEEEEEEE,
    "r15": 0xFFFFFFFFFFFFFFFF,
}

# Fill every register, set CF, report in every operand form, and check that
# nothing moved (each register against its value in .rodata).
PRESERVE_GUEST = (
    ".globl _start\n_start:\n"
    + "".join(f"    mov {r}, {v:#x}\n" for r, v in PRESERVED.items())
    + """
    sub rsp, 64
    mov qword ptr [rsp], rsp            # remember RSP
    stc
    REPORT rax
    REPORT 0x123456789abcdef0
    REPORT -2
    REPORT rsp
    REPORT qword ptr [rip + value_rax]
    REPORT rdi
    jnc flags_lost
    cmp rsp, qword ptr [rsp]
    jne rsp_lost
"""
    + "".join(f"    cmp {r}, qword ptr [rip + value_{r}]\n    jne lost\n" for r in PRESERVED)
    + """
    call emu_is_td
    REPORT rax
    EXIT
flags_lost:
    FAIL 0x71
rsp_lost:
    FAIL 0x72
lost:
    FAIL 0x73
    .section .rodata
"""
    + "".join(f"value_{r}: .quad {v:#x}\n" for r, v in PRESERVED.items())
)


@flavours
def test_report_preserves_registers_and_flags(tmp_path, td):
    image = loader.load_elf(guests.build(write_source(tmp_path, "preserve.S", PRESERVE_GUEST)))
    vm, _ = run_guest(image, 1, td)
    assert vm.fails == {}
    rsp = vm.boot_info.regs(0)["rsp"] - 64
    assert vm.reports == {
        0: [0x1111111111111111, 0x123456789ABCDEF0, (1 << 64) - 2, rsp, 0x1111111111111111, 0x6666666666666666, int(td)]
    }
    regs = vm.final_regs[0]
    # A TD halts inside emu_halt's TDG.VP.VMCALL<Instruction.HLT>, with the call's registers live.
    halt_regs = {"rax", "rcx", "r10", "r11", "r12"} if td else {"rax"}
    assert {r: regs[r] for r in PRESERVED if r not in halt_regs} == {
        r: v for r, v in PRESERVED.items() if r not in halt_regs
    }
    if not td:
        assert regs["rax"] == 0  # emu_is_td's answer


@flavours
def test_fail_reports_the_code_and_halts(tmp_path, td):
    src = write_source(
        tmp_path,
        "failing.S",
        """
.globl _start
_start:
    mov rbx, 0x5150
    FAIL 0x42
    REPORT 1            # never reached
""",
    )
    vm, image = run_guest(loader.load_elf(guests.build(src)), 2, td)
    assert vm.fails == {0: 0x42, 1: 0x42} and vm.reports == {}
    regs = vm.final_regs[0]
    assert regs["rbx"] == 0x5150  # registers kept for a post-mortem
    assert image.symbolize(regs["rip"]).startswith("emu_fail")
    last = [r for _i, _k, r in vm.hypercalls][-1]
    if td:
        assert last == {"rax": 0, "rcx": 0x1C00, "r10": 0, "r11": 0x10003, "r12": 0x42}
    else:
        assert last == {"rax": guestabi.EMU_HC_FAIL, "rbx": 0x42}


def test_emu_accept_uses_2m_pages_where_it_can(tmp_path):
    src = write_source(
        tmp_path,
        "accept.S",
        """
.globl _start
_start:
    mov rdi, 0x1ff000           # 4K, then a whole 2M page, then 4K up to the end
    mov rsi, 0x202000 + 0x1000
    call emu_accept
    REPORT rax
    mov rdi, 0x400000           # again: PAGE_ALREADY_ACCEPTED counts as success
    mov rsi, 0x200000
    call emu_accept
    REPORT rax
    EXIT
""",
    )
    image = loader.load_elf(guests.build(src))
    vm = MiniVm(16 * MiB, td=True)
    vm.boot(image, 1)
    vm.busy_once = {(0x200000, 1)}
    vm.run()
    assert vm.reports == {0: [0, 0]}
    ok, already, mismatch, busy = (0, TDX_PAGE_ALREADY_ACCEPTED, TDX_PAGE_SIZE_MISMATCH, TDX_OPERAND_BUSY)
    first = [(0x1FF000, 0, ok), (0x200000, 1, busy), (0x200000, 1, ok), (0x400000, 0, ok), (0x401000, 0, ok)]
    # 4K pages inside: the 2M accept is refused, then page by page
    second = [(0x400000, 1, mismatch), (0x400000, 0, already), (0x401000, 0, already)]
    second += [(gpa, 0, ok) for gpa in range(0x402000, 0x600000, 0x1000)]
    assert vm.accept_log == first + second
    vm, _ = run_guest(image, 1, td=False)
    assert vm.reports == {0: [0, 0]} and vm.accept_log == []


def test_emu_accept_returns_an_error_status(tmp_path):
    src = write_source(
        tmp_path,
        "accept_bad.S",
        """
.globl _start
_start:
    mov rdi, 0x300000
    mov rsi, 0x1000
    call emu_accept
    REPORT rax
    EXIT
""",
    )
    vm = MiniVm(16 * MiB, td=True)
    vm.boot(loader.load_elf(guests.build(src)), 1)
    vm._accept = lambda gpa, level: 0xC000010000000001  # OPERAND_INVALID | RCX
    vm.run()
    assert vm.reports == {0: [0xC000010000000001]}
