"""PCT runs on workers that restore the snapshot in place, and runs of a known schedule skipped.

``jobs`` workers are forked once from the snapshot.  Each takes one run at a time (its
number and its PCT seed, on a pipe), runs it, sends back the outcome and the decisions it
made, and puts the snapshot back (emu.checkers.inplace).  Runs are handed out as workers
free up, and outcomes come back one by one: a failure is reported as soon as its run ends.

The parent keeps every schedule run so far as a tree of decisions.  The model is
deterministic, so a run is a function of its choices: before handing run k out, its PCT
strategy is walked down the tree (each node holds what the scheduler offered there: the
enabled tasks, the running one, the point).  If it reaches the end of a run already made,
run k is that run, and its outcome is known without running it.  (1000 PCT runs of race2
make 673 distinct schedules.)  Outcomes are yielded in run order, so the result does not
depend on ``jobs`` or on which worker ran what.

A worker that takes longer than ``stall`` seconds over one run has stopped answering: it is
killed, that run is reported (``on_error(Stalled)``: a hang), its other runs go to the worker
that replaces it.
"""

import gc
import os
import pickle
import select
import struct
import time

from .forktree import die_with, fork_child, kill, Stalled


class Known:
    """The schedules run so far: node = {"at": (enabled, current, what), "next": {choice: node}},
    and "out" (the Outcome) where a run ended."""

    def __init__(self):
        self.root = {}
        self.hits = 0

    def add(self, decisions, outcome):
        node = self.root
        for choice, enabled, current, what in decisions:
            node.setdefault("at", (enabled, current, what))
            node = node.setdefault("next", {}).setdefault(choice, {})
        node["out"] = outcome

    def lookup(self, strategy):
        """The outcome of the run ``strategy`` would make, if that run was made already."""
        node, sched, k = self.root, _Decided(), 0
        while "out" not in node:
            at = node.get("at")
            if at is None:
                return None
            enabled, current, what = at
            sched.decisions = range(k)
            tasks = [_Task(i) for i in enabled]
            cur = None if current is None else _Task(current)
            node = node["next"].get(strategy.choose(sched, tasks, cur, what).index)
            if node is None:
                return None
            k += 1
        self.hits += 1
        return node["out"]


class _Decided:
    decisions = ()


class _Task:
    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index


class _Worker:
    def __init__(self, serve):
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        parent = os.getpid()
        pid = fork_child()
        if pid == 0:
            try:
                os.close(req_w)
                os.close(res_r)
                gc.freeze()  # as emu.checkers.explore._start_child
                die_with(parent)
                serve(os.fdopen(req_r, "rb"), os.fdopen(res_w, "wb"))
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(res_w)
        self.pid = pid
        self.req = os.fdopen(req_w, "wb")
        self.res = res_r
        self.in_flight = []
        self.seeds = {}
        self.since = None  # when its current run began

    def send(self, n, seed):
        if not self.in_flight:
            self.since = time.monotonic()
        try:
            self.req.write(struct.pack("<QQ", n, seed))
            self.req.flush()
        except BrokenPipeError:
            pass  # it died: receive() says so, and its runs are reported
        self.in_flight.append(n)
        self.seeds[n] = seed

    def receive(self):
        """(run number, outcome, decisions), or None when the worker died.  Read unbuffered:
        a buffered reader could take the next result out of the pipe with this one, and
        select() would not see it there."""
        head = _read_exactly(self.res, 8)
        if head is None:
            return None
        data = _read_exactly(self.res, struct.unpack("<Q", head)[0])
        return None if data is None else pickle.loads(data)

    def stop(self):
        try:
            self.req.close()
        except OSError:
            pass
        os.close(self.res)
        kill(self.pid)


def _read_exactly(fd, n):
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            return None
        out += chunk
    return bytes(out)


def serve_runs(ip, run_here, strategy_of, slim, on_error):
    """A worker's loop: runs (number, seed) in, (number, slim outcome, decisions) out."""

    def serve(req, res):
        while True:
            head = req.read(16)
            if len(head) < 16:
                return
            n, seed = struct.unpack("<QQ", head)
            try:
                out = run_here(strategy_of(seed))
            except Exception as e:  # a bug of ours: the run's result says so
                out = on_error(e)
            decisions = [(d.choice, d.enabled, d.current, d.what) for d in out.decisions]
            data = pickle.dumps((n, slim(out), decisions))
            res.write(struct.pack("<Q", len(data)))
            res.write(data)
            res.flush()
            ip.restore()

    return serve


def pct_runs(seeds, runs, jobs, serve, strategy_of, on_error, known=None, ahead=2, stall=None):
    """Yield the outcomes of ``runs`` PCT runs (``seeds``, in run order), in run order.  A worker
    that spends more than ``stall`` seconds over one run is replaced (see the module's docstring)."""
    known = known if known is not None else Known()
    seeds = iter(seeds)
    workers = []
    done = {}  # run number -> outcome, not yet yielded
    sent = 0  # runs handed out or found known
    nxt = 0  # the next run to yield
    try:
        workers = [_Worker(serve) for _ in range(min(jobs, runs))]
        while nxt < runs:
            for w in workers:
                while len(w.in_flight) < ahead and sent < runs:
                    seed = next(seeds)
                    out = known.lookup(strategy_of(seed))
                    if out is not None:
                        done[sent] = out
                    else:
                        w.send(sent, seed)
                    sent += 1
            while nxt in done:
                yield done.pop(nxt)
                nxt += 1
            busy = {w.res: w for w in workers if w.in_flight}
            if not busy:
                continue
            wait = None if stall is None else max(0.0, min(w.since for w in busy.values()) + stall - time.monotonic())
            ready, _, _ = select.select(list(busy), [], [], wait)
            if not ready:
                for w in busy.values():
                    if time.monotonic() - w.since >= stall:
                        # Stopped answering: its run is a hang; the runs queued behind it go on
                        # the worker that replaces it.
                        stuck, rest = w.in_flight[0], w.in_flight[1:]
                        done[stuck] = on_error(
                            Stalled(f"the run's process stopped answering (killed after {stall:.0f} s)")
                        )
                        w.in_flight = []
                        w.stop()
                        new = workers[workers.index(w)] = _Worker(serve)
                        for n in rest:
                            new.send(n, w.seeds[n])
                continue
            for fd in ready:
                w = busy[fd]
                got = w.receive()
                if got is None:  # it died: its runs say so, another takes its place
                    for n in w.in_flight:
                        done[n] = on_error(RuntimeError("the run's process died"))
                    w.in_flight = []
                    w.stop()
                    workers[workers.index(w)] = _Worker(serve)
                    continue
                n, out, decisions = got
                w.in_flight.remove(n)
                w.seeds.pop(n, None)
                w.since = time.monotonic()
                known.add(decisions, out)
                done[n] = out
    finally:
        for w in workers:
            w.stop()
