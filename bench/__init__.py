"""Benchmark suite: ``python -m bench`` (``--help`` for options).

Project rule: performance is a RATIO against a baseline measured in the same
run, never an absolute time.  Every measurement is the best (minimum) of
``ctx.repeats`` timed runs with ``time.perf_counter``, with the garbage
collector off during each timed run (as ``timeit`` does).

The pieces a benchmark module uses:

- ``Context``: options of this run (repeats, scale) and ``memo``, a cache of
  baselines, so that a baseline several benchmarks compare against (the bare
  Unicorn fault, say) is measured once per run and shared;
- ``time_best``: best-of-N timing of prepared runs (untimed preparation, timed run);
- ``Result``: one row of the report.  A row with a ``target`` is a pass/fail check
  on its ``ratio``.

A benchmark is a function ``bench(ctx) -> list[Result]`` listed in
``bench.__main__.BENCHMARKS``.
"""

import gc
import time
from dataclasses import dataclass, field, asdict


@dataclass
class Context:
    repeats: int = 5
    scale: float = 1.0  # multiplies iteration / page counts (e.g. 0.2 for a quick run)
    cache: dict = field(default_factory=dict)

    def n(self, count, minimum=1):
        """``count`` scaled by ``--scale``."""
        return max(minimum, int(count * self.scale))

    def memo(self, key, measure):
        """The value of ``measure()``, measured once per run under ``key``."""
        if key not in self.cache:
            self.cache[key] = measure()
        return self.cache[key]


@dataclass
class Result:
    key: str  # stable id, e.g. "hw.warm_loop.ours"
    label: str  # what the table prints
    value: float  # in ``unit``
    unit: str  # "insn/s", "s/page", "s/walk", ... (seconds are printed scaled)
    baseline_key: str = None  # the Result this one is a ratio against
    ratio: float = None  # value / baseline value (or the inverse: see ``ratio_note``)
    ratio_note: str = ""  # how the ratio reads, e.g. "ours/raw insn/s"
    target: tuple = None  # (">=", 0.95) or ("<=", 2.0) on ``ratio``
    detail: dict = field(default_factory=dict)

    @property
    def ok(self):
        if self.target is None or self.ratio is None:
            return None
        op, bound = self.target
        return self.ratio >= bound if op == ">=" else self.ratio <= bound

    def as_dict(self):
        d = asdict(self)
        d["target"] = None if self.target is None else f"{self.target[0]} {self.target[1]}"
        d["ok"] = self.ok
        return d

    @classmethod
    def from_dict(cls, d):
        """The Result of an ``as_dict()`` (another process's ``--json`` row)."""
        kw = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if kw.get("target"):
            op, bound = kw["target"].split()
            kw["target"] = (op, float(bound))
        return cls(**kw)


def time_best(prepares, repeats):
    """Best-of-``repeats`` timing of several runs, interleaved so that drift hits them alike.

    ``prepares`` is a list of callables; each call of one does the untimed set-up
    of a fresh run and returns a zero-argument callable, the timed run.  Returns
    (list of best seconds, list of all-times lists), one entry per prepare.
    """
    times = [[] for _ in prepares]
    for _ in range(repeats):
        for i, prepare in enumerate(prepares):
            go = prepare()
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                go()
                dt = time.perf_counter() - t0
            finally:
                gc.enable()
            times[i].append(dt)
    return [min(t) for t in times], times
