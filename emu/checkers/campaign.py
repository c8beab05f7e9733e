"""Fault-injection campaigns: many runs, each with its own randomly drawn fault plan (and schedule).

    c = Campaign(lambda: Machine("convert", vm="tdx"), plans=[...])
    report = c.run(runs=1000, seed=1)

A campaign first runs the guest once without faults, every fault point counting its calls.
Each run then draws, from the campaign seed and its index, one to three of the
points that were called, a call number (or "every" / a probability) and an error
the point can return, on top of the user's own plans (swarm testing: each run
tests a different mix).  With several vCPUs the run also gets a PCT schedule.
Every run starts from the same snapshot (a forked child), runs to the end,
destroys the VM, and is classified:

    survived          the guest finished with the baseline's results; every invariant held
    kvm_bug_on        KVM hit a KVM_BUG_ON (the VM is dead): the expected end of some errors
    guest_error       the run ended in another error exit (KVM_RUN failed, watchdog, ...)
    invariant_broken  an invariant of emu.checkers.check broke, a result was lost, teardown left a page
                      unaccounted, or the model itself raised: a bug to report
    hang              the run went past its limit of guest code (--max-insns, by default 100x the
                      clean run's, at least 10^7 blocks) or of wall clock (--timeout), or its
                      process stopped answering: the table goes on

invariant_broken is a failure, and a hang is reported as one: each is printed with its reproducer.
A clean run that hangs is an error before any run.
"""

from __future__ import annotations

import collections
import random
import time
import traceback
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from ..userspace.vmm import Machine

from . import check
from .explore import in_child, in_children, default_jobs, PctStrategy, _per_vcpu, BASELINE_LIMIT, run_limits
from .forktree import Stalled
from .inject import Plan, POINTS, judge
from .sched import Scheduler
from tdxmod import abi as A

OUTCOMES = ("survived", "kvm_bug_on", "guest_error", "invariant_broken", "hang")

_SEAMCALL_ERRORS = (
    A.TDX_OPERAND_BUSY | A.OPERAND_ID_RCX,
    A.TDX_OPERAND_BUSY | A.OPERAND_ID_SEPT,
    A.TDX_EPT_WALK_FAILED | A.OPERAND_ID_RCX,
    A.TDX_EPT_ENTRY_STATE_INCORRECT | A.OPERAND_ID_RCX,
    A.TDX_OPERAND_INVALID | A.OPERAND_ID_RCX,
)


class RunReport:
    def __init__(self, index, plans, outcome, error, fired, schedule=None, seed=0):
        self.index, self.plans, self.outcome, self.error = index, plans, outcome, error
        self.fired = fired
        self.schedule = schedule
        self.seed = seed


class CampaignReport:
    def __init__(self):
        self.runs = []
        self.table = {}  # point -> {outcome: runs in which it fired}
        self.seconds = 0.0
        self.interrupted = False

    def count(self, outcome):
        return sum(1 for r in self.runs if r.outcome == outcome)

    @property
    def failures(self):
        return [r for r in self.runs if r.outcome == "invariant_broken"]

    @property
    def hangs(self):
        return [r for r in self.runs if r.outcome == "hang"]

    def as_json(self):
        return {
            "runs": len(self.runs),
            "seconds": round(self.seconds, 3),
            "outcomes": {o: self.count(o) for o in OUTCOMES},
            "points": {p: dict(c) for p, c in sorted(self.table.items())},
            "failures": [
                {"run": r.index, "plans": r.plans, "error": r.error, "schedule": r.schedule} for r in self.failures
            ],
            "hangs": [{"run": r.index, "plans": r.plans, "error": r.error, "schedule": r.schedule} for r in self.hangs],
            "interrupted": self.interrupted,
        }


