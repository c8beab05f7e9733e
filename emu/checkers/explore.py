"""Explore the interleavings of a multi-vCPU guest: bounded DFS, PCT sampling, replay, minimization.

Every explored run starts from the same snapshot: the VM is built once (loaded,
TD finalized), and each run executes in a forked child process, so runs cannot
affect each other and cost no rebuild.  A run fails when KVM hits a KVM_BUG_ON,
an invariant of emu.checkers.check breaks, a vCPU's reports differ from the
non-preemptive run's, or the scheduler finds a deadlock or livelock, or it hangs.

No run hangs the exploration: each runs under a limit of guest code (``max_insns``, by
default 100x the clean run's, at least MIN_RUN_LIMIT blocks) and of wall clock
(``timeout``, none by default); a run past either fails as a hang ("hang: ...", with its
schedule).  A clean run that hangs is an error before any other run (CleanRunHangs).  A
process that stops answering (a run that takes ``stall_seconds``) is killed and its run
reported as a hang.

    ex = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2, no_freeze=True))
    result = ex.dfs(bound=2)          # or ex.random(runs=1000, seed=1, depth=3)
    result.first_failure              # Failure(schedule, minimized, error, trace) or None
"""

from __future__ import annotations

import gc
import os
import pickle
import random
import time
import traceback
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from ..userspace.vmm import Machine

from .check import check_vm
from .sched import Scheduler, Strategy, ReplayStrategy, encode_schedule, decode_schedule, ScheduleError, SleepBlocked
from ..trace import Tracer, ListSink, format_text
from .forktree import in_cohorts, run_cohort, send_bytes, receive_bytes, fork_child, kill, die_with, Deadline, Stalled

BASELINE_LIMIT = 10**9  # blocks of guest code the clean run may run (without --max-insns)
MIN_RUN_LIMIT = 10**7  # a run's default limit: 100x the clean run's blocks, at least this
RUN_LIMIT_FACTOR = 100
MIN_STALL_SECONDS = 60.0  # a run's process that answers within this (or 100x the clean run) is alive


class InvariantBroken(Exception):
    pass


class CleanRunHangs(Exception):
    """The guest hangs without any preemption or fault: there is nothing to explore."""


def run_limits(user_max_insns, baseline_blocks, baseline_seconds, timeout):
    """(the limit of every run, the seconds after which a run's process counts as stalled)."""
    limit = user_max_insns or max(MIN_RUN_LIMIT, RUN_LIMIT_FACTOR * (baseline_blocks or 0))
    stall = max(MIN_STALL_SECONDS, RUN_LIMIT_FACTOR * baseline_seconds, 2 * (timeout or 0))
    return limit, stall


class Outcome:
    """What one run did: its decisions, and the first problem (None if it passed)."""

    def __init__(self, decisions, error, reports, trace=None):
        self.decisions = decisions
        self.error = error
        self.reports = reports
        self.trace = trace
        self.events = None  # (emu.checkers.dpor) (task, Footprint, decision) per step
        self.node_sleep = {}
        self.blocked = False  # (emu.checkers.dpor) cut short: every runnable task slept
        self.signature = None  # (with_signature) what the run reached
        self.blocks = None  # blocks of guest code the run ran
        self.seconds = None  # (the clean run) its wall-clock time

    @property
    def schedule(self):
        return encode_schedule([d.choice for d in self.decisions])

    @property
    def preemptions(self):
        return sum(1 for d in self.decisions if d.preempt)


class Failure:
    def __init__(self, schedule, error, trace, minimized=None, preemptions=0):
        self.schedule, self.error, self.trace = schedule, error, trace
        self.minimized = minimized
        self.preemptions = preemptions

    def as_json(self):
        return {
            "schedule": self.schedule,
            "minimized": self.minimized,
            "error": self.error,
            "preemptions": self.preemptions,
            "trace": self.trace,
        }


