"""``python -m bench``: run the benchmark suite and print a table (``--json``: one JSON object).

``--baseline PATH`` runs each benchmark twice, back to back: ours, then the source tree's at PATH
(a checkout of the commit to compare with: ``git archive HEAD~1 | tar -x -C /tmp/base``), each in
a fresh process (``python -m bench --json --only NAME`` there: the same conditions for both, a
peak RSS of its own), with the same Python and options, and adds its value and ours against it
to every row.

Exit status: 0; 1 with ``--check`` when a target is missed; 2 when a benchmark failed or for
bad options.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import unicorn

from . import Context, Result
from bench import hw
from bench import kvm
from bench import td
from bench import trace
from bench import memory
from bench import selftest

# -- the registry -------------------------------------------------------------------------------------
# (name, function ctx -> list[Result]), run in this order.  Add new layers here.  Baselines shared by
# several benchmarks are memoized in the Context: e.g. hw.bare_fault_per_page(ctx) is the bare Unicorn
# fault + restart (seconds per page) that every "new page" ratio is taken against.
BENCHMARKS = [
    ("hw.warm_loop", hw.bench_warm_loop),  # warm guest loop, ours/raw insn/s   target >= 0.95
    ("hw.sliced_loop", hw.bench_sliced_loop),  # two vCPUs sliced in guest mode / unsliced time  <= 2
    ("hw.new_page", hw.bench_new_page),  # new 4K page (BareHost) / bare fault target <= 2
    ("hw.walks", hw.bench_walks),  # EPT walk <= 0.5 us, 2D walk, TLB-miss fill / trivial fill <= 2
    ("kvm.new_page", kvm.bench_new_page),  # new 4K page through KVM's fault path / bare fault  <= 3
    ("td.private_page", td.bench_private_page),  # TD private page / bare fault                     <= 6
    ("td.huge_page", td.bench_huge_page),  # a 2M private page / 512 4K private pages          <= 0.25
    ("td.explore", td.bench_explore),  # race2 schedules explored per second              >= 500
    ("selftest.conversions", selftest.bench_conversions),  # the conversion selftest port, 4 vCPUs (s)
    ("td.dpor", td.bench_dpor),  # race2 --dpor: 5x fewer than --bound 2; minutes   (#12)
    ("mem", memory.bench_memory),  # 4 GiB guest, 3000 pages: peak RSS                <= 400 MB
    ("trace", trace.bench_trace_cost),  # tracing off / trace calls removed                 <= 1.05
]


def fmt_value(value, unit):
    if unit.startswith("s/"):
        for scale, prefix in ((1, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")):
            if value >= scale or prefix == "ns":
                return f"{value / scale:.2f} {prefix}/{unit[2:]}"
    if unit.endswith("/s"):
        for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")):
            if value >= scale or prefix == "":
                return f"{value / scale:.2f} {prefix + ' ' if prefix else ''}{unit}"
    return f"{value:.4g} {unit}"


def higher_is_better(unit):
    """Rates (insn/s, schedules/s) are better higher; times, sizes and counts lower."""
    return unit.endswith("/s")


def vs_baseline(r, base):
    """How much better ours is than the baseline's value (> 1: better, < 1: worse), or None."""
    if base is None or not base.get("value") or not r.value:
        return None
    b = base["value"]
    return r.value / b if higher_is_better(r.unit) else b / r.value


