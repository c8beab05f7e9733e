"""kvm->srcu and memslot changes as upstream (issue 23): emu/kvm/srcu.py, kvm_set_memslot() (the
KVM_MEMSLOT_INVALID copy, kvm_swap_active_memslots() with synchronize_srcu(), the flush, the final
set), KVM_RUN's read-side section, the checker's memslot invariants, the memslot host events
(delete, move) and the race the SRCU wait closes, found by explore on the shipped scenario
guest memslot_race only with the wait switched off (--bug memslot-no-srcu-wait).
"""

import json
import subprocess
import sys

import pytest

from emu.checkers.check import check_vm, RUN_CHECKS
from emu.checkers.sched import Scheduler
from emu.kvm.kvm import KvmIoctlError, KVM_MEMSLOT_INVALID
from emu.kvm.mmu import RET_PF_RETRY, PFERR_WRITE_MASK
from emu.kvm.srcu import Srcu
from emu.userspace import guests
from emu.userspace.hostevents import parse_host_event, HostEventError
from emu.userspace.vmm import Machine, MachineError

REPO = guests.REPO
RACE = "delete 0x2000000-0x2008000@20"


def emu_cli(*args):
    return subprocess.run([sys.executable, "-m", "emu", *map(str, args)], cwd=REPO, capture_output=True, text=True)


class FakeKvm:
    def __init__(self, sched):
        self.sched = sched
        self.touched = []

    def touch(self, key, write=True):
        self.touched.append((key, write))


# ---------------------------------------------------------------------------
# SRCU
# ---------------------------------------------------------------------------


def test_synchronize_srcu_waits_for_the_readers_that_were_inside_only():
    """A grace period waits for the sections open when it began; a section that begins after the
    index flipped is not waited for (so a grace period ends while new readers keep coming)."""
    s = Scheduler()
    kvm = FakeKvm(s)
    srcu = Srcu(kvm)
    log = []

    def reader_a():  # inside before the grace period, leaves later
        idx = srcu.srcu_read_lock()
        log.append(("a in", idx))
        for _ in range(3):
            s.point(0, "x")
        srcu.srcu_read_unlock(idx)
        log.append("a out")

    def writer():
        log.append("sync starts")
        srcu.synchronize_srcu()
        log.append("sync done")

    def reader_b():  # enters after the flip, stays inside past the sync
        s.wait_until(lambda: srcu.srcu_idx == 1)
        idx = srcu.srcu_read_lock()
        log.append(("b in", idx))
        s.wait_until(lambda: "sync done" in log)
        srcu.srcu_read_unlock(idx)
        log.append("b out")

    s.spawn(reader_a)
    s.spawn(writer, name="writer", host=True, start=1)
    s.spawn(reader_b)
    s.run()
    assert log.index("a out") < log.index("sync done")  # waited for a
    assert log.index(("b in", 1)) < log.index("sync done") < log.index("b out")  # not for b
    assert srcu.grace_periods == 1 and srcu.readers() == 0
    assert ("srcu", True) in kvm.touched and ("srcu", False) in kvm.touched


def test_synchronize_srcu_with_a_reader_and_no_scheduler_is_an_error():
    srcu = Srcu(FakeKvm(None))
    srcu.synchronize_srcu()  # no reader: returns at once
    idx = srcu.srcu_read_lock()
    with pytest.raises(AssertionError, match="no scheduler"):
        srcu.synchronize_srcu()
    srcu.srcu_read_unlock(idx)
    with pytest.raises(AssertionError):
        srcu.srcu_read_unlock(idx)


def test_kvm_run_holds_kvm_srcu_outside_guest_mode():
    """kvm_vcpu_srcu_read_lock() in KVM_RUN: inside at every scheduling point of KVM code, out in
    guest mode (between two guest slices) and after KVM_RUN returns."""
    m = Machine("smp", vm="default", vcpus=2)
    srcu = m.kvm.srcu
    seen = {}

    def on_step(sched, who, what):
        seen.setdefault(what, set()).add(srcu.readers())

    res = m.run_scheduled(Scheduler(on_step=on_step))
    assert res.ok, res.error
    assert seen["vm_exit"] >= {1} and 0 not in seen["vm_exit"] and 0 not in seen["faultin_pfn"]
    assert 0 in seen["guest_slice"]  # both vCPUs in the guest: nobody inside
    assert srcu.readers() == 0