class ExploreResult:
    def __init__(self):
        self.runs = 0
        self.failures = 0
        self.first_failure = None
        self.complete = False  # the whole bounded space was explored
        self.sleep_blocked = 0  # (--dpor) runs cut short as redundant
        self.interrupted = False
        self.seconds = 0.0

    @property
    def rate(self):
        return self.runs / self.seconds if self.seconds else 0.0

    def as_json(self):
        return {
            "runs": self.runs,
            "failures": self.failures,
            "complete": self.complete,
            "sleep_blocked": self.sleep_blocked,
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 3),
            "schedules_per_second": round(self.rate, 1),
            "first_failure": None if self.first_failure is None else self.first_failure.as_json(),
        }


class DeviationStrategy(Strategy):
    """The default policy, except at the given decision indices."""

    def __init__(self, deviations):
        self.deviations = deviations

    def choose(self, sched, enabled, current, what):
        want = self.deviations.get(len(sched.decisions))
        if want is not None:
            for t in enabled:
                if t.index == want:
                    return t
        return sched.default_choice(enabled, current, what)


class PctStrategy(Strategy):
    """Probabilistic concurrency testing (Burckhardt et al.): random distinct priorities,
    and ``depth - 1`` change points at which the running vCPU drops to the lowest priority."""

    def __init__(self, rng, ntasks, nsteps, depth):
        prio = list(range(depth, depth + ntasks))
        rng.shuffle(prio)
        self.prio = prio
        self.change = set(rng.sample(range(max(nsteps, depth)), depth - 1)) if depth > 1 else set()
        self.low = depth - 1

    def choose(self, sched, enabled, current, what):
        k = len(sched.decisions)
        if k in self.change and current is not None:
            self.prio[current.index] = self.low
            self.low -= 1
        return max(enabled, key=lambda t: self.prio[t.index])


