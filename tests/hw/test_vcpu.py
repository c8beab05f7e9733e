"""Tests of the vCPU, ``emu.hw.vcpu.Vcpu``: real guest code on Unicorn, our MMU on every TLB miss.

The host is ``emu.hw.bare.BareHost``: it maps each guest page into EPT (identity GPA -> HPA,
4K, RWX, WB) on its first EPT violation, so every first touch of a page is a visible exit
(``BareHost.violations``), and returns every other exit to the test.

Expected values come from the Intel SDM (Vol. 3C "VM exits", "EPT"; Vol. 3A ch. 4 "Paging";
Appendix C basic exit reasons) and REFERENCE.md sections 4-5, spelled out here.

A guest paging-structure access that hits an EPT violation has qualification bit 8 CLEAR (it is
not the access to the final translation), so with EPT A/D on its qualification is 0x83 (read |
write | GLA valid), not 0x183.

Guest layout (all tests):
  guest tables   PML4 0x800000 (CR3) -> PDPT 0x801000 -> PD 0x802000 -> PT 0x803000:
                 GVA [0, 2 MiB) identity-mapped with 4K pages, P|RW (A = D = 0);
                 GVA [8, 10 MiB) identity-mapped by one 2M page (the guest can edit its tables)
  code           0x100000 (one 4K page)
  data           0x110000.. ; stack top 0x1f0000
"""

import struct

import pytest

from asm import assemble
from emu.hw.bare import BareHost
from emu.hw.ept import walk
from emu.hw.vcpu import Vcpu

# ---------------------------------------------------------------------------------------------
# Spec constants
# ---------------------------------------------------------------------------------------------
# Basic exit reasons (SDM Vol. 3D Appendix C; TDCALL 77 as the TDX module sees it)
EXCEPTION_NMI, HLT, VMCALL, EPT_VIOLATION, EPT_MISCONFIG, TDCALL = 0, 12, 18, 48, 49, 77

# Guest paging entry bits
P, RW, US, A, D, PS = 1, 2, 4, 0x20, 0x40, 0x80
XD = 1 << 63
# EPT entry bits
EPT_RWX, EPT_WB, EPT_A, EPT_D = 7, 6 << 3, 1 << 8, 1 << 9
# EPT-violation qualification (REFERENCE 4.4)
Q_R, Q_W, Q_X, Q_GLA_VALID, Q_FINAL = 1, 2, 4, 1 << 7, 1 << 8
Q_CODE = Q_FINAL | Q_GLA_VALID | Q_X  # 0x184
Q_READ = Q_FINAL | Q_GLA_VALID | Q_R  # 0x181
Q_WRITE = Q_FINAL | Q_GLA_VALID | Q_W  # 0x182
Q_TABLE_AD = Q_GLA_VALID | Q_R | Q_W  # 0x83: paging-structure access, EPT A/D on
Q_TABLE = Q_GLA_VALID | Q_R  # 0x81: paging-structure access, EPT A/D off
# #PF error code
PF_P, PF_W, PF_U, PF_RSVD, PF_ID = 1, 2, 4, 8, 16

PML4, PDPT, PD, PT = 0x800000, 0x801000, 0x802000, 0x803000
CODE = 0x100000
STACK_TOP = 0x1F0000
V1, V2 = 0x1111_2222_3333_4444, 0x5555_6666_7777_8888


def pte_gpa(gva):
    """GPA of the guest PTE mapping ``gva`` (< 2 MiB)."""
    return PT + (gva >> 12) * 8


def table_walk_violations(gva):
    """(GPA, qualification) of the four guest paging-structure entries a first walk of ``gva``
    touches, in walk order, each on a page not yet in EPT (EPT A/D on)."""
    return [
        (PML4 + ((gva >> 39) & 511) * 8, Q_TABLE_AD),
        (PDPT + ((gva >> 30) & 511) * 8, Q_TABLE_AD),
        (PD + ((gva >> 21) & 511) * 8, Q_TABLE_AD),
        (pte_gpa(gva), Q_TABLE_AD),
    ]


class Machine:
    def __init__(self, src=None, ad=True):
        self.host = BareHost(16 << 20, ad=ad)
        self.mem = self.host.mem
        w = self.mem.write64
        w(PML4, PDPT | P | RW)
        w(PDPT, PD | P | RW)
        w(PD, PT | P | RW)
        for i in range(512):
            w(PT + 8 * i, (i << 12) | P | RW)
        w(PD + 4 * 8, 0x800000 | P | RW | PS)  # the tables themselves: GVA 0x800000, one 2M page
        if src is not None:
            self.code(src)

    def code(self, src, at=CODE):
        b = assemble(src, at)
        self.host.write_gpa(at, b)
        return b

    def vcpu(self, rip=CODE, index=0, cr3=PML4):
        v = Vcpu(self.mem, index)
        v.load_eptp(self.host.eptp)
        v.set_regs({"rip": rip, "cr3": cr3, "rsp": STACK_TOP})
        return v

    def run(self, v):
        return self.host.run(v)

    def resume(self, v, exit):
        """Complete a VMCALL/TDCALL the way KVM does (skip the instruction) and run on."""
        v.set_reg("rip", exit.rip + exit.insn_len)
        return self.run(v)

    def q(self, gpa):
        return self.mem.read64(gpa)

    def put(self, gpa, value):
        self.mem.write64(gpa, value)

    def ept_leaf(self, gpa):
        path = []
        walk(self.mem, self.host.eptp, gpa, 1, path=path, set_ad=False)
        assert len(path) == 4
        return path[-1][1]

    def seen(self):
        """(GPA, qualification, GLA) of every EPT violation the host handled so far."""
        return [(e.gpa, e.qualification, e.gla) for e in self.host.violations]


