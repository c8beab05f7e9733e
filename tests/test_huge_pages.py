"""TDX private huge pages (issue 24): the scenario guests end to end with and without
--tdx-huge-pages, the SEAMCALLs a split makes, the options' errors, the zap checker, the fault
points, and the explorer against the reviewers' races switched in (each found within a minute,
nothing reported without them; the two-vCPU mixed-level accept explored with DPOR)."""

import subprocess
import sys
import time
from collections import Counter

import pytest

from emu.checkers.check import check_vm, check_destroyed
from emu.checkers.explore import Explorer
from emu.kvm.bugs import BUGS
from emu.trace import Tracer, ListSink
from emu.userspace.vmm import Machine, MachineError
from tdxmod import abi as A

HUGE = dict(vm="tdx", hugepages="2m", tdx_huge_pages=True)
VE = A.TD_ATTR_DEBUG  # --sept-ve-disable off: an access to a PENDING page is a #VE
MISMATCH_2M = A.TDX_PAGE_SIZE_MISMATCH | 1
PUNCH = "punch 0x2405000-0x2406000@300"


def emu_cli(*args):
    return subprocess.run([sys.executable, "-m", "emu", *map(str, args)], capture_output=True, text=True, timeout=300)


def run(guest, vcpus=1, **kw):
    """Run ``guest``; the result, and the SEAMCALLs made as Counter((leaf, status, level))."""
    sink = ListSink()
    m = Machine(guest, vcpus=vcpus, tracer=Tracer([sink]), **kw)
    res = m.run()
    assert res.ok, res.error
    assert check_vm(m.kvm) == []
    calls = Counter(
        (e.fields["leaf"], e.fields["status"], e.fields["rcx"] & 7)
        for e in sink.events
        if e.name == "seamcall" and e.fields["leaf"].startswith("TDH_MEM")
    )
    m.destroy()  # (its SEAMCALLs are not counted)
    assert check_destroyed(m.kvm) == []
    return res, calls


def per_vcpu(res):
    out = {}
    for v, value in res.reports:
        out.setdefault(v, []).append(value)
    return out


# ---------------------------------------------------------------------------
# The scenario guests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("vcpus", [1, 2])
def test_hpaccept_one_aug_at_2m(vcpus):
    """With --tdx-huge-pages a 2M ACCEPT's exit is one 2M AUG per vCPU and the ACCEPT returns 0."""
    res, calls = run("hpaccept", vcpus, **HUGE)
    for v, reports in per_vcpu(res).items():
        assert reports == [0, ((v + 1) << 41) + 130816]
    assert calls[("TDH_MEM_PAGE_AUG", "TDX_SUCCESS", 1)] == vcpus
    assert not any(leaf == "TDH_MEM_PAGE_DEMOTE" for leaf, _, _ in calls)


@pytest.mark.parametrize(
    "kw, first",
    [(dict(vm="tdx"), MISMATCH_2M), (dict(vm="default"), 0), (dict(vm="tdx", hugepages="2m"), MISMATCH_2M)],
    ids=["td-4k", "plain", "td-2m-backing-no-option"],
)
def test_hpaccept_without_huge_pages(kw, first):
    """Without the option KVM maps 4K: the 2M ACCEPT is PAGE_SIZE_MISMATCH|1 and the guest accepts 4K."""
    res, calls = run("hpaccept", **kw)
    assert per_vcpu(res)[0] == [first, (1 << 41) + 130816]
    assert not any(leaf == "TDH_MEM_PAGE_AUG" and level == 1 for leaf, _, level in calls)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_hpsplit_demotes_on_a_4k_accept(vcpus):
    """A write to a 2M PENDING page (#VE), the handler's 4K ACCEPT: KVM splits with BLOCK, TRACK,
    DEMOTE (one per vCPU's region), the 4K ACCEPT succeeds, a 2M ACCEPT afterwards is a size mismatch."""
    res, calls = run("hpsplit", vcpus, td_attributes=VE, **HUGE)
    for v, reports in per_vcpu(res).items():
        assert reports == [0, MISMATCH_2M, 0x5050505000000000 + v, 0]
    assert calls[("TDH_MEM_PAGE_DEMOTE", "TDX_SUCCESS", 1)] == vcpus
    assert calls[("TDH_MEM_RANGE_BLOCK", "TDX_SUCCESS", 1)] == vcpus
    assert calls[("TDH_MEM_PAGE_AUG", "TDX_SUCCESS", 1)] == vcpus


@pytest.mark.parametrize("kw", [dict(vm="tdx"), dict(HUGE), dict(vm="default")], ids=["td-4k", "td-huge", "plain"])
def test_hpsplit_elsewhere(kw):
    res, calls = run("hpsplit", **kw)
    expect = [0, 0, 0x5050505000000000, 0] if kw["vm"] == "default" else [0, MISMATCH_2M, 0x5050505000000000, 0]
    assert per_vcpu(res)[0] == expect
    assert not any(leaf == "TDH_MEM_PAGE_DEMOTE" for leaf, _, _ in calls)