class Explorer:
    def __init__(
        self,
        factory: Callable[[], Machine],
        check_invariants: bool = True,
        max_steps: int = 100000,
        check_steps: bool = False,
        max_insns: int | None = None,
        timeout: float | None = None,
    ) -> None:
        """``factory()`` builds the Machine every run starts from (it is built once).  ``max_insns``
        and ``timeout``: each run's limits (--max-insns, --timeout; see the module's docstring)."""
        self.machine = factory()
        self.machine.prepare_snapshot(limited=True)  # every run forks from it
        self.check_invariants = check_invariants
        self.check_steps = check_steps  # also check emu.checkers.check.check_step at every scheduling point
        self.max_steps = max_steps
        self.max_insns = max_insns
        self.timeout = timeout
        self.run_limit = None  # every run's limit, from the clean run (baseline_done)
        self.stall_seconds = None
        self.expected = None
        self.progress = None  # callable(result) every so often
        self.with_signature = False  # (tests) each outcome carries what the run reached
        self.inplace = True  # PCT runs go to in-place workers (emu.checkers.inplace, .pool)
        self._in_place = None
        self.not_in_place = None  # why they fork instead, when they do

    # -- one run ------------------------------------------------------------------------------------------
    def run(self, strategy, trace=False):
        """Run once from the snapshot (in a forked child) with ``strategy``."""
        return in_child(lambda: self._run_here(strategy, trace), _explorer_error, self.stall_seconds)

    def run_recorded(self, strategy):
        """Run once with every step's footprint recorded (emu.checkers.dpor)."""
        return in_child(lambda: self._run_here(strategy, False, record=True), _explorer_error, self.stall_seconds)

    def _run_here(self, strategy, trace, record=False):
        m = self.machine
        sink = None
        if trace:
            sink = ListSink()
            t = Tracer([sink])
            m.tracer = m.kvm.tracer = t
            if m.td:
                m.host.tdx_module.tracer = t
        on_step = None  # (the step-invariant checker, on request)
        if self.check_steps:
            from .check import check_step

            def on_step(s, who, what):
                problems = check_step(m.kvm)
                if problems:
                    raise InvariantBroken(f"after step {s.steps} ({what}, vCPU {who}): " + "; ".join(problems[:3]))

        sched = Scheduler(strategy, max_steps=self.max_steps, tracer=m.tracer, on_step=on_step)
        if record:
            from ..hw import ept, paging

            sched.record = True
            sched.mem = m.host.mem
            m.host.mem.sched = sched
            ept.AD_LOG, paging.AD_LOG = [], []
        error = None
        res = None
        blocked = False
        m.max_insns = self.run_limit or self.max_insns or BASELINE_LIMIT
        m.timeout = self.timeout
        try:
            res = m.run_scheduled(sched, collect_regs=False)
            if res.exit == "hang":
                error = f"hang: {res.error}"
            elif not res.ok and not res.accepted:  # (a selftest's check may expect the exit)
                error = res.error
            elif m.kvm.vm_dead:
                error = f"the VM is dead: {m.kvm.bug_reason}"
            elif self.check_invariants:
                problems = check_vm(m.kvm)
                if problems:
                    error = "invariant broken: " + "; ".join(problems[:3])
            if error is None and self.expected is not None and _per_vcpu(res.reports) != self.expected:
                error = f"guest results differ: {_per_vcpu(res.reports)} != {self.expected}"
            if (
                error is None
                and isinstance(strategy, ReplayStrategy)
                and strategy.strict
                and len(sched.decisions) < len(strategy.choices)
            ):
                error = (
                    f"replay: replay diverged: the run ended after {len(sched.decisions)} decisions, "
                    f"the schedule has {len(strategy.choices)}"
                )
        except SleepBlocked:
            blocked = True
        except ScheduleError as e:
            error = f"replay: {e}"
        except InvariantBroken as e:
            error = f"invariant broken {e}"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        lines = [format_text(ev) for ev in sink.events] if sink is not None else None
        out = Outcome(sched.decisions, error, _per_vcpu(res.reports) if res is not None else None, lines)
        out.blocks = m.guest_blocks
        if record:
            out.events = sched.events
            out.node_sleep = getattr(strategy, "node_sleep", {})
            out.blocked = blocked
        if self.with_signature and not blocked:
            out.signature = signature(m, out)
        return out

    def baseline(self):
        """The non-preemptive run: its reports are what every other run must report."""
        t0 = time.perf_counter()
        out = self.run(Strategy())
        out.seconds = time.perf_counter() - t0
        self.baseline_done(out)
        if out.error is None:
            self.expected = out.reports
        return out

    def baseline_done(self, out):
        """The clean run ``out`` sets every run's limits; CleanRunHangs if it hung itself."""
        if out.error is not None and out.error.startswith("hang: "):
            raise CleanRunHangs(
                f"the guest hangs in its clean run (no preemption, no fault), so there is "
                f"nothing to explore: {out.error[len('hang: ') :]}"
            )
        self.run_limit, self.stall_seconds = run_limits(self.max_insns, out.blocks, out.seconds or 0.0, self.timeout)

    def in_place(self):
        """The snapshot as emu.checkers.inplace restores it (built once), or None when the
        machine holds state it cannot put back, or ``self.inplace`` is off: PCT runs go to the
        fork tree instead."""
        if not self.inplace:
            return None
        if self._in_place is None:
            from .inplace import InPlace, NotRestorable

            try:
                self._in_place = InPlace(self.machine)
            except NotRestorable as e:
                self._in_place = False
                self.not_in_place = str(e)
        return self._in_place or None

    # -- strategies -----------------------------------------------------------------------------------------
    def dfs(self, bound: int = 2, max_runs: int | None = None, stop_at_first: bool = True) -> ExploreResult:
        """Every schedule with at most ``bound`` preemptions (CHESS), depth-first."""
        res = ExploreResult()
        t0 = time.perf_counter()
        frames: list = []  # per decision depth: [decision, tried choices, preemptions before]
        prefix: list | None = []
        try:
            base = self.baseline()
            outcome = base
            while True:
                res.runs += 1
                self._account(res, outcome, trace_strategy=ReplayStrategy([d.choice for d in outcome.decisions]))
                if res.first_failure is not None and stop_at_first:
                    break
                pre = 0
                for i, d in enumerate(outcome.decisions):
                    if i >= len(frames):
                        frames.append([d, {d.choice}, pre])
                    pre += d.preempt
                # Backtrack to the deepest decision with an untried choice within the bound.
                prefix = None
                while frames:
                    d, tried, pre = frames[-1]
                    alts = [c for c in d.enabled if c not in tried and pre + d.is_preemption(c) <= bound]
                    if alts:
                        c = alts[0]
                        tried.add(c)
                        prefix = [f[0].choice for f in frames[:-1]] + [c]
                        frames[-1][0] = d.with_choice(c)
                        break
                    frames.pop()
                if prefix is None:
                    res.complete = True
                    break
                if max_runs is not None and res.runs >= max_runs:
                    break
                self._tick(res, t0)
                outcome = self.run(ReplayStrategy(prefix, strict=False))
        except KeyboardInterrupt:
            res.interrupted = True
        res.seconds = time.perf_counter() - t0
        return res

    def dpor(self, bound: int | None = None, max_runs: int | None = None, stop_at_first: bool = True) -> ExploreResult:
        """Every schedule up to equivalence (emu.checkers.dpor), within ``bound`` preemptions if given."""
        from . import dpor

        res = ExploreResult()
        t0 = time.perf_counter()
        try:
            dpor.explore(self, res, bound=bound, max_runs=max_runs, stop_at_first=stop_at_first, tick=self._tick)
        except KeyboardInterrupt:
            res.interrupted = True
        res.seconds = time.perf_counter() - t0
        return res

    def random(
        self,
        runs: int,
        seed: int = 0,
        depth: int = 3,
        stop_at_first: bool = True,
        jobs: int | None = None,
        cluster: tuple | None = None,
    ) -> ExploreResult:
        """``runs`` PCT schedules; seed s names the whole exploration.  Runs are independent, so
        ``jobs`` of them (default: one per core) run at once; results are taken in run order,
        so the outcome does not depend on ``jobs``.  ``cluster`` (an emu.checkers.distributed.Cluster
        and the Machine's arguments: ``(cluster, machine_kwargs)``) runs them on Ray instead,
        with the same results."""
        res = ExploreResult()
        t0 = time.perf_counter()
        rng = random.Random(seed)
        jobs = jobs or default_jobs()
        try:
            base = self.baseline()
            nsteps = max(len(base.decisions), 1)
            n = len(self.machine.vcpus) + len(self.machine.host_events) + len(self.machine.host_threads)
            res.runs += 1
            self._account(res, base, ReplayStrategy([d.choice for d in base.decisions]))
            if res.runs < runs and not (stop_at_first and res.first_failure is not None):
                # Run k's seed is the k-th draw of Random(seed): drawn lazily, so a long
                # exploration (or one cut into batches for a cluster) holds no list of them.
                seeds = (rng.getrandbits(64) for _ in range(runs - 1))
                spec = PctRuns(self, n, nsteps, depth)
                if cluster is None:
                    ip = self.in_place()
                    if ip is not None:
                        from .pool import pct_runs, serve_runs

                        serve = serve_runs(
                            ip, lambda st: self._run_here(st, False), spec.strategy, _slim, _explorer_error
                        )
                        outs = pct_runs(
                            seeds, runs - 1, jobs, serve, spec.strategy, _explorer_error, stall=self.stall_seconds
                        )
                    else:
                        outs = in_cohorts(
                            (spec.strategy(s) for s in seeds),
                            runs - 1,
                            jobs,
                            lambda members: run_cohort(
                                lambda st: self._run_here(st, False), members, _slim, _explorer_error
                            ),
                            in_children,
                            _explorer_error,
                            stall=self.stall_seconds,
                        )
                else:
                    cl, machine_kwargs = cluster
                    outs = cl.map(
                        spec, seeds, runs - 1, elf=self.machine.elf, machine=machine_kwargs, stall=self.stall_seconds
                    )
                try:
                    for out in outs:
                        res.runs += 1
                        self._account(res, out, ReplayStrategy([d.choice for d in out.decisions]))
                        self._tick(res, t0)
                        if stop_at_first and res.first_failure is not None:
                            break
                finally:
                    outs.close()  # now, not when collected: a cluster's workers stop
            res.complete = res.runs >= runs
        except KeyboardInterrupt:
            res.interrupted = True
        res.seconds = time.perf_counter() - t0
        return res

    def replay(self, schedule: str) -> Outcome:
        """Run ``schedule`` (a printed schedule) exactly, with its trace."""
        choices = decode_schedule(schedule)
        return self.run(ReplayStrategy(choices, strict=True), trace=True)

    # -- failures ------------------------------------------------------------------------------------------
    def _account(self, res, outcome, trace_strategy):
        if outcome.error is None:
            return
        res.failures += 1
        if res.first_failure is None:
            minimized = self.minimize(outcome)
            traced = self.run(ReplayStrategy(decode_schedule(minimized), strict=True), trace=True)
            res.first_failure = Failure(outcome.schedule, outcome.error, traced.trace, minimized, outcome.preemptions)

    MINIMIZE_SECONDS = 20.0

    def minimize(self, outcome):
        """Drop every deviation from the default policy that the failure does not need (within
        MINIMIZE_SECONDS: a long failing run, a livelock, is not worth minutes)."""
        devs = {i: d.choice for i, d in enumerate(outcome.decisions) if d.choice != d.default}
        kind = _error_kind(outcome.error)
        deadline = time.perf_counter() + self.MINIMIZE_SECONDS
        for i in sorted(devs, reverse=True):
            if time.perf_counter() > deadline:
                break
            trial = {k: v for k, v in devs.items() if k != i}
            out = self.run(DeviationStrategy(trial))
            if out.error is not None and _error_kind(out.error) == kind:
                devs = trial
        out = self.run(DeviationStrategy(devs))
        return out.schedule if out.error is not None else outcome.schedule

    def _tick(self, res, t0):
        if self.progress is not None:
            res.seconds = time.perf_counter() - t0
            self.progress(res)