# =============================================================================================
# 1. Instruction exits: VMCALL, TDCALL, HLT
# =============================================================================================
class TestInstructionExits:
    """SDM Vol. 3C: VMCALL (0f 01 c1) in VMX non-root operation exits with basic reason 18;
    TDCALL (66 0f 01 cc) in a TD exits to the TDX module with reason 77; HLT exits with reason 12
    ("HLT exiting").  These are fault-like exits: the guest RIP saved is that of the instruction,
    and the VM-exit instruction-length field holds its length; the VMM advances RIP past it
    (kvm_skip_emulated_instruction) before resuming."""

    SRC = "inc rbx\nvmcall\ninc rbx\ntdcall\ninc rbx\nhlt\n"

    def test_vmcall_tdcall_hlt(self):
        m = Machine(self.SRC)
        v = m.vcpu()
        e = m.run(v)
        assert (e.reason, e.rip, e.insn_len) == (VMCALL, CODE + 3, 3)
        assert e.name == "VMCALL"
        assert v.reg("rbx") == 1 and v.reg("rip") == CODE + 3
        e = m.resume(v, e)
        assert (e.reason, e.rip, e.insn_len) == (TDCALL, CODE + 9, 4)
        assert v.reg("rbx") == 2
        e = m.resume(v, e)
        assert (e.reason, e.rip, e.insn_len) == (HLT, CODE + 16, 1)
        assert v.reg("rbx") == 3

    def test_not_advancing_rip_repeats_the_exit(self):
        m = Machine(self.SRC)
        v = m.vcpu()
        first = m.run(v)
        again = m.run(v)
        assert (again.reason, again.rip, again.insn_len) == (VMCALL, first.rip, 3)
        assert v.reg("rbx") == 1

    def test_hlt(self):
        m = Machine("nop\nnop\nhlt\nud2\n")
        v = m.vcpu()
        e = m.run(v)
        assert (e.reason, e.rip, e.insn_len) == (HLT, CODE + 2, 1)

    def test_vmcall_registers_reach_the_host(self):
        """A hypercall's arguments are the guest's registers at the exit; results written by the
        host before resuming are what the guest sees after the VMCALL."""
        m = Machine("mov eax, 0x1234\nmov rdx, -2\nvmcall\nmov rbx, rax\nhlt\n")
        v = m.vcpu()
        e = m.run(v)
        assert e.reason == VMCALL
        assert (v.reg("rax"), v.reg("rdx")) == (0x1234, (1 << 64) - 2)
        v.set_reg("rax", 0xABCDEF)
        e = m.resume(v, e)
        assert e.reason == HLT and v.reg("rbx") == 0xABCDEF


# =============================================================================================
# 2. Exceptions the guest does not handle
# =============================================================================================
class TestExceptions:
    """SDM Vol. 3A 6.15 (exception classes) and Vol. 3C (exception bitmap): a fault is delivered
    with RIP at the faulting instruction; an exception VM exit has basic reason 0
    (EXCEPTION_NMI) with the vector.  #DE = 0, #UD = 6, #GP = 13 (error code 0), #PF = 14 with
    the SDM 4.7 error code and the faulting linear address (CR2)."""

    def test_divide_error(self):
        m = Machine("mov eax, 7\nxor ecx, ecx\ndiv rcx\nhlt\n")
        v = m.vcpu()
        e = m.run(v)
        assert (e.reason, e.vector, e.rip) == (EXCEPTION_NMI, 0, CODE + 7)
        assert v.reg("rax") == 7

    def test_ud2(self):
        m = Machine("nop\nud2\nhlt\n")
        e = m.run(m.vcpu())
        assert (e.reason, e.vector, e.rip) == (EXCEPTION_NMI, 6, CODE + 1)

    def test_page_fault_not_present_read(self):
        m = Machine("inc rbx\nmov rax, [0x120000]\nhlt\n")
        m.put(pte_gpa(0x120000), 0)
        v = m.vcpu()
        e = m.run(v)
        assert (e.reason, e.vector, e.error_code, e.cr2, e.rip) == (EXCEPTION_NMI, 14, 0, 0x120000, CODE + 3)
        assert v.reg("cr2") == 0x120000 and v.reg("rbx") == 1
        # The page was never reached: no EPT violation for it.
        assert [g for g, _, _ in m.seen()] == [g for g, _ in table_walk_violations(CODE)] + [CODE]

    def test_page_fault_not_present_write(self):
        m = Machine("mov qword ptr [0x120000], 1\nhlt\n")
        m.put(pte_gpa(0x120000), 0)
        e = m.run(m.vcpu())
        assert (e.vector, e.error_code, e.cr2, e.rip) == (14, PF_W, 0x120000, CODE)

    def test_page_fault_not_present_fetch(self):
        m = Machine("mov rax, 0x120000\njmp rax\n")
        m.put(pte_gpa(0x120000), 0)
        e = m.run(m.vcpu())
        assert (e.vector, e.error_code, e.cr2, e.rip) == (14, PF_ID, 0x120000, 0x120000)  # EFER.NXE = 1

    def test_page_fault_write_to_read_only(self):
        """CR0.WP = 1 at boot: a supervisor write to a read-only page faults with P|W."""
        m = Machine("mov rax, [0x121000]\nmov qword ptr [0x121000], 1\nhlt\n")
        m.put(pte_gpa(0x121000), 0x121000 | P)
        v = m.vcpu()
        assert v.reg("cr0") & (1 << 16)
        e = m.run(v)
        assert (e.vector, e.error_code, e.cr2, e.rip) == (14, PF_P | PF_W, 0x121000, CODE + 8)

    def test_page_fault_nx_fetch(self):
        m = Machine("mov rax, 0x122000\njmp rax\n")
        m.put(pte_gpa(0x122000), 0x122000 | P | RW | XD)
        e = m.run(m.vcpu())
        assert (e.vector, e.error_code, e.cr2, e.rip) == (14, PF_P | PF_ID, 0x122000, 0x122000)

    def test_page_fault_reserved_bit(self):
        m = Machine("mov rax, [0x123000]\nhlt\n")
        m.put(pte_gpa(0x123000), 0x123000 | P | RW | (1 << 50))
        e = m.run(m.vcpu())
        assert (e.vector, e.error_code, e.cr2) == (14, PF_P | PF_RSVD, 0x123000)

    def test_general_protection_non_canonical(self):
        m = Machine("mov rax, 0x0000800000000000\nmov rbx, [rax]\nhlt\n")
        e = m.run(m.vcpu())
        assert (e.reason, e.vector, e.error_code, e.rip) == (EXCEPTION_NMI, 13, 0, CODE + 10)

    def test_int3_rip_references_the_instruction(self):
        """SDM Vol. 3C "Saving RIP": for a VM exit due to a software exception (INT3 or INTO)
        the RIP saved references the INT3 instruction, and the VM-exit instruction-length field
        is saved (KVM re-injects #BP with that length)."""
        m = Machine("nop\nint3\nhlt\n")
        e = m.run(m.vcpu())
        assert (e.reason, e.vector, e.rip, e.insn_len) == (EXCEPTION_NMI, 3, CODE + 1, 1)

    def test_page_fault_cr2_is_the_exact_address(self):
        """SDM 4.7: CR2 receives the linear address that caused the fault, offset included."""
        m = Machine("mov rax, [0x120008]\nhlt\n")
        m.put(pte_gpa(0x120000), 0)
        v = m.vcpu()
        e = m.run(v)
        assert (e.vector, e.cr2, v.reg("cr2")) == (14, 0x120008, 0x120008)