@pytest.mark.parametrize("vcpus", [1, 2])
def test_hpconvert_splits_and_zaps_one_page(vcpus):
    """MapGPA of 4K inside a 2M page: tdx_gmem_convert() splits first, the zap removes exactly that
    page (REMOVE at 4K), the other 511 keep their data."""
    res, calls = run("hpconvert", vcpus, **HUGE)
    for v, reports in per_vcpu(res).items():
        assert reports == [((v + 1) << 32) * 511 + 130816 - 5, 0x5AD0 + v, 0, 0]
    assert calls[("TDH_MEM_PAGE_DEMOTE", "TDX_SUCCESS", 1)] == vcpus
    assert not any(leaf == "TDH_MEM_PAGE_REMOVE" and level == 1 for leaf, _, level in calls)


def test_hpconvert_4k():
    res, _ = run("hpconvert", vm="tdx")
    assert per_vcpu(res)[0] == [(1 << 32) * 511 + 130816 - 5, 0x5AD0, 0, 0]


@pytest.mark.parametrize("kw", [HUGE, dict(vm="tdx")], ids=["huge", "4k"])
def test_hppunch_keeps_the_other_511_pages(kw):
    """A host punch of 4K out of a 2M private page under the guest: split, then one page removed."""
    res, calls = run("hppunch", host_events=[PUNCH], **kw)
    assert per_vcpu(res)[0] == [200, 0x1FF0001FEFB]
    assert calls[("TDH_MEM_PAGE_DEMOTE", "TDX_SUCCESS", 1)] == (1 if kw is HUGE else 0)
    assert calls[("TDH_MEM_PAGE_REMOVE", "TDX_SUCCESS", 0)] == 1


@pytest.mark.parametrize(
    "guest, vcpus, kw",
    [
        ("hpmixed", 2, HUGE),
        ("hpmixed", 3, HUGE),
        ("hpmixed", 2, dict(vm="tdx")),
        ("hpmixed", 2, dict(vm="default")),
        ("hprace", 3, HUGE),
        ("hprace", 2, dict(vm="tdx")),
    ],
)
def test_mixed_level_accepts(guest, vcpus, kw):
    res, _ = run(guest, vcpus, **kw)
    per = 16 + (8 if guest == "hpmixed" else 16) * (vcpus - 1)
    assert sorted(res.reports) == [(v, per) for v in range(vcpus)]


def test_mirror_leaves_never_promoted():
    """No promotion of a mirror SPTE in the fault path: after hpsplit the split region stays 4K in
    the mirror and in the S-EPT (PROMOTE is never issued)."""
    m = Machine("hpsplit", td_attributes=VE, **HUGE)
    assert m.run().ok
    tdp = m.kvm.tdp_mmu
    root = next(r for r in tdp.roots if r.is_mirror and not r.invalid)
    levels = {level for gfn, level, _ in tdp.leaves(root) if 0x2400 <= gfn < 0x2600}
    assert levels == {1}


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(vm="default", hugepages="2m", tdx_huge_pages=True), "needs --vm tdx"),
        (dict(vm="tdx", tdx_huge_pages=True), "--hugepages 2m"),
        (dict(vm="tdx", hugepages="2m", tdx_huge_pages=True, mirror_hooks="6.16"), "7.2 mirror hooks"),
        (dict(vm="tdx", mirror_hooks="6.17"), "unknown mirror hooks"),
        (dict(vm="default", demote_interruptible=True), "needs --vm tdx"),
    ],
)
def test_option_errors(kw, msg):
    with pytest.raises(MachineError, match=msg):
        Machine("hpaccept", **kw)


def test_huge_pages_imply_the_72_hooks():
    assert Machine("hpaccept", **HUGE).kvm.tdp_mmu.mirror_hooks == "7.2"
    assert Machine("hpaccept", vm="tdx").kvm.tdp_mmu.mirror_hooks == "6.16"


def test_demote_interruptible_module_keeps_huge_pages_off():
    """tdx_bringup(): a module without ENHANCED_DEMOTE_INTERRUPTIBILITY -> tdx_huge_page stays off."""
    res, calls = run("hpaccept", demote_interruptible=True, **HUGE)
    assert per_vcpu(res)[0][0] == MISMATCH_2M
    assert not any(leaf == "TDH_MEM_PAGE_AUG" and level == 1 for leaf, _, level in calls)


def test_cli_run_and_reproducer_flags():
    r = emu_cli(
        "run", "hpsplit", "--vm", "tdx", "--hugepages", "2m", "--tdx-huge-pages", "--sept-ve-disable", "off", "--json"
    )
    assert r.returncode == 0, r.stderr
    r = emu_cli("run", "hpaccept", "--vm", "tdx", "--tdx-huge-pages")
    assert r.returncode != 0 and "--hugepages 2m" in r.stderr


