"""``python -m bench --profile``: where each microsecond of the fault paths goes.

For each path (a new 4K page on the bare host, in a default VM, a TD private page, a TLB-miss
fill with nothing changed) it measures the time per page without the profiler (best of
``--repeats``, as the benchmark does), then runs the same guest under cProfile and splits that
time by component: every function's own time is charged to the component of the file it is
in, and each component gets its share of the measured time.  ``calls`` is the number of
Python-level calls per page (exact: the profiler counts them).  cProfile adds a fixed cost to
every call it sees, so the split leans towards call-heavy components; the calls column shows
which.  The top functions by own time follow each table.
"""

import cProfile
import pstats

from bench import Context, hw, kvm, td, time_best

TOP = 12

# (component, predicate on (file, function)), first match wins
COMPONENTS = [
    (
        "Unicorn: emu_start (guest code, compiled fills)",
        lambda f, fn: "unicorn" in f and fn == "emu_start" or f == "~" and "'start' of 'emu.hw._mmu.Mmu'" in fn,
    ),
    ("Unicorn binding (registers, hooks' trampolines)", lambda f, fn: "unicorn" in f),
    (
        "hw: Python fill and walks (vcpu fill, paging, ept)",
        lambda f, fn: (
            f.endswith(("emu/hw/paging.py", "emu/hw/ept.py"))
            or f.endswith("emu/hw/vcpu.py")
            and fn in ("_tlb_fill", "_fill", "ept", "_fill_slow", "_fetch_slow", "_fetched")
        ),
    ),
    ("hw: host memory (HostMemory, the page allocator)", lambda f, fn: f.endswith("emu/hw/memory.py")),
    ("hw: bare host (BareHost: map a page)", lambda f, fn: f.endswith("emu/hw/bare.py")),
    (
        "hw: exit path (Vcpu.run, exit decode, VmExit, registers)",
        lambda f, fn: "/emu/hw/" in f or f == "~" and "emu.hw._mmu" in fn,
    ),
    (
        "KVM: run loop, exit handlers (x86, vmx, kvm_main)",
        lambda f, fn: f.endswith(("emu/kvm/x86.py", "emu/kvm/vmx.py", "emu/kvm/kvm_main.py", "emu/kvm/kvm.py")),
    ),
    ("KVM: page fault (mmu, mmu_internal)", lambda f, fn: f.endswith(("emu/kvm/mmu.py", "emu/kvm/mmu_internal.py"))),
    (
        "KVM: TDP MMU (tdp_mmu, tdp_iter, spte)",
        lambda f, fn: f.endswith(("emu/kvm/tdp_mmu.py", "emu/kvm/tdp_iter.py", "emu/kvm/spte.py")),
    ),
    ("KVM: TDX (tdx)", lambda f, fn: f.endswith("emu/kvm/tdx.py")),
    ("KVM: other", lambda f, fn: "/emu/kvm/" in f),
    ("host kernel (emu/host)", lambda f, fn: "/emu/host/" in f),
    ("TDX module (tdxmod)", lambda f, fn: "/tdxmod/" in f),
    ("VMM (emu/userspace)", lambda f, fn: "/emu/userspace/" in f),
    ("trace", lambda f, fn: f.endswith("emu/trace.py")),
    ("built-in functions (dict, list, int, ...)", lambda f, fn: f == "~"),
]


def components(st):
    """[(component, own seconds, calls)] over the profile's functions, largest first."""
    sums = {name: [0.0, 0] for name, _ in COMPONENTS}
    sums["other"] = [0.0, 0]
    for (f, _line, fn), (_cc, nc, tt, _ct, _callers) in st.stats.items():
        name = next((n for n, pred in COMPONENTS if pred(f, fn)), "other")
        sums[name][0] += tt
        sums[name][1] += nc
    return sorted(((k, v[0], v[1]) for k, v in sums.items() if v[1]), key=lambda x: -x[1])


def profile_path(title, prepare, n, unit, repeats, runs=2):
    """The table of one path: ``prepare()`` sets up a run (untimed) and returns the timed
    callable, which handles ``n`` units."""
    best, _ = time_best([prepare], repeats)
    per = best[0] / n
    pr = cProfile.Profile()
    for _ in range(runs):
        go = prepare()
        pr.enable()
        go()
        pr.disable()
    st = pstats.Stats(pr)
    total = st.total_tt
    rows = components(st)
    calls = sum(c for _, _, c in rows)
    print(
        f"\n{title}: {per * 1e6:.2f} us/{unit} without the profiler ({n} {unit}s, best of {repeats}); "
        f"{calls / (runs * n):.0f} Python calls/{unit}"
    )
    w = max(len(r[0]) for r in rows)
    print(f"  {'component':{w}}  {'calls/' + unit:>10}  {'share':>6}  {'us/' + unit:>8}")
    for name, tt, nc in rows:
        print(f"  {name:{w}}  {nc / (runs * n):10.1f}  {tt / total * 100:5.1f}%  {tt / total * per * 1e6:8.2f}")
    print(f"  top functions by own time (share of the {per * 1e6:.2f} us):")
    top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:TOP]
    for (f, line, fn), (_cc, nc, tt, _ct, _callers) in top:
        where = "~" if f == "~" else f"{_short(f)}:{line}"
        print(f"    {tt / total * 100:5.1f}%  {nc / (runs * n):6.1f} calls  {fn}  ({where})")


def _short(path):
    for mark in ("/emu/", "/tdxmod/", "/bench/", "/unicorn/"):
        i = path.rfind(mark)
        if i >= 0:
            return path[i + 1 :]
    return path


def main(ctx=None):
    ctx = ctx or Context()
    repeats = max(1, ctx.repeats)
    n = ctx.n(2048, 64)
    prep = hw.vcpu_prepare()
    profile_path("new 4K page (Vcpu + BareHost)", lambda: prep(n), n, "page", repeats)
    profile_path("TLB-miss fill, nothing changed (Vcpu)", hw.fill_run(prep.rig, n), n + 1, "fill", repeats)
    profile_path("new 4K page, default VM (KVM)", lambda: kvm.kvm_prepare(kvm.NEWPAGES), kvm.NEWPAGES, "page", repeats)
    profile_path("TD private page", lambda: td.td_prepare(td.TDPAGES), td.TDPAGES, "page", max(2, repeats // 2))
