"""Dynamic partial-order reduction: one schedule per class of equivalent interleavings.

Two schedules that differ only in the order of independent steps (steps of different
tasks that touch disjoint state, or only read the same state) reach the same state, so
exploring one of them is enough.  This is source-DPOR with sleep sets (Abdulla, Aronis,
Jonsson, Sagonas, "Optimal dynamic partial order reduction", POPL 2014), run the way the
explorer runs everything: each schedule in a forked child of the snapshot, replaying a
prefix of choices.

A step is a task's run from one scheduling point to its next.  With footprints recorded
(Scheduler.record) each step carries what it read and wrote (emu.checkers.sched.Footprint): the
SPTE a point announces, mmu_lock (a reader's lock and unlock commute), RCU, a vCPU's
requests and mode, the page allocator, the TDX module's state, and for guest code every
page its TLB maps and the EPT entries behind them.  A step whose code is not audited
(VM exits, lock waits, host events, memslot and attribute changes, a KVM_BUG_ON) counts
as touching everything.

After each run, every pair of dependent steps of different tasks that no third step
orders (a race) asks for the other order: at the decision before the first step, one
task that can start the reversed order is added to the backtrack set, unless one
already there can.  Tasks already explored at a decision, whose first step is
independent of the one taken, go to sleep in the new branch until a dependent step
runs; a run where every runnable task sleeps is cut short (it adds nothing).

With a preemption bound, a race whose reversal would exceed it at its decision is also
tried at the latest earlier decision where switching is free (Coons, Musuvathi, McKinley,
"Bounded partial-order reduction", OOPSLA 2013), so bounded DPOR misses nothing that the
bounded search through those points finds.
"""

import time

from .sched import Strategy, ScheduleError, SleepBlocked


class DporStrategy(Strategy):
    """Replay ``prefix``; the last choice is a new branch, where ``candidates`` (task ->
    footprint of its first step there) may go to sleep.  Past the prefix: the default
    policy among the tasks that are awake."""

    def __init__(self, prefix, candidates):
        self.prefix = list(prefix)
        self.candidates = dict(candidates)
        self.sleep = {}
        self.node_sleep = {}  # decision index -> the sleep set there (past the prefix)

    def choose(self, sched, enabled, current, what):
        k = len(sched.decisions)
        if k < len(self.prefix):
            want = self.prefix[k]
            for t in enabled:
                if t.index == want:
                    return t
            raise ScheduleError(
                f"replay diverged at decision {k} ({what}): vCPU {want} cannot run "
                f"(runnable: {[t.index for t in enabled]})"
            )
        awake = [t for t in enabled if t.index not in self.sleep]
        if not awake:
            raise SleepBlocked()
        self.node_sleep[k] = dict(self.sleep)
        return sched.default_choice(awake, current, what)

    def forced(self, sched, task):
        if task.index in self.sleep:
            raise SleepBlocked()

    def stepped(self, sched):
        index, fp, dec = sched.events[-1]
        if dec == len(self.prefix) - 1 and self.candidates is not None:
            # The first step of the new branch: the tasks it does not disturb sleep.
            self.sleep = {p: f for p, f in self.candidates.items() if p != index and not f.dependent(fp)}
            self.candidates = None
        elif self.sleep:
            self.sleep = {p: f for p, f in self.sleep.items() if p != index and not f.dependent(fp)}


class Frame:
    """One decision of the current branch."""

    __slots__ = ("d", "done", "backtrack", "sleep", "fps", "pre")

    def __init__(self, d, sleep, pre):
        self.d = d
        self.done = {d.choice}
        self.backtrack = {d.choice}
        self.sleep = sleep  # task -> footprint: asleep when this decision was reached
        self.fps = {}  # task -> footprint of its first step from here
        self.pre = pre  # preemptions before this decision

    def allowed(self, task, bound):
        return bound is None or self.pre + self.d.is_preemption(task) <= bound


def races(events):
    """(i, j, initials): step i races with the later step j; ``initials`` are the tasks
    that can start a schedule in which j comes before i."""
    ntasks = 1 + max((e[0] for e in events), default=0)
    zero = (0,) * ntasks
    clocks = []  # the vector clock of each step (happens-before)
    pos = []  # each step's number within its task (1-based)
    count = [0] * ntasks
    last = [None] * ntasks  # the last step of each task
    last_writer = [None] * ntasks  # the last step of each task that wrote something
    last_all_w = [None] * ntasks
    last_all_r = [None] * ntasks
    key_w = {}  # key -> [last step of each task that wrote it]
    key_r = {}  # key -> [last step of each task that read it]
    out = []
    for j, (p, fp, _) in enumerate(events):
        # The latest step of each other task that j depends on.
        cand = [None] * ntasks

        def see(q, i):
            if i is not None and q != p and (cand[q] is None or i > cand[q]):
                cand[q] = i

        for q in range(ntasks):
            see(q, last_all_w[q])
            if fp.all_w:
                see(q, last[q])
            elif fp.all_r:
                see(q, last_writer[q])
            elif fp.writes:
                see(q, last_all_r[q])
        if not fp.all_w:
            for key in fp.writes:
                w, r = key_w.get(key), key_r.get(key)
                for q in range(ntasks):
                    if w is not None:
                        see(q, w[q])
                    if r is not None:
                        see(q, r[q])
            for key in fp.reads:
                w = key_w.get(key)
                if w is not None:
                    for q in range(ntasks):
                        see(q, w[q])
        prev = last[p]
        base = clocks[prev] if prev is not None else zero
        preds = [i for i in cand if i is not None]
        vc = list(base)
        for i in preds:
            ci = clocks[i]
            for t in range(ntasks):
                if ci[t] > vc[t]:
                    vc[t] = ci[t]
        count[p] += 1
        vc[p] = count[p]
        clocks.append(tuple(vc))
        pos.append(count[p])
        # A race: i is not ordered before j by another of j's predecessors.
        for i in preds:
            qi = events[i][0]
            other = list(base)
            for k in preds:
                if k != i:
                    ck = clocks[k]
                    for t in range(ntasks):
                        if ck[t] > other[t]:
                            other[t] = ck[t]
            if other[qi] >= pos[i]:
                continue
            out.append((i, j, _initials(events, clocks, pos, i, j)))
        last[p] = j
        if fp.writes or fp.all_w:
            last_writer[p] = j
        if fp.all_w:
            last_all_w[p] = j
        if fp.all_r:
            last_all_r[p] = j
        for key in fp.writes:
            key_w.setdefault(key, [None] * ntasks)[p] = j
        for key in fp.reads:
            key_r.setdefault(key, [None] * ntasks)[p] = j
    return out


