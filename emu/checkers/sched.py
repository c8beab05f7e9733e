"""A deterministic scheduler for vCPUs: one greenlet per vCPU, switched only at scheduling points.

Every place where a vCPU touches state another vCPU can see calls
``sched.point(vcpu, what, arg)``: SPTE reads, cmpxchg and writes, freeze and
unfreeze, SEAMCALL entry and return, the frozen-SPTE retry, VM entry and exit.
Between two points a vCPU runs alone, so a run is a function of the sequence
of choices made at the points where more than one vCPU could go on: its
*schedule*.  Guest code runs only between VM entry and VM exit, never across
a switch, so Unicorn is never re-entered.

A Strategy makes the choices.  The default is non-preemptive: the running vCPU
goes on until it halts, blocks, or yields (a retry loop: waiting for a frozen
SPTE, a BUSY SEAMCALL), and then the next vCPU in index order runs.  Switching
away from a vCPU that could go on is a *preemption*; the explorer bounds them.

A schedule prints as ``emu-sched/1:`` followed by the choices, run-length
encoded (``0*12.1*3.0*5``); replaying it reproduces the run exactly, and a
replay that meets a choice that is not possible says where it diverged.
"""

import greenlet

SCHEDULE_PREFIX = "emu-sched/1:"

# Points where a vCPU waits for another one to make progress: the default policy switches.
# A vCPU in guest mode between two slices (its budget ran out, or a window of PAUSEs) yields
# too: a spinning vCPU gives way (CHESS's fairness for spin loops), so spinning neither starves
# the others nor adds choices.
YIELD_POINTS = frozenset(
    {
        "frozen_retry",
        "frozen_wait",
        "fault_local_retry",
        "lock_wait",
        "cond_resched",
        "ipi_wait",
        "guest_slice",
        "guest_pause",
        "vcpu_on_spin",
        "tdcall_busy",
        "sept_zap_wait",
        "mmu_invalidate_retry",
    }
)


# What the step after each scheduling point touches, for partial-order reduction (emu.checkers.dpor):
# the operation the point announces.  A point not named here starts a step that counts as
# touching everything (its code is not audited for what it shares).
SPTE_READ_POINTS = frozenset({"spte_read"})
SPTE_WRITE_POINTS = frozenset({"spte_cmpxchg", "spte_write", "spte_xchg", "frozen_retry", "frozen_wait"})
# Inside a SEAMCALL or a TDCALL: what the module said the call touches (module_keys).
MODULE_POINTS = frozenset(
    {
        "seamcall_entry",
        "sept_entry_locked",
        "sept_entry_locked_guest",
        "sept_locked_exclusive",
        "epoch_locked",
        "tdcall_busy",
        "tdr_locked",
        "tdvpr_locked",
        "pamt_locked",
        "host_interrupt_window",
        "tdcall_accept_2m",
    }
)
# Steps whose code announces what it shares itself (Scheduler.touch, from the locks, RCU,
# requests, the allocators, the invalidation state...): a vCPU's entry and guest code (what
# guest code touched is added as the slice ends: Vcpu.touch_guest), its exit handling and
# fault path, the retries, a zap's cond_resched.  A vCPU's first step (KVM_RUN) too; a
# host task's first step is a host event's setup, not audited.
OWN_POINTS = frozenset(
    {
        "vm_entry",
        "guest_mode",
        "guest_slice",
        "guest_pause",
        "vm_exit",
        "faultin_pfn",
        "faultin_pfn_done",
        "mmu_invalidate_retry",
        "fault_local_retry",
        "cond_resched",
        "seamcall_exit",
        "lpage_info",
        "split_alloc",
    }
)


class ScheduleError(Exception):
    pass


class SleepBlocked(Exception):
    """(emu.checkers.dpor) every runnable task is in the sleep set: this run adds nothing new."""


class Deadlock(Exception):
    pass


class StepLimit(Exception):
    pass


def encode_schedule(choices):
    runs = []
    for c in choices:
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return SCHEDULE_PREFIX + ".".join(f"{c}*{n}" if n > 1 else str(c) for c, n in runs)


