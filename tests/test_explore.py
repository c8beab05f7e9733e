"""The scheduler and the interleaving explorer (emu.checkers.sched, emu.checkers.explore) on the seed's race.

race2: two vCPUs accept and touch private pages of one unmapped 2M region.  The
freeze protocol (REMOVED_SPTE while the reflect SEAMCALL runs) must make every
interleaving safe; without it (--no-freeze) one preemption, right after vCPU 0
publishes the 2M mirror entry and before its TDH.MEM.SEPT.ADD, lets vCPU 1's
TDH.MEM.PAGE.AUG fail with TDX_EPT_WALK_FAILED: the seed patch's race.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from emu.checkers.explore import Explorer
from emu.checkers.sched import (
    Scheduler,
    ReplayStrategy,
    encode_schedule,
    decode_schedule,
    ScheduleError,
    SCHEDULE_PREFIX,
)
from emu.userspace.vmm import Machine

ROOT = Path(__file__).resolve().parent.parent
AREA = 0x1400000


def race2(no_freeze, vcpus=2):
    return Explorer(lambda: Machine("race2", vm="tdx", vcpus=vcpus, no_freeze=no_freeze))


@pytest.fixture(scope="module")
def race_found():
    ex = race2(no_freeze=True)
    return ex, ex.dfs(bound=2)


def test_no_freeze_finds_the_seed_race(race_found):
    ex, res = race_found
    f = res.first_failure
    assert res.failures == 1 and f is not None
    # The module refuses the 4K mapping because the 2M S-EPT level is not there yet.
    assert "KVM_BUG_ON: TDH.MEM.PAGE.AUG" in f.error and "TDX_EPT_WALK_FAILED" in f.error
    assert f.preemptions == 1
    assert f.schedule.startswith(SCHEDULE_PREFIX) and f.minimized.startswith(SCHEDULE_PREFIX)
    # The trace shows the interleaving: vCPU 1's AUG fails before vCPU 0's SEPT.ADD of that 2M level.
    # (the SEAMCALL's completion lines, "seamcall:", not their "seamcall_entry:" lines)
    done = [line for line in f.trace if " seamcall: " in line]
    aug = next(i for i, line in enumerate(done) if "TDH_MEM_PAGE_AUG rcx 0x1401000" in line)
    sept = next(i for i, line in enumerate(done) if "TDH_MEM_SEPT_ADD rcx 0x1400001" in line)
    assert aug < sept
    assert "-> TDX_EPT_WALK_FAILED|0x1 rcx 0x8000000000000000 rdx 0x1" in done[aug]
    # and vCPU 0 had entered that SEPT.ADD before vCPU 1's AUG: the preemption is inside it
    text = "\n".join(f.trace)
    assert text.index("seamcall_entry:              TDH_MEM_SEPT_ADD rcx 0x1400001") < text.index(
        "TDH_MEM_PAGE_AUG rcx 0x1401000"
    )


def test_replay_is_byte_for_byte(race_found):
    ex, res = race_found
    f = res.first_failure
    one = ex.replay(f.minimized)
    two = ex.replay(f.minimized)
    assert one.error == two.error == f.error
    assert one.trace == two.trace == f.trace
    assert one.schedule == f.minimized


def test_the_failing_schedule_passes_with_the_protocol(race_found):
    _, res = race_found
    ex = race2(no_freeze=False)
    ex.baseline()
    out = ex.run(ReplayStrategy(decode_schedule(res.first_failure.minimized), strict=False))
    assert out.error is None
    assert out.reports == {0: [AREA + 0x2A], 1: [AREA + 0x1000 + 0x2A]}


def test_freeze_protocol_survives_every_schedule_with_two_preemptions():
    res = race2(no_freeze=False).dfs(bound=2)
    assert res.complete and res.failures == 0 and res.first_failure is None
    assert res.runs > 100  # the bounded space is real, not one schedule


def test_random_pct_finds_the_race_and_is_seeded():
    a = race2(no_freeze=True).random(runs=200, seed=7, depth=3)
    b = race2(no_freeze=True).random(runs=200, seed=7, depth=3)
    assert a.first_failure is not None
    assert (a.runs, a.first_failure.schedule) == (b.runs, b.first_failure.schedule)


def test_three_vcpus_complete():
    m = Machine("race2", vm="tdx", vcpus=3)
    s = Scheduler()
    res = m.run_scheduled(s)
    assert res.ok and sorted(res.reports) == [(0, AREA + 0x2A), (1, AREA + 0x102A), (2, AREA + 0x202A)]
    assert res.vcpu_exits == ["hlt"] * 3
    ex = race2(no_freeze=False, vcpus=3)
    r = ex.random(runs=30, seed=1, depth=3)
    assert r.failures == 0 and r.runs == 30


def test_default_vm_interleavings_are_safe():
    ex = Explorer(lambda: Machine("touch", vm="default", vcpus=2))
    r = ex.random(runs=20, seed=2, depth=2)
    assert r.failures == 0


# -- schedules ----------------------------------------------------------------------------------------------
def test_schedule_encoding_round_trips():
    choices = [0] * 12 + [1] * 3 + [0] + [2, 2]
    text = encode_schedule(choices)
    assert text == "emu-sched/1:0*12.1*3.0.2*2"
    assert decode_schedule(text) == choices
    assert decode_schedule(encode_schedule([])) == []


@pytest.mark.parametrize("bad", ["0*3", "emu-sched/2:0", "emu-sched/1:x", "emu-sched/1:0*"])
def test_bad_schedules_are_refused(bad):
    with pytest.raises(ScheduleError):
        decode_schedule(bad)


def test_a_replay_that_diverges_says_where():
    ex = race2(no_freeze=False)
    out = ex.run(ReplayStrategy([0, 0, 5], strict=True))
    assert out.error.startswith("replay: replay diverged at decision 2 (")
    assert "vCPU 5 cannot run (runnable: [0, 1])" in out.error
    out = ex.run(ReplayStrategy([1] * 500, strict=True))
    assert out.error.startswith("replay: replay diverged: the run ended after ")


# -- the command line ---------------------------------------------------------------------------------------
def emu(*args):
    return subprocess.run(
        [sys.executable, "-m", "emu", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_cli_explore_json_finds_the_race():
    p = emu(
        "explore", "race2", "--vm", "tdx", "--vcpus", "2", "--no-freeze", "--random", "100", "--seed", "3", "--json"
    )
    assert p.returncode == 1, p.stderr
    out = json.loads(p.stdout)
    assert {"runs", "failures", "first_failure"} <= set(out)
    f = out["first_failure"]
    assert out["failures"] == 1 and {"schedule", "error", "trace"} <= set(f)
    assert "TDX_EPT_WALK_FAILED" in f["error"] and isinstance(f["trace"], list)
    r = emu("explore", "race2", "--vm", "tdx", "--vcpus", "2", "--no-freeze", "--replay", f["minimized"], "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["trace"] == f["trace"]


def test_cli_explore_passes_with_the_protocol():
    p = emu("explore", "race2", "--vm", "tdx", "--vcpus", "2", "--random", "30", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["runs"] == 30 and out["failures"] == 0 and out["first_failure"] is None


@pytest.mark.parametrize("args", [["--replay", "nonsense"], ["--random", "0"], ["--bound", "-1"]])
def test_cli_explore_bad_input(args):
    p = emu("explore", "race2", "--vm", "tdx", "--vcpus", "2", *args)
    assert p.returncode == 2
    assert p.stderr.startswith("emu: error:") and p.stderr.count("\n") == 1


# -- PCT's fork tree (emu.checkers.forktree) ----------------------------------------------------------------
# Runs that chose alike share one process and fork where they part.  That is only a speed-up if
# every run's outcome is exactly the one it has when it runs alone from the snapshot.


def _pct_outcomes(ex, seeds, tree, jobs=2):
    from emu.checkers.explore import PctRuns, in_children, _explorer_error, _slim, _error_kind
    from emu.checkers.forktree import in_cohorts, run_cohort

    ex.with_signature = True
    base = ex.baseline()
    spec = PctRuns(ex, len(ex.machine.vcpus) + len(ex.machine.host_events), max(len(base.decisions), 1), 3)
    if tree:
        outs = in_cohorts(
            (spec.strategy(s) for s in seeds),
            len(seeds),
            jobs,
            lambda members: run_cohort(lambda st: ex._run_here(st, False), members, _slim, _explorer_error),
            in_children,
            _explorer_error,
        )
    else:
        run = spec.setup(None, here=ex)
        outs = in_children(((lambda s=s: run(s)) for s in seeds), _explorer_error, jobs)
    return [(o.signature, o.error and _error_kind(o.error), o.error and o.schedule) for o in outs]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Machine("race2", vm="tdx", vcpus=2, no_freeze=True),
        lambda: Machine(
            "sharedrw",
            vm="tdx",
            vcpus=2,
            bugs=["fault-ignores-invalidation"],
            host_events=["private 0x1c00000-0x1c02000@40"],
        ),
    ],
    ids=["race2-no-freeze", "sharedrw-host-event-bug"],
)
def test_fork_tree_gives_each_run_its_own_outcome(make):
    # Both machines fail in some of these runs and pass in others, so failures (a branch's
    # error, its schedule) travel through the tree as well as passes.
    import random as _random

    rng = _random.Random(5)
    seeds = [rng.getrandbits(64) for _ in range(150)]
    per_run = _pct_outcomes(Explorer(make), seeds, tree=False)
    tree = _pct_outcomes(Explorer(make), seeds, tree=True)
    assert len(tree) == len(per_run) == 150
    assert tree == per_run
    assert len({o[0] for o in tree}) > 1  # the runs really differ
    assert any(o[1] for o in tree) and not all(o[1] for o in tree)


def test_fork_tree_keeps_the_first_failure():
    # The same first failure (by run index), schedule and count as the runs one by one would give.
    a = race2(no_freeze=True).random(runs=300, seed=3, depth=3, stop_at_first=False, jobs=2)
    b = race2(no_freeze=True).random(runs=300, seed=3, depth=3, stop_at_first=False, jobs=1)
    assert a.failures == b.failures > 0
    assert a.first_failure.schedule == b.first_failure.schedule
    c = race2(no_freeze=True).random(runs=300, seed=3, depth=3, jobs=2)
    assert c.first_failure.schedule == a.first_failure.schedule and c.runs <= 300
