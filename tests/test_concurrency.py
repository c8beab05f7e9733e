"""vCPUs that really run at the same time (issue 11): guest mode across scheduling points,
kicks, host events, upstream's invalidation protocol, and the checker's strength against
realistic bugs switched into the model."""

import json
import subprocess
import sys
import time

import pytest

from emu.checkers.check import check_vm, check_destroyed
from emu.checkers.explore import Explorer
from emu.kvm.bugs import BUGS, Bugs
from emu.kvm.kvm import IN_GUEST_MODE, OUTSIDE_GUEST_MODE, KVM_REQ_TLB_FLUSH
from emu.checkers.sched import Scheduler
from emu.userspace.vmm import Machine, MachineError
from emu.userspace.hostevents import parse_host_event, HostEventError
from emu.trace import Tracer, ListSink

VMS = ("default", "tdx")
SMP_ITERS = 64


def emu_cli(*args):
    return subprocess.run([sys.executable, "-m", "emu", *map(str, args)], capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------
# Guest mode lasts across scheduling points
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("vm", VMS)
@pytest.mark.parametrize("vcpus", [1, 2, 3])
def test_smp_guest_completes(vm, vcpus):
    """Spinlock (PAUSE), barrier and token ring (no PAUSE): every vCPU finishes with exact results."""
    m = Machine("smp", vm=vm, vcpus=vcpus)
    res = m.run()
    assert res.ok, res.error
    assert sorted(res.reports) == sorted(
        [(i, SMP_ITERS * vcpus) for i in range(vcpus)] + [(i, vcpus) for i in range(vcpus)]
    )
    assert res.vcpu_exits == ["hlt"] * vcpus
    assert check_vm(m.kvm) == []
    m.destroy()
    assert check_destroyed(m.kvm) == []  # TD teardown after vCPUs spun in guest mode


def test_smp_cli_exit_status_and_json():
    r = emu_cli("run", "smp", "--vcpus", "2", "--json")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["exit"] == "hlt" and sorted(obj["reports"]) == [2, 2, 128, 128]


def test_guest_points_are_in_guest_mode():
    """At a guest-mode scheduling point the vCPU is IN_GUEST_MODE with its hardware in the guest,
    and other tasks run meanwhile; both kinds of point (budget, PAUSE window) happen."""
    seen = {}
    for guest in ("smp", "convspin"):  # smp's barrier spins without PAUSE, convspin with it
        m = Machine(guest, vm="default", vcpus=2)

        def on_step(s, who, what):
            if what in ("guest_slice", "guest_pause"):
                v = m.kvm.vcpus[who]
                assert v.mode == IN_GUEST_MODE and v.hw.in_guest
                seen[what] = seen.get(what, 0) + 1

        res = m.run_scheduled(Scheduler(on_step=on_step))
        assert res.ok
        assert all(v.mode == OUTSIDE_GUEST_MODE and not v.hw.in_guest for v in m.kvm.vcpus)
    assert seen.get("guest_slice", 0) > 0 and seen.get("guest_pause", 0) > 0


def test_one_vcpu_runs_without_slices():
    """Alone, a vCPU runs to its next exit: no budget, no guest-mode points (full speed)."""
    m = Machine("smp", vm="default", vcpus=1)
    assert m.run().ok
    assert m.vcpus[0].hw.slices == 0 and m.vcpus[0].hw._budget is None


@pytest.mark.parametrize("vm", VMS)
def test_smp_explore_and_campaign_clean(vm):
    ex = Explorer(lambda: Machine("smp", vm=vm, vcpus=2))
    r = ex.random(runs=40, seed=3, depth=3)
    assert r.failures == 0 and r.runs == 40
    r = ex.dfs(bound=1, max_runs=40)
    assert r.failures == 0


def test_smp_campaign_no_failure():
    from emu.checkers.campaign import Campaign

    rep = Campaign(lambda: Machine("smp", vm="tdx", vcpus=2)).run(30, seed=5)
    assert rep.failures == [], [r.error for r in rep.failures]


def test_fairness_at_yields():
    """CHESS's fairness: after a yield, a task runs again only once every task enabled at the
    yield has run, so two tasks retrying at each other cannot starve a third."""
    s = Scheduler()
    order = []

    def spinner(i):
        def body():
            for _ in range(3):
                order.append(i)
                s.point(i, "frozen_retry")

        return body

    for i in range(3):
        s.spawn(spinner(i))
    s.run()
    # every round of yields visits each task once
    assert order == [0, 1, 2, 0, 1, 2, 0, 1, 2]


# ---------------------------------------------------------------------------
# Kicks: remote requests reach vCPUs in guest mode
# ---------------------------------------------------------------------------


def test_remote_flush_kicks_a_vcpu_in_guest_mode():
    """convspin in a TD: vCPU 1 spins in guest mode while vCPU 0 converts pages it used; each
    zap's TRACK and remote flush kick it out (an external-interrupt TD exit) and it flushes
    before it enters again."""
    sink = ListSink()
    m = Machine("convspin", vm="tdx", vcpus=2, tracer=Tracer([sink]))
    res = m.run()
    assert res.ok, res.error
    flushes = [e for e in sink.events if e.name == "kvm_flush_remote_tlbs" and e.fields.get("kicked")]
    assert flushes and all(e.fields["kicked"] == [1] for e in flushes)
    irq_exits = [e for e in sink.events if e.name == "tdx_exit" and e.fields["reason"] == "EXTERNAL_INTERRUPT"]
    assert irq_exits and all(e.vcpu == 1 for e in irq_exits)
    # kicked by a remote flush, vCPU 1 processes KVM_REQ_TLB_FLUSH before it enters again
    mine = [e.name for e in sink.events if e.vcpu == 1 and e.name in ("kvm_exit", "kvm_tlb_flush", "kvm_entry")]
    assert "kvm_exit kvm_tlb_flush kvm_entry" in " ".join(mine)
    assert m.kvm.violations == []
    assert sorted(res.reports) == sorted([(0, 0x30300000007FE00), (1, 0xC2C2C0000007FE00), (1, 0x30300000007FE00)])


def test_make_request_sets_exiting_mode_and_waits():
    """kvm_make_vcpus_request(): IN_GUEST_MODE -> EXITING_GUEST_MODE and an IPI; a vCPU outside
    guest mode only gets the request bit."""
    m = Machine("hello", vm="default", vcpus=2)
    kvm = m.kvm
    a, b = m.vcpus
    a.mode = OUTSIDE_GUEST_MODE
    assert kvm.kvm_make_vcpus_request([a], KVM_REQ_TLB_FLUSH) == []
    assert a.requests & KVM_REQ_TLB_FLUSH and not a.hw.intr_pending


# ---------------------------------------------------------------------------
# Host events
# ---------------------------------------------------------------------------


def test_parse_host_events():
    e = parse_host_event("migrate 0x1000-0x3000@7")
    assert e.text == "migrate 0x1000-0x3000@7"
    assert (e.kind, e.start, e.end, e.step) == ("migrate", 0x1000, 0x3000, 7)
    e = parse_host_event("shared 0x200000-0x400000")
    assert (e.kind, e.step) == ("shared", 0)
    for bad in (
        "move 0x1000-0x2000",
        "shared 0x1000",
        "private 0x2000-0x1000",
        "shared 0x1001-0x2000",
        "shared a-b",
        "shared 0x1000-0x2000@x",
    ):
        with pytest.raises(HostEventError):
            parse_host_event(bad)


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--host", "flip 0x1000-0x2000"], "unknown host event 'flip'"),
        (["--host", "shared 0x1000"], "the syntax is 'EVENT START-END[@STEP]'"),
        (["--host", "shared 0x1000-0x2000"], "memory attributes need a TD"),
        (["--vm", "tdx", "--host", "private 0x0-0x80000000"], "GPA range outside guest memory"),
        (["--bug", "nope"], "unknown bug; the bugs are: kick-misses-running-vcpu"),
    ],
)
def test_host_event_and_bug_errors(args, msg):
    r = emu_cli("run", "hello", *args)
    assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1


