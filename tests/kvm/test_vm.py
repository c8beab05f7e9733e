"""Whole VMs (emu.userspace.vmm.Machine over emu.kvm.Kvm): guests through the real EPT-violation path.

Checks, with expectations computed independently from the guests' sources, ELF symbols and the
boot layout:
  - each guest's reports; every 4K guest page touched takes exactly one EPT violation and becomes
    exactly one leaf (fewer, bigger leaves with 2M/1G backing);
  - zap + remote TLB flush: leaves go, every vCPU gets KVM_REQ_TLB_FLUSH, a re-run faults the same
    pages again, and a GPA re-pointed at another host page is never read through a stale TLB entry;
  - guest errors end in one clear exit (MMIO with GPA/rip/instruction, read-only write, #UD, FAIL);
  - KVM_BUG_ON kills the VM; VM destroy gives every page back; memslot ioctl errors.
"""

import pytest

import emu.userspace.vmm as vmm
from emu.host import Host, MiB
from emu.kvm.kvm import (
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    Kvm,
    KvmIoctlError,
    KVM_EXIT_HLT,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_MMIO,
    KVM_MEM_READONLY,
    KVM_REQ_TLB_FLUSH,
)
from emu.checkers.check import check_vm
from emu.kvm.mmu import handle_mmio_page_fault, RET_PF_EMULATE, RET_PF_INVALID
from emu.kvm.spte import SHADOW_NONPRESENT_VALUE, is_mmio_spte, make_mmio_spte

from kvmhelpers import (
    TEST_GUESTS,
    check_tables,
    iter_at,
    fnv1a64,
    hello_string,
    equ,
    expected_touched_pages,
    record_violations,
    fresh_regs,
)

PROBE = 0x2000000


def leaves_of(m):
    return m.kvm.tdp_mmu.leaves(m.vcpus[0].root)


def assert_one_violation_per_page(m, res, seen, expected_pages, level=1):
    """violations == leaves == pages_mapped, every leaf a page first touched once."""
    leaves = leaves_of(m)
    s = res.stats
    mask = ~((1 << (9 * (level - 1))) - 1)
    frames = {g & mask for g in expected_pages}
    assert {lvl for _, lvl, _ in leaves} == {level}
    assert sorted(g for g, _, _ in leaves) == sorted(frames)
    assert s["ept_violations"] == len(leaves) == s["pages_mapped"][{1: "4k", 2: "2m", 3: "1g"}[level]]
    assert sum(s["pages_mapped"].values()) == len(leaves)
    assert s["pf_fixed"] == len(leaves) and s["pf_retry"] == s["pf_spurious"] == s["ept_misconfigs"] == 0
    assert sorted(g & mask for g in seen) == sorted(g for g, _, _ in leaves)  # each faulted once