def _explorer_error(e):
    if isinstance(e, Stalled):
        return Outcome([], f"hang: {e}", None)
    return Outcome([], f"explorer: {type(e).__name__}: {e}\n{traceback.format_exc()}", None)


class PctRuns:
    """Explorer.random's runs as a picklable job: what a Ray worker needs besides the Machine
    to run PCT schedule s exactly as this process would (see emu.checkers.distributed)."""

    on_error = staticmethod(_explorer_error)

    def __init__(self, ex, n, nsteps, depth):
        self.expected = ex.expected
        self.check_invariants, self.check_steps, self.max_steps = ex.check_invariants, ex.check_steps, ex.max_steps
        self.run_limit, self.timeout = ex.run_limit, ex.timeout
        self.n, self.nsteps, self.depth = n, nsteps, depth

    def setup(self, factory, here=None):
        """The runner: seed -> Outcome (in the forked child of a run).  ``here``: this process's
        Explorer; without it (on a worker) one is built from ``factory``."""
        ex = here
        if ex is None:
            ex = Explorer(factory, self.check_invariants, self.max_steps, self.check_steps, timeout=self.timeout)
            ex.expected = self.expected
            ex.run_limit = self.run_limit

        def run(s):
            return _slim(ex._run_here(self.strategy(s), False))

        return run

    def strategy(self, s):
        return PctStrategy(random.Random(s), self.n, self.nsteps, self.depth)


