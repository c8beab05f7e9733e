"""Tests of the guest paging walker, ``emu.hw.paging.translate``, two-dimensional under EPT.

``translate(q, ept, cr3, gva, access, wp, nxe, user)`` walks the guest's IA-32e 4-level tables
from CR3; every guest paging-structure entry is itself at a GPA that goes through the EPT
callback first (SDM Vol. 3C "EPT translation of guest-physical addresses used by the guest's
paging"), then the final GPA does.  The callback here is the one the vCPU builds: a guest
paging-structure read (access PAGING) is an EPT read, or a read+write (3) when the EPTP enables
A/D (REFERENCE.md 4.3, 4.5).

The expected values are written out from the Intel SDM (Vol. 3A ch. 4 "Paging": 4.5 4-level
paging, 4.6 access rights, 4.7 page-fault exceptions, 4.8 accessed and dirty flags; Vol. 3C
EPT chapter) and REFERENCE.md sections 4 and 5, never taken from the walker's code, so bit
positions are spelled out again here.

Memory layout of every test (guest memory is host memory [0, 16 MiB), tables above it):
  guest tables   GPA 0x800000.. (PML4 at 0x800000 = CR3), identity-mapped in EPT
  data page      the GVA ``GVA`` maps to GPA 0x345000 (4K), which EPT maps to HPA 0xabc000
"""

import pytest

from emu.hw.bare import BareHost
from emu.hw.ept import EptMisconfig, EptViolation, walk
from emu.hw.paging import PAGING, GeneralProtection, PageFault, Translation, translate

# ---------------------------------------------------------------------------------------------
# Spec constants
# ---------------------------------------------------------------------------------------------
READ, WRITE, FETCH = 1, 2, 4  # access kinds == EPT qualification bits 0-2

# Guest paging-structure entry bits (SDM Vol. 3A tables 4-15 .. 4-20)
P, RW, US, PWT, PCD, A, D, PS = 1, 2, 4, 8, 16, 32, 64, 128
PAT_LARGE = 1 << 12  # PAT bit of a 2M/1G leaf: NOT reserved
XD = 1 << 63

# #PF error code (SDM Vol. 3A 4.7, figure 4-12)
PF_P, PF_W, PF_U, PF_RSVD, PF_ID = 1, 2, 4, 8, 16

# EPT entry bits (SDM Vol. 3C, REFERENCE.md 4.2)
EPT_R, EPT_W, EPT_X = 1, 2, 4
EPT_A, EPT_D = 1 << 8, 1 << 9
EPT_WB = 6 << 3

# EPT-violation qualification (REFERENCE.md 4.4)
Q_GLA_VALID = 1 << 7
Q_FINAL = 1 << 8


def q_perms(rwx):
    """Bits 3-5 of the qualification: the EPT permissions ANDed over the path."""
    return rwx << 3


CR3 = 0x800000
DATA_GPA = 0x345000
DATA_HPA = 0xABC000
# A GVA with a different index at every level: PML4 0x12, PDPT 0x34, PD 0x56, PT 0x78, offset 0x9ab.
GVA = (0x12 << 39) | (0x34 << 30) | (0x56 << 21) | (0x78 << 12) | 0x9AB
OFF = GVA & 0xFFF


