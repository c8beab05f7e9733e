"""tdp_iter: the pre-order walk of for_each_tdp_pte_min_level (REFERENCE.md 1.3, Linux tdp_iter.c).

Tables are built by hand in a Host's kernel memory, with a KvmMmuPage registered for each, and
the iterator's (level, gfn, sptep, old_spte) sequence is compared with an independent recursive
enumeration:
  - visit an entry, then step down into it if it is MMU-present and not a leaf (and above
    min_level), else sideways, and up when a table is done;
  - the walk starts at the entry containing the start gfn at every level and stops at the first
    entry whose gfn is >= end;
  - gfn_bits is ORed into the table indices only: iter.gfn never contains it;
  - after iter.yielded is set, the next step restarts at the root at next_last_level_gfn.
"""

import random
from itertools import takewhile

import pytest

from emu.host import Host
from emu.kvm.kvm import Kvm
from emu.kvm.spte import (
    make_nonleaf_spte,
    make_spte,
    make_mmio_spte,
    ACC_ALL,
    MT_MASK_DEFAULT_VM,
    REMOVED_SPTE,
    SHADOW_NONPRESENT_VALUE,
)
from emu.kvm.tdp_iter import TdpIter, for_each_tdp_pte_min_level
from emu.kvm.tdp_mmu import KvmMmuPage, ROLE_LEVEL_MASK

from kvmhelpers import read64, pages_per, MMU_PRESENT, PS, ADDR_MASK


class Tables:
    """Hand-built TDP tables in host kernel memory."""

    def __init__(self, root_level=4):
        self.host = Host(0)
        self.kvm = Kvm(self.host)
        self.mem = self.host.mem
        self.tdp = self.kvm.tdp_mmu
        spt = self._page()
        self.root = KvmMmuPage(spt)
        self.root.init(None, 0, self.tdp.root_role(root_level, False))
        self.tdp.sp_of[spt] = self.root
        self.tables = [spt]

    def _page(self):
        hpa = self.host.alloc_kernel_page()
        self.mem.write(hpa, SHADOW_NONPRESENT_VALUE.to_bytes(8, "little") * 512)
        return hpa

    def level_of(self, table):
        return self.tdp.sp_of[table].role_level

    def set(self, table, index, value):
        self.mem.write64(table + 8 * index, value)

    def link(self, table, index):
        """Link a new (empty) child table at table[index]; returns its HPA."""
        parent = self.tdp.sp_of[table]
        child = self._page()
        sp = KvmMmuPage(child)
        sp.init(
            table + 8 * index,
            parent.gfn + index * pages_per(parent.role_level),
            (parent.role & ~ROLE_LEVEL_MASK) | (parent.role_level - 1),
        )
        self.tdp.sp_of[child] = sp
        self.tables.append(child)
        self.set(table, index, make_nonleaf_spte(child))
        return child

    def leaf(self, table, index, pfn=0x1234):
        level = self.level_of(table)
        pfn &= -pages_per(level)
        self.set(table, index, make_spte(level, pfn, ACC_ALL, MT_MASK_DEFAULT_VM)[0])

    def walk(self, min_level=1, start=0, end=1 << 40, gfn_bits=0):
        it = TdpIter(self.kvm, self.root, min_level, start, gfn_bits)
        return [(i.level, i.gfn, i.sptep, i.old_spte) for i in bounded(for_each_tdp_pte_min_level(it, end))]


def bounded(walk, limit=200_000):
    """The iterator's steps, failing (instead of hanging) if it does not terminate."""
    for n, i in enumerate(walk):
        assert n < limit, "the tdp_iter walk does not terminate"
        yield i


def expected_walk(mem, root_spt, root_level, min_level=1, start=0, end=1 << 40, gfn_bits=0):
    """Independent pre-order enumeration of what the iterator must visit."""
    out = []

    def rec(table, level, base, is_root):
        n = pages_per(level)
        for i in range(512):
            if is_root:
                full = i * n  # the gfn this root slot maps, gfn_bits included
                if gfn_bits and not full & gfn_bits:
                    continue
                gfn = full & ~gfn_bits
            else:
                gfn = base + i * n
            if gfn + n <= start:
                continue
            sptep = table + 8 * i
            spte = read64(mem, sptep)
            out.append((level, gfn, sptep, spte))
            if level > min_level and spte & MMU_PRESENT and not spte & PS:
                rec(spte & ADDR_MASK, level - 1, gfn, False)

    rec(root_spt, root_level, 0, True)
    return list(takewhile(lambda e: e[1] < end, out))


