"""Runs that put the snapshot back in place (emu.checkers.inplace) instead of forking each.

That is only a speed-up if every run's outcome is exactly the one it has when it runs
alone in a fresh fork of the snapshot, and if after a run everything is back: memory
byte for byte, the model's objects, the vCPUs' registers.  The guests here are the
README's bug table (every bug switched in, every shipped guest it is found on), so
failing runs, livelocks, host events and host-side writes to pages are all compared.
"""

import os
import random
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from emu.checkers.explore import Explorer, PctRuns, in_children, in_child, _explorer_error, _slim, _error_kind
from emu.checkers.inplace import InPlace, NotRestorable
from emu.checkers.pool import Known, pct_runs, serve_runs
from emu.checkers.sched import Strategy
from emu.kvm.attributes import GfnRanges
from emu.userspace.vmm import Machine

CONVSPIN = dict(vm="tdx", vcpus=2)
SHAREDRW_TD = dict(vm="tdx", vcpus=2, host_events=["private 0x1c00000-0x1c02000@40"])
SHAREDRW_MIGRATE = dict(vcpus=2, host_events=["migrate 0x1c00000-0x1c02000@40"])
NXHUGE = dict(vcpus=2, hugepages="2m", nx_huge_pages=True, host_events=["nx-recover 0x0-0x200000@20"])

CASES = {
    "race2-no-freeze": ("race2", dict(vm="tdx", vcpus=2, no_freeze=True)),
    "race2-3vcpus": ("race2", dict(vm="tdx", vcpus=3)),
    "convspin-no-track": ("convspin", dict(CONVSPIN, bugs=["no-track"])),
    "convspin-entry-ignores-requests": ("convspin", dict(CONVSPIN, bugs=["entry-ignores-requests"])),
    "convspin-kick-misses": ("convspin", dict(CONVSPIN, bugs=["kick-misses-running-vcpu"])),
    "accept2-busy-is-fatal": ("accept2", dict(vm="tdx", vcpus=2, bugs=["busy-is-fatal"])),
    "sharedrw-td-fault-ignores-invalidation": ("sharedrw", dict(SHAREDRW_TD, bugs=["fault-ignores-invalidation"])),
    "sharedrw-migrate-kick-misses": ("sharedrw", dict(SHAREDRW_MIGRATE, bugs=["kick-misses-running-vcpu"])),
    "sharedrw-migrate": ("sharedrw", SHAREDRW_MIGRATE),
    "nxhuge-free-without-grace-period": ("nxhuge", dict(NXHUGE, bugs=["free-without-grace-period"])),
    "smp-default": ("smp", dict(vcpus=2)),
}


def _outcomes(ex, seeds, inplace):
    """(signature, error kind, schedule) of PCT run s for each seed, in a fork each or in place."""
    ex.with_signature = True
    base = ex.baseline()
    spec = PctRuns(ex, len(ex.machine.vcpus) + len(ex.machine.host_events), max(len(base.decisions), 1), 3)
    if inplace:
        ip = ex.in_place()
        assert ip is not None, ex.not_in_place
        serve = serve_runs(ip, lambda st: ex._run_here(st, False), spec.strategy, _keep, _explorer_error)
        known = Known()
        outs = list(pct_runs(seeds, len(seeds), 2, serve, spec.strategy, _explorer_error, known))
        ex.known_hits = known.hits
    else:
        outs = list(
            in_children(((lambda s=s: ex._run_here(spec.strategy(s), False)) for s in seeds), _explorer_error, 2)
        )
    return [(o.signature, o.error and _error_kind(o.error), o.schedule, o.reports) for o in outs]


def _keep(out):
    return out  # the whole outcome: its decisions and reports too


