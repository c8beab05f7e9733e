"""The TDP MMU (emu/kvm/tdp_mmu.py) against REFERENCE.md 1.2-1.8 (Linux tdp_mmu.c).

- the tables a fault builds: non-leaf SPTE == make_nonleaf_spte(child HPA), leaf ==
  make_spte(level, slot pfn, ACC_ALL, WB|IPAT), everything else exactly SHADOW_NONPRESENT_VALUE,
  one KvmMmuPage per table with the right level/gfn/ptep, page stats and tdp_mmu_pages exact;
- tdp_mmu_set_spte_atomic: cmpxchg against iter.old_spte, -EBUSY + refreshed snapshot on a race;
- the fault path: FROZEN -> RET_PF_RETRY with no allocation, a failed link frees the new SP,
  a failed leaf cmpxchg retries (the guest faults again), SPURIOUS for an existing leaf;
- zaps: a range zap removes leaves only (tables stay) and flushes; a whole-root zap goes bottom-up
  (4K, 2M, 1G, root level); a removed table's present entries are frozen (all 512 under the
  shared lock) and the table is freed only after the RCU grace period; yielding (cond_resched)
  makes progress and flushes first; huge-page split and its accounting; BUG on a leaf PFN change.
"""

import pytest

from emu.host import Host, MiB
from emu.kvm import mmu as mmu_mod
from emu.kvm.kvm import Kvm, KVM_EXIT_MMIO, KVM_REQ_TLB_FLUSH
from emu.kvm.mmu import KvmPageFault, PFERR_USER_MASK, PFERR_WRITE_MASK
from emu.kvm.spte import (
    make_spte,
    make_nonleaf_spte,
    make_mmio_spte,
    ACC_ALL,
    MT_MASK_DEFAULT_VM,
    REMOVED_SPTE,
    SHADOW_NONPRESENT_VALUE,
    PG_LEVEL_4K,
)
from emu.kvm.tdp_mmu import RET_PF_FIXED, RET_PF_SPURIOUS, KVM_VALID_ROOTS

from kvmhelpers import (
    check_tables,
    iter_at,
    read64,
    table_pages,
    present_leaves,
    record_violations,
    fnv1a64,
    hello_string,
    MMU_PRESENT,
    ADDR_MASK,
)

EBUSY = 16
HOSTW = 1 << 57


def bare_vm(mem=8 * MiB, nvcpus=1):
    """A VM with one memslot [0, mem) and loaded vCPU MMUs, no guest."""
    host = Host(mem)
    kvm = Kvm(host)
    hva = host.mmap(mem)
    kvm.set_user_memory_region(0, 0, 0, mem, hva)
    vcpus = [kvm.create_vcpu(i) for i in range(nvcpus)]
    for v in vcpus:
        v.mmu_load()
    return kvm, vcpus, hva


class TestTablesAfterGuests:
    """After a real guest run, the direct root holds exactly what kvm_tdp_mmu_map builds."""

    @pytest.mark.parametrize("guest", ["hello", "touch", "pagewalk"])
    @pytest.mark.parametrize("hugepages,mem,level", [(None, 64 * MiB, 1), ("2m", 64 * MiB, 2), ("1g", 2048 * MiB, 3)])
    def test_tables(self, make_machine, guest, hugepages, mem, level):
        m = make_machine(guest, hugepages=hugepages, mem=mem)
        res = m.run()
        assert res.exit == "hlt", res.error
        counts, tables = check_tables(m.kvm, m.vcpus[0].root)
        assert counts[level] == res.stats["ept_violations"] > 0
        assert sum(counts.values()) == counts[level]
        # a 4-level walk needs one table per level below the root down to the leaves' level
        assert all(m.kvm.tdp_mmu.sp_of[t].role_level >= level for t in tables)
        assert res.stats["page_tables"] == len(tables)


