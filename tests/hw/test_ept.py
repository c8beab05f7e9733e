"""Tests of the EPT hardware walker, ``emu.hw.ept.walk``.

These tests are an independent oracle: the expected values come from the Intel SDM rules in
shared/REFERENCE.md section 4 and from the documented contract of emu/hw/ept.py (module and
``walk`` docstrings, DESIGN.md "Public interfaces" -> "Hardware walker"), never from the
walker's code.  Bit positions are therefore spelled out here again instead of being imported.

The emulated CPU (ept.py docstring): execute-only pages, 4- and 5-level walks, UC and WB EPTP
memory types, 2M and 1G pages, A/D flags; no MBEC (bit 10 is ignored), no advanced
EPT-violation information, no #VE (bit 63 is ignored).

Tables are real: 4 KiB pages of 512 little-endian 64-bit entries in a HostMemory, written and
read here as bytes (so the byte order is checked too).
"""

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu.hw import ept as ept_mod
from emu.hw import native
from emu.hw.ept import (
    MAXPHYADDR,
    Access,
    EptMisconfig,
    EptTranslation,
    EptViolation,
    InvalidEptp,
    decode_eptp,
    make_eptp,
    walk,
)
from emu.hw.memory import HostMemory


@pytest.fixture(autouse=True, scope="module", params=["compiled", "python"])
def walker(request):
    """Every test here runs on both walkers: the compiled one (emu/hw/mmu.c, what ``walk`` is
    when it is built) and the Python reference (``walk_py``)."""
    global walk
    if request.param == "compiled" and native.mmu is None:
        pytest.skip(f"no compiled MMU: {native.why_not}")
    walk = ept_mod.walk if request.param == "compiled" else ept_mod.walk_py
    yield request.param
    walk = ept_mod.walk


# ---------------------------------------------------------------------------------------------
# Spec constants (REFERENCE.md 4.1, 4.2, 4.4)
# ---------------------------------------------------------------------------------------------

PAGE = 4096
R, W, X = 1, 2, 4
RWX = R | W | X
MT_UC, MT_WC, MT_WT, MT_WP, MT_WB = 0, 1, 4, 5, 6
GOOD_MT = (MT_UC, MT_WC, MT_WT, MT_WP, MT_WB)
BAD_MT = (2, 3, 7)
VALID_PERMS = (R, R | W, X, R | X, R | W | X)  # every present, well-formed 2:0 value
N = MAXPHYADDR


def bit(n):
    return 1 << n


def bits(hi, lo):
    """Mask of bits hi:lo inclusive."""
    return ((1 << (hi - lo + 1)) - 1) << lo


IPAT, PS, A_BIT, D_BIT, XU, IGN11, SVE = bit(6), bit(7), bit(8), bit(9), bit(10), bit(11), bit(63)
ADDR = bits(N - 1, 12)  # address bits of an entry
RSVD_HIGH = bits(51, N)


def mt(t):
    """Leaf memory-type field (bits 5:3)."""
    return t << 3


def page_shift(level):
    return 12 + 9 * (level - 1)


def page_size(level):
    return 1 << page_shift(level)


def index(gpa, level):
    return (gpa >> page_shift(level)) & 511


def eptp_for(root, levels=4, ad=False, memtype=MT_WB):
    """EPTP per SDM: 2:0 memory type, 5:3 walk length - 1, 6 A/D enable, N-1:12 root."""
    return root | memtype | ((levels - 1) << 3) | (bit(6) if ad else 0)


LEVEL_NAME = {5: "PML5E", 4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}

# A GPA with a distinct index at every level and a non-zero page offset.
GPA = (0x05A << 39) | (0x1C3 << 30) | (0x0F7 << 21) | (0x123 << 12) | 0xABC
GPA5 = (0x1A5 << 48) | GPA  # needs a 5-level walk
# Leaf frames, each with bit N-1 set (an address bit, not a reserved one), aligned to their size.
FRAME = {1: bit(N - 1) | 0x34_5678_9000, 2: bit(N - 1) | 0x34_5660_0000, 3: bit(N - 1) | 0x34_4000_0000}
LEAF_FLAGS = {1: RWX | mt(MT_WB), 2: RWX | mt(MT_WB) | PS, 3: RWX | mt(MT_WB) | PS}


def expected_hpa(leaf_level, gpa=GPA, frame=None):
    frame = FRAME[leaf_level] if frame is None else frame
    return frame | (gpa & (page_size(leaf_level) - 1))


# ---------------------------------------------------------------------------------------------
# Building tables
# ---------------------------------------------------------------------------------------------


class Tables:
    """Host memory plus a bump allocator of zeroed 4 KiB table pages (HPA 0 is left unused)."""

    def __init__(self, size=64 * PAGE):
        self.mem = HostMemory(size)
        self.next = PAGE

    def alloc(self):
        hpa = self.next
        assert hpa + PAGE <= self.mem.size, "test host memory too small"
        self.next += PAGE
        return hpa

    def read_entry(self, hpa):
        return int.from_bytes(self.mem.read(hpa, 8), "little")

    def write_entry(self, hpa, value):
        self.mem.write(hpa, value.to_bytes(8, "little"))

    def snapshot(self):
        """Every 64-bit word of every allocated page."""
        n = (self.next - PAGE) // 8
        return struct.unpack(f"<{n}Q", self.mem.read(PAGE, self.next - PAGE))

    def changes(self, before):
        """{hpa: (old, new)} of the words that differ from ``before``."""
        after = self.snapshot()
        return {PAGE + 8 * i: (o, n) for i, (o, n) in enumerate(zip(before, after)) if o != n}


