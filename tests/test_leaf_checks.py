"""The invariant checker looks at every present leaf whole (emu.checkers.check.leaf_problem): its
size and alignment, the memslot under all of it, its backing page for page, the read-only
memslot and NX huge page rules, and the attributes under a huge leaf.  Each case runs a guest,
finds the checker clean, breaks one leaf the way a KVM bug would, and expects the exact line; the
run-time check on every installed leaf is shown with a make_spte() that forgets a rule."""

from pathlib import Path

import pytest

from emu.checkers.check import check_vm, check_step, leaf_problem
from emu.kvm import tdp_mmu
from emu.kvm.spte import PT_WRITABLE_MASK, shadow_x_mask
from emu.kvm.uapi import KVM_MEM_READONLY
from emu.userspace.vmm import Machine

REPO = Path(__file__).resolve().parent.parent
NX = dict(vm="default", vcpus=2, hugepages="2m", nx_huge_pages=True)


def _run(guest, **kw):
    m = Machine(guest, **kw)
    res = m.run()
    assert res.ok, res.error
    assert check_vm(m.kvm) == [] and check_step(m.kvm) == []
    return m


def _leaf(m, gfn, mirror=False):
    """(sptep, spte) of the leaf of ``gfn`` in the (mirror) root."""
    kvm = m.kvm
    root = next(r for r in kvm.tdp_mmu.roots if not r.invalid and r.is_mirror == mirror)
    gfn |= kvm.tdp_mmu.gfn_root_bits(root)  # (a TD's shared GFNs: the shared bit indexes the direct root)
    table, level = root.spt, root.role_level
    while True:
        sptep = table + ((gfn >> (9 * (level - 1))) & 511) * 8
        spte = kvm.mem.read64(sptep)
        if level == 1 or spte & (1 << 7):
            return sptep, spte
        table, level = spte & 0xFFFFFFFFFF000, level - 1


def _break(m, gfn, fn, mirror=False):
    sptep, spte = _leaf(m, gfn, mirror)
    m.kvm.mem.write64(sptep, fn(spte))
    return check_vm(m.kvm)


def test_an_executable_huge_leaf_under_the_nx_mitigation():
    m = _run("nxhuge", **NX)
    assert _break(m, 0x3C00, lambda s: s | shadow_x_mask)[0] == (
        "the 2M leaf at gfn 0x3c00 is executable, with the NX huge page mitigation on"
    )


@pytest.mark.parametrize("delta", [1, 512])
def test_a_huge_leaf_maps_its_backing_aligned(delta):
    m = _run("nxhuge", **NX)
    base = m.kvm.host.mm.lookup(m.kvm.memslots[0].userspace_addr + (0x3C00 << 12))
    problems = _break(m, 0x3C00, lambda s: s + (delta << 12))
    if delta == 1:
        assert problems[0] == f"the 2M leaf at gfn 0x3c00 maps pfn {base + 1:#x}: not aligned to its size"
    else:
        assert (
            problems[0] == f"gfn 0x3c00 (2M leaf at gfn 0x3c00) maps pfn {base + 512:#x}, its backing is pfn {base:#x}"
        )
    # (the vCPUs' TLBs still hold the old translation: the TLB check says so too)
    assert all(p.startswith("vCPU ") for p in problems[1:])


def test_a_huge_leaf_over_backing_that_is_not_contiguous(monkeypatch):
    """The VMM's page 7 of a 2M range is another frame now (its page tables say so; no
    mmu_notifier told KVM): the leaf maps the old one there.  Only a page-by-page check sees it."""
    m = _run("nxhuge", **NX)
    kvm = m.kvm
    mm = kvm.host.mm
    hva = kvm.memslots[0].userspace_addr + ((0x3C00 + 7) << 12)
    real = mm.lookup
    monkeypatch.setattr(mm, "lookup", lambda a: real(a) + 0x1000 if a == hva else real(a))
    base = real(hva - (7 << 12))
    assert check_vm(kvm) == [
        f"gfn 0x3c07 (2M leaf at gfn 0x3c00) maps pfn {base + 7:#x}, its backing is pfn {base + 7 + 0x1000:#x}"
    ]


