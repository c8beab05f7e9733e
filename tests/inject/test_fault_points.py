"""Fault injection: each fault point, KVM's reaction to it, and the invariants afterwards.

KVM's reactions (Linux 6.16, REFERENCE.md sections 1-2): TDX_OPERAND_BUSY from a reflect op restores the
mirror SPTE and retries the fault; any other reflect error restores it and ends in KVM_BUG_ON (the VM is
dead, every later KVM_RUN is an internal-error exit); a memory-cache or backing failure makes KVM_RUN
fail with the errno; teardown errors are KVM_BUG_ONs, and a page KVM cannot get back is leaked on
purpose and accounted (emu.checkers.check.check_destroyed).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from emu.checkers.check import check_vm, check_destroyed, check_tlbs
from emu.checkers.inject import POINTS, parse_rule, PlanError
from emu.kvm.kvm import KvmIoctlError
from emu.userspace.vmm import Machine
from tdxmod import abi as A

ROOT = Path(__file__).resolve().parents[2]


def td(guest="private", vcpus=1):
    return Machine(guest, vm="tdx", vcpus=vcpus)


def finish(m, res):
    """Tear down and check that nothing was lost; returns the invariant problems of the run."""
    problems = check_vm(m.kvm) if res.ok else []
    m.destroy()
    return problems + check_destroyed(m.kvm)


# -- the plan language --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, point, when, n, p, error",
    [
        ("seamcall.TDH_MEM_PAGE_AUG", "seamcall.TDH_MEM_PAGE_AUG", "nth", 1, None, A.TDX_OPERAND_BUSY),
        (
            "seamcall.TDH_MEM_PAGE_AUG@3=TDX_EPT_WALK_FAILED|0x1",
            "seamcall.TDH_MEM_PAGE_AUG",
            "nth",
            3,
            None,
            A.TDX_EPT_WALK_FAILED | 1,
        ),
        (
            "seamcall.TDH_MEM_SEPT_ADD@every=OPERAND_BUSY|0x92",
            "seamcall.TDH_MEM_SEPT_ADD",
            "every",
            1,
            None,
            A.TDX_OPERAND_BUSY | 0x92,
        ),
        (
            "seamcall.TDH_MEM_TRACK@p=0.25=0x8000020100000000",
            "seamcall.TDH_MEM_TRACK",
            "p",
            1,
            0.25,
            A.TDX_PREVIOUS_TLB_EPOCH_BUSY,
        ),
        ("mmu_cache_alloc@every", "mmu_cache_alloc", "every", 1, None, -12),
        ("spte_cmpxchg@2=lost", "spte_cmpxchg", "nth", 2, None, "lost"),
        ("reflect.set_spte=EIO", "reflect.set_spte", "nth", 1, None, -5),
        ("tlb_flush@1=delayed", "tlb_flush", "nth", 1, None, "delayed"),
    ],
)
def test_plans_parse(text, point, when, n, p, error):
    r = parse_rule(text)
    assert (r.point, r.when, r.n, r.p, r.error) == (point, when, n, p, error)


@pytest.mark.parametrize(
    "text, says",
    [
        ("no.such.point", "unknown fault point 'no.such.point'"),
        ("seamcall.TDH_MEM_PAGE_AUG=NOT_A_STATUS", "unknown TDX status 'NOT_A_STATUS'"),
        ("mmu_cache_alloc=EBUSY", "fault point mmu_cache_alloc cannot fail with 'EBUSY'"),
        ("spte_cmpxchg@0", "calls count from 1"),
        ("spte_cmpxchg@p=2", "is not between 0 and 1"),
        ("spte_cmpxchg@sometimes", "use @N, @every or @p=P"),
        ("", "empty fault-injection plan"),
    ],
)
def test_bad_plans_are_one_clear_line(text, says):
    with pytest.raises(PlanError) as e:
        parse_rule(text)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_every_seamcall_leaf_is_a_fault_point():
    for leaf, name in A.SEAMCALL_NAMES.items():
        assert POINTS[f"seamcall.{name}"].errors == "status"
    assert {
        "mmu_cache_alloc",
        "backing_alloc",
        "spte_cmpxchg",
        "tlb_flush",
        "reflect.link_spt",
        "reflect.set_spte",
        "reflect.remove_spte",
        "reflect.free_spt",
    } <= set(POINTS)


def test_same_plan_and_seed_same_run(inject):
    runs = []
    for _ in range(2):
        m = td()
        plan = inject(m, "seamcall.TDH_MEM_PAGE_AUG@p=0.3", "spte_cmpxchg@p=0.2", seed=11)
        res = m.run()
        runs.append((plan.fired, res.reports, res.stats["seamcalls"]))
    assert runs[0] == runs[1] and runs[0][0]


# -- each fault point and KVM's reaction ----------------------------------------------------------------------
@pytest.mark.parametrize("leaf", ["TDH_MEM_PAGE_AUG", "TDH_MEM_SEPT_ADD"])
def test_busy_from_the_module_restores_and_retries(inject, leaf):
    m = td()
    plan = inject(m, f"seamcall.{leaf}@1=TDX_OPERAND_BUSY")
    res = m.run()
    assert res.ok and res.reports == [(0, 16), (0, sum(i * 0x10001 + 0x5A5A for i in range(16)))]
    assert plan.fired == [(f"seamcall.{leaf}", 1, A.TDX_OPERAND_BUSY)]
    assert res.stats["pf_retry"] == 1 and res.stats["kvm_bug_on"] == 0
    assert finish(m, res) == []


@pytest.mark.parametrize(
    "leaf, status",
    [("TDH_MEM_PAGE_AUG", "TDX_EPT_WALK_FAILED|0x1"), ("TDH_MEM_SEPT_ADD", "TDX_EPT_ENTRY_STATE_INCORRECT|0x1")],
)
def test_other_module_errors_are_kvm_bug_on(inject, leaf, status):
    m = td()
    inject(m, f"seamcall.{leaf}@1={status}")
    res = m.run()
    assert res.exit == "ioctl_error" and m.kvm.vm_bugged and "(-EIO)" in res.error
    name = leaf.replace("_", ".")
    assert f"KVM_BUG_ON: {name}" in res.error and status.split("|")[0] in res.error
    with pytest.raises(KvmIoctlError):
        m.vcpus[0].run()
    assert finish(m, res) == []


@pytest.mark.parametrize(
    "op, error, outcome",
    [("link_spt", "EBUSY", "ok"), ("link_spt", "EIO", "bug"), ("set_spte", "EBUSY", "ok"), ("set_spte", "EIO", "bug")],
)
def test_reflect_ops(inject, op, error, outcome):
    m = td()
    inject(m, f"reflect.{op}@1={error}")
    res = m.run()
    if outcome == "ok":
        assert res.ok and res.stats["pf_retry"] == 1
    else:
        assert res.exit == "ioctl_error" and f"reflect_{op}" in res.error and "injected" in res.error
    assert finish(m, res) == []


def test_remove_error_is_kvm_bug_on_and_the_page_is_leaked(inject):
    m = td("convert")
    inject(m, "reflect.remove_spte@1=EIO")
    res = m.run()
    assert res.exit == "ioctl_error" and "reflect_remove_spte" in res.error
    m.destroy()
    assert any("still in the S-EPT" in why for _, why in m.host.leaked)
    assert check_destroyed(m.kvm) == []


def test_free_spt_errors_leak_the_sept_pages_on_purpose(inject):
    m = td()
    inject(m, "reflect.free_spt@every")
    res = m.run()
    assert res.ok
    m.destroy()
    leaked = [why for _, why in m.host.leaked]
    assert leaked and all("S-EPT page" in w or "RECLAIM" in w for w in leaked)
    assert check_destroyed(m.kvm) == []


@pytest.mark.parametrize("leaf", ["TDH_MEM_RANGE_BLOCK", "TDH_MEM_TRACK", "TDH_MEM_PAGE_REMOVE"])
def test_teardown_busy_is_retried_once(inject, leaf):
    m = td("convert")
    inject(m, f"seamcall.{leaf}@1=TDX_OPERAND_BUSY")
    res = m.run()
    assert res.ok and not m.kvm.vm_bugged
    assert finish(m, res) == []


def test_teardown_busy_twice_is_kvm_bug_on(inject):
    m = td("convert")
    inject(m, "seamcall.TDH_MEM_RANGE_BLOCK@every=TDX_OPERAND_BUSY")
    res = m.run()
    assert res.exit == "ioctl_error" and "TDH.MEM.RANGE.BLOCK" in res.error
    m.destroy()
    assert check_destroyed(m.kvm) == []


def test_reclaim_failure_leaks_and_accounts(inject):
    m = td()
    m.run()
    inject(m, "seamcall.TDH_PHYMEM_PAGE_RECLAIM@1=TDX_LIFECYCLE_STATE_INCORRECT")
    m.destroy()
    assert len(m.host.leaked) >= 1
    assert check_destroyed(m.kvm) == []


def test_mmu_cache_allocation_failure_fails_kvm_run(inject):
    m = Machine("hello")
    inject(m, "mmu_cache_alloc@every")
    res = m.run()
    assert res.exit == "ioctl_error" and "KVM_RUN failed" in res.error
    assert finish(m, res) == []


def test_backing_failure_fails_kvm_run_with_efault(inject):
    m = Machine("touch")
    inject(m, "backing_alloc@3")
    res = m.run()
    assert res.exit == "ioctl_error" and "(-14)" in res.error
    assert finish(m, res) == []


@pytest.mark.parametrize("vm", ["default", "tdx"])
def test_lost_cmpxchg_retries_the_fault(inject, vm):
    m = Machine("touch" if vm == "default" else "private", vm=vm)
    plan = inject(m, "spte_cmpxchg@1")
    res = m.run()
    assert res.ok and res.stats["pf_retry"] >= 1 and plan.fired == [("spte_cmpxchg", 1, "lost")]
    assert finish(m, res) == []


def test_always_lost_cmpxchg_is_a_livelock_the_watchdog_ends(inject):
    m = Machine("touch")
    inject(m, "spte_cmpxchg@every")
    res = m.run()
    assert res.exit == "timeout" and "watchdog" in res.error
    assert finish(m, res) == []


def test_a_delayed_tlb_flush_is_caught_by_the_invariant_checker(inject):
    """MapGPA to shared zaps the private pages; with the flush delayed, the vCPU still holds
    their translations: exactly what check_tlbs exists to catch."""
    m = td("convert")
    inject(m, "tlb_flush@every")
    m.run()
    stale = check_tlbs(m.kvm)
    assert stale and all("caches gpa" in s for s in stale)


# -- the command line and campaigns ---------------------------------------------------------------------------
def emu(*args):
    return subprocess.run(
        [sys.executable, "-m", "emu", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=900
    )


def test_inject_list():
    p = emu("inject", "--list")
    assert p.returncode == 0
    for name in POINTS:
        assert name in p.stdout


def test_cli_refuses_a_bad_plan_in_one_line():
    p = emu("run", "hello", "--inject", "nope@1")
    assert p.returncode == 2 and p.stderr.startswith("emu: error: --inject 'nope@1': unknown fault point")
    assert p.stderr.count("\n") == 1


def test_cli_run_with_a_plan():
    p = emu("run", "private", "--vm", "tdx", "--inject", "seamcall.TDH_MEM_PAGE_AUG@2=TDX_OPERAND_BUSY", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["stats"]["pf_retry"] == 1 and out["stats"]["seamcalls"]["TDH_MEM_PAGE_AUG"] == 17


def test_campaign_of_1000_runs_breaks_no_invariant():
    p = emu("campaign", "race2", "--vm", "tdx", "--vcpus", "2", "--runs", "1000", "--seed", "1", "--json")
    out = json.loads(p.stdout)
    assert p.returncode == 0, out["failures"][:2]
    assert out["runs"] == 1000 and out["outcomes"]["invariant_broken"] == 0
    assert sum(out["outcomes"].values()) == 1000
    # the runs exercised the fault points (swarm plans), and KVM's reactions happened
    assert len(out["points"]) >= 15
    assert out["outcomes"]["survived"] > 0 and out["outcomes"]["kvm_bug_on"] > 0


def test_campaign_reports_a_failure_with_its_reproducer():
    p = emu(
        "campaign",
        "convert",
        "--vm",
        "tdx",
        "--runs",
        "3",
        "--inject",
        "tlb_flush@every",
        "--max-points",
        "0",
        "--json",
    )
    assert p.returncode == 1
    out = json.loads(p.stdout)
    f = out["failures"][0]
    assert "caches gpa" in f["error"] and f["reproducer"].startswith("python -m emu run convert --vm tdx")
    assert "--inject 'tlb_flush@every'" in f["reproducer"]
