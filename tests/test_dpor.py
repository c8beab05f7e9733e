"""explore --dpor: source-DPOR with sleep sets (emu/dpor.py) over recorded step footprints."""

import json
import subprocess
import sys

import pytest

from emu.checkers.dpor import races
from emu.checkers.explore import Explorer, _error_kind
from emu.checkers.sched import Footprint
from emu.userspace.vmm import Machine


def fp(reads=(), writes=(), all_r=False, all_w=False):
    f = Footprint()
    f.reads, f.writes = set(reads), set(writes)
    f.all_r, f.all_w = all_r, all_w
    f.freeze()
    return f


# -- the dependency relation ------------------------------------------------------------------------------
def test_footprints_conflict_only_through_a_write():
    a = fp(reads={("spte", 8)})
    assert not a.dependent(fp(reads={("spte", 8)}))  # two reads commute
    assert a.dependent(fp(writes={("spte", 8)}))  # a read and a write do not
    assert fp(writes={("spte", 8)}).dependent(fp(writes={("spte", 8)}))
    assert not fp(writes={("spte", 8)}).dependent(fp(writes={("spte", 16)}))
    assert fp(all_w=True).dependent(fp())  # unknown: dependent on everything
    assert fp(all_r=True).dependent(fp(writes={"x"}))  # reads everything: any write
    assert not fp(all_r=True).dependent(fp(reads={"x"}))


def test_races_finds_the_unordered_conflicting_pair_only():
    # task 0 writes x, task 1 reads y then writes x: (0, 2) race; the reads of y do not.
    events = [(0, fp(writes={"x"}), 0), (1, fp(reads={"y"}), 1), (1, fp(writes={"x"}), -1)]
    found = [(i, j) for i, j, _ in races(events)]
    assert found == [(0, 2)]
    ((_, _, initials),) = races(events)
    assert initials == [1]


def test_races_ignores_a_pair_ordered_through_a_third_step():
    # 0:w(x) -> 1:r(x)w(y) -> 2:r(y)...w(x): (0, 2) are ordered by task 1; only the direct races remain.
    events = [(0, fp(writes={"x"}), 0), (1, fp(reads={"x"}, writes={"y"}), 1), (2, fp(reads={"y"}, writes={"x"}), 2)]
    found = {(i, j) for i, j, _ in races(events)}
    assert found == {(0, 1), (1, 2)}


# -- the search ---------------------------------------------------------------------------------------------
def _signatures(ex, search):
    seen = set()
    account = ex._account

    def keep(res, outcome, trace_strategy=None):
        if outcome.signature is not None:
            seen.add(outcome.signature)
        return account(res, outcome, trace_strategy)

    ex._account = keep
    ex.with_signature = True
    res = search(ex)
    return res, seen


def test_dpor_reaches_every_outcome_the_bounded_search_reaches_no_freeze():
    """Soundness: on the seed's race (no freeze), DFS and DPOR with the same bound reach the
    same distinct outcomes (errors, reports and final table contents), with far fewer runs."""
    make = lambda: Machine("race2", vm="tdx", vcpus=2, no_freeze=True)  # noqa: E731
    dfs, dfs_seen = _signatures(Explorer(make), lambda ex: ex.dfs(bound=1, stop_at_first=False))
    dpor, dpor_seen = _signatures(Explorer(make), lambda ex: ex.dpor(bound=1, stop_at_first=False))
    assert dfs.complete and dpor.complete
    assert dpor_seen == dfs_seen
    assert len({s[0] for s in dfs_seen}) >= 2  # the failures and the clean end
    assert dpor.runs * 5 <= dfs.runs


def test_dpor_reaches_what_the_bounded_search_reaches_accept2():
    """Soundness on a guest where both vCPUs accept the same pages (module locks, BUSY, retries)."""
    make = lambda: Machine("accept2", vm="tdx", vcpus=2)  # noqa: E731
    dfs, dfs_seen = _signatures(Explorer(make), lambda ex: ex.dfs(bound=1, stop_at_first=False))
    dpor, dpor_seen = _signatures(Explorer(make), lambda ex: ex.dpor(bound=1, stop_at_first=False))
    assert dfs.complete and dpor.complete
    assert dpor_seen == dfs_seen and dpor.runs < dfs.runs


def test_dpor_unbounded_race2_is_complete_and_clean():
    res = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2)).dpor()
    assert res.complete and res.failures == 0 and res.first_failure is None
    assert res.runs < 500


def test_dpor_finds_the_seed_race_unbounded_and_bounded():
    for bound in (None, 2):
        res = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2, no_freeze=True)).dpor(bound=bound)
        assert res.first_failure is not None, bound
        assert "TDH.MEM.PAGE.AUG" in res.first_failure.error
        assert "TDX_EPT_WALK_FAILED" in res.first_failure.error


def test_dpor_bound2_runs_5x_fewer_and_finds_the_same_failure():
    dfs = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2, no_freeze=True)).dfs(bound=2)
    dpor = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2, no_freeze=True)).dpor(bound=2)
    assert _error_kind(dfs.first_failure.error) == _error_kind(dpor.first_failure.error)
    # (the clean search's runs, DFS against DPOR, are measured by make bench: 2496 against 64)
    clean_dpor = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2)).dpor(bound=2)
    assert clean_dpor.complete and not clean_dpor.failures and clean_dpor.runs < 1682 // 5


def test_dpor_three_vcpus_bound2_completes():
    res = Explorer(lambda: Machine("race2", vm="tdx", vcpus=3)).dpor(bound=2)
    assert res.complete and res.failures == 0


def test_dpor_reports_a_switched_in_bug():
    res = Explorer(lambda: Machine("convspin", vm="tdx", vcpus=2, bugs=["no-track"])).dpor(bound=1)
    assert res.first_failure is not None


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "emu", *args], capture_output=True, text=True, timeout=600)


def test_cli_dpor_json():
    p = _cli("explore", "race2", "--vm", "tdx", "--vcpus", "2", "--dpor", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["complete"] is True and out["failures"] == 0 and out["first_failure"] is None
    assert out["runs"] >= 2 and "sleep_blocked" in out


@pytest.mark.parametrize("extra", [["--random", "5"], ["--replay", "emu-sched/1:0"]])
def test_cli_dpor_does_not_combine_with_sampling_or_replay(extra):
    p = _cli("explore", "race2", "--vm", "tdx", "--vcpus", "2", "--dpor", *extra)
    assert p.returncode == 2
    assert "--dpor" in p.stderr and "Traceback" not in p.stderr