class EptPath:
    """The chain of tables that translates one GPA: ``hpa[level]`` is the entry's HPA."""

    def __init__(self, tables, eptp, hpa, levels, leaf_level, gpa):
        self.t, self.eptp, self.hpa = tables, eptp, hpa
        self.levels, self.leaf_level, self.gpa = levels, leaf_level, gpa

    def entry(self, level):
        return self.t.read_entry(self.hpa[level])

    def set_entry(self, level, value):
        self.t.write_entry(self.hpa[level], value)

    def set_flags(self, level, flags):
        """Replace everything but the address bits of the entry at ``level``."""
        self.set_entry(level, (self.entry(level) & ADDR) | flags)

    def walk(self, access, gpa=None, **kw):
        return walk(self.t.mem, self.eptp, self.gpa if gpa is None else gpa, access, **kw)


def build_path(gpa, flags, leaf_frame, levels=4, ad=False, tables=None):
    """Tables for ``gpa``: ``flags[i]`` is the entry at level ``levels - i`` without its address.

    Every entry but the last points at the next (freshly allocated) table; the last one, the
    leaf, gets ``leaf_frame`` as its address.  Entries are written whatever their flags, so a
    non-present or misconfigured entry still carries the address it would have.
    """
    t = tables or Tables()
    root = t.alloc()
    table, hpa = root, {}
    for i, f in enumerate(flags):
        level = levels - i
        hpa[level] = table + 8 * index(gpa, level)
        if i == len(flags) - 1:
            value = f | leaf_frame
        else:
            table = t.alloc()
            value = f | table
        t.write_entry(hpa[level], value)
    leaf_level = levels - len(flags) + 1
    return EptPath(t, eptp_for(root, levels, ad), hpa, levels, leaf_level, gpa)


def std_path(leaf_level=1, levels=4, gpa=None, ad=False, flags=None, extra=None):
    """An all-RWX path with a WB leaf at ``leaf_level``.

    ``flags`` {level: entry flags} replaces a level's flags; ``extra`` {level: bits} ORs bits in.
    """
    if gpa is None:
        gpa = GPA5 if levels == 5 else GPA
    per_level = {lv: RWX for lv in range(levels, leaf_level, -1)}
    per_level[leaf_level] = LEAF_FLAGS[leaf_level]
    per_level.update(flags or {})
    for lv, b in (extra or {}).items():
        per_level[lv] |= b
    ordered = [per_level[lv] for lv in range(levels, leaf_level - 1, -1)]
    return build_path(gpa, ordered, FRAME[leaf_level], levels=levels, ad=ad)


# ---------------------------------------------------------------------------------------------
# Exact assertions
# ---------------------------------------------------------------------------------------------


def assert_translation(got, hpa, level, perms):
    assert type(got) is EptTranslation, got
    assert (got.hpa, got.level, got.perms) == (hpa, level, perms), got


def assert_violation(got, gpa, qualification):
    assert type(got) is EptViolation, got
    assert got.gpa == gpa, got
    assert got.qualification == qualification, f"{got}: expected qualification {qualification:#x}"
    assert got.reason == 48


def assert_misconfig(got, gpa, level):
    assert type(got) is EptMisconfig, got
    assert got.gpa == gpa, got
    assert got.level == level, f"{got}: expected the misconfiguration at level {level}"
    assert got.reason_code == 49


def expect_for_perms(got, gpa, access, perms, hpa, level):
    """The outcome of a well-formed, fully present path with ANDed ``perms`` (SDM 4.3/4.4).

    Every kind of access in ``access`` must be allowed; a violation reports the access bits
    in bits 0-2 and the ANDed permissions in bits 3-5.
    """
    if perms & access == access:
        assert_translation(got, hpa, level, perms)
    else:
        assert_violation(got, gpa, int(access) | perms << 3)


ACCESSES = list(Access)
access_ids = [a.name for a in ACCESSES]
# A guest paging-structure access with A/D enabled: treated as a write, reported with bits 0 and 1
# (REFERENCE 4.3); ept.walk takes it as access READ|WRITE (walk docstring).
PT_ACCESS = Access.READ | Access.WRITE
ALL_ACCESSES = ACCESSES + [PT_ACCESS]
all_access_ids = access_ids + ["PAGING_STRUCTURE"]


def is_write(access):
    return bool(access & Access.WRITE)


# ---------------------------------------------------------------------------------------------
# 1. R/W/X per entry (REFERENCE 4.2 "present", 4.3, 4.4)
# ---------------------------------------------------------------------------------------------

# (walk levels, leaf level, level under test)
RWX_POSITIONS = [(4, 1, 4), (4, 1, 3), (4, 1, 2), (4, 1, 1), (5, 1, 5), (4, 2, 2), (4, 3, 3)]


class TestPermissionBits:
    """SDM: bits 2:0 = 000 -> not present -> violation; bits 3-5 of the qualification are the
    AND over the walked entries, which includes the 000 entry, so only the access bit is set.
    010 / 110 (write without read) -> misconfiguration.  100 is execute-only, supported here.
    Otherwise the permissions are ANDed over the path; a violation reports that AND in bits 3-5.
    """

    @pytest.mark.parametrize("access", ALL_ACCESSES, ids=all_access_ids)
    @pytest.mark.parametrize("rwx", range(8), ids=lambda v: f"rwx{v:03b}")
    @pytest.mark.parametrize(
        "levels,leaf_level,level",
        RWX_POSITIONS,
        ids=[f"{lv}lvl-leaf{lf}-{LEVEL_NAME[l]}" for lv, lf, l in RWX_POSITIONS],
    )
    def test_rwx_bits_of_one_entry(self, levels, leaf_level, level, rwx, access):
        p = std_path(leaf_level, levels, ad=access == PT_ACCESS)
        p.set_flags(level, (p.entry(level) & ~ADDR & ~7) | rwx)
        got = p.walk(access)
        if rwx == 0:
            assert_violation(got, p.gpa, int(access))
        elif rwx in (0b010, 0b110):
            assert_misconfig(got, p.gpa, level)
        else:
            expect_for_perms(got, p.gpa, access, rwx, expected_hpa(leaf_level, p.gpa), leaf_level)

    @pytest.mark.parametrize("access", ALL_ACCESSES, ids=all_access_ids)
    def test_permissions_are_anded_over_the_path(self, access):
        """Every combination of well-formed permissions on every entry of 4K, 2M and 1G paths."""
        for leaf_level in (1, 2, 3):
            p = std_path(leaf_level, ad=access == PT_ACCESS)
            levels = range(4, leaf_level - 1, -1)
            for combo in itertools.product(VALID_PERMS, repeat=len(levels)):
                for lv, perms in zip(levels, combo):
                    p.set_flags(lv, (LEAF_FLAGS[leaf_level] if lv == leaf_level else RWX) & ~7 | perms)
                anded = RWX
                for perms in combo:
                    anded &= perms
                expect_for_perms(p.walk(access), p.gpa, access, anded, expected_hpa(leaf_level), leaf_level)

    @pytest.mark.parametrize("access", ALL_ACCESSES, ids=all_access_ids)
    def test_not_present_below_restrictive_entries_reports_zero_permissions(self, access):
        """The AND in bits 3-5 includes the non-present entry itself, so it is 0 whatever is above."""
        p = std_path(flags={4: R | X, 3: R, 2: 0}, ad=True)
        assert_violation(p.walk(access), GPA, int(access))

    @pytest.mark.parametrize("access", ACCESSES, ids=access_ids)
    def test_empty_root_table(self, access):
        t = Tables()
        root = t.alloc()
        for gpa in (0, GPA, (1 << 48) - 1):
            assert_violation(walk(t.mem, eptp_for(root), gpa, access), gpa, int(access))