# ---------------------------------------------------------------------------------------------
# Fixtures: an EPT (BareHost's tables) and guest page tables written entry by entry
# ---------------------------------------------------------------------------------------------
class Env:
    """Host memory + EPT + hand-written guest page tables.

    The guest tables are allocated one 4K page at a time from GPA 0x800000 and identity-mapped
    in EPT (RWX, WB) unless a test says otherwise.
    """

    def __init__(self, ad=False):
        self.host = BareHost(16 << 20, ad=ad)
        self.ad = ad
        self.mem = self.host.mem
        self.q = self.mem.q
        self.eptp = self.host.eptp
        self.next_table = CR3
        self.tables = []  # GPAs of guest table pages
        self.cr3 = self.new_table()

    # -- EPT --------------------------------------------------------------------------------
    def ept(self, gpa, access):
        if access == PAGING:
            access = READ | WRITE if self.ad else READ
        return walk(self.mem, self.eptp, gpa, access)

    def ept_map(self, gpa, hpa=None, perms=EPT_R | EPT_W | EPT_X):
        """4K EPT leaf gpa -> hpa (identity by default) with ``perms``, WB."""
        self.host.map_4k(gpa & ~0xFFF)
        ptr = self.ept_leaf_ptr(gpa)
        hpa = gpa if hpa is None else hpa
        self.mem.write64(ptr, (hpa & ~0xFFF) | EPT_WB | perms)
        return ptr

    def ept_leaf_ptr(self, gpa):
        path = []
        t = walk(self.mem, self.eptp, gpa, READ, path=path, set_ad=False)
        assert len(path) == 4, (path, t)
        return path[-1][1]

    def ept_entry_ptr(self, gpa, level):
        path = []
        walk(self.mem, self.eptp, gpa, READ, path=path, set_ad=False)
        return next(ptr for lvl, ptr, _ in path if lvl == level)

    # -- guest tables ------------------------------------------------------------------------
    def new_table(self, ept=True):
        gpa = self.next_table
        self.next_table += 0x1000
        self.tables.append(gpa)
        if ept:
            self.ept_map(gpa)
        return gpa

    def map(self, gva, gpa, level=1, leaf=P | RW, upper=P | RW):
        """Guest mapping of ``gva`` at ``level`` (1 = 4K, 2 = 2M, 3 = 1G); returns {level: entry GPA}.

        Missing tables get entries ``upper``; the leaf is ``gpa | leaf`` (| PS above level 1).
        """
        where = {}
        table = self.cr3
        for lvl in range(4, level, -1):
            ptr = table + (((gva >> (12 + 9 * (lvl - 1))) & 511) << 3)
            e = self.mem.read64(ptr)
            if not e & P:
                e = self.new_table() | upper
                self.mem.write64(ptr, e)
            where[lvl] = ptr
            table = e & 0x000FFFFFFFFFF000
        ptr = table + (((gva >> (12 + 9 * (level - 1))) & 511) << 3)
        self.mem.write64(ptr, gpa | leaf | (PS if level > 1 else 0))
        where[level] = ptr
        return where

    def entry(self, gpa):
        return self.mem.read64(gpa)  # guest tables are identity-mapped GPA == HPA

    def set_entry(self, gpa, value):
        self.mem.write64(gpa, value)

    def guest_snapshot(self):
        """Every nonzero word of the guest tables."""
        words = {}
        for t in self.tables:
            for i in range(512):
                v = self.mem.read64(t + 8 * i)
                if v:
                    words[t + 8 * i] = v
        return words

    def snapshot(self):
        """Every guest table word and every EPT word: to prove a walk changed nothing."""
        words = self.guest_snapshot()
        start = self.host.guest_size
        for hpa in range(start, self.host.alloc.next, 8):
            v = self.mem.read64(hpa)
            if v:
                words[hpa] = v
        return words

    def translate(self, gva, access, **kw):
        return translate(self.q, self.ept, self.cr3, gva, access, **kw)


@pytest.fixture
def env():
    return Env(ad=False)


@pytest.fixture
def env_ad():
    return Env(ad=True)


def standard_4k(env, leaf=P | RW, upper=P | RW, ept_perms=EPT_R | EPT_W | EPT_X):
    """GVA -> DATA_GPA (4K) -> DATA_HPA; returns {level: entry GPA}."""
    where = env.map(GVA, DATA_GPA, 1, leaf=leaf, upper=upper)
    env.ept_map(DATA_GPA, DATA_HPA, ept_perms)
    return where