# =============================================================================================
# 3. EPT-violation exits
# =============================================================================================
class TestEptViolationExits:
    """SDM Vol. 3C / REFERENCE 4.3-4.4: reason 48; qualification bits 0-2 = read/write/fetch,
    3-5 = EPT rights of the path (0 when not present), bit 7 = GLA valid, bit 8 = the access was
    to the final translation (clear for a guest paging-structure access, which with EPT A/D on
    is a write: bits 0 and 1).  The GPA field is the GPA accessed (for a paging-structure
    access: the entry's GPA), the GLA field the linear address being translated.  The exit is
    fault-like: after the host maps the page, the guest restarts the faulting instruction, and
    a translation that was once filled is in the TLB, so each page exits exactly once."""

    def test_one_exit_per_page_first_touched(self):
        src = """
            mov rax, [0x110000]         # read A
            mov qword ptr [0x111000], 1 # write B
            mov rax, [0x112000]         # read C ...
            mov qword ptr [0x112008], 2 # ... then write it: C is RWX in EPT now, no exit
            mov rax, [0x110010]         # A again
            mov qword ptr [0x111ff8], 3 # B again
            mov rax, [0x111000]
            hlt
        """
        m = Machine(src)
        e = m.run(m.vcpu())
        assert e.reason == HLT
        expect = [(g, q, CODE) for g, q in table_walk_violations(CODE)] + [
            (CODE, Q_CODE, CODE),
            (0x110000, Q_READ, 0x110000),
            (0x111000, Q_WRITE, 0x111000),
            (0x112000, Q_READ, 0x112000),
        ]
        assert m.seen() == expect
        assert [hex(q) for _, q, _ in m.seen()] == ["0x83"] * 4 + ["0x184", "0x181", "0x182", "0x181"]
        assert all(x.reason == EPT_VIOLATION and x.name == "EPT_VIOLATION" for x in m.host.violations)
        assert struct.unpack("<Q", m.host.read_gpa(0x111FF8, 8))[0] == 3

    def test_page_crossing_access_exits_for_both_pages(self):
        m = Machine("mov rax, [0x110ffc]\nhlt\n")
        m.put(0x110FF8, 0x44332211_00000000)
        m.put(0x111000, 0x88776655)
        v = m.vcpu()
        assert m.run(v).reason == HLT
        data = [(g & ~0xFFF, q) for g, q, _ in m.seen()[5:]]
        assert data == [(0x110000, Q_READ), (0x111000, Q_READ)]
        assert v.reg("rax") == 0x8877665544332211

    def test_paging_structure_violations_without_ad(self):
        """EPT A/D off: a paging-structure read is a plain read (0x81); the A-flag updates that
        follow find the table pages already RWX, so they do not exit."""
        m = Machine("mov rax, [0x110000]\nhlt\n", ad=False)
        e = m.run(m.vcpu())
        assert e.reason == HLT
        assert [q for _, q, _ in m.seen()] == [Q_TABLE] * 4 + [Q_CODE, Q_READ]
        assert m.q(pte_gpa(0x110000)) == 0x110000 | P | RW | A

    def test_gla_and_gpa_differ(self):
        """A GVA mapped to another GPA: GLA = the linear address, GPA = where it maps."""
        gva = 0x4000_0000_0000  # PML4 index 0x80
        m = Machine("mov rax, 0x400000000000\nmov qword ptr [rax], 9\nhlt\n")
        m.put(PML4 + 0x80 * 8, 0x804000 | P | RW)
        m.put(0x804000, 0x805000 | P | RW)
        m.put(0x805000, 0x806000 | P | RW)
        m.put(0x806000, 0x150000 | P | RW)
        e = m.run(m.vcpu())
        assert e.reason == HLT
        assert m.seen()[5:] == [
            (0x804000, Q_TABLE_AD, gva),
            (0x805000, Q_TABLE_AD, gva),
            (0x806000, Q_TABLE_AD, gva),
            (0x150000, Q_WRITE, gva),
        ]
        assert m.host.read_gpa(0x150000, 8) == struct.pack("<Q", 9)

    def test_resume_at_the_faulting_instruction(self):
        """Each side effect happens once: inc before the faulting load, the load itself, the
        inc after; and one instruction (pop) whose own register update must not be doubled."""
        src = """
            inc rbx
            mov rax, [0x110000]
            inc rcx
            mov rsp, 0x117000
            pop rdx                    # reads 0x117000: EPT violation, then rsp += 8 once
            mov rsp, 0x119000
            push rdi                   # writes 0x118ff8: EPT violation, then rsp -= 8 once
            add rsi, [0x11a000]        # an ALU op with a memory source
            hlt
        """
        m = Machine(src)
        m.put(0x110000, V1)
        m.put(0x117000, V2)
        m.put(0x11A000, 5)
        v = m.vcpu()
        v.set_regs({"rdi": 0xFEED, "rsi": 100})
        e = m.run(v)
        assert e.reason == HLT
        r = v.get_regs()
        assert (r["rbx"], r["rax"], r["rcx"], r["rdx"], r["rsp"], r["rsi"]) == (1, V1, 1, V2, 0x118FF8, 105)
        assert m.q(0x118FF8) == 0xFEED
        assert [(g, q) for g, q, _ in m.seen()[5:]] == [
            (0x110000, Q_READ),
            (0x117000, Q_READ),
            (0x118000, Q_WRITE),
            (0x11A000, Q_READ),
        ]

    def test_rep_movsb_restarts_where_it_stopped(self):
        """A REP string instruction is restartable: an exit in the middle of it keeps the
        iterations already done (RCX/RSI/RDI updated) and the restart goes on from there."""
        src = """
            mov rsi, 0x130000
            mov rdi, 0x140000
            mov rcx, 0x2000
            rep movsb
            hlt
        """
        m = Machine(src)
        pattern = bytes((i * 7 + 3) & 0xFF for i in range(0x2000))
        m.host.write_gpa(0x130000, pattern)
        v = m.vcpu()
        assert m.run(v).reason == HLT
        assert m.host.read_gpa(0x140000, 0x2000) == pattern
        assert (v.reg("rcx"), v.reg("rsi"), v.reg("rdi")) == (0, 0x132000, 0x142000)
        assert sorted((g, q) for g, q, _ in m.seen()[5:]) == [
            (0x130000, Q_READ),
            (0x131000, Q_READ),
            (0x140000, Q_WRITE),
            (0x141000, Q_WRITE),
        ]

    def test_permission_violation_reaches_the_host(self):
        """A page present in EPT without W: the write exits with the path rights in bits 3-5
        (R|X = 0b101 -> 0x28); BareHost does not handle it (the page is mapped)."""
        m = Machine("mov rax, [0x110000]\nmov qword ptr [0x110000], 1\nhlt\n")
        m.host.map_4k(0x110000, perms=0b101)
        v = m.vcpu()
        e = m.run(v)
        assert (e.reason, e.gpa, e.gla, e.rip) == (EPT_VIOLATION, 0x110000, 0x110000, CODE + 8)
        assert e.qualification == Q_WRITE | (0b101 << 3) == 0x1AA
        assert m.q(pte_gpa(0x110000)) == 0x110000 | P | RW | A | D  # the guest walk completed

    def test_exit_gpa_and_gla_include_the_page_offset(self):
        """SDM Vol. 3C 28.2.1: the guest-physical-address field is the GPA of the access and the
        guest-linear-address field its linear address (KVM's MMIO emulation uses the full GPA)."""
        m = Machine("mov rax, [0x110008]\nhlt\n")
        m.run(m.vcpu())
        assert m.seen()[5] == (0x110008, Q_READ, 0x110008)

    @pytest.mark.parametrize(
        "insn", ["add qword ptr [0x110000], 1", "lock add qword ptr [0x110000], 1", "xchg [0x110000], rax"]
    )
    def test_read_modify_write_exits_as_a_write(self, insn):
        """REFERENCE 4.3: a read-modify-write sets qualification bit 1 (bit 0 is implementation
        specific)."""
        m = Machine(insn + "\nhlt\n")
        assert m.run(m.vcpu()).reason == HLT
        gpa, q, _ = m.seen()[5]
        assert gpa == 0x110000 and q & Q_W and q & ~Q_R == Q_WRITE