class TestFaultPath:
    """kvm_mmu_page_fault -> kvm_tdp_mmu_map on a bare VM (no guest code)."""

    def test_first_fault_builds_three_tables_and_a_leaf(self):
        kvm, (v,), hva = bare_vm()
        assert v.kvm_mmu_page_fault(0x5000, PFERR_USER_MASK) == 1
        assert v.stat["pf_fixed"] == 1 and kvm.tdp_mmu.pages == 3
        counts, tables = check_tables(kvm, v.root)
        assert counts == {1: 1, 2: 0, 3: 0}
        assert present_leaves(kvm.mem, v.root.spt, 4) == {
            5: (1, make_spte(1, (hva >> 12) + 5, ACC_ALL, MT_MASK_DEFAULT_VM)[0])
        }
        # the neighbour needs no new table; the same gfn again is spurious
        assert v.kvm_mmu_page_fault(0x6000, PFERR_USER_MASK | PFERR_WRITE_MASK) == 1
        assert kvm.tdp_mmu.pages == 3 and kvm.stat["pages_4k"] == 2
        assert v.kvm_mmu_page_fault(0x5000, PFERR_USER_MASK) == 1
        assert (v.stat["pf_fixed"], v.stat["pf_spurious"], v.stat["pf_taken"]) == (2, 1, 3)
        # a gfn in another 2M region needs one new L1 table, in another 1G region an L2 and an L1
        v.kvm_mmu_page_fault(0x200000, PFERR_USER_MASK)
        assert kvm.tdp_mmu.pages == 4
        check_tables(kvm, v.root)

    def test_fault_outside_memslots_installs_mmio_spte(self):
        kvm, (v,), _ = bare_vm()
        gpa = 0x40000000  # 1 GiB: no memslot
        assert v.kvm_mmu_page_fault(gpa, PFERR_USER_MASK) == 0
        assert v.kvm_run.exit_reason == KVM_EXIT_MMIO
        assert (v.kvm_run.phys_addr, v.kvm_run.is_write) == (gpa, False)
        # W|X, the GFN, and the memslots generation (1: one slot added) in bits 10:3
        assert kvm.memslots_generation == 1
        assert kvm.get_leaf_spte(v, gpa) == make_mmio_spte(gpa >> 12, 1) == 0x40000006 | (1 << 3)
        assert (v.stat["pf_emulate"], v.stat["pf_mmio_spte_created"]) == (1, 1)
        assert kvm.stat["pages_4k"] == 0  # an MMIO SPTE is not a mapped page
        assert kvm.tdp_mmu.pages == 3  # but the tables to it are real

    def test_two_vcpus_share_one_root(self):
        kvm, (v0, v1), _ = bare_vm(nvcpus=2)
        assert v0.root is v1.root and kvm.tdp_mmu.roots == [v0.root]
        assert v0.root.tdp_mmu_root_count == 3  # 2 for the first vCPU + MMU, 1 more
        v0.kvm_mmu_page_fault(0x7000, PFERR_USER_MASK)
        v1.kvm_mmu_page_fault(0x7000, PFERR_USER_MASK)
        assert (v0.stat["pf_fixed"], v1.stat["pf_spurious"]) == (1, 1)

    def test_frozen_spte_retries_without_allocating(self):
        kvm, (v,), _ = bare_vm()
        v.kvm_mmu_page_fault(0x5000, PFERR_USER_MASK)
        it = iter_at(kvm, v.root, 0x200, level=2)  # the L2 entry of [2M, 4M): not present
        assert it.old_spte == SHADOW_NONPRESENT_VALUE
        kvm.mem.write64(it.sptep, REMOVED_SPTE)  # another thread is installing it
        cache = len(v.mmu_shadow_page_cache.objects)
        in_use = kvm.host.kernel.in_use
        assert v.kvm_mmu_page_fault(0x200000, PFERR_USER_MASK) == 1
        assert v.stat["pf_retry"] == 1 and v.stat["pf_fixed"] == 1
        assert len(v.mmu_shadow_page_cache.objects) == cache and kvm.host.kernel.in_use == in_use
        assert kvm.tdp_mmu.pages == 3
        assert read64(kvm.mem, it.sptep) == REMOVED_SPTE
        kvm.mem.write64(it.sptep, SHADOW_NONPRESENT_VALUE)  # the other thread gave up
        assert v.kvm_mmu_page_fault(0x200000, PFERR_USER_MASK) == 1
        assert v.stat["pf_fixed"] == 2 and kvm.tdp_mmu.pages == 4
        check_tables(kvm, v.root)

    def test_failed_link_frees_the_new_table(self, monkeypatch):
        kvm, (v,), _ = bare_vm()
        mem = kvm.mem
        real = mem.cmpxchg64
        failed = []

        def cmpxchg64(hpa, old, new):
            if not failed and old == SHADOW_NONPRESENT_VALUE and new & MMU_PRESENT and not new & HOSTW:
                failed.append((hpa, new))
                return False  # someone else changed the entry
            return real(hpa, old, new)

        monkeypatch.setattr(mem, "cmpxchg64", cmpxchg64)
        in_use = kvm.host.kernel.in_use
        assert v.kvm_mmu_page_fault(0x5000, PFERR_USER_MASK) == 1
        ((sptep, new),) = failed
        child = new & ADDR_MASK
        assert sptep == v.root.spt  # root[0], the first link of the walk
        assert v.stat["pf_retry"] == 1 and v.stat["pf_fixed"] == 0
        assert child not in kvm.tdp_mmu.sp_of
        assert kvm.host.kernel.free_list[-1] == child  # tdp_mmu_free_sp: straight back to the host
        assert kvm.host.kernel.in_use == in_use - 1
        assert kvm.tdp_mmu.pages == 0
        assert read64(mem, v.root.spt) == SHADOW_NONPRESENT_VALUE
        assert v.kvm_mmu_page_fault(0x5000, PFERR_USER_MASK) == 1
        assert v.stat["pf_fixed"] == 1 and kvm.tdp_mmu.pages == 3
        check_tables(kvm, v.root)