@pytest.mark.parametrize("case", sorted(CASES))
def test_in_place_runs_give_each_run_its_own_outcome(case):
    guest, kw = CASES[case]
    rng = random.Random(7)
    seeds = [rng.getrandbits(64) for _ in range(60)]
    forked = _outcomes(Explorer(lambda: Machine(guest, **kw)), seeds, inplace=False)
    ex = Explorer(lambda: Machine(guest, **kw))
    placed = _outcomes(ex, seeds, inplace=True)
    assert len(placed) == len(forked) == 60
    for k, (a, b) in enumerate(zip(forked, placed)):
        assert a == b, f"run {k}: forked {a[1:]} in place {b[1:]}"
    assert len({o[2] for o in placed}) > 1  # the runs really differ
    if case == "race2-no-freeze":
        assert ex.known_hits > 0  # and some were not run at all: their schedule was known


def test_explore_finds_the_same_failures_in_place_and_forked():
    def explore(inplace, stop):
        ex = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2, no_freeze=True))
        ex.inplace = inplace
        return ex.random(runs=300, seed=3, depth=3, stop_at_first=stop, jobs=2)

    a, b = explore(True, False), explore(False, False)
    assert a.failures == b.failures > 0
    assert a.first_failure.schedule == b.first_failure.schedule
    assert a.first_failure.minimized == b.first_failure.minimized
    assert a.first_failure.trace == b.first_failure.trace
    c = explore(True, True)
    assert c.first_failure.schedule == a.first_failure.schedule and c.runs <= 300


def _state(m, ip):
    """Much of what a run may change, as a test can read it: all host memory (its CRC), the
    vCPUs' registers, KVM's counters and page tables, the host's allocator, the attributes."""
    mem = m.host.mem
    regs = [hw.get_regs() for hw in ip.hws]
    return (
        zlib.crc32(mem.buf),
        regs,
        dict(m.kvm.stat),
        m.kvm.tdp_mmu.pages,
        len(m.kvm.tdp_mmu.sp_of),
        m.host.kernel.in_use,
        m.host.kernel.next,
        list(m.host.kernel.free_list),
        mem.generation,
        m.kvm.private_gfns.starts[:],
        m.kvm.private_gfns.ends[:],
    )


@pytest.mark.parametrize(
    "case",
    [
        "race2-no-freeze",
        "sharedrw-td-fault-ignores-invalidation",
        "sharedrw-migrate",
        "nxhuge-free-without-grace-period",
    ],
)
def test_restore_puts_every_byte_and_counter_back(case):
    guest, kw = CASES[case]
    ex = Explorer(lambda: Machine(guest, **kw))
    ex.baseline()

    def check():
        m = ex.machine
        ip = InPlace(m)
        before = _state(m, ip)
        base = ex._run_here(Strategy(), True)
        spec = PctRuns(ex, len(m.vcpus) + len(m.host_events), len(base.decisions), 3)
        ip.restore()
        assert _state(m, ip) == before
        for s in range(1, 6):
            ex._run_here(spec.strategy(s), False)
            assert _state(m, ip) != before  # a run changes memory (so the check can fail)
            ip.restore()
            assert _state(m, ip) == before
        # and the non-preemptive run, traced, is the first one again, line for line
        again = ex._run_here(Strategy(), True)
        assert again.trace == base.trace and again.reports == base.reports and again.error == base.error
        return True

    assert in_child(check, _explorer_error) is True


def test_a_machine_that_cannot_be_restored_forks_instead():
    ex = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2, no_freeze=True))
    ex.machine.kvm.pending_work = (x for x in range(3))  # a generator: no way to put it back
    assert ex.in_place() is None
    assert "generator" in ex.not_in_place
    with pytest.raises(NotRestorable):
        InPlace(ex.machine)
    res = ex.random(runs=120, seed=3, depth=3, stop_at_first=False, jobs=2)
    assert res.runs == 120 and res.failures > 0


