"""SPTE encoding, EPT flavour (emu/kvm/spte.py against REFERENCE.md 1.1 = Linux spte.h/spte.c).

Every expected value is spelled out bit by bit here, not derived from the module's masks:
  R/W/X = bits 0/1/2, memtype bits 5:3 (WB = 6), IPAT bit 6, PS bit 7, A bit 8, D bit 9,
  MMU-present bit 11, PFN bits 51:12 (47:12 on this 48-bit CPU), host-writable bit 57,
  MMU-writable bit 58, suppress-#VE bit 63.
"""

import pytest
from hypothesis import given, strategies as st

from emu.hw import ept
from emu.hw.memory import HostMemory
from emu.kvm import spte as S

BIT = lambda n: 1 << n  # noqa: E731
R, W, X, IPAT, PSB, A, D, PRESENT, HOSTW, MMUW, SVE = (
    BIT(0),
    BIT(1),
    BIT(2),
    BIT(6),
    BIT(7),
    BIT(8),
    BIT(9),
    BIT(11),
    BIT(57),
    BIT(58),
    BIT(63),
)
WB = 6 << 3
_MEM = HostMemory(0x5000)  # scratch tables for the hardware-walk check


class TestConstants:
    """The special SPTE values and masks KVM's TDP MMU relies on."""

    def test_shadow_nonpresent_value_is_bit63(self):
        assert S.SHADOW_NONPRESENT_VALUE == 0x8000000000000000
        assert not S.is_shadow_present_pte(S.SHADOW_NONPRESENT_VALUE)

    def test_removed_spte_value_and_bits(self):
        assert S.REMOVED_SPTE == 0x80000000000005A0
        assert S.FROZEN_SPTE == S.REMOVED_SPTE
        assert [b for b in range(64) if S.REMOVED_SPTE >> b & 1] == [5, 7, 8, 10, 63]
        assert S.is_shadow_present_pte(S.REMOVED_SPTE) is False
        assert S.REMOVED_SPTE & 7 == 0  # hardware sees it as not present

    def test_is_removed_spte_is_exact_equality(self):
        assert S.is_removed_spte(0x80000000000005A0)
        assert S.is_frozen_spte(0x80000000000005A0)
        for other in (0x80000000000005A1, 0x5A0, 0x80000000000005A0 | PRESENT, S.SHADOW_NONPRESENT_VALUE, 0):
            assert not S.is_removed_spte(other), hex(other)

    def test_present_bit_is_bit_11_only(self):
        assert S.SPTE_MMU_PRESENT_MASK == 0x800
        assert S.is_shadow_present_pte(PRESENT)
        assert not S.is_shadow_present_pte(R | W | X | SVE | A | PSB)  # RWX alone is not "present" to KVM
        assert not S.is_shadow_present_pte(0)

    def test_memtype_masks(self):
        assert S.MT_MASK_DEFAULT_VM == 0x70  # WB << 3 | IPAT (IGNORE_GUEST_PAT quirk on)
        assert S.MT_MASK_TDX_VM == 0x30  # WB << 3, no IPAT (TDX disables the quirk)

    def test_acc_bits(self):
        assert (S.ACC_EXEC_MASK, S.ACC_WRITE_MASK, S.ACC_USER_MASK, S.ACC_ALL) == (1, 2, 4, 7)

    def test_mmio_value_and_mask(self):
        assert S.shadow_mmio_value == 0b110  # W|X: an EPT misconfiguration
        assert S.shadow_mmio_mask == 0b111 | SVE

    def test_level_helpers(self):
        assert [S.KVM_PAGES_PER_HPAGE(l) for l in (1, 2, 3, 4, 5)] == [1, 512, 512**2, 512**3, 512**4]
        assert S.gfn_round_for_level(0x12345, 1) == 0x12345
        assert S.gfn_round_for_level(0x12345, 2) == 0x12200
        assert S.gfn_round_for_level(0x12345, 3) == 0x0
        assert S.gfn_round_for_level(0x7FFFF, 3) == 0x40000
        gpa = (3 << 39) | (5 << 30) | (7 << 21) | (9 << 12) | 0xABC
        assert [S.SPTE_INDEX(gpa, l) for l in (4, 3, 2, 1)] == [3, 5, 7, 9]
        assert S.SPTE_INDEX(1 << 47, 4) == 256