def _slim(out):
    """What a PCT run sends back.  Only a failure's decisions are used (its schedule, its
    minimization): a passing run need not send them over the network, nor pickle them."""
    if out.error is None:
        slim = Outcome([], None, None)
        slim.signature = getattr(out, "signature", None)
        return slim
    return out


def _start_child(fn, on_error):
    r, w = os.pipe()
    parent = os.getpid()
    pid = fork_child()
    if pid == 0:
        # The child never returns into the parent's code (its copy of the stack): it ends here.
        try:
            os.close(r)
            die_with(parent)
            # The snapshot's objects out of the collector's sight: a collection in the child would
            # write to every one of them (their GC links), copying the pages they share.
            gc.freeze()
            try:
                data = pickle.dumps(fn())
            except BaseException as e:  # a bug of ours: the run's result says so
                data = pickle.dumps(on_error(e))
            send_bytes(w, data)
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def _finish_child(pid, r, on_error, deadline=None):
    try:
        data = receive_bytes(pid, r, deadline)
    except Stalled as e:
        return on_error(e)
    if data is None:
        return on_error(RuntimeError("the run's process died"))
    return pickle.loads(data)


def in_children(fns, on_error, jobs, stall=None):
    """Run the callables ``fns`` (an iterable) in forked children, ``jobs`` at a time (the
    machine's cores), yielding their results in order.  Stop iterating (or close) to stop:
    the children still running are killed (and what they forked, emu.checkers.forktree).
    A child that has not answered ``stall`` seconds after it started is killed, and its
    result is ``on_error(Stalled)``."""
    fns = iter(fns)
    running = []
    try:
        while True:
            while len(running) < jobs:
                fn = next(fns, None)
                if fn is None:
                    break
                running.append((*_start_child(fn, on_error), Deadline.within(stall)))
            if not running:
                return
            pid, r, deadline = running.pop(0)
            yield _finish_child(pid, r, on_error, deadline)
    finally:
        for pid, r, _ in running:
            os.close(r)
            kill(pid)