# =============================================================================================
# 4. EPT misconfiguration exit
# =============================================================================================
class TestEptMisconfigExit:
    """REFERENCE 4.3: an EPT entry with bits 2:0 = 010 (write without read) is a
    misconfiguration: basic exit reason 49, the GPA reported, the qualification undefined."""

    def test_write_only_leaf(self):
        m = Machine("inc rbx\nmov rax, [0x110000]\nhlt\n")
        m.host.map_4k(0x110000, perms=0b010)
        v = m.vcpu()
        e = m.run(v)
        assert (e.reason, e.name, e.gpa, e.rip, e.misconfig) == (
            EPT_MISCONFIG,
            "EPT_MISCONFIG",
            0x110000,
            CODE + 3,
            "write without read",
        )
        assert v.reg("rbx") == 1
        # Fixing the entry and re-entering completes the instruction.
        m.put(m.ept_leaf(0x110000), 0x110000 | EPT_WB | EPT_RWX)
        m.put(0x110000, V1)
        e = m.run(v)
        assert e.reason == HLT and v.reg("rax") == V1 and v.reg("rbx") == 1

    def test_reserved_memory_type(self):
        m = Machine("mov qword ptr [0x110000], 1\nhlt\n")
        m.host.map_4k(0x110000, memtype=7)
        e = m.run(m.vcpu())
        assert (e.reason, e.gpa, e.misconfig) == (EPT_MISCONFIG, 0x110000, "reserved memory type 7")

    def test_misconfigured_page_table_page(self):
        m = Machine("mov rax, [0x110000]\nhlt\n")
        m.host.map_4k(PT, perms=0b110)
        e = m.run(m.vcpu())
        assert (e.reason, e.gpa, e.misconfig) == (EPT_MISCONFIG, pte_gpa(CODE), "write without read")