def test_host_private_event_under_the_guest():
    """A host conversion of shared pages the vCPUs are using: the VMM converts each page back
    when a vCPU touches it (QEMU's answer to KVM_EXIT_MEMORY_FAULT); the results do not change,
    and the host task traces on a track of its own."""
    sink = ListSink()
    m = Machine("sharedrw", vm="tdx", vcpus=2, tracer=Tracer([sink]), host_events=["private 0x1c00000-0x1c02000@40"])
    res = m.run()
    assert res.ok, res.error
    assert sorted(res.reports) == [(0, 600), (1, 600)]
    host = [e for e in sink.events if e.vcpu == "host0"]
    assert [e.fields["msg"] for e in host if e.name == "host_event"] == [
        "private 0x1c00000-0x1c02000@40 begins",
        "private 0x1c00000-0x1c02000@40 done",
    ]
    assert any(e.name == "kvm_set_memory_attributes" for e in host)
    assert check_vm(m.kvm) == []


def test_host_event_after_the_vcpus_still_runs():
    """@STEP beyond the end of the run: the event runs when every vCPU has finished."""
    m = Machine("private", vm="tdx", vcpus=1, host_events=["shared 0x1000000-0x1010000@100000000"])
    res = m.run()
    assert res.ok, res.error
    assert not any(m.kvm.mem_is_private(g) for g in range(0x1000, 0x1010))
    assert check_vm(m.kvm) == []


def test_host_event_in_explore_is_a_choice():
    ex = Explorer(lambda: Machine("sharedrw", vm="tdx", vcpus=2, host_events=["private 0x1c00000-0x1c02000@40"]))
    r = ex.random(runs=60, seed=1, depth=3)
    assert r.failures == 0
    base = ex.baseline()
    assert any(2 in d.enabled for d in base.decisions)  # the host task (after the 2 vCPUs) was a choice