def default_jobs():
    return max(1, min(os.cpu_count() or 1, 8))


def in_child(fn, on_error, stall=None):
    """``fn()`` in a forked child of this process (a copy-on-write snapshot of everything),
    its picklable result sent back; ``on_error(exception)`` if it raised (or stalled: see
    in_children).  A Ctrl-C while it runs kills it."""
    pid, r = _start_child(fn, on_error)
    return _finish_child(pid, r, on_error, Deadline.within(stall))


def signature(m, outcome):
    """What a run reached, for comparing searches: the error (without numbers), each vCPU's
    reports, and every present leaf SPTE of every root (gfn, level, value without its pfn:
    the same state may have its pages in another order)."""
    from ..kvm.spte import SPTE_BASE_ADDR_MASK

    tdp = m.kvm.tdp_mmu
    tables = tuple(
        sorted(
            (bool(r.is_mirror), tuple((g, l, s & ~SPTE_BASE_ADDR_MASK) for g, l, s in tdp.leaves(r)))
            for r in tdp.roots
            if not r.invalid
        )
    )
    reports = tuple(sorted((k, tuple(v)) for k, v in (outcome.reports or {}).items()))
    return (_error_kind(outcome.error), reports, tables)


def _per_vcpu(reports):
    out = {}
    for vcpu, value in reports:
        out.setdefault(vcpu, []).append(value)
    return out


def _error_kind(error):
    """The error without vCPU numbers and addresses: two runs fail "the same way" when these match."""
    if not error:
        return None
    import re

    text = re.sub(r"vCPU \d+: ", "", error)
    return re.sub(r"0x[0-9a-fA-F]+|\b\d+\b", "N", text)