class TestMakeSpte:
    """make_spte() for TDP leaves with ACC_ALL and the default VM's memtype (WB | IPAT)."""

    def test_4k_writable(self):
        spte, wrprot = S.make_spte(1, 0x12345, S.ACC_ALL, S.MT_MASK_DEFAULT_VM)
        assert wrprot is False
        assert spte == 0x8600000012345B77
        assert spte == SVE | MMUW | HOSTW | (0x12345 << 12) | PRESENT | D | A | IPAT | WB | X | W | R

    def test_2m_writable(self):
        spte, _ = S.make_spte(2, 0x12200, S.ACC_ALL, S.MT_MASK_DEFAULT_VM)
        assert spte == 0x8600000012200BF7
        assert spte == SVE | MMUW | HOSTW | (0x12200 << 12) | PRESENT | D | A | PSB | IPAT | WB | X | W | R

    def test_1g_writable(self):
        spte, _ = S.make_spte(3, 0x40000, S.ACC_ALL, S.MT_MASK_DEFAULT_VM)
        assert spte == 0x8600000040000BF7

    def test_host_readonly_gets_no_write_bits(self):
        # (HostW, MMU-W, W) = (0, 0, 0) and no D: a read-only memslot.
        spte, _ = S.make_spte(1, 0x6081, S.ACC_ALL, S.MT_MASK_DEFAULT_VM, host_writable=False)
        assert spte == 0x8000000006081975
        assert spte == SVE | (0x6081 << 12) | PRESENT | A | IPAT | WB | X | R

    def test_prefetch_has_no_accessed_bit(self):
        spte, _ = S.make_spte(1, 0x10, S.ACC_ALL, S.MT_MASK_DEFAULT_VM, prefetch=True)
        assert spte == 0x8600000000010A77
        assert not spte & A

    def test_access_bits_map_to_x_and_r(self):
        no_exec, _ = S.make_spte(1, 1, S.ACC_WRITE_MASK | S.ACC_USER_MASK, S.MT_MASK_DEFAULT_VM)
        assert no_exec == 0x8600000000001B73  # no X
        no_user, _ = S.make_spte(1, 1, S.ACC_WRITE_MASK | S.ACC_EXEC_MASK, S.MT_MASK_DEFAULT_VM)
        assert no_user == 0x8600000000001B76  # no R (shadow_user_mask is R)
        read_exec, _ = S.make_spte(1, 1, S.ACC_USER_MASK | S.ACC_EXEC_MASK, S.MT_MASK_DEFAULT_VM)
        assert read_exec == 0x8200000000001975  # host-writable, not writable

    def test_tdx_memtype(self):
        spte, _ = S.make_spte(1, 0x1, S.ACC_ALL, S.MT_MASK_TDX_VM)
        assert spte == 0x8600000000001B37

    @given(level=st.integers(1, 3), pfn=st.integers(0, (1 << 36) - 1), writable=st.booleans())
    def test_decodes_back(self, level, pfn, writable):
        pfn &= -S.KVM_PAGES_PER_HPAGE(level)
        spte, _ = S.make_spte(level, pfn, S.ACC_ALL, S.MT_MASK_DEFAULT_VM, host_writable=writable)
        assert S.spte_to_pfn(spte) == pfn
        assert S.is_shadow_present_pte(spte)
        assert S.is_last_spte(spte, level)
        assert bool(spte & PSB) == (level > 1)
        assert spte & SVE and not S.is_ept_ve_possible(spte)
        assert (bool(spte & HOSTW), bool(spte & MMUW), bool(spte & W)) == (writable,) * 3
        assert not S.is_mmio_spte(spte) and not S.is_removed_spte(spte)

    @given(level=st.integers(1, 3), pfn=st.integers(0, (1 << 36) - 1))
    def test_hardware_accepts_leaf(self, level, pfn):
        """A make_spte leaf is a valid EPT leaf for the emulated CPU: no misconfiguration."""
        pfn &= -S.KVM_PAGES_PER_HPAGE(level)
        mem = _MEM
        tables = [0x1000, 0x2000, 0x3000, 0x4000]
        for i in range(4):
            mem.zero(tables[i])
        for lvl in range(4, level, -1):
            mem.write64(tables[4 - lvl], S.make_nonleaf_spte(tables[5 - lvl]))
        mem.write64(tables[4 - level], S.make_spte(level, pfn, S.ACC_ALL, S.MT_MASK_DEFAULT_VM)[0])
        t = ept.walk(mem, ept.make_eptp(0x1000, ad=True), 0x123, ept.Access.WRITE, set_ad=False)
        assert isinstance(t, ept.EptTranslation), t
        assert (t.hpa, t.level, t.perms) == ((pfn << 12) | 0x123, level, 7)