def decode_schedule(text):
    text = text.strip()
    if not text.startswith(SCHEDULE_PREFIX):
        raise ScheduleError(f"not a schedule (it must start with {SCHEDULE_PREFIX!r}): {text[:40]!r}")
    body = text[len(SCHEDULE_PREFIX) :]
    out = []
    if not body:
        return out
    for part in body.split("."):
        try:
            if "*" in part:
                c, n = part.split("*")
                out += [int(c)] * int(n)
            else:
                out.append(int(part))
        except ValueError:
            raise ScheduleError(f"bad schedule element {part!r}") from None
    return out


class Decision:
    """One choice among several runnable vCPUs."""

    __slots__ = ("choice", "enabled", "what", "current", "default", "preempt")

    def __init__(self, choice, enabled, what, current, default, preempt):
        self.choice, self.enabled, self.what = choice, enabled, what
        self.current, self.default, self.preempt = current, default, preempt

    def is_preemption(self, choice):
        return self.current is not None and choice != self.current and self.current in self.enabled

    def with_choice(self, choice):
        """The same decision, taking ``choice`` instead."""
        return Decision(choice, self.enabled, self.what, self.current, self.default, self.is_preemption(choice))

    def __getstate__(self):
        return (self.choice, self.enabled, self.what, self.current, self.default, self.preempt)

    def __setstate__(self, s):
        self.choice, self.enabled, self.what, self.current, self.default, self.preempt = s

    def __repr__(self):
        return f"Decision({self.what}: {self.current}->{self.choice} of {self.enabled})"


class Task:
    def __init__(self, index, name=None, start=0):
        self.index = index
        self.name = name or f"vcpu {index}"
        self.glet = None
        self._body = None
        self.done = False
        self.wait = None  # a predicate: the task can run only when it holds
        self.host = False  # a host task (an event of the VMM or the host kernel)
        self.start = start  # a host task may run from this scheduling point on
        self.sched = None
        self.fair_wait = set()  # after a yield: tasks that must run before this one
        self.paused_at = ("start", None)  # the point the task's next step starts from

    def enabled(self):
        if self.done or (self.wait is not None and not self.wait()):
            return False
        if self.host and self.sched.steps < self.start:
            # Not yet: unless every vCPU has finished (an event is never skipped).
            return all(t.done for t in self.sched.tasks if not t.host)
        return True


class Strategy:
    """Default: non-preemptive, switch at yields.  Subclasses override choose()."""

    def choose(self, sched, enabled, current, what):
        return sched.default_choice(enabled, current, what)

    def stepped(self, sched):
        """(with footprints recorded) a step ended: sched.events[-1] holds it."""

    def forced(self, sched, task):
        """(with footprints recorded) ``task`` runs next: no other task could."""


class Footprint:
    """What one step read and wrote.  Two steps of different tasks are dependent (their
    order may matter) when one writes what the other reads or writes; a step that
    touched something unknown counts as reading or writing everything."""

    __slots__ = ("reads", "writes", "all_r", "all_w")

    def __init__(self):
        self.reads, self.writes = set(), set()
        self.all_r = self.all_w = False

    def freeze(self):
        self.reads = frozenset(self.reads - self.writes)
        self.writes = frozenset(self.writes)

    def dependent(self, other):
        if self.all_w or other.all_w:
            return True
        if (self.all_r and other.writes) or (other.all_r and self.writes):
            return True
        w = self.writes
        return bool(
            w
            and (not w.isdisjoint(other.writes) or not w.isdisjoint(other.reads))
            or other.writes
            and not other.writes.isdisjoint(self.reads)
        )

    def __getstate__(self):
        return (self.reads, self.writes, self.all_r, self.all_w)

    def __setstate__(self, s):
        self.reads, self.writes, self.all_r, self.all_w = s

    def __repr__(self):
        if self.all_w:
            return "Footprint(*)"
        return f"Footprint(r={sorted(map(str, self.reads))}, w={sorted(map(str, self.writes))}{', r*' if self.all_r else ''})"


class ReplayStrategy(Strategy):
    """Follow ``choices`` at each decision point, then go on with ``then``."""

    def __init__(self, choices, then=None, strict=True):
        self.choices = list(choices)
        self.then = then or Strategy()
        self.strict = strict

    def choose(self, sched, enabled, current, what):
        k = len(sched.decisions)
        if k < len(self.choices):
            want = self.choices[k]
            for t in enabled:
                if t.index == want:
                    return t
            if self.strict:
                raise ScheduleError(
                    f"replay diverged at decision {k} ({what}): vCPU {want} cannot run "
                    f"(runnable: {[t.index for t in enabled]})"
                )
        return self.then.choose(sched, enabled, current, what)