# ---------------------------------------------------------------------------------------------
# 2. Misconfiguration wins over violation (REFERENCE 4.3)
# ---------------------------------------------------------------------------------------------

MISCONFIG_WINS = [
    # (id, leaf level, {level: flags}, {level: extra bits}, access, misconfigured level)
    ("PML4E-R--_PTE-bit51_write", 1, {4: R}, {1: bit(51)}, Access.WRITE, 1),
    ("PML4E--X_PDE-W-only_read", 1, {4: X, 2: W}, {}, Access.READ, 2),
    ("PDPTE-R--_PTE-mt7_fetch", 1, {3: R, 1: R | X | mt(7)}, {}, Access.FETCH, 1),
    ("PTE-RW-_mt2_fetch", 1, {1: R | W | mt(2)}, {}, Access.FETCH, 1),
    ("PTE--WX_fetch_allowed_by_X", 1, {1: W | X | mt(MT_WB)}, {}, Access.FETCH, 1),
    ("PML4E-R--_2Mleaf-bit12_write", 2, {4: R}, {2: bit(12)}, Access.WRITE, 2),
    ("PML4E--X_1Gleaf-bit29_read", 3, {4: X}, {3: bit(29)}, Access.READ, 3),
    ("PML4E-R--_PDPTE-bit3_fetch", 1, {4: R}, {3: bit(3)}, Access.FETCH, 3),
    ("PDPTE-bit3_above_not_present_PTE", 1, {1: 0}, {3: bit(3)}, Access.READ, 3),
    ("PML4E-bit7_above_R--_PTE", 1, {1: R | mt(MT_WB)}, {4: bit(7)}, Access.WRITE, 4),
]


class TestMisconfigWinsOverViolation:
    """SDM: a misconfiguration anywhere on the path is reported even when an entry above (or the
    same entry) already denies the access; a misconfiguration in a table below a non-present entry
    is never reached, so that is a violation."""

    @pytest.mark.parametrize(
        "leaf_level,flags,extra,access,bad_level", [c[1:] for c in MISCONFIG_WINS], ids=[c[0] for c in MISCONFIG_WINS]
    )
    def test_misconfig_wins_over_violation(self, leaf_level, flags, extra, access, bad_level):
        p = std_path(leaf_level, flags=flags, extra=extra)
        assert_misconfig(p.walk(access), GPA, bad_level)

    @pytest.mark.parametrize("access", ACCESSES, ids=access_ids)
    def test_misconfig_below_a_not_present_entry_is_not_reached(self, access):
        p = std_path(flags={2: 0, 1: W})  # the PT the 000 PDE would point to has a W-only PTE
        assert_violation(p.walk(access), GPA, int(access))


# ---------------------------------------------------------------------------------------------
# 3. Reserved bits, memory types, ignored bits (REFERENCE 4.2, 4.3)
# ---------------------------------------------------------------------------------------------


def _reserved_cases():
    for leaf_level in (1, 2, 3):
        for level in range(4, leaf_level - 1, -1):
            for b in range(N, 52):
                yield leaf_level, level, b
    for b in range(3, 8):
        yield 1, 4, b  # PML4E 7:3
    for leaf_level, level in ((1, 3), (1, 2), (2, 3)):
        for b in range(3, 7):
            yield leaf_level, level, b  # non-leaf PDPTE / PDE 6:3
    for b in range(12, 30):
        yield 3, 3, b  # 1G leaf 29:12
    for b in range(12, 21):
        yield 2, 2, b  # 2M leaf 20:12


RESERVED = list(_reserved_cases())


# Every bit a present entry of this kind may not have, for a non-present entry at that level.
NOT_PRESENT_JUNK = {4: bits(7, 3) | RSVD_HIGH, 3: bits(6, 3) | RSVD_HIGH, 2: bits(6, 3) | RSVD_HIGH}


def _ignored_cases():
    """(id, leaf level, walk levels, level, bits, A/D enabled) that must not change the result."""
    for leaf_level in (1, 2, 3):
        for level in range(4, leaf_level - 1, -1):
            where = f"leaf{leaf_level}-{LEVEL_NAME[level]}"
            yield f"{where}-bit11", leaf_level, 4, level, IGN11, False
            yield f"{where}-bit10-XU", leaf_level, 4, level, XU, False
            yield f"{where}-bits63:52", leaf_level, 4, level, bits(63, 52), False
            yield f"{where}-bit8-noAD", leaf_level, 4, level, A_BIT, False
            yield f"{where}-bit9-noAD", leaf_level, 4, level, D_BIT, False
            if level != leaf_level:
                yield f"{where}-bit9-nonleaf-AD", leaf_level, 4, level, D_BIT, True
            else:
                yield f"{where}-IPAT", leaf_level, 4, level, IPAT, False
    for b in range(52, 64):
        yield f"PTE-bit{b}", 1, 4, 1, bit(b), False
    yield "PTE-SVE-bit63", 1, 4, 1, SVE, False
    yield "PTE-bit7", 1, 4, 1, PS, False
    yield "PTE-bit7-AD", 1, 4, 1, PS, True
    yield "PML5E-bit11+10+63:52+9", 1, 5, 5, IGN11 | XU | bits(63, 52) | D_BIT, False