@pytest.mark.parametrize("vm", VMS)
def test_migrate_pages_two_vcpus_are_writing(vm):
    """Page migration under two vCPUs writing the pages: the mmu_notifier invalidation unmaps
    them, faults wait on the migration entries, the contents move, the old pages are poisoned and
    freed; no write is lost and the new pages back the guest."""
    from emu.host.mm import POISON

    sink = ListSink()
    m = Machine("sharedrw", vm=vm, vcpus=2, tracer=Tracer([sink]), host_events=["migrate 0x1c00000-0x1c02000@40"])
    before = [m.host.mm.lookup(m.hva + 0x1C00000 + i * 4096) for i in range(2)]
    assert before == [(m.hva + 0x1C00000) >> 12, ((m.hva + 0x1C00000) >> 12) + 1]  # not moved yet
    res = m.run()
    assert res.ok, res.error
    assert sorted(res.reports) == [(0, 600), (1, 600)]
    after = [m.host.mm.lookup(m.hva + 0x1C00000 + i * 4096) for i in range(2)]
    assert set(after).isdisjoint(before)
    assert m.host.mem.read(before[0] << 12, 16) == bytes([POISON]) * 16
    assert int.from_bytes(m.read_gpa(0x1C00000, 8), "little") == 300  # vCPU 0's qword, page 0
    moved = [e for e in sink.events if e.name == "host_migrate"]
    assert len(moved) == 1 and moved[0].vcpu == "host0"
    assert check_vm(m.kvm) == [] and m.kvm.violations == []


def test_migrate_needs_4k_backing():
    with pytest.raises(MachineError, match="page migration moves 4K pages"):
        Machine("sharedrw", vm="default", hugepages="2m", host_events=["migrate 0x1c00000-0x1c02000"])


def test_vmm_page_tables_are_real_tables():
    """The VMM's page tables are x86-64 4-level tables in host memory: walk one by hand."""
    from emu.host.mm import PTE_P, PTE_PFN

    m = Machine("hello", vm="default")
    mm, q = m.host.mm, m.host.mem.q
    hva = m.hva + 0x123000
    pfn = mm.hva_to_pfn(hva)
    table = mm.pml4
    for level in (4, 3, 2, 1):
        e = q[(table >> 3) + ((hva >> (12 + 9 * (level - 1))) & 511)]
        assert e & PTE_P
        table = e & PTE_PFN
    assert table >> 12 == pfn == hva >> 12
    assert mm.hva_to_pfn(0x10) is None  # outside every mapping: -EFAULT


# ---------------------------------------------------------------------------
# Upstream's invalidation protocol and mmu_lock
# ---------------------------------------------------------------------------


def test_mmu_invalidate_retry_gfn():
    m = Machine("hello", vm="default")
    kvm = m.kvm
    seq = kvm.mmu_invalidate_seq
    assert not kvm.mmu_invalidate_retry_gfn(seq, 5)
    kvm.kvm_mmu_invalidate_begin()
    assert kvm.mmu_invalidate_retry_gfn(seq, 5)  # no range yet: everything
    kvm.kvm_mmu_invalidate_range_add(10, 20)
    assert kvm.mmu_invalidate_retry_gfn(seq, 10) and kvm.mmu_invalidate_retry_gfn(seq, 19)
    assert not kvm.mmu_invalidate_retry_gfn(seq, 20) and not kvm.mmu_invalidate_retry_gfn(seq, 9)
    kvm.kvm_mmu_invalidate_range_add(30, 31)
    assert kvm.mmu_invalidate_retry_gfn(seq, 25)  # ranges fold into one
    kvm.kvm_mmu_invalidate_end()
    assert kvm.mmu_invalidate_in_progress == 0 and kvm.mmu_invalidate_seq == seq + 1
    assert kvm.mmu_invalidate_retry_gfn(seq, 5)  # the sequence moved
    assert not kvm.mmu_invalidate_retry_gfn(seq + 1, 5)


def test_set_memory_attributes_upstream_order():
    """The zap runs under the invalidation, the attribute is stored after it (outside mmu_lock),
    and the sequence moves at the end."""
    m = Machine("private", vm="tdx")
    kvm = m.kvm
    seen = []
    real = kvm.tdp_mmu.unmap_gfn_range

    def unmap(start, end, types, flush):
        seen.append(("zap", kvm.mmu_invalidate_in_progress, kvm.mem_is_private(start), kvm.mmu_lock.writer))
        return real(start, end, types, flush)

    kvm.tdp_mmu.unmap_gfn_range = unmap
    seq = kvm.mmu_invalidate_seq
    kvm.set_memory_attributes(0x1000, 0x1002, private=False)
    assert seen == [("zap", 1, True, True)]
    assert not kvm.mem_is_private(0x1000) and kvm.mmu_invalidate_seq == seq + 1
    kvm.set_memory_attributes(0x1000, 0x1002, private=False)  # already shared: nothing to do
    assert len(seen) == 1 and kvm.mmu_invalidate_seq == seq + 1