def test_a_huge_leaf_past_the_end_of_its_memslot():
    m = _run("nxhuge", **NX)
    m.kvm.memslots[0].npages = 0x3C00 + 0x100  # the slot now ends in the middle of the 2M leaf
    problems = check_vm(m.kvm)
    assert "the 2M leaf at gfn 0x3c00 reaches past the end of memslot 0 (gfn 0x0-0x3d00)" in problems


@pytest.mark.parametrize("mirror", [False, True])
def test_a_huge_leaf_larger_than_the_page_behind_it(mirror):
    """host_pfn_mapping_level(): a shared 2M leaf needs the host's page to be 2M; a private one
    guest_memfd's and TDX's limit too (4K without --tdx-huge-pages)."""
    if mirror:
        m = _run("hpaccept", vm="tdx", hugepages="2m", tdx_huge_pages=True)
        m.kvm.x86_ops.tdx_huge_page = False
        line = "the 2M private leaf at gfn 0x2400 is larger than the 4K pages its guest_memfd allows"
    else:
        m = _run("nxhuge", **NX)
        m.kvm.memslots[0].backing_level = 1
        line = "the 2M shared leaf at gfn 0x3c00 is larger than the 4K pages its host mapping allows"
    assert line in check_vm(m.kvm)


def test_a_writable_leaf_of_a_read_only_memslot():
    m = _run("nxhuge", **NX)
    m.kvm.memslots[0].flags |= KVM_MEM_READONLY
    problems = check_vm(m.kvm)
    assert "gfn 0x3c00 of read-only memslot 0 is mapped writable" in problems
    # Read-only leaves pass (the vCPUs' TLBs still hold writable translations: the TLB check says so).
    for root in m.kvm.tdp_mmu.roots:
        for gfn, level, spte in m.kvm.tdp_mmu.leaves(root):
            _break(m, gfn, lambda s: s & ~PT_WRITABLE_MASK)
    assert [p for p in check_vm(m.kvm) if not p.startswith("vCPU ")] == []


@pytest.mark.parametrize(
    "vm, mirror, gfn", [("sw-protected", False, 0x2000), ("tdx", False, 0x2000), ("tdx", True, 0x2400)]
)
def test_a_huge_leaf_over_mixed_attributes(vm, mirror, gfn):
    """A page in the middle of a huge leaf changed attribute without the zap (KVM_LPAGE_MIXED_FLAG
    upstream keeps such a range at 4K)."""
    kw = dict(vm=vm, hugepages="2m", tdx_huge_pages=True) if vm == "tdx" else dict(vm=vm, hugepages="2m")
    m = _run("hpaccept" if mirror else "hugemap", **kw)
    kvm = m.kvm
    assert _leaf(m, gfn, mirror)[1] & (1 << 7)  # a 2M leaf
    g = gfn + 0x10
    if mirror:
        kvm.private_gfns.remove(g, g + 1)
    else:
        kvm.private_gfns.add(g, g + 1)
    kind = "private" if mirror else "shared"
    assert f"the 2M {kind} leaf at gfn {gfn:#x} covers GFNs of both attributes" in check_vm(kvm)


def test_the_checks_agree_with_the_leaf_check_on_unbroken_leaves():
    m = _run("hpaccept", vm="tdx", hugepages="2m", tdx_huge_pages=True)
    kvm = m.kvm
    for root in kvm.tdp_mmu.roots:
        for gfn, level, spte in kvm.tdp_mmu.leaves(root):
            assert leaf_problem(kvm, root.is_mirror, gfn, level, spte) is None


def test_a_leaf_installed_wrong_fails_the_run(monkeypatch):
    """The run-time check on every installed leaf: a make_spte() that forgets the NX huge page
    rule (a huge leaf stays executable) stops the run at the first such leaf."""
    real = tdp_mmu.make_spte

    def make_spte(level, pfn, pte_access, mt_mask, host_writable=True, prefetch=False, nx_huge_pages=False):
        spte, wrprot = real(level, pfn, pte_access, mt_mask, host_writable, prefetch, nx_huge_pages)
        return (spte | shadow_x_mask if level > 1 else spte), wrprot

    monkeypatch.setattr(tdp_mmu, "make_spte", make_spte)
    m = Machine("nxhuge", **NX)
    res = m.run()
    assert not res.ok
    assert m.kvm.violations[0].startswith("a leaf SPTE was installed wrong: the 2M leaf at gfn ")
    assert m.kvm.violations[0].endswith(" is executable, with the NX huge page mitigation on")