class TestGuests:
    """The three guests of guest/ on the real fault path."""

    @pytest.mark.parametrize("vcpus", [1, 2])
    def test_hello(self, make_machine, vcpus):
        m = make_machine("hello", vcpus=vcpus)
        seen = record_violations(m)
        res = m.run()
        assert (res.exit, res.error) == ("hlt", None)
        h = fnv1a64(hello_string())
        assert res.reports == [(i, h) for i in range(vcpus)]
        assert res.vcpu_exits == ["hlt"] * vcpus
        expected = expected_touched_pages(m, "hello")
        assert len(expected) == 6 + vcpus
        assert_one_violation_per_page(m, res, seen, expected)

    @pytest.mark.parametrize("vcpus", [1, 2, 3])
    def test_touch(self, make_machine, vcpus):
        m = make_machine("touch", vcpus=vcpus)
        seen = record_violations(m)
        res = m.run()
        assert res.exit == "hlt", res.error
        n = equ("touch.S", "TOUCH_PAGES")
        assert n == 32
        exp = {}
        for i in range(vcpus):
            mine = range(i, n, vcpus)
            exp[i] = [len(mine), sum(p * 0x1000 + 0x5A for p in mine)]
        got = {i: [v for c, v in res.reports if c == i] for i in range(vcpus)}
        assert got == exp
        if vcpus == 1:
            assert got[0] == [32, 0x1F0B40]
        assert_one_violation_per_page(m, res, seen, expected_touched_pages(m, "touch"))

    def test_pagewalk(self, make_machine):
        m = make_machine("pagewalk")
        seen = record_violations(m)
        res = m.run()
        assert res.exit == "hlt", res.error
        values = [equ("pagewalk.S", f"V{i}") for i in (1, 2, 3, 4)]
        assert values == [0x4B1DFACE00000001, 0x4B1DFACE00000002, 0x4B1DFACE00000003, 0x4B1DFACE00000004]
        assert [v for _, v in res.reports] == [m.image.symbol("pt_pool")] + values
        assert_one_violation_per_page(m, res, seen, expected_touched_pages(m, "pagewalk"))

    @pytest.mark.parametrize("guest", ["hello", "touch", "pagewalk"])
    @pytest.mark.parametrize("hugepages,mem,level", [("2m", 64 * MiB, 2), ("1g", 2048 * MiB, 3)])
    def test_huge_backing(self, make_machine, guest, hugepages, mem, level):
        small = make_machine(guest, mem=mem)
        r_small = small.run()
        m = make_machine(guest, hugepages=hugepages, mem=mem)
        seen = record_violations(m)
        res = m.run()
        assert res.exit == "hlt", res.error
        assert res.reports == r_small.reports
        assert res.stats["ept_violations"] < r_small.stats["ept_violations"]
        assert_one_violation_per_page(m, res, seen, expected_touched_pages(m, guest), level=level)

    def test_report_values_survive_as_json(self, make_machine):
        res = make_machine("touch").run()
        j = res.as_json()
        assert j["exit"] == "hlt" and j["error"] is None
        assert j["reports"] == [32, 0x1F0B40] and j["report_vcpus"] == [0, 0]
        assert j["stats"]["ept_violations"] == 38
        assert j["vcpus"][0]["rip"] == res.vcpus[0]["rip"]


class TestZapRefault:
    """kvm.zap_gfn_range: leaves gone, flush requested on every vCPU, the same pages fault again."""

    @pytest.mark.parametrize("guest,vcpus", [("hello", 2), ("touch", 2), ("hello", 1)])
    def test_zap_then_refault(self, make_machine, guest, vcpus):
        m = make_machine(guest, vcpus=vcpus)
        kvm = m.kvm
        seen = record_violations(m)
        first = m.run()
        assert first.exit == "hlt", first.error
        pages = sorted(g for g, _, _ in leaves_of(m))
        slots = [iter_at(kvm, m.vcpus[0].root, g).sptep for g in pages]
        tables = kvm.tdp_mmu.pages
        assert sorted(seen) == pages

        for v in m.vcpus:
            assert v.requests == 0
        kvm.zap_gfn_range(0, 1 << 20)
        assert leaves_of(m) == []
        assert (kvm.stat["pages_4k"], kvm.stat["pages_2m"], kvm.stat["pages_1g"]) == (0, 0, 0)
        assert all(kvm.mem.read64(p) == SHADOW_NONPRESENT_VALUE for p in slots)
        assert kvm.tdp_mmu.pages == tables  # a leaf zap keeps the tables
        assert kvm.stat["remote_tlb_flush"] == 1
        for v in m.vcpus:
            assert v.requests & KVM_REQ_TLB_FLUSH

        if guest == "touch":  # the guest checks its pages start zeroed
            area = m.image.symbol("touch_area")
            m.write_gpa(area, bytes(32 * 4096))
        fresh_regs(m)
        seen.clear()
        second = m.run()
        assert second.exit == "hlt", second.error
        assert second.reports == first.reports
        assert sorted(seen) == pages  # every page faulted again, once
        assert sorted(g for g, _, _ in leaves_of(m)) == pages
        assert second.stats["ept_violations"] == 2 * len(pages)
        assert all(v.stat["tlb_flush"] == 1 and v.requests == 0 for v in m.vcpus)
        check_tables(kvm, m.vcpus[0].root)