def test_memslot_delete_marks_it_invalid_while_zapping():
    m = Machine("hello", vm="default")
    kvm = m.kvm
    flags = []
    real = kvm.flush_shadow_memslot
    kvm.flush_shadow_memslot = lambda slot: (flags.append(slot.flags), real(slot))
    kvm.set_user_memory_region(0, 0, 0, 0, 0)
    from emu.kvm.uapi import KVM_MEMSLOT_INVALID

    assert flags and flags[0] & KVM_MEMSLOT_INVALID and kvm.memslots == []


def test_mmu_lock_prefers_writers():
    """x86's queued rwlock: once a writer waits, a new reader queues behind it."""
    s = Scheduler()
    m = Machine("hello", vm="default")
    kvm = m.kvm
    kvm.sched = s
    lock = kvm.mmu_lock
    log = []

    def reader0():
        lock.read_lock()
        log.append("r0 in")
        s.point(0, "x")
        s.point(0, "x")
        lock.read_unlock()
        log.append("r0 out")

    def writer():
        lock.write_lock()
        log.append("w in")
        lock.write_unlock()

    def reader1():
        s.point(2, "x")
        lock.read_lock()
        log.append("r1 in")
        lock.read_unlock()

    for fn in (reader0, writer, reader1):
        s.spawn(fn)
    from emu.checkers.sched import ReplayStrategy

    s.strategy = ReplayStrategy([0, 1, 2, 0, 0], strict=False)
    s.run()
    assert log.index("w in") < log.index("r1 in")
    assert log.index("r0 out") < log.index("w in")


# ---------------------------------------------------------------------------
# The checker's strength: realistic bugs switched in, one at a time
# ---------------------------------------------------------------------------

BUG_CASES = [
    # (bug, guest, machine options, explore options)
    ("kick-misses-running-vcpu", "convspin", {}, dict(runs=100, seed=1)),
    ("entry-ignores-requests", "convspin", {}, dict(runs=300, seed=2)),
    ("no-track", "convspin", {}, dict(runs=100, seed=1)),
    ("no-kick-after-track", "convspin", {}, dict(runs=100, seed=1)),
    ("busy-is-fatal", "accept2", {}, dict(runs=300, seed=1)),
    ("reflect-error-leaves-frozen", "accept2", {}, dict(runs=300, seed=1)),
    (
        "fault-ignores-invalidation",
        "sharedrw",
        {"host_events": ["private 0x1c00000-0x1c02000@40"]},
        dict(runs=300, seed=1),
    ),
]
# The same bugs in a plain VM, under page migration.
MIGRATE_CASES = [
    ("fault-ignores-invalidation", dict(runs=300, seed=1)),
    ("kick-misses-running-vcpu", dict(runs=100, seed=1)),
    ("entry-ignores-requests", dict(runs=300, seed=1)),
]


@pytest.mark.parametrize("bug, how", MIGRATE_CASES, ids=[c[0] for c in MIGRATE_CASES])
def test_bug_is_found_under_migration(bug, how):
    t0 = time.perf_counter()
    ex = Explorer(
        lambda: Machine("sharedrw", vm="default", vcpus=2, bugs=[bug], host_events=["migrate 0x1c00000-0x1c02000@40"])
    )
    ex.MINIMIZE_SECONDS = 5.0
    r = ex.random(depth=3, **how)
    # Found by the run-time checker (the old page freed while an SPTE maps it) or, when the stale
    # SPTE is installed only after the free, by the invariants at the end (an SPTE that maps a
    # page other than the memslot's backing): which schedule comes first depends on how many
    # scheduling points the guest's exits make.
    err = r.first_failure.error if r.failures else ""
    assert err.startswith("checker:") or (err.startswith("invariant broken:") and "its backing is" in err), (
        r.first_failure
    )
    assert time.perf_counter() - t0 < 60


def test_no_bug_nothing_reported_under_migration():
    ex = Explorer(lambda: Machine("sharedrw", vm="default", vcpus=2, host_events=["migrate 0x1c00000-0x1c02000@40"]))
    r = ex.random(runs=300, seed=1, depth=3)
    assert r.failures == 0, r.first_failure and r.first_failure.error


@pytest.mark.parametrize("bug, guest, opts, how", BUG_CASES, ids=[c[0] for c in BUG_CASES])
def test_bug_is_found_within_a_minute(bug, guest, opts, how):
    t0 = time.perf_counter()
    ex = Explorer(lambda: Machine(guest, vm="tdx", vcpus=2, bugs=[bug], **opts))
    ex.MINIMIZE_SECONDS = 5.0
    r = ex.random(depth=3, **how)
    assert r.failures >= 1, f"{bug} not found in {r.runs} schedules"
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize(
    "guest, opts",
    [("convspin", {}), ("accept2", {}), ("sharedrw", {"host_events": ["private 0x1c00000-0x1c02000@40"]})],
)
def test_no_bug_nothing_reported(guest, opts):
    ex = Explorer(lambda: Machine(guest, vm="tdx", vcpus=2, **opts))
    r = ex.random(runs=300, seed=1, depth=3)
    assert r.failures == 0, r.first_failure and r.first_failure.error