# =============================================================================================
# 1. Translation of 4K, 2M and 1G guest pages; A and D flags (SDM 4.5, 4.8)
# =============================================================================================
class TestTranslation:
    """SDM 4.5: a PTE maps 4K (GPA = PTE[47:12] | GVA[11:0]); a PDE with PS=1 maps 2M
    (PDE[47:21] | GVA[20:0]); a PDPTE with PS=1 maps 1G (PDPTE[47:30] | GVA[29:0]).  The final
    GPA then goes through EPT to the HPA.
    SDM 4.8: the processor sets A in every paging-structure entry it uses, and D in the entry
    that maps the page (only that one) on a write.  A walk that ends in a guest #PF, or in an EPT
    exit on a paging-structure access, sets no guest flag (section 2 and 3 check memory after
    every such walk)."""

    @pytest.mark.parametrize("access", [READ, WRITE, FETCH])
    def test_4k(self, env, access):
        where = standard_4k(env)
        before = {lvl: env.entry(g) for lvl, g in where.items()}
        t = env.translate(GVA, access)
        assert type(t) is Translation
        assert (t.gva, t.gpa, t.hpa, t.level, t.ept_level) == (GVA, DATA_GPA | OFF, DATA_HPA | OFF, 1, 1)
        for lvl in (4, 3, 2):
            assert env.entry(where[lvl]) == before[lvl] | A, lvl
        assert env.entry(where[1]) == DATA_GPA | P | RW | A | (D if access == WRITE else 0)

    def test_4k_exact_entry_values(self, env):
        """Spelled out once in full for a write: every upper entry gets exactly 0x20, the PTE 0x60."""
        where = standard_4k(env)
        t = env.translate(GVA, WRITE)
        assert type(t) is Translation
        pdpt, pd, pt = env.tables[1], env.tables[2], env.tables[3]
        assert env.entry(where[4]) == pdpt | 0x23
        assert env.entry(where[3]) == pd | 0x23
        assert env.entry(where[2]) == pt | 0x23
        assert env.entry(where[1]) == DATA_GPA | 0x63
        assert where[4] == CR3 + 0x12 * 8 and where[1] == pt + 0x78 * 8

    @pytest.mark.parametrize("access", [READ, WRITE, FETCH])
    def test_2m(self, env, access):
        gpa_2m = 0x400000
        gva = (0x12 << 39) | (0x34 << 30) | (0x56 << 21) | 0x12345
        where = env.map(gva, gpa_2m, level=2)
        env.ept_map(gpa_2m + 0x12000, 0x777000)
        t = env.translate(gva, access)
        assert type(t) is Translation
        assert (t.gpa, t.hpa, t.level, t.ept_level) == (0x412345, 0x777345, 2, 1)
        assert sorted(where) == [2, 3, 4]
        assert env.entry(where[4]) == env.tables[1] | P | RW | A
        assert env.entry(where[3]) == env.tables[2] | P | RW | A
        assert env.entry(where[2]) == gpa_2m | P | RW | PS | A | (D if access == WRITE else 0)

    @pytest.mark.parametrize("access", [READ, WRITE, FETCH])
    def test_1g(self, env, access):
        gpa_1g = 0x40000000
        gva = (0x1FF << 39) | (0x1FE << 30) | 0x2345678 | (0xFFFF << 48)  # a canonical high address
        where = env.map(gva, gpa_1g, level=3)
        env.ept_map(gpa_1g + 0x2345000, 0x555000)
        t = env.translate(gva, access)
        assert type(t) is Translation
        assert (t.gpa, t.hpa, t.level, t.ept_level) == (0x42345678, 0x555678, 3, 1)
        assert sorted(where) == [3, 4]
        assert env.entry(where[4]) == env.tables[1] | P | RW | A
        assert env.entry(where[3]) == gpa_1g | P | RW | PS | A | (D if access == WRITE else 0)

    def test_pat_bit_of_large_leaf_is_not_reserved(self, env):
        """Bit 12 of a 2M PDE / 1G PDPTE is PAT, not an address bit and not reserved (SDM tables 4-17, 4-19)."""
        gva2 = 0x40000000 | 0x1234
        env.map(gva2, 0x600000 | PAT_LARGE, level=2)
        env.ept_map(0x601000)
        t = env.translate(gva2, READ)
        assert type(t) is Translation and t.gpa == 0x601234
        gva1 = (5 << 30) | 0x1234
        env.map(gva1, 0x80000000 | PAT_LARGE, level=3)
        env.ept_map(0x80001000, 0x601000)
        t = env.translate(gva1, READ)
        assert type(t) is Translation and (t.gpa, t.hpa) == (0x80001234, 0x601234)

    def test_large_ept_leaf_under_guest_4k_page(self, env):
        """The EPT leaf level is reported separately (ept_level): a 2M EPT page under a 4K guest page."""
        env.map(GVA, DATA_GPA)
        env.host.map_4k(0x200000)  # build the EPT PD for GPA 0x200000..
        pde = env.ept_entry_ptr(0x200000, 2)
        env.mem.write64(pde, 0xE00000 | (1 << 7) | EPT_WB | 7)  # 2M leaf GPA 0x200000 -> HPA 0xe00000
        t = env.translate(GVA, READ)
        assert type(t) is Translation
        assert (t.gpa, t.hpa, t.level, t.ept_level) == (DATA_GPA | OFF, 0xF45000 | OFF, 1, 2)

    def test_flags_already_set_are_left_alone(self, env):
        where = standard_4k(env, leaf=P | RW | A | D, upper=P | RW | A)
        snap = env.snapshot()
        assert type(env.translate(GVA, WRITE)) is Translation
        assert env.snapshot() == snap
        assert env.entry(where[1]) == DATA_GPA | P | RW | A | D

    def test_read_then_write_sets_d_only_on_the_write(self, env):
        where = standard_4k(env)
        env.translate(GVA, READ)
        assert env.entry(where[1]) == DATA_GPA | P | RW | A
        env.translate(GVA, READ)
        assert env.entry(where[1]) == DATA_GPA | P | RW | A
        env.translate(GVA, WRITE)
        assert env.entry(where[1]) == DATA_GPA | P | RW | A | D
        for lvl in (4, 3, 2):
            assert not env.entry(where[lvl]) & D

    def test_ept_ad_flags_of_a_2d_walk(self, env_ad):
        """REFERENCE 4.5: with EPTP A/D on, the walk sets EPT A in every EPT entry used and EPT D in
        the EPT leaves of the guest page-table pages even on a guest read (those accesses are
        writes); the data page's EPT leaf gets A, and D only on a write."""
        env = env_ad
        standard_4k(env)
        t = env.translate(GVA, READ)
        assert type(t) is Translation
        for table in env.tables:
            assert env.mem.read64(env.ept_leaf_ptr(table)) == table | EPT_WB | 7 | EPT_A | EPT_D
        data_leaf = env.ept_leaf_ptr(DATA_GPA)
        assert env.mem.read64(data_leaf) == DATA_HPA | EPT_WB | 7 | EPT_A
        for lvl in (4, 3, 2):
            assert env.mem.read64(env.ept_entry_ptr(DATA_GPA, lvl)) & EPT_A
        env.translate(GVA, WRITE)
        assert env.mem.read64(data_leaf) == DATA_HPA | EPT_WB | 7 | EPT_A | EPT_D