class TestNoStaleTranslation:
    """After a zap + flush, the guest's next access translates through the new mapping."""

    def _repoint(self, m, gpa, new_hpa):
        """Delete slot 0 and re-add it in three pieces, the page at ``gpa`` backed by ``new_hpa``
        (KVM_SET_USER_MEMORY_REGION: delete, then create; the delete zaps and flushes)."""
        kvm = m.kvm
        kvm.set_user_memory_region(0, 0, 0, 0, 0)
        kvm.set_user_memory_region(0, 0, 0, gpa, m.hva)
        kvm.set_user_memory_region(1, 0, gpa, 4096, new_hpa)
        kvm.set_user_memory_region(2, 0, gpa + 4096, m.mem_size - gpa - 4096, m.hva + gpa + 4096)

    @pytest.mark.parametrize(
        "guest,symbol,new_page",
        [
            ("stale.S", "target", (0x2222).to_bytes(8, "little")),  # a data read
            ("stale_code.S", "fn", bytes.fromhex("b822220000c3")),  # a fetch: mov eax, 0x2222; ret
        ],
    )
    def test_access_after_repoint_uses_new_page(self, make_machine, guest, symbol, new_page):
        m = make_machine(TEST_GUESTS / guest)
        v, kvm = m.vcpus[0], m.kvm
        gpa = m.image.symbol(symbol)
        assert gpa % 4096 == 0
        # The new host page is written before the guest runs at all: between the two accesses
        # nothing changes but the memslots (so only the zap + TLB flush can make the guest see it).
        new_hpa = m.host.mmap(4096)
        m.host.mem.write(new_hpa, new_page)
        run = v.run()
        assert run.exit_reason == KVM_EXIT_HYPERCALL and run.args[0] == 0x1111
        assert kvm.get_leaf_spte(v, gpa) >> 12 & 0xFFFFFFFFF == (m.hva + gpa) >> 12
        flushes = kvm.stat["remote_tlb_flush"]
        root = v.root
        self._repoint(m, gpa, new_hpa)
        # kvm_mmu_zap_all_fast(): no remote flush; the root is obsolete and the vCPU asked to
        # drop it (it loads a new one with a local flush, kvm_mmu_load()).
        assert kvm.stat["remote_tlb_flush"] == flushes and v.requests & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
        assert root.invalid
        old = m.host.mem.read(m.hva + gpa, 8)
        run = v.run()
        assert run.exit_reason == KVM_EXIT_HYPERCALL and run.args[0] == 0x2222
        assert v.root is not root
        assert kvm.get_leaf_spte(v, gpa) >> 12 & 0xFFFFFFFFF == new_hpa >> 12
        assert m.host.mem.read(m.hva + gpa, 8) == old  # the old page is untouched
        assert v.run().exit_reason == KVM_EXIT_HLT
        check_tables(kvm, v.root)

    def test_zap_and_rewrite_same_page(self, make_machine):
        """Zap one GPA, change what the host page holds, re-run: the guest reads the new bytes."""
        m = make_machine(TEST_GUESTS / "stale.S")
        v, kvm = m.vcpus[0], m.kvm
        target = m.image.symbol("target")
        assert v.run().args[0] == 0x1111
        kvm.zap_gfn_range(target >> 12, (target >> 12) + 1)
        assert kvm.get_leaf_spte(v, target) == SHADOW_NONPRESENT_VALUE
        m.write_gpa(target, (0x3333).to_bytes(8, "little"))
        violations = v.stat["ept_violations"]
        assert v.run().args[0] == 0x3333
        assert v.stat["ept_violations"] == violations + 1  # faulted in again


def split_slots(m, hole_start, hole_end, hole_flags=None):
    """Slot 0 = [0, hole_start), slot 1 = [hole_end, mem); the hole gets slot 2 with
    ``hole_flags`` when not None."""
    kvm = m.kvm
    kvm.set_user_memory_region(0, 0, 0, 0, 0)
    kvm.set_user_memory_region(0, 0, 0, hole_start, m.hva)
    kvm.set_user_memory_region(1, 0, hole_end, m.mem_size - hole_end, m.hva + hole_end)
    if hole_flags is not None:
        kvm.set_user_memory_region(2, hole_flags, hole_start, hole_end - hole_start, m.hva + hole_start)