def test_every_bug_has_a_switch():
    b = Bugs(["busy-is-fatal"])
    assert b.busy_is_fatal and b.enabled == ["busy-is-fatal"]
    with pytest.raises(ValueError):
        Bugs(["no-such-bug"])
    assert set(BUGS) >= {c[0] for c in BUG_CASES}


# ---------------------------------------------------------------------------
# Campaigns judge each reaction
# ---------------------------------------------------------------------------


def test_expected_reactions():
    from emu.checkers.inject import parse_rule, expected_outcomes, judge

    exp = lambda text: sorted(expected_outcomes(parse_rule(text)))  # noqa: E731
    assert exp("seamcall.TDH_MEM_PAGE_AUG@1=TDX_OPERAND_BUSY") == ["survived"]
    assert exp("seamcall.TDH_MEM_PAGE_AUG@every=TDX_OPERAND_BUSY") == ["guest_error", "survived"]
    assert exp("seamcall.TDH_MEM_PAGE_AUG@1=TDX_EPT_WALK_FAILED") == ["kvm_bug_on"]
    assert exp("seamcall.TDH_MEM_RANGE_BLOCK@2=TDX_OPERAND_BUSY") == ["survived"]
    assert exp("seamcall.TDH_MEM_RANGE_BLOCK@every=TDX_OPERAND_BUSY") == ["kvm_bug_on", "survived"]
    assert exp("seamcall.TDH_PHYMEM_PAGE_RECLAIM@1=TDX_OPERAND_INVALID") == ["survived"]  # leaked
    assert exp("reflect.set_spte@1=EBUSY") == ["survived"] and exp("reflect.set_spte@1=EIO") == ["kvm_bug_on"]
    assert exp("reflect.remove_spte@1=EBUSY") == ["kvm_bug_on"]
    assert exp("backing_alloc@1") == ["guest_error"]
    rules = [parse_rule("reflect.set_spte@1=EIO")]
    assert judge(rules, {"reflect.set_spte"}, "kvm_bug_on") is None
    assert "does not survive" in judge(rules, {"reflect.set_spte"}, "survived")
    assert judge([], set(), "kvm_bug_on") == "kvm_bug_on with no fault injected"
    assert judge(rules, set(), "survived") is None  # it never fired


def test_inject_list_shows_the_judged_reaction():
    r = emu_cli("inject", "--list")
    assert r.returncode == 0
    assert "campaigns accept (a fault that fires once): BUSY: survived; other statuses: kvm_bug_on" in r.stdout