# ---------------------------------------------------------------------------
# kvm_set_memslot()
# ---------------------------------------------------------------------------


def test_delete_installs_the_invalid_copy_waits_flushes_then_removes():
    m = Machine("hello", vm="default", host_reserve=16 << 20)
    kvm = m.kvm
    m.add_region(3, 0x40000000, 0x4000, guest_memfd=False)
    order = []
    real_flush, real_sync = kvm.flush_shadow_memslot, kvm.srcu.synchronize_srcu_expedited
    kvm.flush_shadow_memslot = lambda slot: (
        order.append(("flush", [(s.id, s.flags & KVM_MEMSLOT_INVALID) for s in kvm.memslots])),
        real_flush(slot),
    )
    kvm.srcu.synchronize_srcu_expedited = lambda: (order.append(("sync", [s.id for s in kvm.memslots])), real_sync())
    gen = kvm.memslots_generation
    old = kvm.memslots
    m.delete_region(3)
    assert order == [("sync", [0, 3]), ("flush", [(0, 0), (3, KVM_MEMSLOT_INVALID)]), ("sync", [0])]
    assert kvm.memslots_generation == gen + 2 and kvm.memslots is not old and [s.id for s in old] == [0, 3]
    assert not old[1].flags & KVM_MEMSLOT_INVALID  # the old slot itself was never changed
    with pytest.raises(KvmIoctlError) as e:
        m.delete_region(3)
    assert e.value.errno == 22


def test_move_and_what_may_not_change():
    m = Machine("hello", vm="default", host_reserve=16 << 20)
    kvm = m.kvm
    r = m.add_region(3, 0x40000000, 0x4000, guest_memfd=False)
    grace = kvm.srcu.grace_periods
    m.move_region(3, 0x80000000)
    slot = kvm.gfn_to_memslot(0x80000)
    assert slot.id == 3 and slot.userspace_addr == r.hva and kvm.gfn_to_memslot(0x40000) is None
    assert kvm.srcu.grace_periods == grace + 2
    assert kvm.set_user_memory_region(3, 0, 0x80000000, 0x4000, r.hva) is None  # nothing to change
    assert kvm.srcu.grace_periods == grace + 2
    for flags, size, hva in ((2, 0x4000, r.hva), (0, 0x8000, r.hva), (0, 0x4000, r.hva + 0x1000)):
        with pytest.raises(KvmIoctlError) as e:  # READONLY toggled, another size, another hva
            kvm.set_user_memory_region(3, flags, 0x80000000, size, hva)
        assert e.value.errno == 22
    with pytest.raises(KvmIoctlError) as e:
        kvm.set_user_memory_region(4, 0, 0x80002000, 0x4000, r.hva)  # overlaps
    assert e.value.errno == 17


def test_private_memslots_are_immutable_and_guest_memfd_needs_private_memory():
    m = Machine("hello", vm="sw-protected", host_reserve=16 << 20)
    r = m.add_region(3, 0x40000000, 0x4000, guest_memfd=True)
    with pytest.raises(KvmIoctlError) as e:
        m.move_region(3, 0x80000000)
    assert e.value.errno == 22
    with pytest.raises(KvmIoctlError) as e:
        m.kvm.set_user_memory_region(4, 2, 0x90000000, 0x4000, r.hva, gmem_addr=r.gmem)  # READONLY + gmem
    assert e.value.errno == 22
    d = Machine("hello", vm="default", host_reserve=16 << 20)
    with pytest.raises(KvmIoctlError) as e:
        d.add_region(3, 0x40000000, 0x4000, guest_memfd=True)
    assert e.value.errno == 22