class TestGuestErrors:
    """Errors a guest can cause end the run with one clear, exact description."""

    def test_read_outside_memslots_is_mmio(self, make_machine):
        m = make_machine(TEST_GUESTS / "probe.S")
        split_slots(m, 32 * MiB, 48 * MiB)
        res = m.run()
        entry = m.image.entry
        assert res.exit == "mmio" and res.vcpu_exits == ["mmio"]
        assert res.error == (
            f"vCPU 0: read of GPA {PROBE:#x} (no memslot, MMIO with no device) at rip "
            f"{entry:#x} _start+0x0: mov rax, qword ptr [{PROBE:#x}]"
        )
        assert res.reports == []
        v = m.vcpus[0]
        assert v.kvm_run.exit_reason == KVM_EXIT_MMIO and v.kvm_run.phys_addr == PROBE
        assert m.kvm.get_leaf_spte(v, PROBE) == make_mmio_spte(PROBE >> 12, m.kvm.memslots_generation)
        assert (res.stats["pf_emulate"], res.stats["ept_misconfigs"]) == (1, 0)
        assert m.kvm.stat["pages_4k"] == res.stats["ept_violations"] - 1

    def test_second_mmio_access_is_an_ept_misconfig(self, make_machine):
        """The cached MMIO SPTE (W|X) makes the next access an EPT misconfig, emulated again."""
        m = make_machine(TEST_GUESTS / "probe.S")
        split_slots(m, 32 * MiB, 48 * MiB)
        first = m.run()
        violations = first.stats["ept_violations"]
        second = m.run()
        assert second.exit == "mmio" and second.error == first.error
        assert second.stats["ept_misconfigs"] == 1
        assert second.stats["ept_violations"] == violations
        assert second.stats["pf_emulate"] == 1  # handle_mmio_page_fault: no new fault taken

    def test_mmio_spte_is_stale_after_memslot_creation(self, make_machine):
        m = make_machine(TEST_GUESTS / "probe.S")
        split_slots(m, 32 * MiB, 48 * MiB)
        assert m.run().exit == "mmio"
        m.write_gpa(PROBE, (0x77).to_bytes(8, "little"))
        m.kvm.set_user_memory_region(2, 0, 32 * MiB, 16 * MiB, m.hva + 32 * MiB)
        res = m.run()
        assert (res.exit, res.error) == ("hlt", None)
        assert [v for _, v in res.reports] == [0x77, 0x5157]

    def test_writable_slot_in_the_hole(self, make_machine):
        m = make_machine(TEST_GUESTS / "probe.S")
        split_slots(m, 32 * MiB, 48 * MiB, hole_flags=0)
        m.write_gpa(PROBE, (0x1234).to_bytes(8, "little"))
        res = m.run()
        assert (res.exit, res.error) == ("hlt", None)
        assert [v for _, v in res.reports] == [0x1234, 0x5157]
        assert m.read_gpa(PROBE, 8) == (0x5157).to_bytes(8, "little")
        check_tables(m.kvm, m.vcpus[0].root)

    def test_write_to_readonly_memslot(self, make_machine):
        m = make_machine(TEST_GUESTS / "probe.S")
        split_slots(m, 32 * MiB, 48 * MiB, hole_flags=KVM_MEM_READONLY)
        m.write_gpa(PROBE, (0x1234).to_bytes(8, "little"))
        res = m.run()
        assert res.exit == "mmio"
        assert [v for _, v in res.reports] == [0x1234]  # reading it works
        rip = m.vcpus[0].hw.reg("rip")
        sym = m.image.symbolize(rip)
        assert res.error == (
            f"vCPU 0: write to GPA {PROBE:#x} (a read-only memslot, MMIO with no device) "
            f"at rip {rip:#x} {sym}: mov qword ptr [{PROBE:#x}], rbx"
        )
        assert m.vcpus[0].kvm_run.is_write is True
        assert m.read_gpa(PROBE, 8) == (0x1234).to_bytes(8, "little")  # nothing written
        # the read mapped the page without write permission (host-writable clear)
        check_tables(m.kvm, m.vcpus[0].root)
        assert res.stats["pf_emulate"] == 1

    def test_ud2_is_a_shutdown(self, make_machine):
        m = make_machine(TEST_GUESTS / "ud.S")
        res = m.run()
        rip = m.image.entry + 1
        assert res.exit == "shutdown"
        assert res.error == (
            f"vCPU 0: unhandled guest exception #UD at rip {rip:#x} _start+0x1: ud2 (no IDT: triple fault)"
        )
        assert m.vcpus[0].kvm_run.vector == 6

    def test_unmapped_gva_is_a_guest_page_fault(self, make_machine):
        """With 8 MiB the loader's identity map ends below PROBE: a guest #PF, not an EPT exit."""
        m = make_machine(TEST_GUESTS / "probe.S", mem=8 * MiB)
        res = m.run()
        entry = m.image.entry
        assert res.exit == "shutdown"
        assert res.error == (
            f"vCPU 0: unhandled guest exception #PF error code 0x0 cr2 {PROBE:#x} at rip "
            f"{entry:#x} _start+0x0: mov rax, qword ptr [{PROBE:#x}] (no IDT: triple fault)"
        )
        run = m.vcpus[0].kvm_run
        assert (run.vector, run.error_code, run.cr2) == (14, 0, PROBE)
        assert res.stats["pf_emulate"] == 0 and m.kvm.gfn_to_memslot(PROBE >> 12) is None

    def test_guest_fail(self, make_machine):
        m = make_machine(TEST_GUESTS / "fail.S")
        res = m.run()
        assert res.exit == "fail" and not res.ok
        assert res.reports == [(0, 7)]
        assert res.error == "vCPU 0: the guest failed with code 0x2a (FAIL at _start+0x15)"
        assert res.vcpu_exits == ["fail"]

    def test_guest_fail_register_dump(self, make_machine):
        m = make_machine(TEST_GUESTS / "fail.S")
        res = m.run()
        regs = res.vcpus[0]
        top = m.boot.stack_range(0)[1]
        # runtime.S, emu_fail: registers restored before the final HLT: RDI = code, RSP one
        # return address lower, RIP inside emu_fail; RAX/RBX as the guest left them (0 here).
        assert (regs["rdi"], regs["rsp"], regs["rax"], regs["rbx"]) == (0x2A, top - 8, 0, 0)
        assert m.image.symbolize(regs["rip"]).startswith("emu_fail")