def test_campaign_reports_busy_treated_as_fatal():
    """A BUSY KVM retries upstream, turned into a KVM_BUG_ON: the campaign counts the runs whose
    reaction differs as failures, each with its reproducer."""
    r = emu_cli(
        "campaign",
        "accept2",
        "--vm",
        "tdx",
        "--vcpus",
        "2",
        "--runs",
        "60",
        "--seed",
        "2",
        "--bug",
        "busy-is-fatal",
        "--json",
    )
    assert r.returncode == 1
    obj = json.loads(r.stdout)
    assert obj["failures"] and all("reaction differs from upstream" in f["error"] for f in obj["failures"])
    assert all("--bug busy-is-fatal" in f["reproducer"] for f in obj["failures"])
    r = emu_cli("campaign", "accept2", "--vm", "tdx", "--vcpus", "2", "--runs", "60", "--seed", "2", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["failures"] == []


def test_failure_report_centers_on_the_failure():
    """The report shows the events around the first failure event, from every task (here the
    other vCPU's ACCEPT holding the entry lock, then the AUG that met it), not the run's last lines."""
    r = emu_cli(
        "explore", "accept2", "--vm", "tdx", "--vcpus", "2", "--random", "300", "--seed", "1", "--bug", "busy-is-fatal"
    )
    assert r.returncode == 1
    report = r.stdout[r.stdout.index("events around the failure") :]
    lines = report.splitlines()[1:]
    bug = next(i for i, line in enumerate(lines) if "kvm_bug_on:" in line)
    assert 0 < bug < len(lines) - 1  # events before and after it
    assert any("vcpu-0" in line for line in lines[:bug]) and any("vcpu-1" in line for line in lines[:bug])
    assert "TDX_OPERAND_BUSY" in lines[bug - 1]


def test_misconfig_on_a_non_mmio_spte_is_a_retry():
    """Upstream's handle_mmio_page_fault(): an EPT misconfiguration whose SPTE is no longer an MMIO
    SPTE (another vCPU changed it since the CPU's walk) makes the guest fault again; no KVM_BUG_ON."""
    from emu.kvm.mmu import PFERR_RSVD_MASK, PFERR_USER_MASK

    m = Machine("hello", vm="default")
    v = m.vcpus[0]
    v.mmu_load()
    assert v.kvm_mmu_page_fault(0x200000, PFERR_USER_MASK) == 1  # a normal present SPTE
    assert v.kvm_mmu_page_fault(0x200000, PFERR_RSVD_MASK) == 1
    assert not m.kvm.vm_bugged and m.kvm.rcu.depth == {}


SPIN_AND_FAIL = """
.intel_syntax noprefix
.include "emu.inc"
    .text
    .globl _start
_start:
    test rdi, rdi
    jnz 1f
    mov ecx, 64                 # vCPU 0 spins a while (so vCPU 1 gets to run), then fails
2:  pause
    dec ecx
    jnz 2b
    FAIL 0x77
1:  pause                       # vCPU 1 waits for a flag nobody will set
    jmp 1b
"""


def test_an_error_stops_the_vcpus_spinning_in_guest_mode(tmp_path):
    """As QEMU stops the VM on a fatal error: the other vCPUs get a signal and leave KVM_RUN, even
    one spinning in guest mode; the run ends with the first error (exit status 1)."""
    src = tmp_path / "spinfail.S"
    src.write_text(SPIN_AND_FAIL)
    r = emu_cli("run", src, "--vcpus", "2", "--json")
    assert r.returncode == 1
    obj = json.loads(r.stdout)
    assert obj["exit"] == "fail" and "failed with code 0x77" in obj["error"]
    assert obj["vcpu_exits"] == ["fail", "stopped"]


@pytest.mark.parametrize("leaf", ["TDH_MNG_VPFLUSHDONE", "TDH_MNG_KEY_FREEID"])
def test_teardown_keeps_a_hkid_it_could_not_release(leaf):
    """tdx_mmu_release_hkid(): a failed VPFLUSHDONE skips the rest, a failed FREEID keeps the HKID;
    either is a KVM_BUG_ON, no RECLAIM follows, and the TD's pages are leaked and accounted."""
    from emu.checkers.check import check_destroyed

    m = Machine("private", vm="tdx", inject=[f"seamcall.{leaf}@1=TDX_OPERAND_INVALID"])
    assert m.run().ok
    ops = m.kvm.x86_ops
    before = dict(ops.seamcall_counts)
    m.destroy()
    calls = {k: v - before.get(k, 0) for k, v in ops.seamcall_counts.items()}
    assert m.kvm.vm_bugged and m.kvm.tdx.hkid is not None
    assert calls.get("TDH_PHYMEM_PAGE_RECLAIM", 0) == 0
    assert calls.get("TDH_MNG_KEY_FREEID", 0) == (1 if leaf == "TDH_MNG_KEY_FREEID" else 0)
    leaked = {hpa for hpa, _ in m.host.leaked}
    assert m.kvm.tdx.tdr_pa in leaked and set(m.kvm.tdx.tdcs_pa) <= leaked
    assert check_destroyed(m.kvm) == []


def test_perfetto_gives_the_host_task_a_track(tmp_path):
    out = tmp_path / "p.json"
    r = emu_cli(
        "run",
        "sharedrw",
        "--vm",
        "tdx",
        "--vcpus",
        "2",
        "--host",
        "private 0x1c00000-0x1c02000@40",
        "--trace",
        "perfetto",
        "--trace-file",
        out,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    events = d["traceEvents"] if isinstance(d, dict) else d
    tracks = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    assert tracks[2000] == "host task host0"
    assert any(e.get("tid") == 2000 and e.get("name") == "kvm_set_memory_attributes" for e in events)


# ---------------------------------------------------------------------------
# Memslot deletion: kvm_arch_flush_shadow_memslot()
# ---------------------------------------------------------------------------


def test_default_vm_memslot_delete_is_zap_all_fast():
    """kvm_mmu_zap_all_fast() (a default VM, KVM_X86_QUIRK_SLOT_ZAP_ALL): under the write lock
    mmu_valid_gen toggles, the direct roots become invalid and every vCPU gets
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS; then kvm_tdp_mmu_zap_invalidated_roots() zaps them under the
    read lock and puts the MMU's reference.  The vCPU puts its own at its next entry and loads a
    new root (kvm_mmu_free_obsolete_roots(), kvm_mmu_reload())."""
    from emu.kvm.kvm import KVM_REQ_MMU_FREE_OBSOLETE_ROOTS

    m = Machine("touch", vm="default", vcpus=2)
    kvm, tdp = m.kvm, m.kvm.tdp_mmu
    for v in m.vcpus:
        v.mmu_load()
    m.vcpus[0].kvm_tdp_map_page(0x1000000)
    old = m.vcpus[0].root
    assert m.vcpus[1].root is old and tdp.pages > 0
    kvm.set_user_memory_region(1, 0, m.mem_size, 0x1000, m.hva)  # an extra slot, unused
    seen = {}
    real_request, real_zap = kvm.kvm_make_vcpus_request, tdp.zap_root

    def request(vcpus, req, wait=True):
        seen["request"] = (req, kvm.mmu_lock.writer, old.invalid, [v.vcpu_id for v in vcpus])
        return real_request(vcpus, req, wait)

    def zap_root(root, shared):
        seen["zap"] = (root is old, shared, kvm.mmu_lock.readers, kvm.mmu_lock.writer)
        return real_zap(root, shared)

    kvm.kvm_make_vcpus_request, tdp.zap_root = request, zap_root
    gen = kvm.mmu_valid_gen
    kvm.set_user_memory_region(1, 0, 0, 0, 0)
    assert kvm.mmu_valid_gen == gen ^ 1
    assert seen["request"] == (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, True, True, [0, 1])
    assert seen["zap"] == (True, True, 1, False)  # shared: under the read lock
    assert old.invalid and old.zapped and tdp.pages == 0
    assert old in tdp.roots and old.tdp_mmu_root_count == 2  # the two vCPUs' references
    assert all(v.requests & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS for v in m.vcpus)
    res = m.run()
    assert res.ok, res.error
    assert all(v.root is not None and v.root is not old and not v.root.invalid for v in m.vcpus)
    assert old not in tdp.roots  # the last reference put
    assert check_vm(kvm) == []
    m.destroy()
    assert check_destroyed(kvm) == []


def test_td_memslot_delete_zaps_the_slot():
    """kvm_mmu_zap_memslot() for a TD (not a default VM): the slot's range is unmapped from every
    root under the write lock; no root is invalidated."""
    m = Machine("private", vm="tdx")
    res = m.run()
    assert res.ok, res.error
    kvm = m.kvm
    roots = list(kvm.tdp_mmu.roots)
    zaps = kvm.stat["zaps"]
    kvm.set_user_memory_region(0, 0, 0, 0, 0)
    assert kvm.tdp_mmu.roots == roots and not any(r.invalid for r in roots)
    assert kvm.stat["zaps"] == zaps + 1 and kvm.stat["pages_4k"] == 0
    assert kvm.mmu_valid_gen == 0
    m.destroy()
    assert check_destroyed(kvm) == []


def test_memslot_delete_kicks_vcpus_in_guest_mode():
    """A host task deletes an unused memslot while two vCPUs spin in guest mode: each is kicked
    (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS waits for the IPI), loads a new root, faults its pages in
    again, and the guest's results are unchanged; the checker sees no stale translation."""
    m = Machine("smp", vm="default", vcpus=2)
    kvm = m.kvm
    kvm.set_user_memory_region(1, 0, m.mem_size, 0x1000, m.hva)
    sched = Scheduler()
    kicked = []
    real = kvm.kvm_make_vcpus_request

    def request(vcpus, req, wait=True):
        t = real(vcpus, req, wait)
        kicked.append([v.vcpu_id for v in t])
        return t

    kvm.kvm_make_vcpus_request = request
    done = {}

    def host():
        roots = [v.root for v in m.vcpus]
        kvm.set_user_memory_region(1, 0, 0, 0, 0)
        done["old"] = roots

    sched.spawn(host, name="host0", host=True, start=100)
    res = m.run_scheduled(sched)
    assert res.ok, res.error
    assert sorted(res.reports) == [(0, 2), (0, SMP_ITERS * 2), (1, 2), (1, SMP_ITERS * 2)]
    assert done["old"][0] is not None and all(v.root is not done["old"][0] for v in m.vcpus)
    # The deletion waited in synchronize_srcu() until vCPU 1, which was in KVM, left its read-side
    # section by entering the guest: at the zap both vCPUs were in guest mode, and both get the IPI.
    assert kicked == [[0, 1]]
    assert kvm.violations == [] and check_vm(kvm) == []
    m.destroy()
    assert check_destroyed(kvm) == []


# ---------------------------------------------------------------------------
# The NX huge page mitigation and its recovery worker (free-without-grace-period)
# ---------------------------------------------------------------------------

NX_MACHINE = dict(vm="default", vcpus=2, hugepages="2m", nx_huge_pages=True)
NX_RECOVER = "nx-recover 0x0-0x200000@20"


def _nx_table(kvm):
    """The possible NX huge page of the image's 2M region (GPA 0-2M)."""
    sps = [sp for sp in kvm.tdp_mmu.possible_nx_huge_pages if sp.gfn == 0]
    assert len(sps) == 1, kvm.tdp_mmu.possible_nx_huge_pages
    return sps[0]


def test_nx_exec_fault_makes_a_disallowed_table_and_data_faults_go_into_it():
    """With the mitigation, the fetch in the image's 2M region maps 4K and marks its table; the
    data faults of the same region want 2M but go down into that table (disallowed_hugepage_adjust)."""
    m = Machine("nxhuge", **NX_MACHINE)
    res = m.run()
    assert res.ok, res.error
    assert sorted(res.reports) == [(0, 18), (1, 18)]
    kvm = m.kvm
    sp = _nx_table(kvm)
    assert sp.nx_huge_page_disallowed and sp.role_level == 1 and kvm.stat["nx_lpage_splits"] == 1
    assert kvm.mem.q[sp.ptep >> 3] & ~0xFFF & ((1 << 52) - 1) == sp.spt  # linked below the 2M entry
    root = m.vcpus[0].root
    leaves = {g: lvl for g, lvl, _ in kvm.tdp_mmu.leaves(root)}
    assert all(lvl == 1 for g, lvl in leaves.items() if g < 0x200), leaves  # region 0 only at 4K
    assert sum(1 for g in leaves if g < 0x200) >= 12 + 1  # 12 data pages and code
    assert check_vm(kvm) == []
    # Without the mitigation the same region is one 2M page.
    m = Machine("nxhuge", vm="default", vcpus=2, hugepages="2m")
    assert m.run().ok
    assert not m.kvm.tdp_mmu.possible_nx_huge_pages
    assert (0, 2) in {(g, lvl) for g, lvl, _ in m.kvm.tdp_mmu.leaves(m.vcpus[0].root)}


@pytest.mark.parametrize("bug", [False, True])
def test_nx_recovery_zaps_under_the_read_lock_and_frees_after_the_grace_period(bug):
    m = Machine("nxhuge", bugs=["free-without-grace-period"] if bug else [], **NX_MACHINE)
    assert m.run().ok
    kvm = m.kvm
    sp = _nx_table(kvm)
    seen = []
    orig = kvm.tdp_mmu.zap_possible_nx_huge_page

    def zap(sp, who=None):
        seen.append((kvm.mmu_lock.readers, kvm.mmu_lock.writer))
        return orig(sp, who)

    kvm.tdp_mmu.zap_possible_nx_huge_page = zap
    kvm.rcu.read_lock("walker")  # a fault's walk, inside the table
    assert kvm.recover_nx_huge_pages(0, 0x200) == 1
    assert seen == [(1, False)]  # mmu_lock for read, not write
    assert not kvm.tdp_mmu.possible_nx_huge_pages and not sp.nx_huge_page_disallowed
    assert kvm.stat["nx_lpage_splits"] == 0
    assert kvm.mem.q[sp.ptep >> 3] == 0x8000000000000000  # the 2M entry zapped (cmpxchg)
    assert (sp.spt in kvm.host.kernel.freed) == bug  # the bug frees it under the walker
    kvm.rcu.read_unlock("walker")
    assert sp.spt in kvm.host.kernel.freed and kvm.tdp_mmu.frees[sp.spt] == 1
    assert kvm.recover_nx_huge_pages(0, 0x200) == 0


def test_nx_recover_event_errors():
    with pytest.raises(MachineError, match=r"needs the mitigation on \(--nx-huge-pages\)"):
        Machine("nxhuge", vcpus=2, hugepages="2m", host_events=[NX_RECOVER])
    assert parse_host_event(NX_RECOVER).kind == "nx-recover"
    r = emu_cli("run", "nxhuge", "--vcpus", "2", "--hugepages", "2m", "--host", "nx-recover 0x0-0x200000")
    assert r.returncode == 2 and "needs the mitigation on" in r.stderr and r.stderr.count("\n") == 1


def test_nx_recover_event_runs_under_the_guest():
    sink = ListSink()
    m = Machine("nxhuge", tracer=Tracer([sink]), host_events=[NX_RECOVER], **NX_MACHINE)
    res = m.run()
    assert res.ok, res.error
    assert sorted(res.reports) == [(0, 18), (1, 18)]
    assert any(e.name == "kvm_nx_recover" for e in sink.events if e.vcpu == "host0")
    assert check_vm(m.kvm) == []


def test_nx_free_without_grace_period_is_found_within_a_minute():
    t0 = time.perf_counter()
    ex = Explorer(lambda: Machine("nxhuge", bugs=["free-without-grace-period"], host_events=[NX_RECOVER], **NX_MACHINE))
    ex.MINIMIZE_SECONDS = 5.0
    r = ex.random(runs=300, seed=1, depth=3)
    assert r.failures >= 1, f"not found in {r.runs} schedules"
    assert r.first_failure.error.startswith("checker: use after free"), r.first_failure.error
    assert time.perf_counter() - t0 < 60


def test_nx_no_bug_nothing_reported():
    ex = Explorer(lambda: Machine("nxhuge", host_events=[NX_RECOVER], **NX_MACHINE))
    r = ex.random(runs=300, seed=1, depth=3)
    assert r.failures == 0, r.first_failure and r.first_failure.error


def test_nx_reproducer_carries_the_option():
    r = emu_cli(
        "explore",
        "nxhuge",
        "--vcpus",
        "2",
        "--hugepages",
        "2m",
        "--nx-huge-pages",
        "--host",
        NX_RECOVER,
        "--bug",
        "free-without-grace-period",
        "--random",
        "300",
        "--seed",
        "1",
    )
    assert r.returncode != 0
    replay = next(line for line in r.stdout.splitlines() if "replay:" in line)
    assert "--nx-huge-pages" in replay and "--host 'nx-recover" in replay