# =============================================================================================
# 5. Exact dirty flags
# =============================================================================================
class TestDirtyFlags:
    """SDM 4.8: the guest PTE's D flag is set on the first write to the page, not on a read.
    REFERENCE 4.5 (EPT A/D on): the EPT leaf's A (bit 8) is set by any access, its D (bit 9)
    only by a write.  REFERENCE 5: the TLB entry a read fills is read-only, so the later write
    misses again and the walk sets D exactly then."""

    def test_read_then_write(self):
        src = """
            mov rax, [0x110000]
            vmcall
            mov qword ptr [0x110008], 1
            vmcall
            hlt
        """
        m = Machine(src)
        v = m.vcpu()
        e = m.run(v)
        assert e.reason == VMCALL
        leaf = m.ept_leaf(0x110000)
        assert m.q(leaf) == 0x110000 | EPT_WB | EPT_RWX | EPT_A  # 0x110137: no D
        assert m.q(pte_gpa(0x110000)) == 0x110000 | P | RW | A  # 0x110023: no D
        e = m.resume(v, e)
        assert e.reason == VMCALL
        assert m.q(leaf) == 0x110000 | EPT_WB | EPT_RWX | EPT_A | EPT_D  # 0x110337
        assert m.q(pte_gpa(0x110000)) == 0x110000 | P | RW | A | D  # 0x110063
        assert m.resume(v, e).reason == HLT

    def test_code_page_and_table_pages(self):
        """A fetch sets A, not D; the EPT leaves of the guest table pages get D even though the
        guest only read them (REFERENCE 4.5); upper guest entries never get D."""
        m = Machine("nop\nhlt\n")
        assert m.run(m.vcpu()).reason == HLT
        assert m.q(m.ept_leaf(CODE)) == CODE | EPT_WB | EPT_RWX | EPT_A
        assert m.q(pte_gpa(CODE)) == CODE | P | RW | A
        for table in (PML4, PDPT, PD, PT):
            assert m.q(m.ept_leaf(table)) == table | EPT_WB | EPT_RWX | EPT_A | EPT_D
        assert (m.q(PML4), m.q(PDPT), m.q(PD)) == (PDPT | P | RW | A, PD | P | RW | A, PT | P | RW | A)

    def test_host_clearing_d_is_seen_after_flush(self):
        """Dirty logging: the host clears EPT D and flushes; the next guest write sets it again."""
        src = "mov qword ptr [0x110000], 1\nvmcall\nmov qword ptr [0x110000], 2\nvmcall\nhlt\n"
        m = Machine(src)
        v = m.vcpu()
        e = m.run(v)
        leaf = m.ept_leaf(0x110000)
        assert m.q(leaf) & EPT_D
        m.put(leaf, m.q(leaf) & ~EPT_D)
        v.flush_tlb()
        e = m.resume(v, e)
        assert e.reason == VMCALL and m.q(leaf) == 0x110000 | EPT_WB | EPT_RWX | EPT_A | EPT_D


# =============================================================================================
# 6. TLB: INVEPT, MOV CR3, per-vCPU TLBs
# =============================================================================================
READ_TWICE = """
    mov rax, [0x110000]
    vmcall
    mov rax, [0x110000]
    vmcall
    hlt
"""


def remap_ept(m, gpa, hpa):
    m.put(m.ept_leaf(gpa), hpa | EPT_WB | EPT_RWX | EPT_A | EPT_D)