def table(results, errors, baseline=None):
    head = ("benchmark", "value", "ratio", "target", "status", "ratio is")
    if baseline is not None:
        head += ("baseline", "vs base")
    rows = [head]
    for r in results:
        row = (
            r.label,
            fmt_value(r.value, r.unit),
            "" if r.ratio is None else f"{r.ratio:.2f}x",
            "" if r.target is None else f"{r.target[0]} {r.target[1]}",
            {True: "ok", False: "MISS", None: ""}[r.ok],
            r.ratio_note,
        )
        if baseline is not None:
            base = baseline.get(r.key)
            v = vs_baseline(r, base)
            row += ("" if base is None else fmt_value(base["value"], base["unit"]), "" if v is None else f"{v:.2f}x")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) if i in (0, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        )
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    for name, msg in errors:
        lines.append(f"{name}: FAILED: {msg}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument(
        "--only",
        action="append",
        metavar="PREFIX",
        help="run the benchmarks whose name starts with PREFIX (repeatable)",
    )
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--repeats", type=int, default=5, help="best of N timed runs (default 5)")
    ap.add_argument("--scale", type=float, default=1.0, help="scale iteration/page counts (e.g. 0.2: quick)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="where each microsecond of the fault paths goes (a table per path) instead of benchmarking",
    )
    ap.add_argument(
        "--baseline",
        metavar="PATH",
        help="run each benchmark again in the source tree at PATH (the commit to compare with), "
        "right after ours, and compare every row",
    )
    args = ap.parse_args(argv)
    if args.baseline is not None and not os.path.isfile(os.path.join(args.baseline, "bench", "__main__.py")):
        print(f"error: --baseline {args.baseline}: not a source tree with bench/ in it", file=sys.stderr)
        return 2

    if args.list:
        for name, fn in BENCHMARKS:
            print(f"{name:16} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    if args.profile:
        from bench import prof

        prof.main(Context(repeats=args.repeats, scale=args.scale))
        return 0

    ctx = Context(repeats=max(1, args.repeats), scale=args.scale)
    selected = [(n, f) for n, f in BENCHMARKS if not args.only or any(n.startswith(p) for p in args.only)]
    results, errors, durations = [], [], {}
    baseline = {} if args.baseline is not None else None
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, fn in selected:
        if not args.json:
            print(f"running {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if baseline is None:
            try:
                results += fn(ctx)
            except Exception as e:  # report and go on with the others
                errors.append((name, f"{type(e).__name__}: {e}"))
                traceback.print_exc(file=sys.stderr)
        else:
            got, err = run_tree(here, name, ctx)  # ours too in a fresh process: the same conditions
            results += [Result.from_dict(r) for r in got.values()]
            if err:
                errors.append((name, err))
        durations[name] = round(time.perf_counter() - t0, 2)
        if baseline is not None:
            if not args.json:
                print(f"running {name} in {args.baseline} ...", file=sys.stderr, flush=True)
            got, err = run_tree(args.baseline, name, ctx)
            baseline.update(got)
            if err:
                errors.append((f"{name} (baseline)", err))

    missed = [r.key for r in results if r.ok is False]
    if args.json:
        rows = []
        for r in results:
            d = r.as_dict()
            if baseline is not None:
                base = baseline.get(r.key)
                d["baseline_value"] = None if base is None else base["value"]
                d["vs_baseline"] = vs_baseline(r, base)
            rows.append(d)
        print(
            json.dumps(
                {
                    "python": platform.python_version(),
                    "unicorn": unicorn.__version__,
                    "machine": platform.machine(),
                    "repeats": ctx.repeats,
                    "scale": ctx.scale,
                    "baseline": args.baseline,
                    "results": rows,
                    "errors": [{"benchmark": n, "error": m} for n, m in errors],
                    "durations_s": durations,
                    "targets_missed": missed,
                },
                indent=1,
            )
        )
    else:
        print(table(results, errors, baseline))
        print(
            f"\nbest of {ctx.repeats}; Python {platform.python_version()}, Unicorn {unicorn.__version__}; "
            f"wall time per benchmark: " + ", ".join(f"{n} {t}s" for n, t in durations.items())
        )
        if missed:
            print("targets missed: " + ", ".join(missed))
    if errors:
        return 2
    return 1 if args.check and missed else 0


def run_tree(path, name, ctx):
    """The results ({key: row dict}) of benchmark ``name`` run by the source tree at ``path``, in a
    child process (its own emu and bench first on the path); and an error line, or None."""
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--json",
        "--only",
        name,
        "--repeats",
        str(ctx.repeats),
        "--scale",
        str(ctx.scale),
    ]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(p for p in (os.path.abspath(path), os.environ.get("PYTHONPATH")) if p)
    )
    try:
        p = subprocess.run(cmd, cwd=path, env=env, capture_output=True, text=True, timeout=3600)
        data = json.loads(p.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        return {}, f"the baseline's run failed: {type(e).__name__}: {e}"
    errs = "; ".join(f"{e['benchmark']}: {e['error']}" for e in data.get("errors", []))
    return {r["key"]: r for r in data.get("results", [])}, errs or None


if __name__ == "__main__":
    sys.exit(main())