# =============================================================================================
# 2. Guest page faults: error codes (SDM 4.7) and access rights (SDM 4.6)
# =============================================================================================
PF_ID_IF_FETCH = {READ: 0, WRITE: PF_W, FETCH: PF_ID}  # with EFER.NXE = 1


class TestPageFault:
    """SDM 4.7: #PF error code bit 0 P (0 = not present, 1 = protection or reserved bit),
    bit 1 W/R (the access was a write), bit 2 U/S (user-mode access), bit 3 RSVD (a reserved
    bit was set in some paging-structure entry), bit 4 I/D (instruction fetch, when
    EFER.NXE = 1 or CR4.SMEP = 1).
    SDM 4.6: rights combine over all levels: a write needs R/W = 1 everywhere (supervisor
    writes ignore R/W when CR0.WP = 0); a user access needs U/S = 1 everywhere; with NXE = 1 a
    fetch needs XD = 0 everywhere.
    A fault leaves every guest and EPT entry as it was (no A/D set)."""

    @pytest.mark.parametrize("access", [READ, WRITE, FETCH])
    @pytest.mark.parametrize("level", [4, 3, 2, 1])
    def test_not_present(self, env, access, level):
        where = standard_4k(env)
        env.set_entry(where[level], env.entry(where[level]) & ~P)
        snap = env.snapshot()
        assert env.translate(GVA, access) == PageFault(GVA, PF_ID_IF_FETCH[access])
        assert env.snapshot() == snap

    def test_not_present_error_code_values(self, env):
        standard_4k(env, leaf=0)
        assert env.translate(GVA, READ).error_code == 0x0
        assert env.translate(GVA, WRITE).error_code == 0x2
        assert env.translate(GVA, FETCH).error_code == 0x10
        assert env.translate(GVA, FETCH, nxe=False).error_code == 0x0  # I/D only when NXE (or SMEP)
        assert env.translate(GVA, READ, user=True).error_code == 0x4
        assert env.translate(GVA, WRITE, user=True).error_code == 0x6

    def test_not_present_entry_ignores_other_bits(self, env):
        """A non-present entry is not checked for reserved bits: P = 0 wins."""
        where = standard_4k(env)
        env.set_entry(where[1], (1 << 51) | XD | DATA_GPA)
        assert env.translate(GVA, READ, nxe=False) == PageFault(GVA, 0)

    @pytest.mark.parametrize("level", [4, 3, 2, 1])
    def test_write_to_read_only_wp1(self, env, level):
        where = standard_4k(env)
        env.set_entry(where[level], env.entry(where[level]) & ~RW)
        snap = env.snapshot()
        assert env.translate(GVA, WRITE, wp=True) == PageFault(GVA, PF_P | PF_W)
        assert env.snapshot() == snap
        assert env.translate(GVA, WRITE, wp=True).error_code == 0x3

    def test_read_of_read_only_page_is_fine(self, env):
        standard_4k(env, leaf=P)
        t = env.translate(GVA, READ, wp=True)
        assert type(t) is Translation and t.hpa == DATA_HPA | OFF

    def test_supervisor_write_to_read_only_wp0(self, env):
        where = standard_4k(env, leaf=P, upper=P)
        t = env.translate(GVA, WRITE, wp=False)
        assert type(t) is Translation
        assert (t.gpa, t.hpa) == (DATA_GPA | OFF, DATA_HPA | OFF)
        assert env.entry(where[1]) == DATA_GPA | P | A | D
        assert env.entry(where[4]) == env.tables[1] | P | A

    def test_user_write_to_read_only_wp0_faults(self, env):
        """CR0.WP only relaxes supervisor writes."""
        standard_4k(env, leaf=P | US, upper=P | US)
        assert env.translate(GVA, WRITE, wp=False, user=True) == PageFault(GVA, PF_P | PF_W | PF_U)

    @pytest.mark.parametrize("level", [4, 3, 2, 1])
    def test_nx_fetch(self, env, level):
        where = standard_4k(env)
        env.set_entry(where[level], env.entry(where[level]) | XD)
        snap = env.snapshot()
        assert env.translate(GVA, FETCH) == PageFault(GVA, PF_P | PF_ID)
        assert env.translate(GVA, FETCH).error_code == 0x11
        assert env.snapshot() == snap

    def test_nx_page_read_and_write_are_fine(self, env):
        standard_4k(env, leaf=P | RW | XD)
        assert type(env.translate(GVA, READ)) is Translation
        assert type(env.translate(GVA, WRITE)) is Translation

    @pytest.mark.parametrize("access", [READ, WRITE, FETCH])
    @pytest.mark.parametrize("level", [4, 3, 2, 1])
    def test_user_access_to_supervisor_page(self, env, access, level):
        where = standard_4k(env, leaf=P | RW | US, upper=P | RW | US)
        env.set_entry(where[level], env.entry(where[level]) & ~US)
        snap = env.snapshot()
        expect = PF_P | PF_U | PF_ID_IF_FETCH[access]
        assert env.translate(GVA, access, user=True) == PageFault(GVA, expect)
        assert env.snapshot() == snap

    def test_user_access_error_code_values(self, env):
        standard_4k(env, leaf=P | RW, upper=P | RW | US)
        assert env.translate(GVA, READ, user=True).error_code == 0x5
        assert env.translate(GVA, WRITE, user=True).error_code == 0x7
        assert env.translate(GVA, FETCH, user=True).error_code == 0x15

    def test_user_access_to_user_page(self, env):
        standard_4k(env, leaf=P | RW | US, upper=P | RW | US)
        for access in (READ, WRITE, FETCH):
            assert type(env.translate(GVA, access, user=True)) is Translation

    def test_supervisor_access_to_user_page(self, env):
        """No SMEP/SMAP in this CPU model: a supervisor access to a user page is allowed."""
        standard_4k(env, leaf=P | RW | US, upper=P | RW | US)
        for access in (READ, WRITE, FETCH):
            assert type(env.translate(GVA, access)) is Translation