def test_a_fault_on_an_invalid_slot_retries():
    m = Machine("hello", vm="default", host_reserve=16 << 20)
    kvm = m.kvm
    v = m.vcpus[0]
    v.mmu_load()
    r = m.add_region(3, 0x40000000, 0x4000, guest_memfd=False)
    invalid = kvm.gfn_to_memslot(0x40000).copy()
    invalid.flags |= KVM_MEMSLOT_INVALID
    kvm.memslots = [s if s.id != 3 else invalid for s in kvm.memslots]
    assert v.kvm_mmu_do_page_fault(0x40000000, PFERR_WRITE_MASK) == RET_PF_RETRY
    kvm.memslots = [s if s.id != 3 else invalid.copy() for s in kvm.memslots]
    kvm.memslots[-1].flags &= ~KVM_MEMSLOT_INVALID
    assert v.kvm_mmu_do_page_fault(0x40000000, PFERR_WRITE_MASK) != RET_PF_RETRY
    assert r.slot == 3


# ---------------------------------------------------------------------------
# The checker's memslot invariants
# ---------------------------------------------------------------------------


def test_checker_sees_a_leaf_no_memslot_covers_a_zapped_invalid_root_and_a_freed_root():
    m = Machine("hello", vm="default", host_reserve=16 << 20)
    assert m.run().ok
    kvm = m.kvm
    assert check_vm(kvm) == []
    # A leaf for a GFN whose memslot is gone, without the zap (what the SRCU race leaves).
    kvm.memslots = []
    problems = check_vm(kvm)
    assert any("which no memslot covers" in p for p in problems)
    kvm.violations.clear()
    RUN_CHECKS.leaf_installed(kvm, 0x100, 1)
    assert kvm.violations == [
        "a leaf SPTE (level 1) was installed for gfn 0x100, which no memslot covers "
        "(a fault that looked its memslot up before the slot was deleted?)"
    ]
    m = Machine("hello", vm="default", host_reserve=16 << 20)
    assert m.run().ok
    kvm, tdp = m.kvm, m.kvm.tdp_mmu
    root = m.vcpus[0].root
    root.role |= 1 << 11  # ROLE_INVALID, and pretend the zap is done
    root.zapped = True
    assert any("invalid direct root that was zapped still maps" in p for p in check_vm(kvm))
    tdp.roots.remove(root)  # freed while the vCPU still holds it
    assert any("which was freed" in p for p in check_vm(kvm))
    kvm.violations.clear()
    RUN_CHECKS.vcpu_entering(kvm, m.vcpus[0])
    assert kvm.violations and "entering the guest" in kvm.violations[0]


# ---------------------------------------------------------------------------
# Host events: delete and move
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, msg",
    [
        ("move 0x2000000-0x2008000", "needs the GPA to move to"),
        ("delete 0x2000000-0x2008000 0x1000", "delete takes no TO"),
        ("move 0x2000000-0x2008000 0x10000800", "TO must be 4 KiB aligned"),
    ],
)
def test_memslot_host_event_syntax(text, msg):
    with pytest.raises(HostEventError, match=msg):
        parse_host_event(text)
    e = parse_host_event("move 0x2000000-0x2008000 0x10000000@7")
    assert (e.kind, e.start, e.end, e.to, e.step) == ("move", 0x2000000, 0x2008000, 0x10000000, 7)


@pytest.mark.parametrize(
    "vm, events, msg",
    [
        ("tdx", ["move 0x2000000-0x2008000 0x10000000"], "cannot be moved"),
        ("default", ["move 0x2000000-0x2008000 0x1000000"], "TO must lie above guest memory"),
        ("default", ["delete 0x3e00000-0x3e01000"], "loader's top"),
        ("default", ["delete 0x2000000-0x2008000", "delete 0x2004000-0x2010000"], "memslot ranges overlap"),
    ],
)
def test_memslot_host_event_refusals(vm, events, msg):
    with pytest.raises(MachineError, match=msg):
        Machine("memslot_race", vm=vm, host_events=events)


def test_delete_event_gives_the_range_a_memslot_of_its_own():
    m = Machine("memslot_race", vm="tdx", vcpus=2, host_events=[RACE])
    ranges = sorted((s.base_gfn, s.base_gfn + s.npages) for s in m.kvm.memslots)
    assert ranges == [(0, 0x2000), (0x2000, 0x2008), (0x2008, 0x4000)]
    assert m.host_events[0].slot == m.kvm.gfn_to_memslot(0x2000).id != 0
    res = m.run()
    assert res.ok and m.kvm.gfn_to_memslot(0x2000) is None and check_vm(m.kvm) == []
    assert set(res.vcpu_exits) <= {"hlt", "memory_fault"}