class TestVmDead:
    """KVM_BUG_ON marks the VM dead: every KVM_RUN fails with -EIO (kvm_vcpu_ioctl() checks
    kvm->vm_dead; vcpu_enter_guest() KVM_REQ_VM_DEAD), and the VMM reports the failed ioctl."""

    def test_kvm_bug_then_run(self, make_machine):
        m = make_machine("hello", vcpus=2)
        m.kvm.kvm_bug("test")
        for v in m.vcpus:
            with pytest.raises(KvmIoctlError) as e:
                v.run()
            assert e.value.errno == 5  # EIO
            assert str(e.value) == "the VM is dead (KVM_BUG_ON: test) (-EIO)"
            assert v.stat["exits"] == 0  # never entered the guest
        assert m.kvm.stat["kvm_bug_on"] == 1

    def test_first_reason_is_kept(self, make_machine):
        m = make_machine("hello")
        assert m.kvm.KVM_BUG_ON(False, "not a bug") is False and not m.kvm.vm_dead
        assert m.kvm.KVM_BUG_ON(1, "first") is True
        m.kvm.kvm_bug("second")
        res = m.run()
        assert res.exit == "ioctl_error" and res.vcpu_exits == ["ioctl_error"]
        assert res.error == "vCPU 0: KVM_RUN failed: the VM is dead (KVM_BUG_ON: first) (-EIO)"
        assert res.stats["kvm_bug_on"] == 2

    def test_bug_during_run_stops_the_vcpu(self, make_machine, monkeypatch):
        m = make_machine("hello")
        kvm = m.kvm
        real = kvm.tdp_mmu.map
        calls = []

        def map_then_bug(vcpu, fault):
            calls.append(fault.gfn)
            r = real(vcpu, fault)
            if len(calls) == 2:
                kvm.kvm_bug(f"injected at gfn {fault.gfn:#x}")
            return r

        monkeypatch.setattr(kvm.tdp_mmu, "map", map_then_bug)
        res = m.run()
        assert res.exit == "ioctl_error"
        assert res.error == (
            f"vCPU 0: KVM_RUN failed: the VM is dead (KVM_BUG_ON: injected at gfn {calls[1]:#x}) (-EIO)"
        )
        assert len(calls) == 2 and res.reports == []


