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
"""

import gc
import os
import pickle
import struct

from .sched import Strategy


class Cohort(Strategy):
    """The PCT runs (``[(run_no, PctStrategy)]``, in run order) that have chosen alike so far."""

    def __init__(self, members, on_error):
        self.members = members
        self.on_error = on_error
        self.results = {}         # run_no -> Outcome, from the branches forked off this process
        self.pipe = None          # in a forked branch: where its results go

    def choose(self, sched, enabled, current, what):
        groups = {}
        for m in self.members:
            groups.setdefault(m[1].choose(sched, enabled, current, what).index, []).append(m)
        by_index = {t.index: t for t in enabled}
        keys = list(groups)       # keys[0] holds this cohort's first run: it goes on here
        parent = os.getpid()
        for c in keys[1:]:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                gc.freeze()               # as emu.checkers.explore._start_child
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


_libc = None


def die_with(parent):
    """A branch is killed when the process it was forked from dies (a batch stopped early,
    Ctrl-C): PR_SET_PDEATHSIG, then a check that the parent did not die before it was set."""
    global _libc
    try:
        if _libc is None:
            import ctypes
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, 9, 0, 0, 0)          # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def send_bytes(fd, data):
    """A child's result to its parent: a length, then the bytes (and the pipe closed)."""
    with os.fdopen(fd, "wb") as f:
        f.write(struct.pack("<Q", len(data)))
        f.write(data)


def receive_bytes(pid, r):
    """What child ``pid`` sent on ``r``, once it has exited; None if it died first."""
    with os.fdopen(r, "rb") as f:
        head = f.read(8)
        data = f.read(struct.unpack("<Q", head)[0]) if len(head) == 8 else None
    os.waitpid(pid, 0)
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
        out = on_error(e)         # a branch must not unwind into its parent's code
        res = {n: out for n, _ in st.members}
    res.update(st.results)
    if st.pipe is not None:
        send_bytes(st.pipe, pickle.dumps(res))
        os._exit(0)
    return res


def batch_size(runs, jobs):
    """Bigger batches share more prefixes; enough of them keep every core busy to the end."""
    return max(8, min(250, -(-runs // (2 * jobs))))


def in_cohorts(strategies, runs, jobs, run_batch, in_children, on_error):
    """Yield the outcomes of ``runs`` PCT runs (``strategies``: an iterator of PctStrategy, in run
    order), in run order, ``run_batch(members)`` running each batch in a child of the snapshot."""
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

    outs = in_children(batches(), lambda e: {"error": on_error(e)}, jobs)
    n = 0
    try:
        for res in outs:
            if "error" in res:            # the batch's process itself failed: every run in it says so
                k = min(size, runs - n)
                res = {n + i: res["error"] for i in range(k)}
            for k in sorted(res):
                yield res[k]
            n += len(res)
    finally:
        outs.close()