class TestTlb:
    """SDM Vol. 3C "Caching translation information" / INVEPT: the processor may keep using a
    cached translation (combined GVA -> HPA mapping) after software changes an EPT entry, until
    INVEPT invalidates it.  That is why KVM must flush after changing a present SPTE; this
    emulator's TLB behaves the same (Unicorn's TLB survives emu_start; Vcpu.flush_tlb is
    INVEPT).  MOV to CR3 invalidates the guest's non-global translations (SDM Vol. 3A 4.10.4.1).
    Each logical processor has its own TLB."""

    def setup_two_frames(self, m):
        m.put(0x110000, V1)  # the frame GPA 0x110000 maps to (identity)
        m.put(0x150000, V2)  # another frame with different content

    def test_invept_makes_a_changed_ept_entry_visible(self):
        m = Machine(READ_TWICE)
        self.setup_two_frames(m)
        v = m.vcpu()
        e = m.run(v)
        assert e.reason == VMCALL and v.reg("rax") == V1
        remap_ept(m, 0x110000, 0x150000)
        v.flush_tlb()
        e = m.resume(v, e)
        assert e.reason == VMCALL and v.reg("rax") == V2

    def test_without_invept_the_stale_translation_is_used(self):
        """The hardware behaviour that makes KVM's remote TLB flushes necessary."""
        m = Machine(READ_TWICE)
        self.setup_two_frames(m)
        v = m.vcpu()
        e = m.run(v)
        remap_ept(m, 0x110000, 0x150000)
        fills = v.stats_fills
        e = m.resume(v, e)
        assert e.reason == VMCALL and v.reg("rax") == V1
        assert v.stats_fills == fills  # no TLB miss at all

    def test_without_invept_a_zapped_page_is_still_reachable(self):
        m = Machine(READ_TWICE)
        self.setup_two_frames(m)
        v = m.vcpu()
        e = m.run(v)
        m.put(m.ept_leaf(0x110000), 0)  # zap the leaf, no flush
        e = m.resume(v, e)
        assert e.reason == VMCALL and v.reg("rax") == V1
        assert len(m.host.violations) == 6

    def test_zap_and_flush_exits_again(self):
        m = Machine(READ_TWICE)
        self.setup_two_frames(m)
        v = m.vcpu()
        e = m.run(v)
        m.put(m.ept_leaf(0x110000), 0)
        v.flush_tlb()
        m.host.violations.clear()
        e = m.resume(v, e)
        assert e.reason == VMCALL and v.reg("rax") == V1
        # Everything is refetched after the flush, but only the zapped page was missing in EPT.
        assert m.seen() == [(0x110000, Q_READ, 0x110000)]

    def test_warm_tlb_takes_no_fills(self):
        m = Machine("mov ecx, 1000\n1: mov rax, [0x110000]\nmov [0x111000], rax\ndec ecx\njnz 1b\nhlt\n")
        v = m.vcpu()
        assert m.run(v).reason == HLT
        # One fill per page (code, 0x110000, 0x111000) plus the refused fills of the first
        # touches: a handful for 3000 memory accesses.
        assert v.stats_fills < 20

    def test_mov_cr3_flushes(self):
        """The guest changes its own PTE (pointing GVA 0x110000 at GPA 0x150000) and reloads CR3
        with the same value: the old translation is gone."""
        src = """
            mov rax, [0x110000]
            mov qword ptr [{pte}], 0x150003
            mov rbx, [0x110000]          # stale: the TLB still has the old translation
            mov rdx, cr3
            mov cr3, rdx
            mov rcx, [0x110000]
            hlt
        """.format(pte=hex(pte_gpa(0x110000)))
        m = Machine(src)
        self.setup_two_frames(m)
        v = m.vcpu()
        assert m.run(v).reason == HLT
        assert (v.reg("rax"), v.reg("rbx"), v.reg("rcx")) == (V1, V1, V2)

    def test_mov_cr3_to_new_tables(self):
        """Switch to a second set of tables (PML4 0x810000) where GVA 0x110000 maps GPA 0x150000."""
        src = "mov rax, [0x110000]\nmov rdx, 0x810000\nmov cr3, rdx\nmov rcx, [0x110000]\nhlt\n"
        m = Machine(src)
        self.setup_two_frames(m)
        m.put(0x810000, 0x811000 | P | RW)
        m.put(0x811000, 0x812000 | P | RW)
        m.put(0x812000, 0x813000 | P | RW)
        m.host.write_gpa(0x813000, m.host.read_gpa(PT, 0x1000))
        m.put(0x813000 + 0x110 * 8, 0x150000 | P | RW)
        v = m.vcpu()
        assert m.run(v).reason == HLT
        assert (v.reg("rax"), v.reg("rcx"), v.reg("cr3")) == (V1, V2, 0x810000)

    def test_host_write_of_guest_pte_without_flush_is_not_seen(self):
        m = Machine(READ_TWICE)
        self.setup_two_frames(m)
        v = m.vcpu()
        e = m.run(v)
        m.put(pte_gpa(0x110000), 0x150000 | P | RW | A)
        e = m.resume(v, e)
        assert v.reg("rax") == V1
        v.flush_tlb()
        v.set_reg("rip", CODE)
        e = m.run(v)
        assert e.reason == VMCALL and v.reg("rax") == V2