class TestDestroy:
    """kvm_destroy_vm: every page-table page and cache page goes back to the host allocator."""

    def _check_all_freed(self, m):
        kvm, alloc = m.kvm, m.host.kernel
        assert alloc.in_use == 0
        handed_out = list(range(alloc.base, alloc.next, 4096))
        assert sorted(alloc.free_list) == handed_out  # each page exactly once: no leak, no double free
        assert kvm.tdp_mmu.roots == [] and kvm.tdp_mmu.sp_of == {} and kvm.tdp_mmu.pages == 0
        assert (kvm.stat["pages_4k"], kvm.stat["pages_2m"], kvm.stat["pages_1g"]) == (0, 0, 0)
        assert all(v.root is None and v.mmu_shadow_page_cache.objects == [] for v in m.vcpus)
        assert kvm.rcu.pending == [] and kvm.rcu.depth == {}
        assert m.host.leaked == []

    @pytest.mark.parametrize(
        "guest,vcpus,hugepages", [("hello", 1, None), ("touch", 3, None), ("pagewalk", 1, None), ("touch", 2, "2m")]
    )
    def test_destroy_after_run(self, make_machine, guest, vcpus, hugepages):
        m = make_machine(guest, vcpus=vcpus, hugepages=hugepages)
        assert m.run().exit == "hlt"
        assert m.host.kernel.in_use > 0
        m.destroy()
        self._check_all_freed(m)

    def test_destroy_after_zap_and_mmio(self, make_machine):
        m = make_machine(TEST_GUESTS / "probe.S")
        split_slots(m, 32 * MiB, 48 * MiB)
        assert m.run().exit == "mmio"
        m.kvm.zap_gfn_range(0, 1 << 20)
        m.destroy()
        self._check_all_freed(m)

    def test_destroy_never_run(self, make_machine):
        m = make_machine("hello", vcpus=2)
        m.destroy()
        self._check_all_freed(m)
        assert m.host.kernel.next == m.host.kernel.base  # nothing was ever allocated


@pytest.mark.parametrize("mem", [8 * MiB, 64 * MiB, 66 * MiB])
@pytest.mark.parametrize("hugepages", [None, "2m"])
def test_machine_default_backing_builds_host(mem, hugepages):
    """Regression: Host(mem + 4096) once had a kernel region that was not a whole number of pages."""
    m = vmm.Machine("hello", mem=mem, hugepages=hugepages)
    assert m.host.user_base % 4096 == 0 and m.host.mem.size % 4096 == 0
    assert m.hva % (4096 if hugepages is None else 2 * MiB) == 0
    res = m.run()
    assert (res.exit, res.reports) == ("hlt", [(0, fnv1a64(hello_string()))])


class TestMemslotIoctl:
    """KVM_SET_USER_MEMORY_REGION errors (virt/kvm/kvm_main.c: __kvm_set_memory_region)."""

    def _kvm(self):
        host = Host(8 * MiB)
        kvm = Kvm(host)
        return kvm, host.mmap(8 * MiB)

    @pytest.mark.parametrize("gpa,size,hva_off", [(0x800, 4096, 0), (0, 4095, 0), (0, 4096, 0x10)])
    def test_unaligned_is_einval(self, gpa, size, hva_off):
        kvm, hva = self._kvm()
        with pytest.raises(KvmIoctlError) as e:
            kvm.set_user_memory_region(0, 0, gpa, size, hva + hva_off)
        assert e.value.errno == 22 and kvm.memslots == []

    def test_overlap_is_eexist(self):
        kvm, hva = self._kvm()
        kvm.set_user_memory_region(0, 0, 0x100000, 0x100000, hva)
        for gpa, size in ((0x1FF000, 0x2000), (0, 0x101000), (0x180000, 0x1000)):
            with pytest.raises(KvmIoctlError) as e:
                kvm.set_user_memory_region(1, 0, gpa, size, hva)
            assert e.value.errno == 17
        kvm.set_user_memory_region(1, 0, 0x200000, 0x1000, hva)  # adjacent is fine
        assert [s.id for s in kvm.memslots] == [0, 1]

    def test_delete_missing_is_einval_and_beyond_host_is_efault(self):
        kvm, hva = self._kvm()
        with pytest.raises(KvmIoctlError) as e:
            kvm.set_user_memory_region(3, 0, 0, 0, 0)
        assert e.value.errno == 22
        with pytest.raises(KvmIoctlError) as e:
            kvm.set_user_memory_region(0, 0, 0, 16 * MiB, hva)
        assert e.value.errno == 14

    def test_delete_zaps_the_slot_and_flushes(self, make_machine):
        m = make_machine("hello")
        assert m.run().exit == "hlt"
        kvm = m.kvm
        assert kvm.stat["pages_4k"] == 7
        kvm.set_user_memory_region(0, 0, 0, 0, 0)
        assert kvm.memslots == [] and kvm.stat["pages_4k"] == 0
        # kvm_mmu_zap_all_fast(): the vCPU drops its obsolete root instead of a remote flush.
        assert kvm.stat["remote_tlb_flush"] == 0 and m.vcpus[0].requests & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS
        assert leaves_of(m) == []