def small_tree():
    """root[0] -> L3; L3[1] -> L2; L2[3] = 2M leaf; L2[4] -> L1 with leaves at 0 and 511;
    L3[2] = 1G leaf; root[1] -> empty L3."""
    t = Tables()
    l3 = t.link(t.root.spt, 0)
    l2 = t.link(l3, 1)
    t.leaf(l2, 3, pfn=0x40600)
    l1 = t.link(l2, 4)
    t.leaf(l1, 0, pfn=0x777)
    t.leaf(l1, 511, pfn=0x778)
    t.leaf(l3, 2, pfn=0x80000)
    t.link(t.root.spt, 1)
    return t, l3, l2, l1


class TestPreOrder:
    """The visit order: down into present non-leaf entries, sideways, up."""

    def test_explicit_order_small_tree(self):
        t, l3, l2, l1 = small_tree()
        got = t.walk(end=0x40A01)
        keys = [e[:3] for e in got]
        assert keys[:5] == [
            (4, 0, t.root.spt),
            (3, 0, l3),
            (3, 0x40000, l3 + 8),
            (2, 0x40000, l2),
            (2, 0x40200, l2 + 8),
        ]
        # The 2M leaf at L2[3] is visited but not descended; L2[4] is, and L1 is walked in order.
        i = keys.index((2, 0x40600, l2 + 24))
        assert keys[i : i + 4] == [(2, 0x40600, l2 + 24), (2, 0x40800, l2 + 32), (1, 0x40800, l1), (1, 0x40801, l1 + 8)]
        assert got[i][3] == make_spte(2, 0x40600, ACC_ALL, MT_MASK_DEFAULT_VM)[0]
        assert got[i + 1][3] == make_nonleaf_spte(l1)
        assert got[i + 2][3] == make_spte(1, 0x777, ACC_ALL, MT_MASK_DEFAULT_VM)[0]
        assert got[i + 3][3] == SHADOW_NONPRESENT_VALUE
        # After L1[511]: up, and side to L2[5]; that is the last entry with gfn < end.
        assert keys[-2:] == [(1, 0x40800 + 511, l1 + 511 * 8), (2, 0x40A00, l2 + 40)]
        assert len(got) == 1 + 2 + 5 + 512 + 1  # root[0], L3[0..1], L2[0..4], L1, L2[5]
        assert got == expected_walk(t.mem, t.root.spt, 4, end=0x40A01)

    def test_up_then_side_full_range(self):
        t, l3, l2, l1 = small_tree()
        l3b = read64(t.mem, t.root.spt + 8) & ADDR_MASK
        got = t.walk()
        assert got == expected_walk(t.mem, t.root.spt, 4)
        keys = [e[:3] for e in got]
        # root, the L3 of root[0], its L2, the L1, the (empty) L3 of root[1]: every entry once
        assert len(keys) == len(set(keys)) == 5 * 512
        k = keys.index((2, 0x40000 + 511 * 512, l2 + 511 * 8))
        assert keys[k + 1] == (3, 0x80000, l3 + 16)  # the 1G leaf at L3[2]
        assert got[k + 1][3] == make_spte(3, 0x80000, ACC_ALL, MT_MASK_DEFAULT_VM)[0]
        m = keys.index((3, 511 * 0x40000, l3 + 511 * 8))
        assert keys[m + 1 : m + 3] == [(4, 1 << 27, t.root.spt + 8), (3, 1 << 27, l3b)]
        assert keys[-1] == (4, 511 << 27, t.root.spt + 511 * 8)

    @pytest.mark.parametrize("min_level", [2, 3, 4])
    def test_min_level_stops_descent(self, min_level):
        t, *_ = small_tree()
        got = t.walk(min_level=min_level)
        assert got == expected_walk(t.mem, t.root.spt, 4, min_level=min_level)
        assert min(l for l, *_ in got) == min_level

    def test_start_inside_the_tree(self):
        t, l3, l2, l1 = small_tree()
        start = 0x40800 + 100
        got = t.walk(start=start, end=start + 3)
        assert [e[:3] for e in got] == [
            (4, 0, t.root.spt),
            (3, 0x40000, l3 + 8),
            (2, 0x40800, l2 + 32),
            (1, start, l1 + 800),
            (1, start + 1, l1 + 808),
            (1, start + 2, l1 + 816),
        ]

    def test_not_present_values_are_not_descended(self):
        """MMIO, REMOVED and SHADOW_NONPRESENT entries, and leaves, whose address bits point at a
        real table, are visited but never stepped into (only bit 11 + not-last counts)."""
        t = Tables()
        l3 = t.link(t.root.spt, 0)
        decoy = t.link(l3, 5)  # a real table...
        t.leaf(decoy, 0)
        t.set(l3, 5, make_mmio_spte(decoy >> 12))  # ...now only referenced by non-present values
        t.set(l3, 6, REMOVED_SPTE | decoy)
        t.set(l3, 7, SHADOW_NONPRESENT_VALUE | decoy)
        t.set(l3, 8, make_spte(3, decoy >> 12, ACC_ALL, MT_MASK_DEFAULT_VM)[0])  # 1G leaf
        t.set(l3, 9, make_nonleaf_spte(decoy) & ~MMU_PRESENT)  # RWX, no bit 11
        got = t.walk()
        assert [l for l, *_ in got].count(2) == 0
        assert len(got) == 512 + 512
        assert got == expected_walk(t.mem, t.root.spt, 4)

    def test_five_level_root(self):
        t = Tables(root_level=5)
        l4 = t.link(t.root.spt, 2)
        l3 = t.link(l4, 0)
        t.leaf(l3, 1)
        got = t.walk(start=2 << 36, end=(2 << 36) + 2 * 512 * 512)
        assert [e[:3] for e in got] == [
            (5, 2 << 36, t.root.spt + 16),
            (4, 2 << 36, l4),
            (3, 2 << 36, l3),
            (3, (2 << 36) + 512 * 512, l3 + 8),
        ]