# -- ranges a conversion or a hole punch unmapped, checked before the invalidation ends ----------------
@pytest.mark.parametrize(
    "guest, kw, gpa, what, root",
    [
        ("convert", dict(vm="tdx"), None, "KVM_SET_MEMORY_ATTRIBUTES", "mirror"),
        (
            "sharedrw",
            dict(vm="sw-protected", vcpus=2, host_events=["private 0x1c00000-0x1c02000@300"]),
            0x1C00000,
            "KVM_SET_MEMORY_ATTRIBUTES",
            "direct",
        ),
        (
            "hppunch",
            dict(vm="tdx", hugepages="2m", tdx_huge_pages=True, host_events=["punch 0x2405000-0x2406000@60"]),
            0x2405000,
            "fallocate(PUNCH_HOLE) on guest_memfd",
            "mirror",
        ),
    ],
)
def test_a_range_left_mapped_after_its_zap_fails_the_run(monkeypatch, guest, kw, gpa, what, root):
    """An unmap that forgets the roots it was asked for (kvm_gfn_range_filter_to_root_types() gone
    wrong): the check before kvm_mmu_invalidate_end() finds the leaf left in the range."""
    real = tdp_mmu.TdpMmu.unmap_gfn_range
    skipped = []

    def unmap_gfn_range(self, start, end, types, flush):
        if (start == gpa >> 12) if gpa is not None else types == tdp_mmu.KVM_MIRROR_ROOTS:
            skipped.append((start, end))
            return flush  # the zap forgets this range
        return real(self, start, end, types, flush)

    monkeypatch.setattr(tdp_mmu.TdpMmu, "unmap_gfn_range", unmap_gfn_range)
    m = Machine(guest, **kw)
    res = m.run()
    assert skipped and res.exit == "checker", res.error
    v = m.kvm.violations[0]
    assert v.startswith(f"{what} unmapped gfn 0x") and f"but the {root} root still maps gfn 0x" in v, v


def test_run_checks_the_invariants_at_the_end(monkeypatch):
    """`run` (and GuestVM.run) check the quiescence invariants when the run ends well: an SPTE left
    frozen is reported as the run's error (exit checker), not only by explore."""
    from emu.kvm.spte import REMOVED_SPTE
    from emu.selftest import GuestVM, UCALL_SYNC

    for check_at_end in (False, True):
        vm = GuestVM(REPO / "tests" / "guests" / "counter.c")

        @vm.on_ucall
        def host(vcpu, uc):
            if uc.cmd == UCALL_SYNC and uc.stage == 10:  # the guest's last sync: freeze an unused SPTE
                kvm = vm.machine.kvm
                root = vm.machine.vcpus[0].root
                kvm.mem.write64(root.spt + 300 * 8, REMOVED_SPTE)

        if check_at_end:
            run = vm.run()
            assert run.exit == "checker"
            assert run.error.startswith("checker: at the end of the run: direct root: SPTE at ")
            assert run.error.endswith("(level 4) left REMOVED")
        else:
            vm.machine.check_at_end = False
            res = vm.machine.run()
            assert res.ok and check_vm(vm.machine.kvm) != []


def test_the_page_stats_count_the_leaves():
    """kvm_update_page_stats(): a leaf made or zapped without it leaves the stats wrong."""
    m = _run("hugemap", vm="tdx", hugepages="2m", vcpus=2)
    kvm = m.kvm
    assert (kvm.stat["pages_4k"], kvm.stat["pages_2m"]) == (17, 1)
    kvm.stat["pages_2m"] -= 1
    assert check_vm(kvm) == ["KVM's pages_2m stat is 0, the roots have 1 2M leaves"]