class Campaign:
    def __init__(
        self,
        factory: Callable[[], Machine],
        plans: Sequence[str] = (),
        max_points: int = 3,
        baseline: tuple | None = None,
        max_insns: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """``baseline``: the (expected, calls, None, limits) of a campaign on the same machine, not
        run again.  ``max_insns``, ``timeout``: each run's limits (by default from the clean run)."""
        self.machine = factory()
        self.machine.prepare_snapshot(limited=True)  # every run forks from it
        self.user_plans = list(plans)
        self.max_points = max_points
        self.progress = None
        self.timeout = timeout
        counting = Plan((), seed=0, count_all=True)  # a clean run: the results every run must give
        if baseline is None:
            t0 = time.perf_counter()
            expected, calls, err, blocks = in_child(
                lambda: self._baseline(counting, max_insns), lambda e: (None, {}, f"{type(e).__name__}: {e}", None)
            )
            baseline = (expected, calls, err, run_limits(max_insns, blocks, time.perf_counter() - t0, timeout))
        self.baseline = baseline
        self.expected, self.calls, err, (self.run_limit, self.stall_seconds) = baseline
        if err is not None:
            raise RuntimeError(
                err if err.startswith("the guest hangs") else f"the guest fails without injected faults: {err}"
            )

    def _baseline(self, counting, max_insns):
        m = self.machine
        m.set_plan(counting)
        m.max_insns, m.timeout = max_insns or BASELINE_LIMIT, self.timeout
        res = m.run()
        if res.exit == "hang":
            return (
                None,
                {},
                f"the guest hangs without injected faults, so there is nothing to inject: {res.error}",
                None,
            )
        if not res.ok:
            return None, {}, res.error, None
        problems = check.check_vm(m.kvm)
        m.destroy()
        problems += check.check_destroyed(m.kvm)
        if problems:
            return None, {}, "; ".join(problems[:3]), None
        return _per_vcpu(res.reports), dict(counting.calls), None, m.guest_blocks

    # -- drawing plans --------------------------------------------------------------------------------
    # A delayed TLB flush breaks KVM's own guarantee (a stale translation survives): the checker
    # must catch it, so it is drawn only when the user asks for it with --inject.
    NOT_DRAWN = frozenset({"tlb_flush"})

    def draw(self, rng):
        """One to max_points rules over the points the guest calls."""
        points = sorted(p for p, n in self.calls.items() if n > 0 and p in POINTS and p not in self.NOT_DRAWN)
        if not points or self.max_points < 1:
            return []
        rules = []
        for name in rng.sample(points, rng.randint(1, min(self.max_points, len(points)))):
            point = POINTS[name]
            calls = self.calls[name]
            k = rng.random()
            if k < 0.7:
                trig = f"@{rng.randint(1, calls)}"
            elif k < 0.8:
                trig = "@every"
            else:
                trig = f"@p={rng.choice((0.05, 0.2, 0.5))}"
            if point.errors == "status":
                err = A.status_name(rng.choice(_SEAMCALL_ERRORS))
            else:
                err = rng.choice(sorted(point.errors))
            rules.append(f"{name}{trig}={err}")
        return rules

    # -- running ----------------------------------------------------------------------------------------
    def run(self, runs: int, seed: int = 0, jobs: int | None = None, cluster: tuple | None = None) -> CampaignReport:
        """``runs`` runs, ``jobs`` at a time (default: one per core); results in run order.
        ``cluster``: ``(an emu.checkers.distributed.Cluster, the Machine's arguments)`` runs them on Ray,
        with the same results."""
        rep = CampaignReport()
        t0 = time.perf_counter()
        handed: collections.deque = collections.deque()  # the runs handed out, in run order: a result is the first's

        def work():
            for i in range(runs):
                rng = random.Random(f"{seed}:{i}")
                plans = self.user_plans + self.draw(rng)
                run_seed = rng.getrandbits(32)
                handed.append((i, plans, run_seed))
                yield i, plans, run_seed

        if cluster is None:
            results = in_children(
                ((lambda a=a: self._one(*a)) for a in work()),
                _model_raised,
                jobs or default_jobs(),
                stall=self.stall_seconds,
            )
        else:
            cl, machine_kwargs = cluster
            results = cl.map(
                CampaignRuns(self), work(), runs, elf=self.machine.elf, machine=machine_kwargs, stall=self.stall_seconds
            )
        try:
            for r in results:
                i, plans, run_seed = handed.popleft()
                if r.index == -1:  # its process died or stopped answering: say which run
                    r.index, r.plans, r.seed = i, plans, run_seed
                rep.runs.append(r)
                for point in {p for p, _, _ in r.fired}:
                    row = rep.table.setdefault(point, {o: 0 for o in OUTCOMES})
                    row[r.outcome] += 1
                if self.progress is not None:
                    rep.seconds = time.perf_counter() - t0
                    self.progress(rep, runs)
        except KeyboardInterrupt:
            rep.interrupted = True
        finally:
            results.close()
        rep.seconds = time.perf_counter() - t0
        return rep

    def trace(self, r):
        """The trace (text lines) of run ``r`` again, from the snapshot: the same plans, seed and schedule."""

        def traced():
            from ..trace import Tracer, ListSink, format_text

            sink = ListSink()
            t = Tracer([sink])
            m = self.machine
            m.tracer = m.kvm.tracer = t
            t.symbolize = m.image.symbolize
            if m.td:
                m.host.tdx_module.tracer = t
            self._one(r.index, r.plans, r.seed)
            return [format_text(ev) for ev in sink.events]

        return in_child(traced, lambda e: [f"(tracing the run failed: {type(e).__name__}: {e})"], self.stall_seconds)

    def _one(self, index, plans, run_seed):
        try:
            return self._one_run(index, plans, run_seed)
        except Exception as e:  # a bug of the model: a failure, with its reproducer
            return RunReport(
                index,
                plans,
                "invariant_broken",
                f"the model raised {type(e).__name__}: {e}\n{traceback.format_exc()}",
                [],
                seed=run_seed,
            )

    def _one_run(self, index, plans, run_seed):
        m = self.machine
        plan = Plan(plans, seed=run_seed, tracer=m.tracer)
        m.set_plan(plan)
        m.max_insns, m.timeout = self.run_limit, self.timeout
        schedule = None
        if m.nvcpus > 1 or m.host_events:
            strategy = PctStrategy(random.Random(run_seed), m.nvcpus + len(m.host_events), 40, 3)
            sched = Scheduler(strategy, max_steps=200000)
            res = m.run_scheduled(sched, collect_regs=False)
            schedule = sched.schedule
        else:
            res = m.run()
        kvm = m.kvm
        problems = []
        if res.ok:
            outcome = "survived"
            problems += check.check_vm(kvm)
            got = _per_vcpu(res.reports)
            if got != self.expected:
                problems.append(f"guest results differ: {got} != {self.expected}")
        elif res.exit == "checker":
            outcome = "invariant_broken"
            problems.append(res.error)
        elif kvm.vm_bugged:
            outcome = "kvm_bug_on"
        elif res.exit == "hang":
            outcome = "hang"
        else:
            outcome = "guest_error"
        m.destroy()  # with the plan still active: teardown has fault points too
        problems += check.check_destroyed(kvm)
        if outcome == "survived" and kvm.vm_bugged:
            outcome = "kvm_bug_on"  # the guest finished, but teardown hit a KVM_BUG_ON
        if not problems and outcome != "hang":
            # Each fault's reaction must be upstream's: a run that survived a fault KVM must not
            # swallow, or died of one it retries, is a failure (as is any error with no fault).
            why = judge([r for rs in plan.rules.values() for r in rs], {p for p, _, _ in plan.fired}, outcome)
            if why is not None:
                problems.append(f"reaction differs from upstream: {why} ({res.error or kvm.bug_reason or 'no error'})")
        if problems:
            return RunReport(index, plans, "invariant_broken", "; ".join(problems[:3]), plan.fired, schedule, run_seed)
        return RunReport(index, plans, outcome, res.error or kvm.bug_reason, plan.fired, schedule, run_seed)


def _model_raised(e):
    if isinstance(e, Stalled):
        return RunReport(-1, [], "hang", str(e), [])
    return RunReport(
        -1, [], "invariant_broken", f"the model raised {type(e).__name__}: {e}\n{traceback.format_exc()}", []
    )


class CampaignRuns:
    """Campaign.run's runs as a picklable job for a Ray worker (see emu.checkers.distributed): the
    baseline travels with it, so a worker builds its snapshot and runs (i, plans, seed) as here."""

    on_error = staticmethod(_model_raised)

    def __init__(self, c):
        self.plans, self.max_points, self.baseline = c.user_plans, c.max_points, c.baseline
        self.timeout = c.timeout

    def setup(self, factory):
        c = Campaign(factory, self.plans, self.max_points, baseline=self.baseline, timeout=self.timeout)
        return lambda args: c._one(*args)


def reproducer(guest, vm, vcpus, r, flags=""):
    inj = " ".join(f"--inject '{p}'" for p in r.plans)
    if r.schedule is not None:
        return (
            f"python -m emu explore {guest} --vm {vm} --vcpus {vcpus}{flags} {inj} --seed {r.seed} "
            f"--replay '{r.schedule}'"
        )
    return f"python -m emu run {guest} --vm {vm}{flags} {inj} --seed {r.seed}"


def format_table(rep):
    lines = [f"{'fault point':<34}" + "".join(f"{o:>18}" for o in OUTCOMES)]
    for point, row in sorted(rep.table.items()):
        lines.append(f"{point:<34}" + "".join(f"{row[o]:>18}" for o in OUTCOMES))
    lines.append(f"{'(all runs)':<34}" + "".join(f"{rep.count(o):>18}" for o in OUTCOMES))
    return "\n".join(lines)