def random_tables(seed):
    rng = random.Random(seed)
    t = Tables(root_level=rng.choice([4, 4, 5]))
    budget = [rng.randint(2, 8)]  # tables to add at most

    def fill(table, level, depth):
        n = rng.choice([0, 1, 2, 3, 4])
        idxs = rng.sample(range(512), n) + rng.choice([[], [0], [511], [0, 511]])
        for idx in set(idxs):
            r = rng.random()
            if level > 1 and r < 0.45 and budget[0] > 0:
                budget[0] -= 1
                fill(t.link(table, idx), level - 1, depth + 1)
            elif r < 0.7 and level <= 3:
                t.leaf(table, idx, pfn=rng.randrange(1 << 30))
            elif r < 0.8:
                t.set(table, idx, make_mmio_spte(rng.randrange(1 << 30)))
            elif r < 0.9:
                t.set(table, idx, REMOVED_SPTE)
            else:
                t.set(table, idx, rng.choice([0, SHADOW_NONPRESENT_VALUE, MMU_PRESENT | PS]))

    fill(t.root.spt, t.root.role_level, 0)
    return t, rng


class TestRandomTrees:
    """Random trees (seeded), random ranges and min levels: iterator == enumeration."""

    @pytest.mark.parametrize("seed", range(25))
    def test_matches_enumeration(self, seed):
        t, rng = random_tables(seed)
        root_level = t.root.role_level
        span = pages_per(root_level) * 512
        for _ in range(3):
            start = rng.randrange(span) if rng.random() < 0.7 else 0
            end = start + rng.choice([1, 2, 513, 1 << 18, span])
            min_level = rng.choice([1, 1, 2, 3])
            got = t.walk(min_level=min_level, start=start, end=end)
            exp = expected_walk(t.mem, t.root.spt, root_level, min_level=min_level, start=start, end=end)
            assert got == exp, (seed, start, end, min_level)
            assert got, "the walk always visits the root entry containing start"
            assert got[0][:2] == (root_level, start & -pages_per(root_level))