IGNORED = list(_ignored_cases())


class TestReservedAndIgnoredBits:
    """SDM: a present entry with a reserved bit set is a misconfiguration: bits 51:N everywhere;
    PML5E/PML4E 7:3; PDPTE/PDE pointing to a table 6:3; 1G leaf 29:12; 2M leaf 20:12.  A leaf's
    memory type 2, 3 or 7 is reserved.  A non-present entry ignores all its other bits."""

    @pytest.mark.parametrize(
        "leaf_level,level,b", RESERVED, ids=[f"leaf{lf}-{LEVEL_NAME[l]}-bit{b}" for lf, l, b in RESERVED]
    )
    def test_reserved_bit_is_a_misconfig(self, leaf_level, level, b):
        p = std_path(leaf_level, extra={level: bit(b)})
        for access in Access:
            assert_misconfig(p.walk(access), GPA, level)

    @pytest.mark.parametrize("b", list(range(3, 8)) + list(range(N, 52)))
    def test_reserved_bit_in_pml5e_is_a_misconfig(self, b):
        p = std_path(levels=5, extra={5: bit(b)})
        for access in Access:
            assert_misconfig(p.walk(access), GPA5, 5)

    @pytest.mark.parametrize("memtype", range(8))
    @pytest.mark.parametrize("leaf_level", (1, 2, 3), ids=["4K", "2M", "1G"])
    def test_leaf_memory_type(self, leaf_level, memtype):
        p = std_path(leaf_level, flags={leaf_level: LEAF_FLAGS[leaf_level] & ~bits(5, 3) | mt(memtype)})
        for access in Access:
            got = p.walk(access)
            if memtype in BAD_MT:
                assert_misconfig(got, GPA, leaf_level)
            else:
                assert_translation(got, expected_hpa(leaf_level), leaf_level, RWX)

    @pytest.mark.parametrize("access", ACCESSES, ids=access_ids)
    @pytest.mark.parametrize("junk", ["reserved", "reserved+ignored", "xu-only", "large-leaf-junk"])
    @pytest.mark.parametrize("level", (4, 3, 2, 1), ids=LEVEL_NAME.get)
    def test_not_present_entry_ignores_reserved_bits(self, level, junk, access):
        p = std_path()
        reserved = NOT_PRESENT_JUNK.get(level, RSVD_HIGH) | mt(7)
        value = {
            "reserved": reserved,
            "reserved+ignored": reserved | A_BIT | D_BIT | XU | IGN11 | bits(63, 52),
            "xu-only": XU,  # no MBEC: bit 10 does not make it present
            "large-leaf-junk": PS | mt(3) | bits(29, 12) | RSVD_HIGH,
        }[junk]
        p.set_flags(level, value)
        assert_violation(p.walk(access), GPA, int(access))

    @pytest.mark.parametrize("leaf_level,levels,level,extra,ad", [c[1:] for c in IGNORED], ids=[c[0] for c in IGNORED])
    def test_ignored_bits_are_ignored(self, leaf_level, levels, level, extra, ad):
        p = std_path(leaf_level, levels, ad=ad, extra={level: extra})
        for access in Access:
            # Ignored bits never leak into the HPA, the level or the permissions.
            assert_translation(p.walk(access, set_ad=False), expected_hpa(leaf_level, p.gpa), leaf_level, RWX)


# ---------------------------------------------------------------------------------------------
# 4. Large pages (REFERENCE 4.2: 1G address N-1:30, 2M address N-1:21)
# ---------------------------------------------------------------------------------------------


