"""The exits the emulated CPU makes for port I/O, CPUID, RDMSR and WRMSR, and its own RDTSC and MSRs.

Expected values come from the SDM (Vol. 3C Table 28-5 "Exit Qualification for I/O Instructions":
bits 2:0 size - 1, bit 3 direction (1 = IN), bit 4 string, bit 5 REP, bit 6 operand encoding (1 =
immediate), bits 31:16 port; basic exit reasons CPUID 10, I/O 30, RDMSR 31, WRMSR 32; "MSR-Bitmap
Address").  At every such exit RIP is the instruction and the registers and memory are as the
guest left them: the hypervisor completes it.
"""

import pytest
from hypothesis import given, settings, strategies as st

from test_vcpu import Machine, CODE, HLT
from emu.hw.msr import MsrBitmap, MSR_FS_BASE, MSR_IA32_TSC, MSR_EFER, MSR_LSTAR, MSR_TYPE_RW, MSR_TYPE_W, is_canonical
from emu.hw.vcpu import TSC_STEP

IO, RDMSR, WRMSR, CPUID, EXC = 30, 31, 32, 10, 0
DATA = 0x160000


def first_exit(src, setup=None, **regs):
    m = Machine(src)
    v = m.vcpu()
    v.set_regs(regs)
    if setup:
        setup(m, v)
    before = {r: v.reg(r) for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi")}
    return m, v, m.run(v), before


IO_CASES = [
    # (instruction, size, in, string, rep, imm, port, length)
    ("in al, 0x60", 1, True, False, False, True, 0x60, 2),
    ("in ax, 0x61", 2, True, False, False, True, 0x61, 3),
    ("in eax, 0x62", 4, True, False, False, True, 0x62, 2),
    ("out 0x80, al", 1, False, False, False, True, 0x80, 2),
    ("out 0x81, ax", 2, False, False, False, True, 0x81, 3),
    ("out 0x82, eax", 4, False, False, False, True, 0x82, 2),
    ("in al, dx", 1, True, False, False, False, 0x3F8, 1),
    ("in ax, dx", 2, True, False, False, False, 0x3F8, 2),
    ("in eax, dx", 4, True, False, False, False, 0x3F8, 1),
    ("out dx, al", 1, False, False, False, False, 0x3F8, 1),
    ("out dx, ax", 2, False, False, False, False, 0x3F8, 2),
    ("out dx, eax", 4, False, False, False, False, 0x3F8, 1),
    ("insb", 1, True, True, False, False, 0x3F8, 1),
    ("insw", 2, True, True, False, False, 0x3F8, 2),
    ("insd", 4, True, True, False, False, 0x3F8, 1),
    ("outsb", 1, False, True, False, False, 0x3F8, 1),
    ("outsw", 2, False, True, False, False, 0x3F8, 2),
    ("outsd", 4, False, True, False, False, 0x3F8, 1),
    ("rep insb", 1, True, True, True, False, 0x3F8, 2),
    ("rep insd", 4, True, True, True, False, 0x3F8, 2),
    ("rep outsw", 2, False, True, True, False, 0x3F8, 3),
]


class TestPortIo:
    @pytest.mark.parametrize("insn,size,is_in,string,rep,imm,port,length", IO_CASES)
    def test_qualification_length_and_nothing_changed(self, insn, size, is_in, string, rep, imm, port, length):
        src = (
            f"mov dx, {port:#x}\nmov rax, 0x1122334455667788\nmov ecx, 5\nlea rdi, [{DATA}]\n"
            f"lea rsi, [{DATA + 0x100}]\n{insn}\nhlt\n"
        )
        m, v, e, _ = first_exit(src)
        while e.reason == 48:  # BareHost maps pages; stop at the I/O exit
            e = m.run(v)
        at = CODE + len(m.code(src)) - length - 1
        q = (
            (size - 1)
            | (8 if is_in else 0)
            | (16 if string else 0)
            | (32 if rep else 0)
            | (64 if imm else 0)
            | port << 16
        )
        assert (e.reason, e.rip, e.insn_len, e.qualification) == (IO, at, length, q)
        assert e.gla == ((DATA if is_in else DATA + 0x100) if string else None)
        assert v.reg("rip") == at
        assert (v.reg("rax"), v.reg("rcx"), v.reg("rdi"), v.reg("rsi")) == (0x1122334455667788, 5, DATA, DATA + 0x100)
        assert m.host.read_gpa(DATA, 16) == bytes(16)

    def test_ins_stores_nothing_before_the_exit(self):
        """The exit comes before the instruction does anything: ES:RDI keeps its bytes, RCX and
        RDI their values (the hypervisor's completion writes the port's data)."""
        src = (
            f"mov rax, -1\nmov [{DATA}], rax\nmov [{DATA + 8}], rax\nmov dx, 0x70\nlea rdi, [{DATA}]\n"
            f"mov ecx, 4\nrep insw\nhlt\n"
        )
        m, v, e, _ = first_exit(src)
        while e.reason == 48:
            e = m.run(v)
        assert e.reason == IO and m.host.read_gpa(DATA, 16) == b"\xff" * 16
        assert (v.reg("rcx"), v.reg("rdi")) == (4, DATA)

    def test_the_exit_stops_before_the_next_instruction(self):
        """Unicorn runs a translated block to its end after an instruction hook: the exit-site
        code hook stops before the instruction, so nothing after it has run."""
        m, v, e, _ = first_exit("mov eax, 0x21\nxor ecx, ecx\ncpuid\nxor eax, eax\nmov ebx, 5\nhlt\n")
        assert (e.reason, v.reg("rax"), v.reg("rbx")) == (CPUID, 0x21, 0)
        m, v, e, _ = first_exit("mov rax, -1\nin al, 0x60\nmov ebx, 5\nhlt\n")
        assert (e.reason, v.reg("rax"), v.reg("rbx")) == (IO, (1 << 64) - 1, 0)

    def test_rep_ins_with_rcx_zero_still_exits(self):
        m, v, e, _ = first_exit("xor ecx, ecx\nmov dx, 0x70\nrep insb\nhlt\n")
        assert (e.reason, e.qualification) == (IO, 0x700039 & ~1)

    def test_cross_page_instruction(self):
        """A 66 prefix on the last byte of one page, its opcode on the next: the hook on the
        prefix catches it."""
        src = "mov dx, 0x71\njmp 1f\n.org 0xfff\n1: .byte 0x66, 0xed\nhlt\n"
        m, v, e, _ = first_exit(src)
        while e.reason == 48:
            e = m.run(v)
        assert (e.reason, e.rip, e.insn_len, e.qualification) == (IO, CODE + 0xFFF, 2, 0x710009)

    def test_operand_and_address_size_prefixes(self):
        """66 67 F3 6D: REP INSW with a 32-bit address: the length counts every prefix, and
        the linear address is EDI."""
        src = "mov dx, 0x70\nmov ecx, 2\nmov rdi, 0xffffffff00160000\n.byte 0x66, 0x67, 0xf3, 0x6d\nhlt\n"
        m, v, e, _ = first_exit(src)
        while e.reason == 48:
            e = m.run(v)
        assert (e.reason, e.insn_len, e.qualification, e.gla) == (IO, 4, 0x700039, 0x160000)

    def test_outs_segment_override(self):
        """OUTS reads DS:RSI, which FS: overrides (the base of FS is added)."""
        src = "mov dx, 0x70\nlea rsi, [0x100]\nfs outsb\nhlt\n"

        def setup(m, v):
            v.uc.msr_write(MSR_FS_BASE, DATA)

        m, v, e, _ = first_exit(src, setup)
        while e.reason == 48:
            e = m.run(v)
        assert (e.reason, e.insn_len, e.gla) == (IO, 2, DATA + 0x100)

    def test_resumed_past_the_instruction(self):
        m, v, e, _ = first_exit("in al, 0x60\nmov rbx, 9\nhlt\n")
        v.set_regs({"rax": 0xAB, "rip": e.rip + e.insn_len})
        assert m.run(v).reason == HLT and (v.reg("rax"), v.reg("rbx")) == (0xAB, 9)


class TestMsrExits:
    def test_rdmsr_wrmsr_exit_without_a_bitmap(self):
        m, v, e, before = first_exit("mov ecx, 0xdeadbeef\nrdmsr\nwrmsr\nhlt\n")
        assert (e.reason, e.rip, e.insn_len) == (RDMSR, CODE + 5, 2)
        assert (v.reg("rax"), v.reg("rdx"), v.reg("rcx")) == (before["rax"], before["rdx"], 0xDEADBEEF)
        v.set_reg("rip", e.rip + 2)
        e = m.run(v)
        assert (e.reason, e.rip, e.insn_len) == (WRMSR, CODE + 7, 2)

    def test_prefixed_rdmsr_still_exits(self):
        """REX.W 0F 32 begins a byte before the 0F: a hook sits there too."""
        m, v, e, _ = first_exit("mov ecx, 0x10\n.byte 0x48, 0x0f, 0x32\nhlt\n")
        assert (e.reason, e.rip, e.insn_len) == (RDMSR, CODE + 5, 3)

    def test_bytes_inside_another_instruction_do_not_exit(self):
        """mov eax, 0x90320f90 holds 0F 32: its hook never fires (no instruction starts there)."""
        m, v, e, _ = first_exit("mov eax, 0x90320f90\nhlt\n")
        assert e.reason == HLT and v.reg("rax") == 0x90320F90

    def test_bitmap_passes_fs_base_through(self):
        """A cleared bitmap bit: the CPU itself writes FS_BASE (Unicorn's, so fs: uses it)."""
        src = f"mov ecx, {MSR_FS_BASE:#x}\nmov eax, {DATA}\nxor edx, edx\nwrmsr\nmov rbx, fs:[8]\nrdmsr\nhlt\n"

        def setup(m, v):
            v.msr_bitmap = MsrBitmap()
            v.msr_bitmap.set_intercept(MSR_FS_BASE, MSR_TYPE_RW, False)
            m.put(DATA + 8, 0x4242)

        m, v, e, _ = first_exit(src, setup)
        while e.reason == 48:
            e = m.run(v)
        assert e.reason == HLT and (v.reg("rbx"), v.reg("rax"), v.reg("rdx")) == (0x4242, DATA, 0)

    def test_bitmap_intercepts_writes_only(self):
        def setup(m, v):
            v.msr_bitmap = MsrBitmap()
            v.msr_bitmap.set_intercept(MSR_LSTAR, MSR_TYPE_RW, False)
            v.msr_bitmap.set_intercept(MSR_LSTAR, MSR_TYPE_W, True)

        m, v, e, _ = first_exit(f"mov ecx, {MSR_LSTAR:#x}\nrdmsr\nwrmsr\nhlt\n", setup)
        assert (e.reason, e.rip) == (WRMSR, CODE + 7)

    def test_msrs_outside_the_bitmap_ranges_always_exit(self):
        bm = MsrBitmap()
        bm.page[:] = bytes(4096)
        assert not bm.intercepted(MSR_EFER, False) and not bm.intercepted(0x1FFF, True)
        assert bm.intercepted(0x2000, False) and bm.intercepted(0xC0002000, True)
        with pytest.raises(ValueError):
            bm.set_intercept(0x40000000, MSR_TYPE_RW, False)

    def test_native_noncanonical_write_is_gp(self):
        """WRMSR of a non-canonical FS_BASE: #GP(0) (the exception bitmap intercepts #GP here)."""

        def setup(m, v):
            v.msr_bitmap = MsrBitmap()
            v.msr_bitmap.set_intercept(MSR_FS_BASE, MSR_TYPE_RW, False)
            v.exception_bitmap = 1 << 13

        m, v, e, _ = first_exit(f"mov ecx, {MSR_FS_BASE:#x}\nmov edx, 0x10000\nxor eax, eax\nwrmsr\nhlt\n", setup)
        assert (e.reason, e.vector, e.error_code, e.rip) == (EXC, 13, 0, CODE + 12)

    def test_native_access_to_an_msr_the_cpu_lacks_is_gp(self):
        def setup(m, v):
            v.msr_bitmap = MsrBitmap()
            v.msr_bitmap.page[:] = bytes(4096)
            v.exception_bitmap = 1 << 13

        m, v, e, _ = first_exit("mov ecx, 0x1234\nrdmsr\nhlt\n", setup)
        assert (e.reason, e.vector, e.rip) == (EXC, 13, CODE + 5)


@given(st.integers(0, (1 << 64) - 1))
def test_is_canonical(addr):
    top = addr >> 47
    assert is_canonical(addr) == (top == 0 or top == (1 << 17) - 1)


class TestTsc:
    def test_rdtsc_is_host_tsc_plus_offset_and_advances(self):
        def setup(m, v):
            v.tsc_offset = 1 << 40

        m, v, e, _ = first_exit("rdtsc\nmov r8, rax\nmov r9, rdx\nrdtsc\nhlt\n", setup)
        first = (v.reg("r9") << 32) | v.reg("r8")
        second = (v.reg("rdx") << 32) | v.reg("rax")
        assert (first, second) == ((1 << 40) + TSC_STEP, (1 << 40) + 2 * TSC_STEP)

    def test_native_tsc_read_and_write(self):
        src = f"mov ecx, {MSR_IA32_TSC}\nxor edx, edx\nmov eax, 0x5000\nwrmsr\nrdmsr\nhlt\n"

        def setup(m, v):
            v.msr_bitmap = MsrBitmap()
            v.msr_bitmap.set_intercept(MSR_IA32_TSC, MSR_TYPE_RW, False)

        m, v, e, _ = first_exit(src, setup)
        assert e.reason == HLT and v.reg("rax") == 0x5000 + TSC_STEP

    def test_rdtscp_returns_tsc_aux(self):
        def setup(m, v):
            v.uc.msr_write(0xC0000103, 7)

        m, v, e, _ = first_exit("rdtscp\nhlt\n", setup)
        assert (v.reg("rcx"), v.reg("rax")) == (7, TSC_STEP)


@settings(max_examples=30, deadline=None)
@given(port=st.integers(0, 0xFFFF), size=st.sampled_from([1, 2, 4]), is_in=st.booleans())
def test_dx_port_qualification(port, size, is_in):
    reg = {1: "al", 2: "ax", 4: "eax"}[size]
    insn = f"in {reg}, dx" if is_in else f"out dx, {reg}"
    m, v, e, _ = first_exit(f"mov edx, {port}\n{insn}\nhlt\n")
    assert e.reason == IO
    assert e.qualification == (size - 1) | (8 if is_in else 0) | port << 16