class TestSetSpteAtomic:
    """tdp_mmu_set_spte_atomic: try_cmpxchg64 against the iterator's snapshot."""

    def test_stale_snapshot_returns_ebusy_and_refreshes(self):
        kvm, (v,), hva = bare_vm()
        v.kvm_mmu_page_fault(0x5000, PFERR_USER_MASK)
        kvm.mmu_lock.read_lock()
        it = iter_at(kvm, v.root, 6)
        assert it.old_spte == SHADOW_NONPRESENT_VALUE
        leaf = make_spte(1, (hva >> 12) + 6, ACC_ALL, MT_MASK_DEFAULT_VM)[0]
        other = make_mmio_spte(6)
        kvm.mem.write64(it.sptep, other)  # written after the iterator read it
        assert kvm.tdp_mmu.tdp_mmu_set_spte_atomic(it, leaf) == -EBUSY
        assert it.old_spte == other  # the snapshot is refreshed
        assert read64(kvm.mem, it.sptep) == other  # nothing written
        assert kvm.stat["pages_4k"] == 1
        # with the refreshed snapshot the same call succeeds and is accounted
        assert kvm.tdp_mmu.tdp_mmu_set_spte_atomic(it, leaf) == 0
        assert read64(kvm.mem, it.sptep) == leaf
        assert kvm.stat["pages_4k"] == 2
        kvm.mmu_lock.read_unlock()
        check_tables(kvm, v.root)

    def test_race_lost_to_identical_value(self):
        kvm, (v,), hva = bare_vm()
        v.kvm_mmu_page_fault(0x5000, PFERR_USER_MASK)
        kvm.mmu_lock.read_lock()
        it = iter_at(kvm, v.root, 5)
        leaf = it.old_spte
        kvm.mem.write64(it.sptep, SHADOW_NONPRESENT_VALUE)
        new = make_spte(1, (hva >> 12) + 5, ACC_ALL, MT_MASK_DEFAULT_VM)[0]
        assert new == leaf
        assert kvm.tdp_mmu.tdp_mmu_set_spte_atomic(it, new) == -EBUSY
        assert it.old_spte == SHADOW_NONPRESENT_VALUE
        kvm.mmu_lock.read_unlock()

    def test_leaf_cmpxchg_failure_in_a_guest_retries(self, make_machine, monkeypatch):
        m = make_machine("hello")
        seen = record_violations(m)
        mem = m.kvm.mem
        real = mem.cmpxchg64
        failed = []

        def cmpxchg64(hpa, old, new):
            if not failed and old == SHADOW_NONPRESENT_VALUE and new & HOSTW:
                failed.append((hpa, new))
                return False
            return real(hpa, old, new)

        monkeypatch.setattr(mem, "cmpxchg64", cmpxchg64)
        res = m.run()
        assert res.exit == "hlt", res.error
        assert [v for _, v in res.reports] == [fnv1a64(hello_string())]
        leaves = m.kvm.tdp_mmu.leaves(m.vcpus[0].root)
        s = res.stats
        assert len(failed) == 1
        assert s["pf_retry"] == 1
        assert s["ept_violations"] == len(leaves) + 1 == s["pf_fixed"] + 1 == s["pages_mapped"]["4k"] + 1
        # the first violation was retried: the guest faulted on the same page again
        assert seen[0] == seen[1] and len(set(seen)) == len(seen) - 1
        assert failed[0][1] == make_spte(1, (m.hva >> 12) + seen[0], ACC_ALL, MT_MASK_DEFAULT_VM)[0]
        check_tables(m.kvm, m.vcpus[0].root)