def _initials(events, clocks, pos, i, j):
    """The tasks that can go first in v = (the steps after i not ordered after it), then j."""
    pi, posi = events[i][0], pos[i]
    v = [k for k in range(i + 1, j) if clocks[k][pi] < posi] + [j]
    seen, initials = set(), []
    for n, k in enumerate(v):
        q = events[k][0]
        if q in seen:
            continue
        seen.add(q)
        ck = clocks[k]
        if all(ck[events[m][0]] < pos[m] for m in v[:n] if events[m][0] != q):
            initials.append(q)
    return initials


def explore(ex, result, bound=None, max_runs=None, stop_at_first=True, tick=None):
    """Source-DPOR over ``ex`` (an emu.checkers.explore.Explorer); fills ``result`` (ExploreResult)."""
    frames = []
    prefix, candidates = [], {}
    t0 = time.perf_counter()
    first = True
    while True:
        out = ex.run_recorded(DporStrategy(prefix, candidates))
        if first:
            first = False
            out.seconds = time.perf_counter() - t0
            ex.baseline_done(out)  # the clean run: every run's limits (or CleanRunHangs)
            if out.error is None and not out.blocked:
                ex.expected = out.reports
        result.runs += 1
        if out.blocked:
            result.sleep_blocked += 1
        else:
            ex._account(result, out, None)
        if result.first_failure is not None and stop_at_first:
            break
        events = out.events or []
        n0 = len(prefix) - 1
        first_fp = {}
        for task, fp, dec in events:
            if dec >= 0 and dec not in first_fp:
                first_fp[dec] = fp
        if n0 >= 0 and n0 in first_fp:
            frames[n0].fps[prefix[-1]] = first_fp[n0]
        pre = frames[n0].pre + frames[n0].d.preempt if n0 >= 0 else 0
        for k in range(n0 + 1, len(out.decisions)):
            d = out.decisions[k]
            f = Frame(d, out.node_sleep.get(k, {}), pre)
            if k in first_fp:
                f.fps[d.choice] = first_fp[k]
            frames.append(f)
            pre += d.preempt
        _backtrack(frames, events, bound)
        # The deepest decision with a task left to try.
        nxt = None
        while frames:
            f = frames[-1]
            todo = sorted(
                q for q in f.backtrack - f.done if q not in f.sleep and q in f.d.enabled and f.allowed(q, bound)
            )
            if todo:
                nxt = todo[0]
                break
            frames.pop()
        if nxt is None:
            result.complete = True
            break
        if max_runs is not None and result.runs >= max_runs:
            break
        f = frames[-1]
        candidates = {}
        if bound is None:
            # Sleep sets prune what another branch covers; under a preemption bound that
            # branch may have been cut, so they are used only without one.
            candidates = dict(f.sleep)
            for q in f.done:
                if q in f.fps:
                    candidates[q] = f.fps[q]
        f.done.add(nxt)
        f.d = f.d.with_choice(nxt)
        prefix = [g.d.choice for g in frames]
        if tick is not None:
            tick(result, t0)
    return result


def _backtrack(frames, events, bound):
    for i, j, initials in races(events):
        dec = events[i][2]
        if dec < 0 or dec >= len(frames):
            continue  # i was the only task that could run there
        _add(frames, dec, initials, bound)


def _add(frames, dec, initials, bound):
    f = frames[dec]
    enabled = f.d.enabled
    if any(q in f.backtrack for q in initials):
        return
    cands = [q for q in initials if q in enabled]
    if not cands:
        # (fairness may hide a task at this decision) every task that can run here
        cands = list(enabled)
    if all(q in f.sleep for q in cands):
        return
    q = next(q for q in cands if q not in f.sleep)
    f.backtrack.add(q)
    if bound is not None:
        # Bounded POR: the reversal may need q to run earlier than the bound lets it here,
        # so also try it where switching to it costs no preemption.
        for g in reversed(frames[:dec]):
            if q in g.d.enabled and not g.d.is_preemption(q) and g.allowed(q, bound):
                g.backtrack.add(q)
                break