class TestReservedBits:
    """SDM 4.5 (tables 4-14 .. 4-20) and 4.7: a present entry with a reserved bit set faults with
    P | RSVD (plus W / I/D for the access).  Reserved with guest MAXPHYADDR = 48: bits 51:48 of
    every entry; PS (bit 7) of a PML4E; bits 20:13 of a 2M PDE; bits 29:13 of a 1G PDPTE; XD
    (bit 63) of every entry when EFER.NXE = 0."""

    @pytest.mark.parametrize("bit", [48, 49, 50, 51])
    @pytest.mark.parametrize("level", [4, 3, 2, 1])
    def test_address_bits_above_maxphyaddr(self, env, level, bit):
        where = standard_4k(env)
        env.set_entry(where[level], env.entry(where[level]) | (1 << bit))
        snap = env.snapshot()
        assert env.translate(GVA, READ) == PageFault(GVA, PF_P | PF_RSVD)
        assert env.translate(GVA, WRITE) == PageFault(GVA, PF_P | PF_RSVD | PF_W)
        assert env.translate(GVA, FETCH) == PageFault(GVA, PF_P | PF_RSVD | PF_ID)
        assert env.snapshot() == snap

    def test_error_code_values(self, env):
        where = standard_4k(env)
        env.set_entry(where[1], env.entry(where[1]) | (1 << 50))
        assert env.translate(GVA, READ).error_code == 0x9
        assert env.translate(GVA, WRITE).error_code == 0xB
        assert env.translate(GVA, FETCH).error_code == 0x19
        assert env.translate(GVA, READ, user=True).error_code == 0xD

    def test_bit_47_is_an_address_bit(self, env):
        """MAXPHYADDR 48: bit 47 is part of the address, not reserved."""
        where = standard_4k(env)
        env.set_entry(where[1], (1 << 47) | DATA_GPA | P | RW)
        r = env.translate(GVA, READ)
        # The walk succeeds; the GPA (1 << 47) | ... is simply not mapped in EPT.
        assert r == EptViolation((1 << 47) | DATA_GPA | OFF, Q_GLA_VALID | Q_FINAL | READ)

    def test_ps_in_pml4e(self, env):
        where = standard_4k(env)
        env.set_entry(where[4], env.entry(where[4]) | PS)
        snap = env.snapshot()
        assert env.translate(GVA, READ) == PageFault(GVA, PF_P | PF_RSVD)
        assert env.snapshot() == snap

    @pytest.mark.parametrize("bit", range(13, 21))
    def test_2m_pde_bits_20_13(self, env, bit):
        gva = 0x40000000 | 0x1234
        where = env.map(gva, 0x600000 | (1 << bit), level=2)
        env.ept_map(0x601000)
        assert env.translate(gva, READ) == PageFault(gva, PF_P | PF_RSVD)
        assert not env.entry(where[4]) & A

    @pytest.mark.parametrize("bit", range(13, 30))
    def test_1g_pdpte_bits_29_13(self, env, bit):
        gva = (5 << 30) | 0x1234
        where = env.map(gva, 0x80000000 | (1 << bit), level=3)
        assert env.translate(gva, WRITE) == PageFault(gva, PF_P | PF_RSVD | PF_W)
        assert not env.entry(where[4]) & A

    @pytest.mark.parametrize("bit", range(13, 21))
    def test_bits_20_13_are_address_bits_in_non_leaf_pde(self, env, bit):
        """Only a 2M leaf reserves 20:13; a PDE pointing to a page table uses them as address."""
        gva = 0x40000000 | 0x1234
        where = env.map(gva, DATA_GPA, level=1)
        pde = where[2]
        pt = env.entry(pde) & 0x000FFFFFFFFFF000
        moved = pt | (1 << bit)  # a 4K-aligned page-table GPA using bit `bit`
        env.mem.write(moved, env.mem.read(pt, 0x1000))
        env.ept_map(moved)
        env.set_entry(pde, moved | P | RW)
        env.ept_map(DATA_GPA, DATA_HPA)
        t = env.translate(gva, READ)
        assert type(t) is Translation and t.hpa == DATA_HPA | 0x234

    @pytest.mark.parametrize("level", [4, 3, 2, 1])
    def test_xd_reserved_when_nxe_0(self, env, level):
        where = standard_4k(env)
        env.set_entry(where[level], env.entry(where[level]) | XD)
        snap = env.snapshot()
        assert env.translate(GVA, READ, nxe=False) == PageFault(GVA, PF_P | PF_RSVD)
        assert env.translate(GVA, FETCH, nxe=False) == PageFault(GVA, PF_P | PF_RSVD)  # no I/D: NXE = 0
        assert env.snapshot() == snap

    def test_xd_not_reserved_when_nxe_1(self, env):
        standard_4k(env, leaf=P | RW | XD)
        assert type(env.translate(GVA, READ, nxe=True)) is Translation

    def test_reserved_wins_over_not_present_below(self, env):
        """The walk stops at the first entry with a reserved bit: what is below does not matter."""
        where = standard_4k(env)
        env.set_entry(where[3], env.entry(where[3]) | (1 << 51))
        env.set_entry(where[1], 0)
        assert env.translate(GVA, READ) == PageFault(GVA, PF_P | PF_RSVD)