@pytest.mark.parametrize("vm", ["tdx", "sw-protected", "default"])
def test_memslot_race_is_clean_with_the_srcu_wait(vm):
    """Every explored schedule: faults that lose the race retry or exit with
    KVM_EXIT_MEMORY_FAULT; nothing maps the deleted range afterwards."""
    r = emu_cli(
        "explore",
        "memslot_race",
        "--vm",
        vm,
        "--vcpus",
        "2",
        "--host",
        RACE,
        "--random",
        "12" if vm == "default" else "150",
        "--json",
    )
    obj = json.loads(r.stdout)
    assert r.returncode == 0 and obj["failures"] == 0 and obj["complete"], r.stdout + r.stderr


@pytest.mark.parametrize("vm", ["tdx", "sw-protected"])
def test_memslot_race_found_without_the_srcu_wait(vm):
    r = emu_cli(
        "explore",
        "memslot_race",
        "--vm",
        vm,
        "--vcpus",
        "2",
        "--host",
        RACE,
        "--random",
        "300",
        "--bug",
        "memslot-no-srcu-wait",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failing" in r.stdout
    first = next(line for line in r.stdout.splitlines() if line.startswith("first failure:"))
    assert "which no memslot covers" in first or "is gone, but the" in first
    assert "--bug memslot-no-srcu-wait --replay 'emu-sched/1:" in r.stdout


def test_memslot_race_run_and_campaign():
    r = emu_cli("run", "memslot_race", "--vm", "tdx", "--vcpus", "2", "--host", RACE, "--json")
    obj = json.loads(r.stdout)
    assert r.returncode == 0 and obj["exit"] == "hlt" and obj["error"] is None
    assert set(obj["vcpu_exits"]) <= {"hlt", "memory_fault"}
    r = emu_cli(
        "campaign",
        "memslot_race",
        "--vm",
        "tdx",
        "--vcpus",
        "2",
        "--host",
        RACE,
        "--runs",
        "6",
        "--max-points",
        "0",
        "--json",
    )
    obj = json.loads(r.stdout)
    assert r.returncode == 0 and obj["failures"] == [], r.stdout + r.stderr


# ---------------------------------------------------------------------------
# A memslot moved to GPAs the vCPUs touch: the MMIO SPTE generation race
# ---------------------------------------------------------------------------
MOVE = "move 0x2000000-0x2008000 0x10000000@2"


def test_memslot_move_run_reads_the_moved_slot_or_stops_at_mmio():
    """A vCPU that reads the destination before the memslot is there stops at its MMIO exit (the
    scenario expects it); one that reads after the move reads the slot's memory (zeros)."""
    m = Machine("memslot_move", vcpus=2, host_events=[MOVE])
    res = m.run()
    assert res.ok, res.error
    assert set(res.vcpu_exits) <= {"hlt", "mmio"}
    assert m.kvm.gfn_to_memslot(0x10000) is not None and m.kvm.gfn_to_memslot(0x2000) is None
    assert check_vm(m.kvm) == []
    m = Machine("memslot_move", vcpus=2, host_events=[MOVE.replace("@2", "")])  # the move before any read
    res = m.run()
    assert res.ok and res.vcpu_exits == ["hlt", "hlt"], res.error


def test_memslot_move_is_clean_with_the_generation_bumped_after_the_wait():
    r = emu_cli("explore", "memslot_move", "--vcpus", "2", "--host", MOVE, "--random", "150", "--json")
    obj = json.loads(r.stdout)
    assert r.returncode == 0 and obj["failures"] == 0 and obj["complete"], r.stdout + r.stderr


def test_memslot_move_race_found_with_the_generation_bumped_before_the_wait():
    r = emu_cli(
        "explore",
        "memslot_move",
        "--vcpus",
        "2",
        "--host",
        MOVE,
        "--random",
        "300",
        "--bug",
        "mmio-gen-before-srcu-wait",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    first = next(line for line in r.stdout.splitlines() if line.startswith("first failure:"))
    assert "an MMIO SPTE of the current memslots generation" in first and "for gfn 0x1000" in first, first
    assert "--bug mmio-gen-before-srcu-wait --replay 'emu-sched/1:" in r.stdout