class TestCodeModification:
    """SDM Vol. 3A 9.1.2-9.1.3 and 11.6: a write to code bytes is seen by the instruction fetch of
    the same processor (self-modifying code), and by another processor once it executes a
    serializing instruction such as CPUID (cross-modifying code).  The host writing guest code
    between exits is the same logical processor writing it."""

    def test_self_modifying_code(self):
        src = """
            mov byte ptr [patch + 1], 5
        patch:
            mov ecx, 0
            hlt
        """
        m = Machine(src)
        v = m.vcpu()
        assert m.run(v).reason == HLT and v.reg("rcx") == 5

    def test_host_rewrites_code_between_exits(self):
        m = Machine("mov eax, 1\nvmcall\nhlt\n")
        v = m.vcpu()
        e = m.run(v)
        assert e.reason == VMCALL and v.reg("rax") == 1
        m.code("mov eax, 2\nvmcall\nhlt\n")
        v.flush_tlb()
        v.set_reg("rip", CODE)
        e = m.run(v)
        assert e.reason == VMCALL and v.reg("rax") == 2

    @pytest.mark.xfail(
        strict=True,
        reason="cross-modifying code: each vCPU's Unicorn tracks only its own stores "
        "to code; a serializing CPUID does not drop translated code "
        "(README Fidelity)",
    )
    def test_cross_modifying_code(self):
        m = Machine()
        m.code("mov ecx, 7\nret\n", at=0x102000)
        m.code(
            "mov rax, 0x102000\ncall rax\nvmcall\nxor eax, eax\ncpuid\nmov rax, 0x102000\ncall rax\nhlt\n", at=0x101000
        )
        m.code("mov byte ptr [0x102001], 9\nhlt\n", at=0x100000)
        v0, v1 = m.vcpu(rip=0x100000, index=0), m.vcpu(rip=0x101000, index=1)
        e1 = m.run(v1)
        assert e1.reason == VMCALL and v1.reg("rcx") == 7
        assert m.run(v0).reason == HLT
        assert m.host.read_gpa(0x102000, 2) == bytes([0xB9, 9])
        assert m.resume(v1, e1).reason == HLT
        assert v1.reg("rcx") == 9


class TestTwoVcpus:
    """REFERENCE 5: every vCPU's Unicorn maps the same host memory, so a store by one is seen by
    the other at once; each vCPU has its own TLB (INVEPT on one leaves the other's entries)."""

    def test_shared_memory_and_private_tlbs(self):
        m = Machine()
        m.code(
            "mov qword ptr [0x160000], 0x77\nvmcall\nmov rax, [0x110000]\nvmcall\nmov rax, [0x110000]\nvmcall\nhlt\n",
            at=0x100000,
        )
        m.code(
            "mov rbx, [0x160000]\nmov rax, [0x110000]\nvmcall\nmov qword ptr [0x160008], 0x88\n"
            "mov rax, [0x110000]\nvmcall\nhlt\n",
            at=0x101000,
        )
        m.put(0x110000, V1)
        m.put(0x150000, V2)
        v0 = m.vcpu(rip=0x100000, index=0)
        v1 = m.vcpu(rip=0x101000, index=1)
        e0 = m.run(v0)  # v0 wrote 0x77
        assert e0.reason == VMCALL and e0.vcpu == 0
        e1 = m.run(v1)  # v1 reads it, reads V1 (TLB now caches it)
        assert e1.reason == VMCALL and e1.vcpu == 1
        assert (v1.reg("rbx"), v1.reg("rax")) == (0x77, V1)
        e0 = m.resume(v0, e0)
        assert v0.reg("rax") == V1  # v0's TLB caches it too
        n = len(m.host.violations)
        remap_ept(m, 0x110000, 0x150000)
        v0.flush_tlb()  # INVEPT on v0 only
        e0 = m.resume(v0, e0)
        e1 = m.resume(v1, e1)
        assert (e0.reason, e1.reason) == (VMCALL, VMCALL)
        assert v0.reg("rax") == V2  # walked again: new frame
        assert v1.reg("rax") == V1  # stale entry in v1's own TLB
        assert m.q(0x160008) == 0x88  # v1's store, in host memory at once
        assert len(m.host.violations) == n  # pages mapped for v0 serve v1 too

    def test_second_vcpu_needs_no_ept_exits_for_mapped_pages(self):
        m = Machine("mov rax, [0x110000]\nhlt\n")
        m.put(0x110000, V1)
        v0, v1 = m.vcpu(index=0), m.vcpu(index=1)
        assert m.run(v0).reason == HLT
        n = len(m.host.violations)
        assert m.run(v1).reason == HLT
        assert len(m.host.violations) == n and v1.reg("rax") == V1


# =============================================================================================
# 7. CPUID and registers
# =============================================================================================
class TestControlState:
    """The walk uses the vCPU's control state (SDM 4.6, 4.5): CR0.WP = 0 lets supervisor writes
    through read-only pages; with EFER.NXE = 0 the XD bit is reserved (#PF P|RSVD) and fetch
    faults do not set I/D.  The guest's CPUID.80000008H:EAX[7:0] is the MAXPHYADDR the walker
    uses for reserved bits (emu.hw.paging.GUEST_MAXPHYADDR, 48)."""

    def test_wp0_set_by_host(self):
        m = Machine("mov qword ptr [0x121000], 1\nhlt\n")
        m.put(pte_gpa(0x121000), 0x121000 | P)
        v = m.vcpu()
        v.set_regs({"cr0": 0x80000033})
        assert m.run(v).reason == HLT
        assert m.q(0x121000) == 1 and m.q(pte_gpa(0x121000)) == 0x121000 | P | A | D

    def test_wp0_set_by_guest(self):
        m = Machine(
            "mov qword ptr [0x121000], 1\nmov rax, cr0\nbtr rax, 16\nmov cr0, rax\nmov qword ptr [0x121000], 2\nhlt\n"
        )
        m.put(pte_gpa(0x121000), 0x121000 | P)
        v = m.vcpu()
        e = m.run(v)
        assert (e.vector, e.error_code, e.rip) == (14, PF_P | PF_W, CODE)
        v.set_reg("rip", CODE + 12)  # skip the first store
        assert m.run(v).reason == HLT
        assert m.q(0x121000) == 2 and v.reg("cr0") & (1 << 16) == 0

    def test_xd_reserved_when_efer_nxe_0(self):
        m = Machine("mov rax, [0x121000]\nhlt\n")
        m.put(pte_gpa(0x121000), 0x121000 | P | RW | XD)
        v = m.vcpu()
        v.set_regs({"efer": 0x500})  # LME | LMA, no NXE
        e = m.run(v)
        assert (e.reason, e.vector, e.error_code, e.cr2) == (EXCEPTION_NMI, 14, PF_P | PF_RSVD, 0x121000)

    def test_fetch_fault_without_nxe_has_no_id_bit(self):
        m = Machine("mov rax, 0x120000\njmp rax\n")
        m.put(pte_gpa(0x120000), 0)
        v = m.vcpu()
        v.set_regs({"efer": 0x500})
        e = m.run(v)
        assert (e.vector, e.error_code, e.cr2) == (14, 0, 0x120000)