class TestNonCanonical:
    """SDM Vol. 3A 3.3.7.1: a linear address whose bits 63:47 are not all equal is non-canonical;
    a memory access with it is #GP(0) (no page walk, no #PF)."""

    @pytest.mark.parametrize(
        "gva",
        [
            1 << 47,
            0x0000_8000_0000_1000,
            0xFFFF_7FFF_FFFF_F000,
            1 << 63,
            0x8000_0000_0000_0000 | 0x1234,
            0x0001_0000_0000_0000,
        ],
    )
    def test_non_canonical(self, env, gva):
        snap = env.snapshot()
        for access in (READ, WRITE, FETCH):
            r = env.translate(gva, access)
            assert type(r) is GeneralProtection and r.gva == gva
            assert (r.vector, r.error_code) == (13, 0)
        assert env.snapshot() == snap

    @pytest.mark.parametrize("gva", [0xFFFF_8000_0000_0000, 0x0000_7FFF_FFFF_F000])
    def test_canonical_edges_are_walked(self, env, gva):
        assert env.translate(gva, READ) == PageFault(gva, 0)


# =============================================================================================
# 3. EPT violations and misconfigurations of the 2D walk (SDM Vol. 3C; REFERENCE 4.3, 4.4)
# =============================================================================================
class TestEptDuringWalk:
    """REFERENCE 4.4: an EPT violation on a guest paging-structure access has qualification
    bit 7 (GLA valid) set and bit 8 clear, and reports the GPA of the paging-structure entry;
    bits 0-1 are read|write (3) when the EPTP enables A/D (those accesses are writes, 4.3) and
    read (1) when not.  Bits 3-5 are the EPT permissions ANDed over the EPT path (0 when an
    entry is not present).  The processor's A/D update of a guest entry is a write (4.3).
    A misconfiguration is reported as is, with the entry's GPA."""

    @pytest.mark.parametrize("ad, qual", [(True, 0x83), (False, 0x81)])
    @pytest.mark.parametrize("level", [4, 3, 2, 1])
    @pytest.mark.parametrize("access", [READ, WRITE, FETCH])
    def test_table_not_mapped(self, ad, qual, level, access):
        env = Env(ad=ad)
        where = standard_4k(env)
        table_gpa = where[level] & ~0xFFF
        env.mem.write64(env.ept_leaf_ptr(table_gpa), 0)
        snap = env.guest_snapshot()
        r = env.translate(GVA, access)
        assert r == EptViolation(where[level], qual)
        assert r.qualification & Q_GLA_VALID and not r.qualification & Q_FINAL
        # No guest A flag set (the EPT entries of the table pages above were used: with EPT A/D
        # on they got their EPT A/D flags, as the hardware does).
        assert env.guest_snapshot() == snap
        # exact entry GPAs: table base + 8 * index of the GVA at that level
        index = (GVA >> (12 + 9 * (level - 1))) & 511
        assert r.gpa == table_gpa + 8 * index

    @pytest.mark.parametrize(
        "ept_perms, ad, qual",
        [
            (EPT_R, True, 0x83 | q_perms(EPT_R)),  # A/D on: the read is a write, W missing
            (EPT_R | EPT_X, True, 0x83 | q_perms(EPT_R | EPT_X)),
            (EPT_X, False, 0x81 | q_perms(EPT_X)),  # exec-only table page
            (EPT_X, True, 0x83 | q_perms(EPT_X)),
        ],
    )
    def test_table_without_needed_ept_rights(self, ept_perms, ad, qual):
        env = Env(ad=ad)
        where = standard_4k(env)
        env.ept_map(where[2] & ~0xFFF, perms=ept_perms)  # the PD page
        r = env.translate(GVA, READ)
        assert r == EptViolation(where[2], qual)

    def test_read_only_table_is_enough_without_ad(self, env):
        """Without EPT A/D a paging-structure read needs only R (once guest A flags are set)."""
        where = standard_4k(env, leaf=P | RW | A, upper=P | RW | A)
        for lvl in (4, 3, 2, 1):
            env.ept_map(where[lvl] & ~0xFFF, perms=EPT_R)
        t = env.translate(GVA, READ)
        assert type(t) is Translation and t.hpa == DATA_HPA | OFF

    @pytest.mark.parametrize("level", [4, 3, 2, 1])
    def test_a_flag_update_is_an_ept_write(self, env, level):
        """The guest A-flag update of an entry in a page-table page mapped read-only in EPT (A/D
        off): EPT violation, write (bit 1), bits 3-5 = R, GLA valid, not the final translation."""
        where = standard_4k(env, leaf=P | RW | A, upper=P | RW | A)
        env.set_entry(where[level], env.entry(where[level]) & ~A)
        env.ept_map(where[level] & ~0xFFF, perms=EPT_R)
        snap = env.snapshot()
        r = env.translate(GVA, READ)
        assert r == EptViolation(where[level], Q_GLA_VALID | WRITE | q_perms(EPT_R))
        assert r.qualification == 0x8A
        # Entries above `level` were updated before the failing write: here all already had A.
        assert env.snapshot() == snap

    def test_d_flag_update_is_an_ept_write(self, env):
        where = standard_4k(env, leaf=P | RW | A, upper=P | RW | A)
        env.ept_map(where[1] & ~0xFFF, perms=EPT_R | EPT_X)
        assert type(env.translate(GVA, READ)) is Translation  # no flag to set: reads suffice
        r = env.translate(GVA, WRITE)
        assert r == EptViolation(where[1], Q_GLA_VALID | WRITE | q_perms(EPT_R | EPT_X))
        assert r.qualification == 0xAA
        assert env.entry(where[1]) == DATA_GPA | P | RW | A  # D not set

    @pytest.mark.parametrize("access, qual", [(READ, 0x181), (WRITE, 0x182), (FETCH, 0x184)])
    @pytest.mark.parametrize("ad", [True, False])
    def test_final_gpa_not_mapped(self, access, qual, ad):
        env = Env(ad=ad)
        env.map(GVA, DATA_GPA)
        r = env.translate(GVA, access)
        assert r == EptViolation(DATA_GPA | OFF, qual)
        assert r.qualification & Q_GLA_VALID and r.qualification & Q_FINAL

    @pytest.mark.parametrize(
        "access, ept_perms, qual",
        [
            (WRITE, EPT_R, 0x182 | q_perms(EPT_R)),  # 0x18a
            (WRITE, EPT_R | EPT_X, 0x182 | q_perms(EPT_R | EPT_X)),  # 0x1aa
            (FETCH, EPT_R | EPT_W, 0x184 | q_perms(EPT_R | EPT_W)),  # 0x19c
            (FETCH, EPT_R, 0x184 | q_perms(EPT_R)),  # 0x18c
            (READ, EPT_X, 0x181 | q_perms(EPT_X)),  # 0x1a1: execute-only page
            (WRITE, EPT_X, 0x182 | q_perms(EPT_X)),  # 0x1a2
        ],
    )
    def test_final_access_rights(self, env, access, ept_perms, qual):
        standard_4k(env, ept_perms=ept_perms)
        r = env.translate(GVA, access)
        assert r == EptViolation(DATA_GPA | OFF, qual)

    def test_final_rights_are_anded_over_the_ept_path(self, env):
        """Bits 3-5 are the AND over every EPT entry used: a non-leaf EPT PDE without W."""
        standard_4k(env)
        pde = env.ept_entry_ptr(DATA_GPA, 2)
        env.mem.write64(pde, env.mem.read64(pde) & ~EPT_W)
        assert env.translate(GVA, WRITE) == EptViolation(DATA_GPA | OFF, 0x182 | q_perms(EPT_R | EPT_X))
        assert env.translate(GVA, WRITE).qualification == 0x1AA
        pml4e = env.ept_entry_ptr(DATA_GPA, 4)
        env.mem.write64(pml4e, env.mem.read64(pml4e) & ~EPT_X)
        assert env.translate(GVA, FETCH) == EptViolation(DATA_GPA | OFF, 0x184 | q_perms(EPT_R))

    def test_guest_flags_on_final_ept_violation(self, env):
        """A guest walk that completed sets the guest A flags even if the final GPA then has an
        EPT violation (as KVM's walker and the hardware do: the paging-structure accesses happened)."""
        where = env.map(GVA, DATA_GPA)
        r = env.translate(GVA, READ)
        assert type(r) is EptViolation
        for lvl in (4, 3, 2, 1):
            assert env.entry(where[lvl]) & A

    def test_misconfig_of_table_page(self, env):
        where = standard_4k(env)
        env.ept_map(where[3] & ~0xFFF, perms=EPT_W)  # write without read
        r = env.translate(GVA, READ)
        assert type(r) is EptMisconfig
        assert (r.gpa, r.reason) == (where[3], "write without read")

    def test_misconfig_of_final_page(self, env):
        standard_4k(env)
        env.mem.write64(env.ept_leaf_ptr(DATA_GPA), DATA_HPA | (2 << 3) | 7)  # memory type 2
        r = env.translate(GVA, READ)
        assert type(r) is EptMisconfig
        assert r.gpa == DATA_GPA | OFF and r.reason == "reserved memory type 2"

    def test_misconfig_wins_over_guest_fault(self, env):
        """The EPT translation of a paging-structure entry comes before that entry is read."""
        where = standard_4k(env, leaf=0)  # PTE not present
        env.ept_map(where[1] & ~0xFFF, perms=EPT_W | EPT_X)
        r = env.translate(GVA, READ)
        assert type(r) is EptMisconfig and r.gpa == where[1]