class TestZap:
    """Zapping: range zaps remove leaves (not tables) and flush; whole-root zaps free tables after RCU."""

    def test_zap_leafs_keeps_tables_and_flushes(self):
        kvm, (v0, v1), _ = bare_vm(nvcpus=2)
        for gpa in (0x5000, 0x6000, 0x200000):
            v0.kvm_mmu_page_fault(gpa, PFERR_USER_MASK)
        old = {gfn: s for gfn, (_, s) in present_leaves(kvm.mem, v0.root.spt, 4).items()}
        slots = {g: iter_at(kvm, v0.root, g).sptep for g in old}
        tables = table_pages(kvm.mem, v0.root.spt, 4)
        kvm.zap_gfn_range(0, 0x200)  # [0, 2M): gfns 5 and 6, not 0x200
        assert present_leaves(kvm.mem, v0.root.spt, 4).keys() == {0x200}
        assert read64(kvm.mem, slots[5]) == read64(kvm.mem, slots[6]) == SHADOW_NONPRESENT_VALUE
        assert table_pages(kvm.mem, v0.root.spt, 4) == tables and kvm.tdp_mmu.pages == 4  # L3, L2, 2 L1s
        assert kvm.stat["pages_4k"] == 1
        assert kvm.stat["remote_tlb_flush"] == 1 and kvm.stat["zaps"] == 1
        assert v0.requests & KVM_REQ_TLB_FLUSH and v1.requests & KVM_REQ_TLB_FLUSH
        # nothing left to zap in the range: no flush
        v0.requests = v1.requests = 0
        kvm.zap_gfn_range(0, 0x200)
        assert kvm.stat["remote_tlb_flush"] == 1 and (v0.requests, v1.requests) == (0, 0)
        check_tables(kvm, v0.root)

    def test_zap_range_end_is_exclusive(self):
        kvm, (v,), _ = bare_vm()
        for gfn in (4, 5, 6):
            v.kvm_mmu_page_fault(gfn << 12, PFERR_USER_MASK)
        kvm.zap_gfn_range(5, 6)
        assert present_leaves(kvm.mem, v.root.spt, 4).keys() == {4, 6}

    def test_whole_root_zap_frees_tables_after_grace_period(self):
        kvm, (v,), _ = bare_vm()
        for gpa in (0x5000, 0x200000, 0x600000):
            v.kvm_mmu_page_fault(gpa, PFERR_USER_MASK)
        tdp, alloc = kvm.tdp_mmu, kvm.host.kernel
        root = v.root
        entries = {t: [read64(kvm.mem, t + 8 * i) for i in range(512)] for t in table_pages(kvm.mem, root.spt, 4)}
        assert len(entries) == 5  # L3, L2, three L1s
        in_use = alloc.in_use
        kvm.rcu.read_lock("x")  # a lockless walker inside a read-side section
        kvm.mmu_lock.write_lock()
        tdp.invalidate_roots(KVM_VALID_ROOTS)
        kvm.mmu_lock.write_unlock()
        tdp.zap_invalidated_roots(False)  # takes mmu_lock for write itself
        # unlinked and accounted at once ...
        assert read64(kvm.mem, root.spt) == SHADOW_NONPRESENT_VALUE
        assert tdp.pages == 0 and kvm.stat["pages_4k"] == 0
        # ... bottom-up (4K, 2M, 1G, then root-level passes), so every table was empty when it
        # was unlinked: nothing in them is left frozen ...
        for t in entries:
            assert [read64(kvm.mem, t + 8 * i) for i in range(512)] == [SHADOW_NONPRESENT_VALUE] * 512
        # ... but no table page is freed while the reader is inside
        assert alloc.in_use == in_use
        assert not set(entries) & set(alloc.free_list)
        assert set(entries) <= set(tdp.sp_of)
        kvm.rcu.read_unlock("x")
        assert alloc.in_use == in_use - 5
        assert set(entries) <= set(alloc.free_list)
        assert set(tdp.sp_of) == {root.spt}  # the root: still referenced by the vCPU
        assert root.invalid and root.tdp_mmu_root_count == 1 and tdp.roots == [root]

    def test_shared_root_zap_freezes_every_entry(self):
        """Under the read lock (shared), handle_removed_pt xchg's FROZEN into all 512 entries
        of each removed table, present or not (so no concurrent installer can slip in)."""
        kvm, (v,), _ = bare_vm()
        for g in (5, 0x200, 0x3FF):
            v.kvm_mmu_page_fault(g << 12, PFERR_USER_MASK)
        tabs = table_pages(kvm.mem, v.root.spt, 4)
        assert len(tabs) == 4
        in_use = kvm.host.kernel.in_use
        kvm.rcu.read_lock("x")
        kvm.mmu_lock.read_lock()
        kvm.tdp_mmu.zap_root(v.root, True)
        kvm.mmu_lock.read_unlock()
        for t in tabs:
            assert {read64(kvm.mem, t + 8 * i) for i in range(512)} == {REMOVED_SPTE}
        assert read64(kvm.mem, v.root.spt) == SHADOW_NONPRESENT_VALUE
        assert kvm.tdp_mmu.pages == 0 and kvm.stat["pages_4k"] == 0
        assert kvm.host.kernel.in_use == in_use
        kvm.rcu.read_unlock("x")
        assert kvm.host.kernel.in_use == in_use - 4
        assert kvm.warnings == [] and not kvm.vm_bugged

    def test_removed_table_freezes_present_entries(self):
        """handle_removed_pt (exclusive): present children become FROZEN, the rest stay; the table
        is unaccounted at once and freed after the grace period."""
        kvm, (v,), _ = bare_vm()
        for gfn in (0x200, 0x201, 0x3FF):
            v.kvm_mmu_page_fault(gfn << 12, PFERR_USER_MASK)
        it = iter_at(kvm, v.root, 0x200, level=2)
        l1 = it.old_spte & ADDR_MASK
        assert it.old_spte == make_nonleaf_spte(l1) and kvm.tdp_mmu.pages == 3
        alloc = kvm.host.kernel
        in_use = alloc.in_use
        kvm.rcu.read_lock("x")
        kvm.mmu_lock.write_lock()
        kvm.tdp_mmu.tdp_mmu_set_spte(it.as_id, it.sptep, it.old_spte, SHADOW_NONPRESENT_VALUE, 0x200, 2)
        kvm.mmu_lock.write_unlock()
        after = [read64(kvm.mem, l1 + 8 * i) for i in range(512)]
        assert [i for i, e in enumerate(after) if e == REMOVED_SPTE] == [0, 1, 511]
        assert all(e == SHADOW_NONPRESENT_VALUE for i, e in enumerate(after) if i not in (0, 1, 511))
        assert kvm.stat["pages_4k"] == 0 and kvm.tdp_mmu.pages == 2
        assert l1 in kvm.tdp_mmu.sp_of and alloc.in_use == in_use and l1 not in alloc.free_list
        kvm.rcu.read_unlock("x")
        assert l1 not in kvm.tdp_mmu.sp_of and alloc.in_use == in_use - 1 and alloc.free_list[-1] == l1

    def test_zap_yields_with_progress_and_flushes_before_yielding(self):
        class AlwaysResched:
            def __init__(self):
                self.resched = 0

            def point(self, vcpu, what, arg=None):
                if what == "cond_resched":
                    self.resched += 1

            def need_resched(self):
                return True

        kvm, (v,), _ = bare_vm()
        gfns = [3, 4, 9, 0x1FF, 0x200, 0x3FF]
        for g in gfns:
            v.kvm_mmu_page_fault(g << 12, PFERR_USER_MASK)
        kvm.sched = AlwaysResched()
        kvm.zap_gfn_range(0, 0x400)
        assert present_leaves(kvm.mem, v.root.spt, 4) == {}
        assert kvm.stat["pages_4k"] == 0
        # one flush for every zapped leaf: each yield after a zap flushes first (and clears flush)
        assert kvm.stat["remote_tlb_flush"] == len(gfns)
        assert kvm.sched.resched > len(gfns)
        assert kvm.rcu.depth == {}

    def test_leaf_pfn_change_is_a_kvm_bug(self):
        kvm, (v,), hva = bare_vm()
        v.kvm_mmu_page_fault(0x5000, PFERR_USER_MASK)
        it = iter_at(kvm, v.root, 5)
        other = make_spte(1, (hva >> 12) + 99, ACC_ALL, MT_MASK_DEFAULT_VM)[0]
        kvm.mmu_lock.write_lock()
        kvm.tdp_mmu.tdp_mmu_set_spte(it.as_id, it.sptep, it.old_spte, other, 5, 1)
        kvm.mmu_lock.write_unlock()
        assert kvm.vm_bugged and kvm.vm_dead
        assert "gfn 0x5" in kvm.bug_reason and kvm.stat["kvm_bug_on"] == 1

    def test_zap_in_invalid_root_needs_no_flush(self):
        kvm, (v,), _ = bare_vm()
        v.kvm_mmu_page_fault(0x5000, PFERR_USER_MASK)
        kvm.tdp_mmu.invalidate_roots(KVM_VALID_ROOTS)  # invalid, not yet zapped
        kvm.zap_gfn_range(0, 0x200)  # unmap_gfn_range includes invalid roots
        assert kvm.stat["pages_4k"] == 0  # the leaf is zapped ...
        assert kvm.stat["remote_tlb_flush"] == 0  # ... without a flush