class Scheduler:
    def __init__(self, strategy=None, max_steps=200000, tracer=None, on_step=None):
        self.strategy = strategy or Strategy()
        self.tasks = []
        self.current = None
        self.main = None
        self.decisions = []  # (chosen task, enabled indices, point name, preempting)
        self.preemptions = 0
        self.steps = 0
        self.max_steps = max_steps
        self.tracer = tracer
        self.error = None
        self.on_step = on_step  # called at every scheduling point (invariant checks)
        # Footprints (emu.checkers.dpor): with ``record`` set, every step (a task's run from one
        # point to its next) is logged with what it read and wrote.
        self.record = False
        self._decided = False
        self.events = []  # Step per step taken
        self.fp = None  # the running step's Footprint
        self.mem = None  # host memory (its bulk writes are touches: HostMemory.sched)
        self.module_keys = {}  # task -> (reads, writes, reads everything) of its module call

    # -- tasks --------------------------------------------------------------------------------------------
    def spawn(self, fn, name=None, host=False, start=0):
        t = Task(len(self.tasks), name, start)
        t.host, t.sched = host, self

        def body():
            try:
                fn()
            finally:
                t.done = True

        t._body = body
        self.tasks.append(t)
        return t

    def run(self):
        """Run every task to completion (call from outside any task)."""
        self.main = greenlet.getcurrent()
        for t in self.tasks:
            t.glet = greenlet.greenlet(t._body, self.main)
        while True:
            live = [t for t in self.tasks if not t.done]
            if not live:
                return
            enabled = [t for t in live if t.enabled()]
            if not enabled:
                raise Deadlock(f"every vCPU is waiting: {[t.index for t in live]}")
            nxt = self._decide(enabled, None, "start")
            if self.record:
                self._begin_step(nxt)
            self._switch(nxt)
            if self.record:
                self._end_step(self.events[-1][0])
                self.strategy.stepped(self)

    def _switch(self, t):
        self.current = t
        if self.tracer is not None:
            self.tracer.vcpu = self.track(t)
        t.glet.switch()
        self.current = None if greenlet.getcurrent() is self.main else self.current

    # -- the points -----------------------------------------------------------------------------------------
    def others_live(self):
        """Another task than the running one may still run (so guest code runs in slices)."""
        cur = self.current
        return any(not t.done for t in self.tasks if t is not cur)

    def default_choice(self, enabled, current, what):
        # A host event runs as soon as it may (a host CPU of its own would not wait for the vCPUs).
        for t in enabled:
            if t.host and t is not current:
                return t
        if current is not None and current in enabled and what not in YIELD_POINTS:
            return current
        start = -1 if current is None else current.index
        ordered = sorted(enabled, key=lambda t: (t.index - start - 1) % len(self.tasks))
        others = [t for t in ordered if t is not current]
        return others[0] if others else ordered[0]

    def _decide(self, enabled, current, what):
        if len(enabled) > 1:
            if what in YIELD_POINTS and current in enabled:
                # A yield (a retry loop, a spinning guest): CHESS's fairness.  The yielding task
                # may run again only once every other task enabled now has run (or cannot run),
                # so tasks that retry at each other cannot starve the one they wait for, and an
                # exploration never follows an unfair schedule forever.
                current.fair_wait = {t.index for t in enabled if t is not current}
            live = {t.index for t in enabled}
            fair = [t for t in enabled if not (t.fair_wait & live)]
            enabled = fair or enabled
        if len(enabled) == 1:
            self._decided = False
            if self.record:
                self.strategy.forced(self, enabled[0])
            return self._ran(enabled[0])
        self._decided = True
        default = self.default_choice(enabled, current, what)
        choice = self.strategy.choose(self, enabled, current, what)
        preempt = current is not None and choice is not current and current in enabled
        if preempt:
            self.preemptions += 1
        self.decisions.append(
            Decision(
                choice.index,
                tuple(t.index for t in enabled),
                what,
                None if current is None else current.index,
                default.index,
                preempt,
            )
        )
        return self._ran(choice)

    def _ran(self, task):
        """``task`` runs now: nobody waits for it to have run any more."""
        i = task.index
        for t in self.tasks:
            if i in t.fair_wait:
                t.fair_wait.discard(i)
        return task

    def point(self, who, what, arg=None):
        cur = self.current
        if cur is None or greenlet.getcurrent() is self.main:
            return  # not inside a vCPU task (setup, teardown)
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self, who, what)
        if self.steps > self.max_steps:
            raise StepLimit(f"more than {self.max_steps} scheduling points: a livelock?")
        enabled = [t for t in self.tasks if t.enabled()]
        if not enabled:
            raise Deadlock(f"every vCPU is waiting (at {what})")
        if self.record:
            self._end_step(cur.index)
            cur.paused_at = (what, arg)
            self.strategy.stepped(self)
        nxt = self._decide(enabled, cur, what)
        if self.record:
            self._begin_step(nxt)
        if nxt is not cur:
            if self.tracer is not None and self.tracer.enabled:
                self.tracer.emit("sched_switch", self.track(cur), msg=f"{cur.name} -> {nxt.name} at {what}")
            self.current = nxt
            if self.tracer is not None:
                self.tracer.vcpu = self.track(nxt)
            nxt.glet.switch()
            self.current = cur
            if self.tracer is not None:
                self.tracer.vcpu = self.track(cur)

    # -- footprints (emu.checkers.dpor) --------------------------------------------------------------------------------
    def touch(self, key, write=True):
        """The running step reads (or writes) ``key``: an SPTE's address, a lock, a vCPU's state..."""
        fp = self.fp
        if fp is not None:
            (fp.writes if write else fp.reads).add(key)

    def module_call(self, keys):
        """The running task enters a SEAMCALL or TDCALL that touches ``keys`` (reads, writes,
        reads everything), or None for unknown; its steps inside the call get them."""
        cur = self.current
        if cur is None:
            return
        if keys is None:
            self.module_keys.pop(cur.index, None)
            self.touch_all()
            return
        self.module_keys[cur.index] = keys
        fp = self.fp
        if fp is not None:
            fp.reads.update(keys[0])
            fp.writes.update(keys[1])
            if keys[2]:
                fp.all_r = True

    def touch_all(self, write=True):
        """The running step reads (or writes) everything: it depends on every other step."""
        fp = self.fp
        if fp is not None:
            if write:
                fp.all_w = True
            else:
                fp.all_r = True

    def _begin_step(self, task):
        fp = Footprint()
        what, arg = task.paused_at
        if what in SPTE_READ_POINTS:
            fp.reads.add(("spte", arg))
        elif what in SPTE_WRITE_POINTS:
            fp.writes.add(("spte", arg))
        elif what in MODULE_POINTS:
            keys = self.module_keys.get(task.index)
            if keys is None:
                fp.all_w = True
            else:
                fp.reads.update(keys[0])
                fp.writes.update(keys[1])
                fp.all_r = keys[2]
        elif what not in OWN_POINTS and (what != "start" or task.host):
            fp.all_w = True
        fp.writes.add(("task", task.index))  # its own state (requests, mode, TLB) is written
        self.fp = fp
        self.events.append((task.index, fp, len(self.decisions) - 1 if self._decided else -1))

    def _end_step(self, index):
        fp = self.fp
        if fp is None:
            return
        self.fp = None
        from ..hw import ept, paging

        if ept.AD_LOG:
            fp.writes.update(("spte", a) for a in ept.AD_LOG)
            ept.AD_LOG.clear()
        if paging.AD_LOG:
            fp.writes.update(("page", a >> 12) for a in paging.AD_LOG)
            paging.AD_LOG.clear()
        fp.freeze()

    def wait_until(self, pred, who=None, what="lock_wait"):
        """Block the running task until ``pred()`` holds (other tasks run meanwhile)."""
        cur = self.current
        if cur is None:
            if not pred():
                raise Deadlock(f"{what}: cannot wait outside a vCPU task")
            return
        while not pred():
            cur.wait = pred
            self.point(who, what)
            cur.wait = None

    def track(self, task):
        """The trace track of a task: the vCPU index, or the host task's name."""
        return task.name if task.host else task.index

    def need_resched(self):
        """need_resched() for the running task: another task waits to run.  Long host loops
        (zaps) then drop their locks and yield (tdp_mmu_iter_cond_resched)."""
        cur = self.current
        if cur is None:
            return False
        return any(t is not cur and not t.done and t.wait is not None for t in self.tasks)

    @property
    def schedule(self):
        return encode_schedule([d.choice for d in self.decisions])
