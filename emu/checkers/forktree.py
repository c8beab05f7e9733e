"""PCT runs that share a prefix run it once: a run's process forks where the schedules part.

PCT run k is a function of its seed only, and the model is deterministic, so runs whose PCT
strategies have made the same choices so far are in the same state: one process can run them
together (a cohort) until their strategies disagree.  There it forks; each child carries on
with the runs that chose its task, and hands its results to the process it was forked from,
which waits for it (depth-first, so a batch holds at most one process per divergence along a
path, never one per pending run).  Runs that make every choice alike are one run.  Their
outcomes are exactly those of the runs one by one (every run still forks from the snapshot,
only later); the speed-up is the prefixes not run again (1000 PCT runs of race2 share about
two thirds of their decisions with an earlier run) and the Unicorn code a child inherits
already translated.

Batches of runs go to ``jobs`` processes at once, as single runs did; the outcomes come back
in run order.

The processes of a run (a batch, its branches, the explorer's single runs, the in-place
workers) are forked by ``fork_child``, die with the process that forked them, and never
unwind into the code of the process they were copied from (whatever happens, they end with
os._exit).  A parent that stops waiting (Ctrl-C, a run that stopped answering: ``Stalled``)
kills what it forked.
"""

import gc
import os
import pickle
import select
import signal
import struct
import time

from .sched import Strategy


class Cohort(Strategy):
    """The PCT runs (``[(run_no, PctStrategy)]``, in run order) that have chosen alike so far."""

    def __init__(self, members, on_error):
        self.members = members
        self.on_error = on_error
        self.results = {}  # run_no -> Outcome, from the branches forked off this process
        self.pipe = None  # in a forked branch: where its results go

    def choose(self, sched, enabled, current, what):
        groups = {}
        for m in self.members:
            groups.setdefault(m[1].choose(sched, enabled, current, what).index, []).append(m)
        by_index = {t.index: t for t in enabled}
        keys = list(groups)  # keys[0] holds this cohort's first run: it goes on here
        parent = os.getpid()
        for c in keys[1:]:
            r, w = os.pipe()
            pid = fork_child()
            if pid == 0:
                os.close(r)
                gc.freeze()  # as emu.checkers.explore._start_child
                die_with(parent)
                self.members, self.results, self.pipe = groups[c], {}, w
                return by_index[c]
            os.close(w)
            self.results.update(self._collect(pid, r, groups[c]))
        self.members = groups[keys[0]]
        return by_index[keys[0]]

    def _collect(self, pid, r, members):
        data = receive_bytes(pid, r)
        if data is None:
            out = self.on_error(RuntimeError("the run's process died"))
            return {n: out for n, _ in members}
        return pickle.loads(data)


class Stalled(Exception):
    """A run's process stopped answering within its deadline: it was killed, and its runs are
    reported as hangs (the exploration goes on)."""


def fork_child():
    """os.fork() for a process of runs.  The child ignores SIGINT (Ctrl-C reaches every process
    of the terminal's group: the parent stops the children itself and keeps what they found),
    takes SIGTERM's default action and leaves the parent's signal wakeup fd alone; SIGINT and
    SIGTERM are blocked across the fork, so neither can land in the child before that."""
    mask = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        pid = os.fork()
        if pid == 0:
            _children.clear()
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
            except ValueError:  # not the main thread (a Ray actor's): it set its own
                pass
        else:
            _children.add(pid)  # before a Ctrl-C can interrupt the caller: kill_children()
        return pid
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_children = set()  # forked by fork_child, not reaped yet


def kill_children():
    """Kill every process fork_child made that is still there (a Ctrl-C may have interrupted its
    caller before it kept the pid)."""
    for pid in list(_children):
        kill(pid)


def reap(pid):
    """waitpid(), for a child that may have been reaped already."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    _children.discard(pid)


def kill(pid):
    """SIGKILL, then reap: the child and (die_with) what it forked are gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    reap(pid)


_libc = None


def die_with(parent):
    """A branch is killed when the process it was forked from dies (a batch stopped early,
    Ctrl-C): PR_SET_PDEATHSIG, then a check that the parent did not die before it was set."""
    global _libc
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def send_bytes(fd, data):
    """A child's result to its parent: a length, then the bytes (and the pipe closed).  A parent
    that stopped listening is not an error of the child's (it exits next)."""
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(data)))
            f.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


class Deadline:
    """When a child that has not answered counts as stalled: ``seconds`` from now."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    @classmethod
    def within(cls, seconds):
        return None if seconds is None else cls(seconds)

    def left(self):
        return max(0.0, self.at - time.monotonic())

    def stalled(self):
        return Stalled(f"the run's process stopped answering (killed after {self.seconds:.0f} s)")


def receive_bytes(pid, r, deadline=None):
    """What child ``pid`` sent on ``r``, once it has exited; None if it died first.  Past
    ``deadline`` (a Deadline) with nothing sent, Stalled.  Whatever stops the wait (Stalled,
    Ctrl-C) kills the child first."""
    try:
        if deadline is not None and not select.select([r], [], [], deadline.left())[0]:
            raise deadline.stalled()
        with os.fdopen(r, "rb") as f:
            r = None
            head = f.read(8)
            data = f.read(struct.unpack("<Q", head)[0]) if len(head) == 8 else None
    except BaseException:
        if r is not None:
            os.close(r)
        kill(pid)
        raise
    reap(pid)
    return data


def run_cohort(run_here, members, slim, on_error):
    """Run the cohort ``members`` from here (a child of the snapshot): {run_no: Outcome}.
    ``run_here(strategy)`` runs once; ``slim(outcome)`` is what a run sends back."""
    st = Cohort(members, on_error)
    try:
        out = slim(run_here(st))
        res = {n: out for n, _ in st.members}
    except BaseException as e:
        if st.pipe is None:
            raise
        out = on_error(e)  # a branch must not unwind into its parent's code
        res = {n: out for n, _ in st.members}
    res.update(st.results)
    if st.pipe is not None:
        try:
            send_bytes(st.pipe, pickle.dumps(res))
        finally:
            os._exit(0)
    return res


def batch_size(runs, jobs):
    """Bigger batches share more prefixes; enough of them keep every core busy to the end."""
    return max(8, min(250, -(-runs // (2 * jobs))))


def in_cohorts(strategies, runs, jobs, run_batch, in_children, on_error, stall=None):
    """Yield the outcomes of ``runs`` PCT runs (``strategies``: an iterator of PctStrategy, in run
    order), in run order, ``run_batch(members)`` running each batch in a child of the snapshot.
    ``stall``: seconds a run may take before its batch's process counts as stopped answering."""
    size = batch_size(runs, jobs)

    def batches():
        left = runs
        n = 0
        while left > 0:
            k = min(size, left)
            members = [(n + i, next(strategies)) for i in range(k)]
            yield lambda members=members: run_batch(members)
            n += k
            left -= k

    outs = in_children(
        batches(), lambda e: {"error": on_error(e)}, jobs, **({} if stall is None else {"stall": stall * size})
    )
    n = 0
    try:
        for res in outs:
            if "error" in res:  # the batch's process itself failed: every run in it says so
                k = min(size, runs - n)
                res = {n + i: res["error"] for i in range(k)}
            for k in sorted(res):
                yield res[k]
            n += len(res)
    finally:
        outs.close()