class TestOtherSptes:
    """Non-leaf, MMIO and helper predicates."""

    def test_make_nonleaf_spte(self):
        assert S.make_nonleaf_spte(0x27000) == 0x8000000000027907
        assert S.make_nonleaf_spte(0x27000) == SVE | 0x27000 | PRESENT | A | X | W | R
        assert not S.is_last_spte(S.make_nonleaf_spte(0x27000), 2)
        assert S.is_last_spte(S.make_nonleaf_spte(0x27000), 1)  # level 1 is always last

    def test_mmio_spte(self):
        spte = S.make_mmio_spte(0x2000)
        assert spte == 0x2000006
        assert S.is_mmio_spte(spte)
        assert not S.is_shadow_present_pte(spte)
        assert not spte & SVE and not S.is_ept_ve_possible(spte)  # W|X: a misconfig, never a #VE
        assert S.get_mmio_spte_gfn(spte) == 0x2000
        assert not S.is_mmio_spte(S.SHADOW_NONPRESENT_VALUE)
        assert not S.is_mmio_spte(S.REMOVED_SPTE)

    def test_ve_possible_only_without_sve(self):
        assert S.is_ept_ve_possible(0)
        assert not S.is_ept_ve_possible(S.SHADOW_NONPRESENT_VALUE)
        assert not S.is_ept_ve_possible(S.REMOVED_SPTE)

    def test_is_last_spte(self):
        assert S.is_last_spte(0, 1)
        assert S.is_last_spte(PSB, 2) and S.is_last_spte(PSB, 3)
        assert not S.is_last_spte(PRESENT | R, 2)
        assert not S.is_last_spte(PRESENT | R, 4)

    def test_spte_to_pfn_ignores_high_and_low_bits(self):
        assert S.spte_to_pfn(SVE | MMUW | HOSTW | (0xABCDE << 12) | 0xFFF) == 0xABCDE
        assert S.spte_to_pfn((0xFFFFFFFFF << 12)) == 0xFFFFFFFFF
        assert S.spte_to_pfn(S.SHADOW_NONPRESENT_VALUE) == 0
        assert S.spte_to_pfn(S.REMOVED_SPTE) == 0

    @pytest.mark.parametrize(
        "spte,text",
        [
            (1 << 63, "nonpresent"),
            (0x80000000000005A0, "REMOVED"),
            (0x2000006, "mmio gfn 0x2000"),
            (0x8600000012200BF7, "RWX pfn 0x12200 PS A D"),
            (0x8000000006081975, "R-X pfn 0x6081 A"),
        ],
    )
    def test_spte_str(self, spte, text):
        assert S.spte_str(spte) == text
