"""``python -m bench --profile``: cProfile of the TLB-fill paths of the hardware layer.

Two profiles, each over a few runs of the same guest as the benchmark:
- new 4K page (Vcpu + BareHost): exit, 2D walk, EPT violation, BareHost map, resume;
- TLB-miss fill with nothing changed (after INVEPT): the fill hook and the 2D walk.

cProfile adds a fixed cost per Python call, which inflates call-heavy code;
read the numbers as shares, not as timings (the benchmark gives those).
"""

import cProfile
import io
import pstats

from bench import hw

TOP = 18


def _profile(title, prepare, runs, n_units, unit):
    pr = cProfile.Profile()
    for _ in range(runs):
        go = prepare()
        pr.enable()
        go()
        pr.disable()
    out = io.StringIO()
    st = pstats.Stats(pr, stream=out)
    total = st.total_tt
    print(f"\n=== {title}: {runs} runs x {n_units} {unit}; profiled total {total:.3f} s, "
          f"{total / (runs * n_units) * 1e6:.1f} us per {unit} under the profiler ===")
    print("share of profiled time by component (own time):")
    for name, tt in _groups(st):
        print(f"  {name:48} {tt / total * 100:5.1f}%  {tt / (runs * n_units) * 1e6:6.2f} us per {unit}")
    st.sort_stats("tottime").print_stats(TOP)
    print(_trim(out.getvalue()))
    out.seek(0)
    out.truncate()
    st.sort_stats("cumulative").print_stats(TOP)
    print("--- by cumulative time ---")
    print(_trim(out.getvalue()))


# (component, predicate on (file, function)), first match wins
_GROUPS = [
    ("EPT walk (emu/hw/ept.py)", lambda f, fn: f.endswith("emu/hw/ept.py")),
    ("2D walk own time (emu/hw/paging.py)", lambda f, fn: f.endswith("emu/hw/paging.py")),
    ("Vcpu EPT callback (vcpu.py ept closure)", lambda f, fn: f.endswith("emu/hw/vcpu.py") and fn == "ept"),
    ("Vcpu fill hook own time (_tlb_fill)", lambda f, fn: f.endswith("emu/hw/vcpu.py") and fn == "_tlb_fill"),
    ("Vcpu.run / VmExit (exit path)", lambda f, fn: f.endswith(("emu/hw/vcpu.py", "emu/hw/exits.py"))),
    ("BareHost handle/map_4k + HostMemory", lambda f, fn: f.endswith(("emu/hw/bare.py", "emu/hw/memory.py"))),
    ("reg_read/reg_write (Unicorn Python binding)",
     lambda f, fn: "unicorn" in f and ("reg" in fn or fn in ("_select_reg_class", "<genexpr>"))),
    ("emu_start (Unicorn C: translate/execute/unwind)", lambda f, fn: "unicorn" in f and fn == "emu_start"),
    ("hook trampolines (Unicorn Python binding)", lambda f, fn: "unicorn" in f),
]


def _groups(st):
    sums = {name: 0.0 for name, _ in _GROUPS}
    sums["other"] = 0.0
    for (f, _line, fn), (_cc, _nc, tt, _ct, _callers) in st.stats.items():
        for name, pred in _GROUPS:
            if pred(f, fn):
                sums[name] += tt
                break
        else:
            sums["other"] += tt
    return sorted(((k, v) for k, v in sums.items() if v), key=lambda kv: -kv[1])


def _trim(text):
    # drop pstats' preamble (file name, "Ordered by", ...), keep the table
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("ncalls"):
            return "\n".join(lines[i:]).rstrip()
    return text.rstrip()


def main(ctx):
    n = ctx.n(2048, 64)
    prep = hw.vcpu_prepare()
    _profile("new 4K page (Vcpu + BareHost)", lambda: prep(n), ctx.repeats, n, "page")
    _profile("TLB-miss fill, nothing changed (Vcpu)", hw.fill_run(prep.rig, n), ctx.repeats, n + 1, "fill")