# =============================================================================================
# 4. Translation.perms: what a TLB may cache (SDM 4.8, 4.10; REFERENCE 5 "exact dirty flags")
# =============================================================================================
class TestTlbPerms:
    """The TLB entry carries R=1 W=2 X=4.  W only when the write would set no dirty flag (guest
    PTE D = 1 and, with EPT A/D on, EPT leaf D = 1): a processor sets D on the first write, so a
    TLB entry filled by a read of a clean page must not allow a write.  X only when the guest
    allows fetches (XD = 0 or NXE = 0) and the EPT path has X."""

    def test_read_of_clean_writable_page(self, env):
        where = standard_4k(env)
        t = env.translate(GVA, READ)
        assert t.perms == READ | FETCH
        t = env.translate(GVA, WRITE)
        assert t.perms == READ | WRITE | FETCH
        assert env.entry(where[1]) & D
        assert env.translate(GVA, READ).perms == READ | WRITE | FETCH  # now dirty

    def test_read_of_dirty_writable_page(self, env):
        standard_4k(env, leaf=P | RW | A | D)
        assert env.translate(GVA, READ).perms == READ | WRITE | FETCH

    def test_fetch_of_clean_page(self, env):
        standard_4k(env)
        assert env.translate(GVA, FETCH).perms == READ | FETCH

    def test_read_only_guest_page(self, env):
        standard_4k(env, leaf=P | A | D)
        assert env.translate(GVA, READ).perms == READ | FETCH

    def test_read_only_guest_page_wp0(self, env):
        """With CR0.WP = 0 a supervisor may write a read-only page: a dirty one may be cached writable."""
        standard_4k(env, leaf=P | A | D)
        assert env.translate(GVA, READ, wp=False).perms == READ | WRITE | FETCH

    def test_xd_page(self, env):
        standard_4k(env, leaf=P | RW | A | D | XD)
        assert env.translate(GVA, READ).perms == READ | WRITE

    def test_execute_only_ept_page(self, env):
        standard_4k(env, ept_perms=EPT_X)
        t = env.translate(GVA, FETCH)
        assert type(t) is Translation and t.perms == FETCH and t.hpa == DATA_HPA | OFF

    def test_read_only_ept_page(self, env):
        standard_4k(env, leaf=P | RW | A | D, ept_perms=EPT_R)
        assert env.translate(GVA, READ).perms == READ

    def test_ept_rx_page(self, env):
        standard_4k(env, leaf=P | RW | A | D, ept_perms=EPT_R | EPT_X)
        assert env.translate(GVA, READ).perms == READ | FETCH

    def test_ept_leaf_clean_with_ad(self, env_ad):
        """EPT A/D on: a read of a page whose EPT leaf D = 0 gives no W even though the guest PTE
        has D = 1; the write that follows sets EPT D (bit 9) and may then be cached writable."""
        env = env_ad
        standard_4k(env, leaf=P | RW | A | D)
        leaf = env.ept_leaf_ptr(DATA_GPA)
        t = env.translate(GVA, READ)
        assert t.perms == READ | FETCH
        assert env.mem.read64(leaf) == DATA_HPA | EPT_WB | 7 | EPT_A
        t = env.translate(GVA, WRITE)
        assert t.perms == READ | WRITE | FETCH
        assert env.mem.read64(leaf) == DATA_HPA | EPT_WB | 7 | EPT_A | EPT_D
        assert env.translate(GVA, READ).perms == READ | WRITE | FETCH

    def test_ept_leaf_clean_without_ad(self, env):
        """EPT A/D off: EPT D is ignored, only the guest D matters."""
        standard_4k(env, leaf=P | RW | A | D)
        assert env.translate(GVA, READ).perms == READ | WRITE | FETCH
        assert env.mem.read64(env.ept_leaf_ptr(DATA_GPA)) == DATA_HPA | EPT_WB | 7