class TestHugePages:
    """Huge leaves and splitting them (tdp_mmu_split_huge_page)."""

    def _vm_2m(self):
        host = Host(8 * MiB + 2 * MiB)
        kvm = Kvm(host)
        hva = host.mmap(8 * MiB, 2 * MiB)
        kvm.set_user_memory_region(0, 0, 0, 8 * MiB, hva, backing_level=2)
        v = kvm.create_vcpu(0)
        v.mmu_load()
        return kvm, v, hva

    def test_2m_backing_maps_2m_leaf(self):
        kvm, v, hva = self._vm_2m()
        v.kvm_mmu_page_fault(0x234000, PFERR_USER_MASK)
        assert present_leaves(kvm.mem, v.root.spt, 4) == {
            0x200: (2, make_spte(2, (hva >> 12) + 0x200, ACC_ALL, MT_MASK_DEFAULT_VM)[0])
        }
        assert kvm.tdp_mmu.pages == 2  # L3 and L2 only
        check_tables(kvm, v.root)

    def test_misaligned_slot_falls_back_to_4k(self):
        host = Host(8 * MiB + 2 * MiB)
        kvm = Kvm(host)
        hva = host.mmap(8 * MiB + 4096, 2 * MiB) + 4096  # host address off by 4K
        kvm.set_user_memory_region(0, 0, 0, 8 * MiB, hva, backing_level=2)
        v = kvm.create_vcpu(0)
        v.mmu_load()
        v.kvm_mmu_page_fault(0x234000, PFERR_USER_MASK)
        assert present_leaves(kvm.mem, v.root.spt, 4).keys() == {0x234}
        check_tables(kvm, v.root)

    def _split(self, kvm, v, gfn):
        fault = KvmPageFault(gfn << 12, PFERR_USER_MASK)
        fault.gfn = gfn
        fault.max_level = PG_LEVEL_4K  # e.g. dirty logging: map this gfn at 4K
        assert mmu_mod.mmu_topup_memory_caches(v) == 0
        assert mmu_mod.kvm_mmu_faultin_pfn(v, fault) == 0
        kvm.mmu_lock.read_lock()
        try:
            return kvm.tdp_mmu.map(v, fault)
        finally:
            kvm.mmu_lock.read_unlock()

    def test_split_replaces_huge_leaf_by_512_small(self):
        kvm, v, hva = self._vm_2m()
        v.kvm_mmu_page_fault(0x234000, PFERR_USER_MASK)
        assert self._split(kvm, v, 0x234) == RET_PF_SPURIOUS  # the split table already maps it
        leaves = present_leaves(kvm.mem, v.root.spt, 4)
        assert sorted(leaves) == list(range(0x200, 0x400))
        for g, (lvl, s) in leaves.items():
            assert (lvl, s) == (1, make_spte(1, (hva >> 12) + g, ACC_ALL, MT_MASK_DEFAULT_VM)[0])
        assert kvm.tdp_mmu.pages == 3

    def test_huge_leaf_replaces_table(self):
        """A 2M fault where a 4K table is linked installs the huge leaf over it: the table is
        removed (shared: all entries frozen), its leaves unaccounted, the gfn flushed, and the
        table freed once the fault leaves its RCU read-side section."""
        kvm, v, hva = self._vm_2m()
        assert self._split(kvm, v, 0x234) == RET_PF_FIXED  # a 4K-only mapping first
        assert (kvm.stat["pages_4k"], kvm.stat["pages_2m"], kvm.tdp_mmu.pages) == (1, 0, 3)
        l1 = iter_at(kvm, v.root, 0x234, level=2).old_spte & ADDR_MASK
        in_use = kvm.host.kernel.in_use
        assert v.kvm_mmu_page_fault(0x235000, PFERR_USER_MASK) == 1
        assert present_leaves(kvm.mem, v.root.spt, 4) == {
            0x200: (2, make_spte(2, (hva >> 12) + 0x200, ACC_ALL, MT_MASK_DEFAULT_VM)[0])
        }
        assert (kvm.stat["pages_4k"], kvm.stat["pages_2m"], kvm.tdp_mmu.pages) == (0, 1, 2)
        assert kvm.stat["remote_tlb_flush"] == 1 and v.requests & KVM_REQ_TLB_FLUSH
        assert {read64(kvm.mem, l1 + 8 * i) for i in range(512)} == {REMOVED_SPTE}
        assert kvm.host.kernel.in_use == in_use - 1 and kvm.host.kernel.free_list[-1] == l1
        check_tables(kvm, v.root)

    def test_split_page_stats(self):
        kvm, v, hva = self._vm_2m()
        v.kvm_mmu_page_fault(0x234000, PFERR_USER_MASK)
        v.kvm_mmu_page_fault(0x434000, PFERR_USER_MASK)
        assert (kvm.stat["pages_2m"], kvm.stat["pages_4k"]) == (2, 0)
        self._split(kvm, v, 0x234)
        assert (kvm.stat["pages_2m"], kvm.stat["pages_4k"]) == (1, 512)
        check_tables(kvm, v.root)