# -- the memory attributes' runs (emu.kvm.attributes) --------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 80), st.integers(0, 40)), max_size=25),
    st.integers(0, 130),
    st.integers(0, 50),
)
def test_gfn_ranges_behave_as_a_set_of_gfns(ops, probe, width):
    r, model = GfnRanges(), set()
    for add, start, n in ops:
        if add:
            r.add(start, start + n)
            model.update(range(start, start + n))
        else:
            r.remove(start, start + n)
            model.difference_update(range(start, start + n))
        # the runs stay sorted, disjoint, non-empty and apart (two touching runs are one)
        assert all(s < e for s, e in zip(r.starts, r.ends))
        assert all(e < s for e, s in zip(r.ends, r.starts[1:]))
    assert set(r) == model and len(r) == len(model)
    assert (probe in r) == (probe in model)
    span = set(range(probe, probe + width))
    assert r.covers(probe, probe + width) == (span <= model)
    assert r.intersects(probe, probe + width) == bool(span & model)


def test_translated_code_goes_when_the_run_changed_its_page():
    # Unicorn drops code the guest itself overwrites, but not what restore() copies back:
    # a page code came from that differs from the snapshot's drops every vCPU's code.
    ex = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2))
    ex.baseline()

    def check():
        m = ex.machine
        ip = InPlace(m)
        ex._run_here(Strategy(), False)
        code = set().union(*(hw.code_pfns for hw in ip.hws))
        assert code
        ip.restore()
        assert ip.code_flushes == 0 and set().union(*(hw.code_pfns for hw in ip.hws)) == code
        ex._run_here(Strategy(), False)
        page = min(code) << 12
        m.host.mem.buf[page] ^= 0xFF  # as the guest's own store would (Unicorn's, not logged)
        ip.restore()
        assert ip.code_flushes == 1 and not any(hw.code_pfns for hw in ip.hws)
        # and the next run translates again, and gives the first run's outcome
        return ex._run_here(Strategy(), True).error

    assert in_child(check, _explorer_error) is None


def test_a_worker_that_dies_fails_its_run_and_is_replaced():
    ex = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2))
    base = ex.baseline()
    spec = PctRuns(ex, 2, len(base.decisions), 3)
    ip = ex.in_place()
    seeds = list(range(100, 130))

    def run_here(st):
        if st.seed == 110:
            os._exit(3)  # as a crash of Unicorn would
        return ex._run_here(st, False)

    def strategy_of(s):
        st = spec.strategy(s)
        st.seed = s
        return st

    outs = list(
        pct_runs(
            seeds,
            len(seeds),
            2,
            serve_runs(ip, run_here, strategy_of, _slim, _explorer_error),
            strategy_of,
            _explorer_error,
        )
    )
    assert len(outs) == 30
    died = [k for k, o in enumerate(outs) if o.error]
    assert 10 in died and all("the run's process died" in outs[k].error for k in died)
    assert len(died) <= 2  # the run, and at most the one queued behind it
    assert sum(1 for o in outs if o.error is None) >= 28


def test_results_that_arrive_together_are_all_taken():
    # While the consumer is busy, a worker's results pile up in the pipe; the parent must
    # take every one (select() sees the pipe, not a reader's buffer).
    import pickle
    import struct
    from emu.checkers.explore import Outcome

    def serve(req, res):
        while True:
            head = req.read(16)
            if len(head) < 16:
                return
            n, seed = struct.unpack("<QQ", head)
            data = pickle.dumps((n, Outcome([], None, {0: [seed]}), [(n, (0, 1), None, "start")]))
            res.write(struct.pack("<Q", len(data)) + data)
            res.flush()

    class Never:  # a strategy no earlier run's choice matches
        def choose(self, sched, enabled, current, what):
            return type(enabled[0])(-1)

    import signal
    import time

    def hung(*_):
        raise TimeoutError("pct_runs waits for a result it already holds")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    outs = []
    try:
        for o in pct_runs(range(1000, 1100), 100, 2, serve, lambda s: Never(), _explorer_error):
            outs.append(o)
            time.sleep(0.005)  # a slow consumer (explore minimizing a failure)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert [o.reports[0][0] for o in outs] == list(range(1000, 1100))
