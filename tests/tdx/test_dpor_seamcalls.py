"""Two CPUs issuing SEAMCALLs on host tasks, interleaved by the deterministic scheduler at the module's
scheduling points: every schedule (depth-first, all of them) against partial-order reduction
(emu.checkers.dpor, on the footprints the module announces: the call's keys and every lock it takes).
DPOR must reach every outcome (the statuses and the module's state) that some schedule reaches: the
locks' footprints are sound.  And the contention the locks cause is reachable from the explorer."""

import pytest

from emu.checkers import dpor
from emu.checkers.explore import ExploreResult, Outcome
from emu.checkers.sched import Scheduler, ReplayStrategy, Strategy, SleepBlocked
from emu.checkers.seamfuzz import Snapshot
from tdxmod import abi as A

from tdxhelpers import TdEnv, PAGE

G = 0x4000_0000
G2 = 0x4000_1000


class HostCalls:
    """What emu.checkers.dpor needs of an explorer, for host tasks that issue SEAMCALLs on a fresh
    TD: run_recorded(strategy) -> Outcome (with its steps' footprints), baseline_done(), _account(),
    expected."""

    def __init__(self, stage, setup, tasks):
        self.stage, self.setup, self.tasks = stage, setup, tasks
        self.expected = None
        self.outcomes = []

    def run(self, strategy, record=False):
        env = TdEnv(user_size=8 << 20).build(self.stage)
        ctx = self.setup(env)
        sched = Scheduler(strategy, max_steps=10000)
        sched.record = record
        env.mod.sched = sched
        statuses = [None] * len(self.tasks)

        def task(i):
            def body():
                statuses[i] = A.status_name(self.tasks[i](env, ctx).rax)

            return body

        for i in range(len(self.tasks)):
            sched.spawn(task(i), name=f"cpu {i}")
        blocked = False
        try:
            sched.run()
        except SleepBlocked:
            blocked = True
        finally:
            env.mod.sched = None
        snap = Snapshot(env.mod)
        state = frozenset((k, v) for k, v in snap.facts.items() if k[0] in ("pamt", "sept", "td"))
        out = Outcome(sched.decisions, None, (tuple(statuses), state))
        out.events = sched.events if record else None
        out.node_sleep = getattr(strategy, "node_sleep", {})
        out.blocked = blocked
        if not blocked and None not in statuses:
            self.outcomes.append(out.reports)
        return out

    def baseline_done(self, out):
        """The clean run sets no limits here: a SEAMCALL sequence runs no guest code."""

    def run_recorded(self, strategy):
        return self.run(strategy, record=True)

    def _account(self, res, outcome, trace_strategy):
        pass


def every_schedule(ex):
    """Depth-first over every decision: the outcomes of all schedules."""
    seen, todo, runs = set(), [[]], 0
    while todo:
        prefix = todo.pop()
        out = ex.run(ReplayStrategy(prefix, then=Strategy(), strict=True))
        runs += 1
        seen.add(out.reports)
        for k in range(len(prefix), len(out.decisions)):
            d = out.decisions[k]
            head = [x.choice for x in out.decisions[:k]]
            todo.extend(head + [alt] for alt in d.enabled if alt != d.choice)
    return seen, runs


def _aug(gpa, key="page"):
    return lambda env, ctx: env.call(A.TDH_MEM_PAGE_AUG, rcx=gpa, rdx=env.tdr, r8=ctx[key])


def _path(*gpas):
    def setup(env):
        for g in gpas:
            env.ensure_path(g, 0)
        return {"page": env.upage(), "page2": env.upage(), "source": env.source(b"x")}

    return setup


SCENARIOS = {
    # one page AUGed at two GPAs: its PAMT entry (pamt_locked), the S-EPT tree shared
    "aug-aug-same-page": ("runnable", _path(G, G2), [_aug(G), _aug(G2)]),
    # PAGE.ADD (TDR exclusive) against AUG (TDR shared, the entry lock) of the same GPA
    "page-add-vs-aug": (
        "initialized",
        _path(G),
        [
            lambda env, ctx: env.call(A.TDH_MEM_PAGE_ADD, rcx=G, rdx=env.tdr, r8=ctx["page"], r9=ctx["source"]),
            _aug(G, "page2"),
        ],
    ),
    # BLOCK (tree exclusive) against AUG (tree shared) of another GPA
    "block-vs-aug": (
        "runnable",
        lambda env: dict(_path(G2)(env), hpa=env.make_state(G, 0, "PENDING")),
        [lambda env, ctx: env.block(G), _aug(G2)],
    ),
    # two TRACKs (the epoch lock)
    "track-track": ("runnable", lambda env: {}, [lambda env, ctx: env.track(), lambda env, ctx: env.track()]),
    # RECLAIM of the page an AUG is taking (its PAMT entry, exclusive both)
    "aug-vs-reclaim": (
        "runnable",
        _path(G),
        [_aug(G), lambda env, ctx: env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=ctx["page"])],
    ),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_dpor_reaches_every_outcome_of_two_cpus(name):
    stage, setup, tasks = SCENARIOS[name]
    all_outcomes, dfs_runs = every_schedule(HostCalls(stage, setup, tasks))
    ex = HostCalls(stage, setup, tasks)
    res = dpor.explore(ex, ExploreResult(), stop_at_first=False)
    assert res.complete
    assert set(ex.outcomes) == all_outcomes, name
    assert res.runs <= dfs_runs


def test_the_explorer_reaches_the_pamt_lock_contention():
    """Some schedule of the two AUGs of one page meets the PAMT entry lock (BUSY|R8), another finds
    the page taken (PAGE_METADATA_INCORRECT|R8): both reachable by interleaving host tasks."""
    outcomes, _ = every_schedule(HostCalls(*SCENARIOS["aug-aug-same-page"]))
    statuses = {s for o in outcomes for s in o[0]}
    assert {"TDX_SUCCESS", "TDX_OPERAND_BUSY|0x8", "TDX_PAGE_METADATA_INCORRECT|0x8"} <= statuses
    assert PAGE