class TestMmioSpteGeneration:
    """MMIO SPTEs and the memslots generation (kvm_swap_active_memslots(), check_mmio_spte())."""

    def _probed(self, make_machine):
        """probe.S read PROBE, a GPA no memslot covers: its MMIO SPTE is in the tables."""
        m = make_machine(TEST_GUESTS / "probe.S", host_reserve=16 * MiB)
        split_slots(m, 32 * MiB, 48 * MiB)
        assert m.run().exit == "mmio"
        v = m.vcpus[0]
        assert m.kvm.get_leaf_spte(v, PROBE) == make_mmio_spte(PROBE >> 12, m.kvm.memslots_generation)
        return m, v

    def test_the_generation_is_bumped_after_the_srcu_wait(self, make_machine):
        """While the readers of the old memslots are waited for, the generation is still the old one
        and marked in progress: an MMIO SPTE a reader makes then is stale once the wait ends."""
        m, v = self._probed(make_machine)
        kvm = m.kvm
        gen = kvm.memslots_generation
        seen = []
        real = kvm.srcu.synchronize_srcu_expedited

        def sync():
            # A fault that looked up the old memslots (no slot at PROBE) makes its MMIO SPTE now.
            seen.append((kvm.memslots_generation, kvm.memslots_gen_in_progress, handle_mmio_page_fault(v, PROBE)))
            real()

        kvm.srcu.synchronize_srcu_expedited = sync
        kvm.set_user_memory_region(2, 0, 32 * MiB, 16 * MiB, m.hva + 32 * MiB)  # a slot over PROBE
        assert seen == [(gen, True, RET_PF_INVALID)]  # no MMIO SPTE is current meanwhile
        assert (kvm.memslots_generation, kvm.memslots_gen_in_progress) == (gen + 1, False)
        # The SPTE made with the old generation is stale: the next access faults the page in.
        assert handle_mmio_page_fault(v, PROBE) == RET_PF_INVALID
        assert check_vm(kvm) == [] and kvm.violations == []

    def test_a_current_mmio_spte_over_a_memslot_is_reported(self, make_machine):
        """What the wrong order (the generation bumped before the wait) leaves behind: an MMIO SPTE
        of the current generation at a GFN a memslot now covers.  The quiescence check reports it,
        and the run-time check when check_mmio_spte() takes it."""
        m, v = self._probed(make_machine)
        kvm = m.kvm
        kvm.set_user_memory_region(2, 0, 32 * MiB, 16 * MiB, m.hva + 32 * MiB)
        assert check_vm(kvm) == []  # the old MMIO SPTE is stale: fine
        table, level = v.root.spt, v.root.role_level  # down to the MMIO SPTE (not present: a leaf)
        while True:
            sptep = table + ((PROBE >> (12 + 9 * (level - 1))) & 511) * 8
            if is_mmio_spte(kvm.mem.read64(sptep)):
                break
            table, level = kvm.mem.read64(sptep) & 0xFFFFFFFFFF000, level - 1
        kvm.mem.write64(sptep, make_mmio_spte(PROBE >> 12, kvm.memslots_generation))
        gen = kvm.memslots_generation
        assert check_vm(kvm) == [
            f"an MMIO SPTE of the current memslots generation ({gen}) for gfn {PROBE >> 12:#x}, which "
            f"memslot 2 covers: the guest's accesses there are taken for MMIO"
        ]
        assert handle_mmio_page_fault(v, PROBE) == RET_PF_EMULATE
        assert kvm.violations == [
            f"an MMIO SPTE for gfn {PROBE >> 12:#x} was taken as current (memslots generation {gen}), but "
            f"memslot 2 covers the GFN: made while a memslot update was in progress?"
        ]