class TestGfnBits:
    """gfn_bits (the shared bit of a TD's direct root) goes into the indices, not into iter.gfn."""

    BITS = 1 << 35  # gpa_to_gfn(BIT(47))

    def test_indices_use_the_bit_and_gfns_do_not(self):
        t = Tables()
        low = t.link(t.root.spt, 0)  # without the bit: must never be visited
        t.leaf(low, 0)
        hi = t.link(t.root.spt, 256)  # index of gfn 0 | BITS
        hi2 = t.link(hi, 1)
        t.leaf(hi2, 7)
        got = t.walk(start=0, end=2 * 512 * 512, gfn_bits=self.BITS)
        keys = [e[:3] for e in got]
        assert keys[:4] == [(4, 0, t.root.spt + 256 * 8), (3, 0, hi), (3, 512 * 512, hi + 8), (2, 512 * 512, hi2)]
        assert all(g < self.BITS for _, g, _, _ in got)
        assert all(not (low <= p < low + 4096) for _, _, p, _ in got)
        assert got == expected_walk(t.mem, t.root.spt, 4, start=0, end=2 * 512 * 512, gfn_bits=self.BITS)

    def test_walk_to_the_end_of_the_root(self):
        t = Tables()
        t.link(t.root.spt, 511)
        got = t.walk(min_level=4, start=0, end=self.BITS, gfn_bits=self.BITS)
        assert [e[:3] for e in got] == [(4, i << 27, t.root.spt + (256 + i) * 8) for i in range(256)]

    def test_start_at_or_above_the_bit_is_invalid(self):
        t = Tables()
        it = TdpIter(t.kvm, t.root, 1, self.BITS, self.BITS)
        assert it.valid is False
        assert list(for_each_tdp_pte_min_level(it, 1 << 40)) == []
        it = TdpIter(t.kvm, t.root, 1, self.BITS - 1, self.BITS)
        assert it.valid is True


class TestRestart:
    """After a yield (iter.yielded = True; continue), the walk restarts at the root at
    next_last_level_gfn and revisits the entry it was on."""

    @pytest.mark.parametrize("seed", range(8))
    def test_restart_sequence(self, seed):
        t, rng = random_tables(100 + seed)
        root_level = t.root.role_level
        full = expected_walk(t.mem, t.root.spt, root_level)
        k = rng.randrange(len(full))
        it = TdpIter(t.kvm, t.root, 1, 0, 0)
        got, nllg, after = [], None, None
        for n, i in enumerate(bounded(for_each_tdp_pte_min_level(it, 1 << 40))):
            got.append((i.level, i.gfn, i.sptep, i.old_spte))
            if n == k:
                nllg = i.next_last_level_gfn
                i.yielded = True
            elif n == k + 1:
                after = (i.yielded, i.yielded_gfn, i.level)
        assert got[: k + 1] == full[: k + 1]
        assert got[k + 1 :] == expected_walk(t.mem, t.root.spt, root_level, start=nllg)
        if after is not None:
            assert after == (False, nllg, root_level)

    def test_restart_revisits_current_leaf_entry(self):
        t, l3, l2, l1 = small_tree()
        it = TdpIter(t.kvm, t.root, 1, 0x40800 + 10, 0)
        seq = []
        for i in bounded(for_each_tdp_pte_min_level(it, 0x40800 + 12)):
            seq.append(i.sptep)
            if i.sptep == l1 + 11 * 8 and len(seq) < 8:
                assert i.next_last_level_gfn == 0x40800 + 11
                i.yielded = True
        assert seq == [t.root.spt, l3 + 8, l2 + 32, l1 + 80, l1 + 88, t.root.spt, l3 + 8, l2 + 32, l1 + 88]


class TestRereads:
    """try_step_down re-reads the SPTE: a table linked (or zapped) under the iterator after it
    read the entry is followed (or not)."""

    def test_follows_table_linked_after_read(self):
        t, l3, l2, l1 = small_tree()
        seen = []
        new = None
        it = TdpIter(t.kvm, t.root, 1, 0, 0)
        for i in bounded(for_each_tdp_pte_min_level(it, 0x40200 + 2)):
            seen.append(i.sptep)
            if i.sptep == l2 + 8:
                assert i.old_spte == SHADOW_NONPRESENT_VALUE
                new = t.link(l2, 1)  # another thread links a table here
        assert seen == [t.root.spt, l3, l3 + 8, l2, l2 + 8, new, new + 8]

    def test_does_not_follow_table_zapped_after_read(self):
        t, l3, l2, l1 = small_tree()
        seen = []
        it = TdpIter(t.kvm, t.root, 1, 0x40800, 0)
        for i in bounded(for_each_tdp_pte_min_level(it, 0x40A00 + 1)):
            seen.append((i.level, i.sptep))
            if i.sptep == l2 + 32:
                assert i.old_spte == make_nonleaf_spte(l1)
                t.set(l2, 4, SHADOW_NONPRESENT_VALUE)
        assert seen == [(4, t.root.spt), (3, l3 + 8), (2, l2 + 32), (2, l2 + 40)]