class TestLargePages:
    """SDM: a PDPTE or PDE with bit 7 = 1 maps a 1G / 2M page; the HPA is the frame plus the GPA's
    low 30 / 21 bits."""

    @pytest.mark.parametrize("leaf_level", (1, 2, 3), ids=["4K", "2M", "1G"])
    def test_hpa_is_frame_plus_low_gpa_bits(self, leaf_level):
        p = std_path(leaf_level)
        size = page_size(leaf_level)
        base = GPA & ~(size - 1)
        for off in (0, 1, 0xABC, size // 2 + 8, size - 1):
            for access in Access:
                got = p.walk(access, gpa=base + off)
                assert_translation(got, FRAME[leaf_level] + off, leaf_level, RWX)

    def test_large_leaf_frames_at_the_top_of_the_address_space(self):
        top = {1: bits(N - 1, 12), 2: bits(N - 1, 21), 3: bits(N - 1, 30)}
        for leaf_level, frame in top.items():
            flags = [RWX] * (4 - leaf_level) + [LEAF_FLAGS[leaf_level]]
            p = build_path(GPA, flags, frame)
            assert_translation(p.walk(Access.READ), expected_hpa(leaf_level, GPA, frame), leaf_level, RWX)


# ---------------------------------------------------------------------------------------------
# 5. Walk length (REFERENCE 4.1: EPTP 5:3 = levels - 1)
# ---------------------------------------------------------------------------------------------


class TestWalkLength:
    """A 4-level walk translates 48-bit GPAs, a 5-level walk 57-bit ones (the PML5E is indexed by
    GPA bits 56:48).  A wider GPA is a caller error: ValueError."""

    @pytest.mark.parametrize("leaf_level", (1, 2, 3), ids=["4K", "2M", "1G"])
    def test_five_level_walk(self, leaf_level):
        p = std_path(leaf_level, levels=5)
        assert p.eptp == make_eptp(p.eptp & ADDR, levels=5)
        for access in Access:
            assert_translation(p.walk(access), expected_hpa(leaf_level, GPA5), leaf_level, RWX)
        # The same low 48 bits with another PML5 index miss.
        other = GPA5 ^ (1 << 48)
        assert_violation(p.walk(Access.READ, gpa=other), other, int(Access.READ))

    def test_five_level_walk_of_a_low_gpa_uses_pml5_index_0(self):
        p = std_path(levels=5, gpa=GPA)
        assert index(GPA, 5) == 0
        assert_translation(p.walk(Access.WRITE), expected_hpa(1, GPA), 1, RWX)

    @pytest.mark.parametrize(
        "levels,gpa",
        [(4, 1 << 48), (4, (1 << 48) | GPA), (4, 1 << 63), (5, 1 << 57), (5, (1 << 57) | GPA5), (5, 1 << 63)],
    )
    def test_gpa_wider_than_the_walk_raises(self, levels, gpa):
        p = std_path(levels=levels)
        for access in Access:
            with pytest.raises(ValueError):
                p.walk(access, gpa=gpa)

    @pytest.mark.parametrize("levels,gpa", [(4, (1 << 48) - 1), (5, (1 << 57) - 1)])
    def test_widest_gpa_of_the_walk_is_accepted(self, levels, gpa):
        t = Tables()
        root = t.alloc()
        assert_violation(walk(t.mem, eptp_for(root, levels), gpa, Access.READ), gpa, int(Access.READ))


# ---------------------------------------------------------------------------------------------
# 6. Accessed and dirty flags (REFERENCE 4.5)
# ---------------------------------------------------------------------------------------------


def _ad_expectation(p, access):
    """{hpa: (old, new)} a successful walk must write."""
    exp = {}
    for level, hpa in p.hpa.items():
        old = p.entry(level)
        new = old | A_BIT
        if level == p.leaf_level and is_write(access):
            new |= D_BIT
        if new != old:
            exp[hpa] = (old, new)
    return exp


AD_FAILURES = [
    # (id, leaf level, {level: flags}, {level: extra}, access)
    ("write-to-R-X-leaf", 1, {1: R | X | mt(MT_WB)}, {}, Access.WRITE),
    ("read-through-X-only-PML4E", 1, {4: X}, {}, Access.READ),
    ("fetch-from-2M-RW-", 2, {2: R | W | mt(MT_WB) | PS}, {}, Access.FETCH),
    ("PTE-not-present", 1, {1: 0}, {}, Access.READ),
    ("PDPTE-not-present", 1, {3: 0}, {}, Access.WRITE),
    ("PTE-reserved-bit", 1, {}, {1: bit(N)}, Access.WRITE),
    ("PTE-mt7", 1, {1: RWX | mt(7)}, {}, Access.READ),
    ("PDE-W-only", 1, {2: W}, {}, Access.FETCH),
    ("PML4E-R--_and_PTE-bit51", 1, {4: R}, {1: bit(51)}, Access.WRITE),
    ("paging-structure-access-to-R-X", 1, {2: R | X}, {}, PT_ACCESS),
]


class TestAccessedDirtyFlags:
    """SDM: with EPTP bit 6 set, A (bit 8) is set in every entry used for a translation and D
    (bit 9) in the leaf on a write; the CPU never clears them.  Without EPTP bit 6 nothing is
    written.  ``set_ad=False`` probes write nothing.

    Failed walks (a choice, documented here): REFERENCE 4.5 sets A in entries "used for a
    translation" and says nothing of walks that end in an exit; ept.py's docstring allows walk
    no side effect but "the accessed/dirty flags it sets", and its EptTranslation.dirty is the
    leaf's D "after this walk", i.e. flags belong to a translation.  So a walk ending in a
    violation or a misconfiguration writes nothing, not even A in the entries above the fault.
    """

    @pytest.mark.parametrize("access", ALL_ACCESSES, ids=all_access_ids)
    @pytest.mark.parametrize(
        "levels,leaf_level", [(4, 1), (4, 2), (4, 3), (5, 1)], ids=["4lvl-4K", "4lvl-2M", "4lvl-1G", "5lvl-4K"]
    )
    def test_ad_flags_set_by_a_successful_walk(self, levels, leaf_level, access):
        p = std_path(leaf_level, levels, ad=True)
        before = p.t.snapshot()
        expected = _ad_expectation(p, access)
        got = p.walk(access)
        assert_translation(got, expected_hpa(leaf_level, p.gpa), leaf_level, RWX)
        assert got.dirty is is_write(access)
        assert p.t.changes(before) == expected
        # A second identical walk finds everything set and writes nothing more.
        before = p.t.snapshot()
        assert p.walk(access).dirty is is_write(access)
        assert p.t.changes(before) == {}

    def test_ad_flags_already_set_are_kept_and_others_added(self):
        p = std_path(ad=True, extra={4: A_BIT, 2: A_BIT | D_BIT, 1: D_BIT})
        old = {lv: p.entry(lv) for lv in (4, 3, 2, 1)}
        before = p.t.snapshot()
        got = p.walk(Access.READ)
        assert got.dirty is True  # the leaf's D was already set
        assert p.t.changes(before) == {p.hpa[3]: (old[3], old[3] | A_BIT), p.hpa[1]: (old[1], old[1] | A_BIT)}

    def test_dirty_follows_the_leaf_d_flag(self):
        p = std_path(ad=True)
        assert p.walk(Access.READ).dirty is False
        assert p.walk(Access.FETCH).dirty is False
        assert p.walk(Access.WRITE).dirty is True
        assert p.walk(Access.READ).dirty is True
        assert p.entry(1) & D_BIT

    def test_guest_paging_structure_read_sets_d(self):
        """REFERENCE 4.5: D is set on the leaf mapping a guest page-table page even when the
        guest only reads it (the access is treated as a write)."""
        p = std_path(ad=True)
        got = p.walk(PT_ACCESS)
        assert_translation(got, expected_hpa(1), 1, RWX)
        assert got.dirty is True
        assert p.entry(1) & (A_BIT | D_BIT) == A_BIT | D_BIT
        for lv in (4, 3, 2):
            assert p.entry(lv) & (A_BIT | D_BIT) == A_BIT

    @pytest.mark.parametrize("leaf_perms", (R, R | X), ids=["R--", "R-X"])
    def test_guest_paging_structure_access_needs_w(self, leaf_perms):
        """REFERENCE 4.3: with A/D enabled a paging-structure access needs W; the violation sets
        qualification bits 0 and 1, and bits 3-5 are the ANDed permissions."""
        p = std_path(ad=True, flags={1: leaf_perms | mt(MT_WB)})
        before = p.t.snapshot()
        assert_violation(p.walk(PT_ACCESS), GPA, 0b011 | leaf_perms << 3)
        assert p.t.changes(before) == {}

    @pytest.mark.parametrize("access", ACCESSES, ids=access_ids)
    def test_ad_disabled_writes_nothing(self, access):
        p = std_path(ad=False)
        before = p.t.snapshot()
        got = p.walk(access)
        assert_translation(got, expected_hpa(1), 1, RWX)
        assert got.dirty is True  # documented: always True without A/D
        assert p.t.changes(before) == {}

    @pytest.mark.parametrize("access", ACCESSES, ids=access_ids)
    def test_set_ad_false_probe_writes_nothing(self, access):
        p = std_path(leaf_level=2, ad=True)
        before = p.t.snapshot()
        got = p.walk(access, set_ad=False)
        assert_translation(got, expected_hpa(2), 2, RWX)
        assert got.dirty is False  # the leaf's D is still clear after this walk
        assert p.t.changes(before) == {}

    @pytest.mark.parametrize(
        "leaf_level,flags,extra,access", [c[1:] for c in AD_FAILURES], ids=[c[0] for c in AD_FAILURES]
    )
    def test_failed_walk_sets_no_ad_flags(self, leaf_level, flags, extra, access):
        p = std_path(leaf_level, ad=True, flags=flags, extra=extra)
        before = p.t.snapshot()
        got = p.walk(access)
        assert type(got) in (EptViolation, EptMisconfig), got
        assert p.t.changes(before) == {}


# ---------------------------------------------------------------------------------------------
# 7. EPTP checks (REFERENCE 4.1)
# ---------------------------------------------------------------------------------------------

ROOT = bit(N - 1) | 0x5000


class TestEptp:
    """VM entry refuses an EPTP whose memory type is not supported (here only UC 0 and WB 6),
    whose walk length is not supported (here 4 or 5), or with reserved bits set (11:8, 63:N)."""

    @pytest.mark.parametrize("levels", (4, 5))
    @pytest.mark.parametrize("ad", (False, True))
    @pytest.mark.parametrize("memtype", (MT_UC, MT_WB))
    def test_decode_valid_eptp(self, memtype, ad, levels):
        eptp = eptp_for(ROOT, levels, ad, memtype)
        assert make_eptp(ROOT, levels=levels, ad=ad, memtype=memtype) == eptp
        assert decode_eptp(eptp) == (ROOT, levels, ad)

    @pytest.mark.parametrize("memtype", (1, 2, 3, 4, 5, 7))
    def test_eptp_bad_memory_type(self, memtype):
        with pytest.raises(InvalidEptp):
            decode_eptp(eptp_for(ROOT) & ~7 | memtype)

    @pytest.mark.parametrize("pwl", (0, 1, 2, 5, 6, 7), ids=lambda v: f"field{v}")
    def test_eptp_bad_walk_length(self, pwl):
        with pytest.raises(InvalidEptp):
            decode_eptp(ROOT | MT_WB | pwl << 3)

    @pytest.mark.parametrize("b", list(range(8, 12)) + list(range(N, 64)))
    def test_eptp_reserved_bits(self, b):
        with pytest.raises(InvalidEptp):
            decode_eptp(eptp_for(ROOT) | bit(b))

    def test_invalid_eptp_is_a_value_error(self):
        assert issubclass(InvalidEptp, ValueError)


# ---------------------------------------------------------------------------------------------
# 8. The path= trace (walk docstring: one (level, entry HPA, entry) per entry read)
# ---------------------------------------------------------------------------------------------


def _trace(p, levels_read):
    return [(lv, p.hpa[lv], p.entry(lv)) for lv in levels_read]


class TestPathTrace:
    """The walker reads entries top-down and stops at a non-present or misconfigured entry; a
    permission violation still reads the whole path (a misconfiguration lower down would win)."""

    @pytest.mark.parametrize("levels,leaf_level", [(4, 1), (4, 2), (4, 3), (5, 1), (5, 3)])
    def test_path_of_a_translation(self, levels, leaf_level):
        p = std_path(leaf_level, levels)
        path = []
        assert type(p.walk(Access.READ, path=path)) is EptTranslation
        assert path == _trace(p, range(levels, leaf_level - 1, -1))

    @pytest.mark.parametrize(
        "flags,extra,read",
        [
            ({2: 0}, {}, (4, 3, 2)),  # stops at the non-present PDE
            ({4: 0}, {}, (4,)),
            ({}, {3: bit(4)}, (4, 3)),  # stops at the misconfigured PDPTE
            ({1: W}, {}, (4, 3, 2, 1)),  # W-only PTE
            ({4: R}, {}, (4, 3, 2, 1)),  # write violation: whole path read
        ],
        ids=["PDE-not-present", "PML4E-not-present", "PDPTE-reserved", "PTE-W-only", "PML4E-R--"],
    )
    def test_path_of_a_failed_walk(self, flags, extra, read):
        p = std_path(flags=flags, extra=extra)
        path = []
        assert type(p.walk(Access.WRITE, path=path)) in (EptViolation, EptMisconfig)
        assert path == _trace(p, read)

    def test_path_with_ad_records_the_entries_walked(self):
        p = std_path(ad=True)
        path = []
        p.walk(Access.WRITE, path=path)
        assert [(lv, hpa) for lv, hpa, _ in path] == [(lv, p.hpa[lv]) for lv in (4, 3, 2, 1)]
        for lv, _, e in path:  # the values read, A/D aside
            assert e & ~(A_BIT | D_BIT) == p.entry(lv) & ~(A_BIT | D_BIT)


# ---------------------------------------------------------------------------------------------
# 9. Property: random EPT trees against an independent enumerator
# ---------------------------------------------------------------------------------------------

MAX_TABLES = 40
TREE_MEM = (MAX_TABLES + 2) * PAGE


def _ignorable(level, leaf):
    """Bits a present, well-formed entry may carry without changing the walk."""
    m = IGN11 | XU | bits(63, 52) | A_BIT | D_BIT
    if leaf:
        m |= IPAT
    if level == 1:
        m |= PS
    return m


def _frame(draw, level):
    s = page_shift(level)
    return draw(st.integers(0, (1 << (N - s)) - 1)) << s


def _misconfigured_entry(draw, level):
    """A present entry that breaks exactly one SDM rule for its level."""
    ways = ["w_without_r"] + (["high_reserved"] if N < 52 else [])
    leaf = level == 1 or (level in (2, 3) and draw(st.booleans()))
    if level >= 2:  # a PTE has no reserved bits below bit N
        ways.append("low_reserved")
    if leaf:
        ways.append("memtype")
    way = draw(st.sampled_from(ways))
    perms = draw(st.sampled_from(VALID_PERMS))
    base = _frame(draw, level if leaf else 1) | (PS if leaf and level > 1 else 0)
    base |= mt(draw(st.sampled_from(GOOD_MT))) if leaf else 0
    if way == "w_without_r":
        return base | draw(st.sampled_from((W, W | X)))
    if way == "high_reserved":
        return base | perms | draw(st.integers(1, (1 << (52 - N)) - 1)) << N
    if way == "memtype":
        return base & ~bits(5, 3) | perms | mt(draw(st.sampled_from(BAD_MT)))
    # low reserved bits for the entry's kind
    if level >= 4:
        lo, hi = 3, 7
    elif not leaf:
        lo, hi = 3, 6
    elif level == 3:
        lo, hi = 12, 29
    else:
        lo, hi = 12, 20
    return base | perms | bit(draw(st.integers(lo, hi)))


@st.composite
def ept_trees(draw, misconfigs):
    levels = draw(st.sampled_from((4, 5)))
    ad = draw(st.booleans())
    t = Tables(TREE_MEM)
    root = t.alloc()

    def fill(table, level):
        idxs = draw(
            st.lists(st.one_of(st.sampled_from((0, 1, 511)), st.integers(0, 511)), min_size=1, max_size=4, unique=True)
        )
        for i in idxs:
            kinds = ["absent", "leaf", "leaf", "table", "table", "table"]
            if level >= 4:
                kinds = [k for k in kinds if k != "leaf"]
            if level == 1:
                kinds = [k for k in kinds if k != "table"]
            if t.next + PAGE > t.mem.size:
                kinds = [k for k in kinds if k != "table"] or ["absent"]
            if misconfigs:
                kinds.append("bad")
            kind = draw(st.sampled_from(kinds))
            if kind == "absent":
                e = draw(st.integers(0, (1 << 64) - 1)) & ~7
            elif kind == "bad":
                e = _misconfigured_entry(draw, level)
            else:
                leaf = kind == "leaf"
                # Lean to RWX, or deep paths would AND down to nothing (the permission
                # combinations themselves are covered exhaustively by TestPermissionBits).
                e = draw(st.sampled_from(VALID_PERMS + (RWX,) * (3 if leaf else 8)))
                e |= draw(st.one_of(st.just(0), st.integers(0, (1 << 64) - 1))) & _ignorable(level, leaf)
                if leaf:
                    e |= _frame(draw, level) | mt(draw(st.sampled_from(GOOD_MT)))
                    e |= PS if level > 1 else 0
                else:
                    e |= t.alloc()
            t.write_entry(table + 8 * i, e)
            if kind == "table":
                fill(e & ADDR, level - 1)

    fill(root, levels)
    return t, eptp_for(root, levels, ad), levels, ad


MAP, MISCONFIG, ABSENT = "map", "misconfig", "absent"


def _misconfigured(e, level):
    """SDM 4.3 for a present entry."""
    if e & 7 in (0b010, 0b110) or e & RSVD_HIGH:
        return True
    if level in (2, 3) and e & PS or level == 1:
        if level == 3 and e & bits(29, 12) or level == 2 and e & bits(20, 12):
            return True
        return (e >> 3) & 7 in BAD_MT
    return bool(e & (bits(7, 3) if level >= 4 else bits(6, 3)))


def enumerate_ept(tables, root, levels):
    """{(gpa base, level): outcome} for every region an entry decides, recursively.

    outcome: (MAP, hpa base, ANDed perms, HPAs of the entries on the path, top first)
    | (MISCONFIG,) | (ABSENT,) (a non-present entry with junk in it; all-zero ones are left
    out: any GPA not covered is absent).
    """
    regions = {}

    def visit(table, level, base, perms, trail):
        entries = struct.unpack("<512Q", tables.mem.read(table, PAGE))
        for i, e in enumerate(entries):
            gpa = base | i << page_shift(level)
            here = trail + (table + 8 * i,)
            if e & 7 == 0:
                if e:
                    regions[gpa, level] = (ABSENT,)
            elif _misconfigured(e, level):
                regions[gpa, level] = (MISCONFIG,)
            elif level == 1 or level in (2, 3) and e & PS:
                regions[gpa, level] = (MAP, e & ADDR & ~(page_size(level) - 1), perms & e & 7, here)
            else:
                visit(e & ADDR, level - 1, gpa, perms & e & 7, here)

    visit(root, levels, 0, RWX, ())
    return regions


def _lookup(regions, gpa, levels):
    for level in range(1, levels + 1):
        base = gpa & ~(page_size(level) - 1)
        if (base, level) in regions:
            return level, regions[base, level]
    return None, (ABSENT,)


def check_tree_against_enumeration(tree, data):
    t, eptp, levels, ad = tree
    regions = enumerate_ept(t, eptp & ADDR, levels)
    width = 12 + 9 * levels

    def inside(keys):
        return st.sampled_from(sorted(keys)).flatmap(
            lambda k: st.integers(0, page_size(k[1]) - 1).map(lambda off: k[0] | off)
        )

    choices = [st.integers(0, (1 << width) - 1)]  # mostly unmapped
    if regions:
        choices.append(inside(regions))
    mapped = [k for k, o in regions.items() if o[0] == MAP]
    if mapped:
        choices += [inside(mapped)] * 2  # lean to GPAs that translate
    gpa_st = st.one_of(choices)
    gpas = data.draw(st.lists(gpa_st, min_size=1, max_size=12), label="gpas")
    before = t.snapshot()
    # What memory must hold after the walks: {entry HPA: value}, updated per REFERENCE 4.5.
    model = {}

    for gpa in gpas:
        level, outcome = _lookup(regions, gpa, levels)
        # Random order: which walk finds an entry's A or D still clear matters.
        for access in data.draw(st.permutations(ALL_ACCESSES if ad else ACCESSES), label="order"):
            got = walk(t.mem, eptp, gpa, access)
            if outcome[0] == ABSENT:
                assert_violation(got, gpa, int(access))
            elif outcome[0] == MISCONFIG:
                assert_misconfig(got, gpa, level)
            else:
                _, hpa_base, perms, trail = outcome
                expect_for_perms(got, gpa, access, perms, hpa_base | gpa & (page_size(level) - 1), level)
                if ad and perms & access == access:
                    # A in every entry used, D in the leaf for a write; never anything else.
                    for hpa in trail:
                        model[hpa] = model.get(hpa, before[(hpa - PAGE) // 8]) | A_BIT
                    if is_write(access):
                        model[trail[-1]] |= D_BIT
                    assert got.dirty is bool(model[trail[-1]] & D_BIT)
                elif type(got) is EptTranslation:
                    assert got.dirty is True

    expected = {hpa: (before[(hpa - PAGE) // 8], v) for hpa, v in model.items() if v != before[(hpa - PAGE) // 8]}
    assert t.changes(before) == expected
    assert enumerate_ept(t, eptp & ADDR, levels) == regions


PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class TestRandomTrees:
    """Random trees of real tables (present / non-present with junk / table / leaf at each level,
    ignored bits sprinkled, optionally misconfigured entries, 4 or 5 levels, A/D on or off).  An
    enumerator written from the SDM rules walks the tree recursively and lists every region it
    decides; ``walk`` must agree for random GPAs (mapped, unmapped, misconfigured) and every access.
    Afterwards memory must differ only by the A/D flags of the successful walks (REFERENCE 4.5),
    computed from the enumerator's paths, and only when the EPTP enables A/D."""

    @PROPERTY_SETTINGS
    @given(tree=ept_trees(misconfigs=False), data=st.data())
    def test_random_trees_agree_with_enumeration(self, tree, data):
        check_tree_against_enumeration(tree, data)

    @PROPERTY_SETTINGS
    @given(tree=ept_trees(misconfigs=True), data=st.data())
    def test_random_trees_with_misconfigurations_agree_with_enumeration(self, tree, data):
        check_tree_against_enumeration(tree, data)

    def test_enumerator_sanity(self):
        """The oracle itself: a hand-built tree with one entry of each kind."""
        p = std_path(flags={4: R | X})
        t = p.t
        root = p.eptp & ADDR
        pd = p.entry(3) & ADDR
        pt = p.entry(2) & ADDR
        t.write_entry(pd + 8 * 5, R | W | mt(MT_WT) | PS | FRAME[2])  # a 2M leaf
        t.write_entry(pd + 8 * 6, RSVD_HIGH | 0x78)  # junk, not present
        t.write_entry(pt + 8 * 7, W | X | mt(MT_WB) | FRAME[1])  # misconfigured PTE
        regions = enumerate_ept(t, root, 4)
        pt_base = GPA & ~(page_size(2) - 1)
        pd_base = GPA & ~(page_size(3) - 1)
        assert regions == {
            (GPA & ~(PAGE - 1), 1): (MAP, FRAME[1], R | X, tuple(p.hpa[lv] for lv in (4, 3, 2, 1))),
            (pt_base | 7 << 12, 1): (MISCONFIG,),
            (pd_base | 5 << 21, 2): (MAP, FRAME[2], R, (p.hpa[4], p.hpa[3], pd + 8 * 5)),
            (pd_base | 6 << 21, 2): (ABSENT,),
        }


# ---------------------------------------------------------------------------------------------
# Convertible EPT violations (SDM Vol. 3C "Convertible EPT Violations")
# ---------------------------------------------------------------------------------------------

SVE = 1 << 63


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_suppress_ve_of_a_not_present_entry(level):
    """A not-present entry decides: its own bit 63 (KVM's SHADOW_NONPRESENT_VALUE sets it; a
    TD's MMIO SPTE of value 0 does not)."""
    for sve in (0, SVE):
        p = std_path(flags={level: sve})
        got = p.walk(Access.READ)
        assert_violation(got, GPA, 1)
        assert got.suppress_ve is bool(sve)


def test_suppress_ve_of_a_permission_violation_is_the_leafs():
    """A present path: only the leaf's bit 63 is used, a non-leaf entry's is not."""
    p = std_path(flags={1: 1 | (6 << 3)}, extra={4: SVE, 3: SVE, 2: SVE})  # leaf R only, SVE clear
    got = p.walk(Access.WRITE)
    assert_violation(got, GPA, 2 | (1 << 3))
    assert got.suppress_ve is False
    p = std_path(flags={1: 1 | (6 << 3) | SVE})
    got = p.walk(Access.WRITE)
    assert got.suppress_ve is True