class TestCpuidAndRegisters:
    """CPUID exits unconditionally (SDM Vol. 3C "Instructions That Cause VM Exits
    Unconditionally"): reason 10 with RIP at the instruction, length 2, every register as
    the guest left it (the hypervisor answers: emu.kvm.cpuid, tests/kvm/test_exits.py)."""

    def test_cpuid_exits_with_the_registers_untouched(self):
        m = Machine("mov eax, 0x21\nxor ecx, ecx\nmov rbx, -1\nmov rdx, 7\ncpuid\nhlt\n")
        v = m.vcpu()
        e = m.run(v)
        assert (e.reason, e.rip, e.insn_len) == (10, CODE + 21, 2)
        assert (v.reg("rip"), v.reg("rax"), v.reg("rbx"), v.reg("rcx"), v.reg("rdx")) == (
            CODE + 21,
            0x21,
            (1 << 64) - 1,
            0,
            7,
        )
        v.set_regs({"rax": 1, "rbx": 2, "rcx": 3, "rdx": 4, "rip": e.rip + e.insn_len})
        assert m.run(v).reason == HLT
        assert (v.reg("rax"), v.reg("rbx")) == (1, 2)

    def test_get_regs(self):
        m = Machine()
        v = m.vcpu()
        r = v.get_regs()
        gprs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
        for name in gprs + ["rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer"]:
            assert name in r, name
        assert all(k == k.lower() for k in r)
        assert (r["rip"], r["rsp"], r["cr3"]) == (CODE, STACK_TOP, PML4)
        assert r["efer"] == 0xD00  # LME | LMA | NXE
        assert r["cr0"] & 0x80010001 == 0x80010001  # PG | WP | PE
        assert r["cr4"] & 0x20  # PAE

    def test_set_regs_round_trip(self):
        m = Machine()
        v = m.vcpu()
        gprs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"] + [f"r{i}" for i in range(8, 16)]
        want = {n: 0x0123_4567_89AB_0000 + i * 0x1111 for i, n in enumerate(gprs)}
        want.update(rip=0x100123, cr3=0x810000, cr2=0xDEAD000, rflags=0x202 | 0x1 | 0x40)
        v.set_regs(want)
        r = v.get_regs()
        assert {k: r[k] for k in want} == want
        v.set_regs(r)
        assert v.get_regs() == r
        v.set_reg("r15", 42)
        assert v.reg("r15") == 42 and v.get_regs()["r15"] == 42

    def test_read_guest_has_no_side_effects(self):
        """The debugger view (Vcpu.gva_to_hpa / read_guest) walks without setting A/D flags."""
        m = Machine("mov rax, [0x110000]\nhlt\n")
        m.put(0x110000, V1)
        v = m.vcpu()
        assert m.run(v).reason == HLT
        m.put(pte_gpa(0x111000), 0x150000 | P | RW)
        m.host.map_4k(0x150000)
        m.put(0x150008, V2)
        before = (m.q(pte_gpa(0x111000)), m.q(m.ept_leaf(0x150000)), m.q(m.ept_leaf(PT)))
        assert v.gva_to_hpa(0x110008) == 0x110008
        assert v.gva_to_hpa(0x111008) == 0x150008
        assert v.read_guest(0x111008, 8) == struct.pack("<Q", V2)
        m.put(0x110FF8, 0xAABBCCDD_00000000)
        m.put(0x150000, 0x11223344)
        assert v.read_guest(0x110FFC, 8) == bytes.fromhex("ddccbbaa44332211")  # crosses into GPA 0x150000
        assert (m.q(pte_gpa(0x111000)), m.q(m.ept_leaf(0x150000)), m.q(m.ept_leaf(PT))) == before
        assert v.gva_to_hpa(0x1A0000) is None  # not in EPT yet
        m.put(pte_gpa(0x1B0000), 0)
        assert v.gva_to_hpa(0x1B0000) is None  # not present in the guest

    def test_registers_after_run(self):
        m = Machine("mov r12, 0x1122334455667788\nmov rbp, rsp\npush r12\nhlt\n")
        v = m.vcpu()
        assert m.run(v).reason == HLT
        r = v.get_regs()
        assert (r["r12"], r["rbp"], r["rsp"], r["rip"]) == (
            0x1122334455667788,
            STACK_TOP,
            STACK_TOP - 8,
            CODE + 10 + 3 + 2 + 1,
        )
        assert m.q(STACK_TOP - 8) == 0x1122334455667788