# ---------------------------------------------------------------------------
# The zap checker, fault points
# ---------------------------------------------------------------------------


def test_over_zap_is_caught(monkeypatch):
    """A conversion that does not split first (tdx_gmem_convert() doing nothing) zaps the whole 2M
    page for one 4K page: the checker names it (the guest then dies touching a page it had
    accepted, which the run reports first)."""
    from emu.kvm.tdx import TdxX86Ops

    monkeypatch.setattr(TdxX86Ops, "gmem_convert", lambda self, kvm, start, end, to_private: 0)
    m = Machine("hpconvert", **HUGE)
    assert not m.run().ok
    assert m.kvm.violations == [
        "zap of gfn 0x2405-0x2406 removes the 2M private page at gfn 0x2400-0x2600: beyond the range asked"
    ]


def test_split_fault_point_kills_the_vm():
    """reflect.split_spte: a failed split (not BUSY) is KVM_BUG_ON, the VM dead, nothing leaked."""
    m = Machine("hpsplit", td_attributes=VE, inject=["reflect.split_spte@1=EIO"], **HUGE)
    res = m.run()
    assert not res.ok and "KVM_BUG_ON" in res.error
    m.destroy()
    assert check_destroyed(m.kvm) == []


def test_host_interrupt_fault_point_without_enhanced_interruptibility():
    """tdx.host_interrupt once, on a module without ENHANCED_DEMOTE_INTERRUPTIBILITY, with KVM's
    huge pages forced on (demote-interrupted-is-error): the DEMOTE is INTERRUPTED_RESTARTABLE and
    KVM, treating it as an error, kills the VM."""
    m = Machine(
        "hpsplit",
        td_attributes=VE,
        demote_interruptible=True,
        bugs=["demote-interrupted-is-error"],
        inject=["tdx.host_interrupt@1"],
        **HUGE,
    )
    res = m.run()
    assert not res.ok and "TDX_INTERRUPTED_RESTARTABLE" in res.error, res.error


# ---------------------------------------------------------------------------
# The reviewers' races: each found within a minute, nothing without them
# ---------------------------------------------------------------------------

HUGE_BUG_CASES = [
    # (bug, machine options, explore seed, what the failure says)
    ("split-under-shared-lock", {}, 1, "TDH.MEM.RANGE.BLOCK"),
    ("guest-inhibit-cleared", {}, 1, "under the shared mmu_lock"),
    ("inhibit-on-shared-root", {}, 1, "under the shared mmu_lock"),
    ("split-alloc-no-recheck", {}, 3, "TDH.MEM.PAGE.DEMOTE"),
    ("demote-interrupted-is-error", {"demote_interruptible": True}, 2, "TDX_INTERRUPTED_RESTARTABLE"),
    (
        "demote-interrupted-retried-forever",
        {"demote_interruptible": True, "inject": ["tdx.host_interrupt@every"]},
        1,
        "soft lockup",
    ),
]


@pytest.mark.parametrize("bug, opts, seed, says", HUGE_BUG_CASES, ids=[c[0] for c in HUGE_BUG_CASES])
def test_huge_bug_is_found_within_a_minute(bug, opts, seed, says):
    t0 = time.perf_counter()
    ex = Explorer(lambda: Machine("hprace", vcpus=3, bugs=[bug], **HUGE, **opts))
    ex.MINIMIZE_SECONDS = 5.0
    r = ex.random(runs=300, seed=seed, depth=3)
    assert r.failures >= 1, f"{bug} not found in {r.runs} schedules"
    assert says in r.first_failure.error, r.first_failure.error
    assert time.perf_counter() - t0 < 60
    assert bug in BUGS


def test_huge_no_bug_nothing_reported():
    ex = Explorer(lambda: Machine("hprace", vcpus=3, **HUGE))
    r = ex.random(runs=300, seed=1, depth=3)
    assert r.failures == 0, r.first_failure and r.first_failure.error


def test_mixed_level_accept_dpor_no_failure():
    """The two-vCPU mixed-level accept under DPOR (preemption bound 1: every class of interleavings
    with one preemption; the unbounded search is in docs/huge-pages.md): no failure."""
    r = Explorer(lambda: Machine("hpmixed", vcpus=2, **HUGE)).dpor(bound=1)
    assert r.complete and r.failures == 0, r.first_failure and r.first_failure.error
    assert r.runs > 50


def test_reproducer_carries_the_options():
    r = emu_cli(
        "explore",
        "hprace",
        "--vm",
        "tdx",
        "--vcpus",
        "3",
        "--hugepages",
        "2m",
        "--tdx-huge-pages",
        "--bug",
        "guest-inhibit-cleared",
        "--random",
        "300",
        "--seed",
        "1",
    )
    assert r.returncode != 0
    replay = next(line for line in r.stdout.splitlines() if "replay:" in line)
    assert "--tdx-huge-pages" in replay and "--hugepages 2m" in replay and "--mirror-hooks" not in replay
