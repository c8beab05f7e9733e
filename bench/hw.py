"""Hardware-layer benchmarks: the emulated CPU (Unicorn + our MMU) against bare Unicorn.

Three measurements, each against a baseline measured in the same run:

1. ``bench_warm_loop``: a memory-traffic loop with the TLB warm, on our Vcpu vs.
   raw Unicorn (its own TLB, UC_TLB_CPU, flat memory, no hooks).  Target >= 0.95x.
2. ``bench_new_page``: cost per new 4K page (EPT-violation exit, walk, map,
   resume) on Vcpu + BareHost vs. the bare Unicorn fault (UC_TLB_VIRTUAL, a
   trivial Python hook refusing the first fill of each page, restart at RIP).
   Target <= 2x.  ``per_new_page`` and ``bare_fault_per_page`` are the reusable
   pieces for the KVM layer's own "new page" ratios.
3. ``bench_walks``: one 4-level EPT walk (``emu.hw.ept.walk``, target <= 0.5 us), one
   2D walk (4-level guest paging under 4-level EPT, the walk the fill makes: compiled
   when the compiled MMU is built) and one TLB-miss fill when nothing changed (per
   fill, vs. a bare Unicorn fill by a trivial hook, target <= 2x).

The guest code is hand-assembled (GNU as, Intel syntax shown next to the bytes)
and runs from GVA ``CODE`` with identity 4K guest paging.
"""

import struct

from unicorn import (
    Uc,
    UcError,
    UC_ARCH_X86,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_HOOK_TLB_FILL,
    UC_TLB_VIRTUAL,
    UC_CTL_TLB_FLUSH,
    UC_CTL_IO_WRITE,
)
from unicorn import x86_const as X

from emu.hw.bare import BareHost
from emu.hw.ept import walk, EptTranslation
from emu.hw.exits import EXIT_REASON_HLT
from emu.hw.paging import translate, Translation, READ
from emu.hw.vcpu import Vcpu

from . import Result, time_best

PAGE = 0x1000

# -- guest layout (GVA == GPA; on the raw baselines also == the Unicorn address) --------------------
GUEST_SIZE = 32 << 20
CODE = 0x100000
BUF = 0x200000  # the warm loop's buffer
BUF_SIZE = 16 << 10
PAGES = 0x400000  # the "new page" / fill region
MAX_PAGES = 4096  # up to 0x1400000
PT_BASE = 0x1800000  # guest PML4, PDPT, PD, then the PTs (4K identity map of [0, GUEST_SIZE))

# rsi = buffer, rcx = iterations (> 0), rax = 0.  7 instructions per iteration, then HLT.
#   1: mov rdx, [rsi+rax]; add rdx, rcx; mov [rsi+rax], rdx
#      add eax, 64; and eax, 0x3fc0        ; 64-byte stride, wraps at 16 KiB
#      dec ecx; jnz 1b
#      hlt
WARM_LOOP = CODE
WARM_CODE = bytes.fromhex("488b14064801ca4889140683c04025c03f0000ffc975e9f4")
WARM_INSNS_PER_ITER = 7

# rsi = first page, rcx = pages (> 0): one 8-byte load per 4K page, in sequence.
#   2: mov rdx, [rsi]; add rsi, 4096; dec ecx; jnz 2b
#      hlt
PAGES_LOOP = CODE + 0x100
PAGES_CODE = bytes.fromhex("488b164881c600100000ffc975f2f4")

_UC_PROT = {16: 1, 17: 3, 18: 5}  # UC_MEM_READ/WRITE/FETCH -> perms a trivial fill grants


# ==================================================================================================
# Our side: BareHost + Vcpu
# ==================================================================================================
class HwRig:
    """A Vcpu over a BareHost (EPT mapped 4K at a time on demand, A/D on), with 4-level guest
    page tables mapping [0, GUEST_SIZE) identically in 4K pages, and the benchmark code loaded."""

    def __init__(self):
        self.host = h = BareHost(GUEST_SIZE)
        pml4, pdpt, pd = PT_BASE, PT_BASE + PAGE, PT_BASE + 2 * PAGE
        npt = GUEST_SIZE >> 21
        h.write_gpa(pml4, struct.pack("<Q", pdpt | 3))
        h.write_gpa(pdpt, struct.pack("<Q", pd | 3))
        h.write_gpa(pd, struct.pack(f"<{npt}Q", *((PT_BASE + (3 + i) * PAGE) | 3 for i in range(npt))))
        for i in range(npt):
            h.write_gpa(
                PT_BASE + (3 + i) * PAGE, struct.pack("<512Q", *((((i << 9) + j) << 12) | 3 for j in range(512)))
            )
        assert PT_BASE >= PAGES + MAX_PAGES * PAGE and PT_BASE + (3 + npt) * PAGE <= GUEST_SIZE
        h.write_gpa(WARM_LOOP, WARM_CODE)
        h.write_gpa(PAGES_LOOP, PAGES_CODE)
        self.cr3 = pml4
        self.vcpu = v = Vcpu(h.mem)
        v.load_eptp(h.eptp)
        v.set_regs({"cr3": pml4, "rsp": CODE})
        self._leaf = {}

    def start(self, rip, rsi, rcx):
        self.vcpu.set_regs({"rip": rip, "rsi": rsi, "rcx": rcx, "rax": 0})

    def run_host(self):
        """Run until HLT, BareHost mapping every EPT violation on the way."""
        e = self.host.run(self.vcpu)
        if e.reason != EXIT_REASON_HLT:
            raise RuntimeError(f"benchmark guest stopped with {e.describe()}")
        return e

    def run_direct(self):
        """One VM entry, which must end at the HLT (no exits on the way)."""
        e = self.vcpu.run()
        if e.reason != EXIT_REASON_HLT:
            raise RuntimeError(f"benchmark guest stopped with {e.describe()} (expected no exit before HLT)")
        return e

    def ept_leaf(self, gpa):
        """HPA of the EPT leaf entry mapping ``gpa`` (which must be mapped)."""
        ptr = self._leaf.get(gpa)
        if ptr is None:
            path = []
            t = walk(self.host.mem, self.host.eptp, gpa, 1, path=path, set_ad=False)
            assert t.__class__ is EptTranslation, t
            ptr = self._leaf[gpa] = path[-1][1]
        return ptr

    def unmap(self, gpas):
        """Zap the EPT leaves of ``gpas`` (tables stay) and flush the TLB: each page is new again."""
        mem = self.host.mem
        for g in gpas:
            mem.write64(self.ept_leaf(g), 0)
        self.vcpu.flush_tlb()


def pages(n):
    assert 0 < n <= MAX_PAGES, n
    return [PAGES + i * PAGE for i in range(n)]


# ==================================================================================================
# Baselines: raw Unicorn
# ==================================================================================================
def _raw_uc_virtual(fill):
    """Raw Unicorn configured as Vcpu configures it (UC_TLB_VIRTUAL, exits on with an empty list),
    with ``fill`` as the only hook and flat memory [0, GUEST_SIZE), the benchmark code loaded."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, GUEST_SIZE, UC_PROT_ALL)
    uc.mem_write(WARM_LOOP, WARM_CODE)
    uc.mem_write(PAGES_LOOP, PAGES_CODE)
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    uc.ctl_exits_enabled(True)
    uc.ctl_set_exits([])
    uc.hook_add(UC_HOOK_TLB_FILL, fill)
    return uc


def _raw_set(uc, rip, rsi, rcx):
    uc.reg_write(X.UC_X86_REG_RSI, rsi)
    uc.reg_write(X.UC_X86_REG_RCX, rcx)
    uc.reg_write(X.UC_X86_REG_RAX, 0)
    uc.reg_write(X.UC_X86_REG_RIP, rip)


def _flush(uc):
    uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)


# ==================================================================================================
# 1. warm guest loop
# ==================================================================================================
def bench_warm_loop(ctx):
    """Warm guest loop (16 KiB of loads/stores): Vcpu vs raw Unicorn insn/s, target >= 0.95x."""
    iters = ctx.n(4_000_000, 1000)
    insns = iters * WARM_INSNS_PER_ITER + 1

    # (a) raw Unicorn: its own TLB (UC_TLB_CPU, the default), no paging, flat memory, no hooks.
    raw = Uc(UC_ARCH_X86, UC_MODE_64)
    raw.mem_map(CODE, PAGE, UC_PROT_ALL)
    raw.mem_map(BUF, BUF_SIZE, UC_PROT_ALL)
    raw.mem_write(WARM_LOOP, WARM_CODE)
    raw_end = WARM_LOOP + len(WARM_CODE)

    def prep_raw():
        _raw_set(raw, WARM_LOOP, BUF, iters)
        return lambda: raw.emu_start(WARM_LOOP, raw_end)  # ends at the HLT (raw_end is never reached)

    # (a') for reference: raw Unicorn in UC_TLB_VIRTUAL mode with a trivial identity fill, configured
    # as the Vcpu is: what UC_TLB_VIRTUAL itself costs, our MMU apart.
    def fill(uc, vaddr, access, entry, _data):
        entry.paddr = vaddr & ~0xFFF
        entry.perms = UC_PROT_ALL
        return True

    virt = _raw_uc_virtual(fill)

    def prep_virt():
        _raw_set(virt, WARM_LOOP, BUF, iters)
        return lambda: virt.emu_start(WARM_LOOP, 0)

    # (b) ours: first run faults everything in through BareHost; timed runs must not fill at all.
    rig = HwRig()
    v = rig.vcpu
    rig.start(WARM_LOOP, BUF, iters)
    rig.run_host()
    prep_raw()()
    prep_virt()()
    buf = rig.host.read_gpa(BUF, BUF_SIZE)
    same = bytes(raw.mem_read(BUF, BUF_SIZE)) == buf == bytes(virt.mem_read(BUF, BUF_SIZE))
    fills_before = v.stats_fills

    def prep_ours():
        rig.start(WARM_LOOP, BUF, iters)
        return rig.run_direct

    (t_raw, t_virt, t_ours), all_t = time_best([prep_raw, prep_virt, prep_ours], ctx.repeats)
    timed_fills = v.stats_fills - fills_before
    if timed_fills:
        raise RuntimeError(f"the TLB was not warm: {timed_fills} fills during the timed runs")
    if not same:
        raise RuntimeError("the warm loop left different memory on raw Unicorn and on the Vcpu")
    ips_raw, ips_virt, ips_ours = insns / t_raw, insns / t_virt, insns / t_ours
    return [
        Result(
            "hw.warm_loop.raw",
            "warm loop, raw Unicorn (UC_TLB_CPU, no hooks)",
            ips_raw,
            "insn/s",
            detail={"iterations": iters, "guest_insns": insns, "buffer_bytes": BUF_SIZE, "times_s": all_t[0]},
        ),
        Result(
            "hw.warm_loop.virtual",
            "warm loop, raw Unicorn UC_TLB_VIRTUAL (ref.)",
            ips_virt,
            "insn/s",
            baseline_key="hw.warm_loop.raw",
            ratio=ips_virt / ips_raw,
            ratio_note="virtual/raw insn/s",
            detail={"times_s": all_t[1]},
        ),
        Result(
            "hw.warm_loop.ours",
            "warm loop, Vcpu (our MMU, TLB warm)",
            ips_ours,
            "insn/s",
            baseline_key="hw.warm_loop.raw",
            ratio=ips_ours / ips_raw,
            ratio_note="ours/raw insn/s",
            target=(">=", 0.95),
            detail={"fills_during_timed_runs": timed_fills, "same_memory_after_first_run": same, "times_s": all_t[2]},
        ),
    ]


def bench_sliced_loop(ctx):
    """Two vCPUs each running the warm loop, sliced: guest mode across scheduling points (the
    block budget, a scheduler switch to the other vCPU at each slice end) against the same two
    loops run one after the other unsliced.  Target: slicing costs at most 2x."""
    import greenlet
    from emu.kvm.kvm import GUEST_SLICE_BLOCKS

    iters = ctx.n(2_000_000, 1000)
    rigs = [HwRig(), HwRig()]
    for rig in rigs:  # warm: fault everything in through BareHost
        rig.start(WARM_LOOP, BUF, iters)
        rig.run_host()

    def prep_plain():
        for rig in rigs:
            rig.vcpu.slice_blocks = 0
            rig.start(WARM_LOOP, BUF, iters)
        return lambda: [rig.run_direct() for rig in rigs]

    def prep_sliced():
        main = greenlet.getcurrent()
        tasks = []
        slices = [0, 0]

        def make(i, rig):
            def point(kind):
                slices[i] += 1
                other = tasks[1 - i]
                if not other.dead:
                    other.switch()  # the other vCPU runs while this one stays in guest mode

            rig.vcpu.guest_point = point
            rig.vcpu.slice_blocks = GUEST_SLICE_BLOCKS
            rig.start(WARM_LOOP, BUF, iters)

            def body():
                rig.run_direct()
                rig.vcpu.guest_point = None

            return greenlet.greenlet(body, main)

        tasks.extend(make(i, rig) for i, rig in enumerate(rigs))

        def run():
            while not all(t.dead for t in tasks):
                for t in tasks:
                    if not t.dead:
                        t.switch()
            ctx.slices = sum(slices)

        return run

    (t_plain, t_sliced), all_t = time_best([prep_plain, prep_sliced], ctx.repeats)
    insns = 2 * (iters * WARM_INSNS_PER_ITER + 1)
    return [
        Result(
            "hw.sliced_loop.plain",
            "two warm loops, one after the other (no slicing)",
            insns / t_plain,
            "insn/s",
            detail={"iterations": iters, "times_s": all_t[0]},
        ),
        Result(
            "hw.sliced_loop.sliced",
            "two warm loops interleaved in guest-mode slices",
            insns / t_sliced,
            "insn/s",
            baseline_key="hw.sliced_loop.plain",
            ratio=t_sliced / t_plain,
            ratio_note="sliced/plain time",
            target=("<=", 2.0),
            detail={"slice_blocks": GUEST_SLICE_BLOCKS, "slices": getattr(ctx, "slices", None), "times_s": all_t[1]},
        ),
    ]


# ==================================================================================================
# 2. new 4K page: exit + restart
# ==================================================================================================
def per_new_page(prepare_new_pages, n, repeats):
    """Best-of-``repeats`` seconds per new page.

    ``prepare_new_pages(n)`` does the untimed set-up of a fresh run and returns a
    zero-argument callable that runs the guest until it has touched ``n`` pages
    it never touched since the set-up (each one exit, handled, and a resume) and
    returns when done.  Returns (seconds per page, all run times in seconds).
    """
    (best,), (times,) = time_best([lambda: prepare_new_pages(n)], repeats)
    return best / n, times


def bare_fault_prepare():
    """A ``prepare_new_pages`` for bare Unicorn: UC_TLB_VIRTUAL, identity fills by a trivial hook
    that refuses the first fill of each page (emu_start raises UcError), restart at RIP."""
    seen = set()

    def fill(uc, vaddr, access, entry, _data):
        page = vaddr & ~0xFFF
        if page not in seen:
            seen.add(page)
            return False
        entry.paddr = page
        entry.perms = UC_PROT_ALL
        return True

    uc = _raw_uc_virtual(fill)
    state = {"faults": 0}

    def prepare(n):
        seen.clear()
        seen.add(PAGES_LOOP & ~0xFFF)  # the code page is not new (as for the Vcpu)
        _flush(uc)
        _raw_set(uc, PAGES_LOOP, PAGES, n)

        def go():
            rip, faults = PAGES_LOOP, 0
            while True:
                try:
                    uc.emu_start(rip, 0)
                    break
                except UcError:
                    faults += 1
                    rip = uc.reg_read(X.UC_X86_REG_RIP)
            state["faults"] = faults

        return go

    prepare(MAX_PAGES)()  # warm: translate the code, commit the memory
    prepare.state = state
    return prepare


def vcpu_prepare(rig=None):
    """A ``prepare_new_pages`` for Vcpu + BareHost: each page's EPT leaf is zapped before the run,
    so each first touch is an EPT violation that BareHost maps (the tables stay)."""
    rig = rig or HwRig()

    def prepare(n):
        ps = pages(n)
        rig.unmap(ps)
        rig.host.violations.clear()
        rig.start(PAGES_LOOP, PAGES, n)
        return rig.run_host

    rig.start(PAGES_LOOP, PAGES, MAX_PAGES)  # warm: map every page once, build the tables
    rig.run_host()
    prepare.rig = rig
    return prepare


def bare_fault_per_page(ctx, n=None):
    """The bare Unicorn fault + restart, seconds per page, measured once per run (memoized)."""
    n = n or ctx.n(2048, 64)
    return ctx.memo("hw.bare_fault", lambda: per_new_page(bare_fault_prepare(), n, ctx.repeats)[0])


def bench_new_page(ctx):
    """New 4K page (exit, walk, map, resume) on Vcpu + BareHost vs the bare Unicorn fault, target <= 2x."""
    n = ctx.n(2048, 64)
    bare, ours = bare_fault_prepare(), vcpu_prepare()
    rig = ours.rig
    fills0 = rig.vcpu.stats_fills
    (t_bare, t_ours), all_t = time_best([lambda: bare(n), lambda: ours(n)], ctx.repeats)
    fills = (rig.vcpu.stats_fills - fills0) / ctx.repeats
    exits = len(rig.host.violations)
    if bare.state["faults"] != n or exits != n:
        raise RuntimeError(f"expected {n} faults per run, got bare {bare.state['faults']}, ours {exits}")
    bare_pp, ours_pp = t_bare / n, t_ours / n
    ctx.cache.setdefault("hw.bare_fault", bare_pp)
    return [
        Result(
            "hw.bare_fault",
            "bare Unicorn fault + restart (per page)",
            bare_pp,
            "s/page",
            detail={"pages": n, "times_s": all_t[0]},
        ),
        Result(
            "hw.new_page",
            "new 4K page: exit+walk+map+resume (BareHost)",
            ours_pp,
            "s/page",
            baseline_key="hw.bare_fault",
            ratio=ours_pp / bare_pp,
            ratio_note="ours/bare per page",
            target=("<=", 2.0),
            detail={"pages": n, "exits_per_run": exits, "fills_per_page": fills / n, "times_s": all_t[1]},
        ),
    ]


# ==================================================================================================
# 3. walks and fills
# ==================================================================================================
def walk_loops(rig, n):
    """Untimed set-up for the walk micro-benchmarks: zero-argument callables, each walking ``n``
    mapped pages once (A/D already set: a walk that changes nothing).  The 2D walk is the one
    the vCPU's fill makes, whole (no paging-structure cache), over the vCPU's EPT access (its
    GPA cache): compiled when the compiled MMU is built."""
    mem, eptp = rig.host.mem, rig.host.eptp
    q, ept, cr3 = mem.q, rig.vcpu._ept, rig.cr3  # _ept: the EPT callback the Vcpu's fills use
    mmu = rig.vcpu._mmu
    gpas = pages(n)
    for g in gpas:  # steady state: every A flag set, all mapped
        assert walk(mem, eptp, g, READ).__class__ is EptTranslation
        assert translate(q, ept, cr3, g, READ).__class__ is Translation

    def ept_walks():
        for g in gpas:
            walk(mem, eptp, g, READ)

    if mmu is not None:

        def walks_2d():
            for g in gpas:
                mmu.translate(cr3, g, READ, True, True, False)
    else:

        def walks_2d():
            for g in gpas:
                translate(q, ept, cr3, g, READ)

    return ept_walks, walks_2d


def fill_run(rig, n):
    """A prepare for a run touching ``n`` mapped pages after an INVEPT: TLB-miss fills, no exits."""

    def prepare():
        rig.vcpu.flush_tlb()
        rig.start(PAGES_LOOP, PAGES, n)
        return rig.run_direct

    return prepare


def bare_fill_prepare(n):
    """Bare Unicorn, UC_TLB_VIRTUAL, a trivial hook accepting every fill: the same run as fill_run."""
    count = [0]

    def fill(uc, vaddr, access, entry, _data):
        count[0] += 1
        entry.paddr = vaddr & ~0xFFF
        entry.perms = UC_PROT_ALL
        return True

    uc = _raw_uc_virtual(fill)

    def prepare():
        _flush(uc)
        _raw_set(uc, PAGES_LOOP, PAGES, n)
        count[0] = 0
        return lambda: uc.emu_start(PAGES_LOOP, 0)

    prepare()()
    prepare.count = count
    return prepare


def bench_walks(ctx):
    """One EPT walk, one 2D walk, one TLB-miss fill with nothing changed (vs a bare Unicorn fill)."""
    n = ctx.n(2048, 64)
    rig = vcpu_prepare().rig  # every page mapped, tables built
    ept_walks, walks_2d = walk_loops(rig, n)
    (t_ept, t_2d), _ = time_best([lambda: ept_walks, lambda: walks_2d], ctx.repeats)

    v = rig.vcpu
    ours_prep, bare_prep = fill_run(rig, n), bare_fill_prepare(n)
    f0 = v.stats_fills
    (t_fill, t_bare), _ = time_best([ours_prep, bare_prep], ctx.repeats)
    fills = (v.stats_fills - f0) // ctx.repeats
    bare_fills = bare_prep.count[0]
    ept_us, d2_us = t_ept / n, t_2d / n
    fill_s, bare_fill_s = t_fill / fills, t_bare / bare_fills
    which = "compiled" if v._mmu is not None else "Python"
    return [
        Result(
            "hw.ept_walk",
            "one 4-level EPT walk (A/D on, nothing to set)",
            ept_us,
            "s/walk",
            ratio=ept_us / 0.5e-6,
            target=("<=", 1.0),
            ratio_note="walk / 0.5 us",
            detail={"walks": n},
        ),
        Result(
            "hw.walk_2d",
            f"one 2D walk (4-level guest under 4-level EPT, {which})",
            d2_us,
            "s/walk",
            baseline_key="hw.ept_walk",
            ratio=d2_us / ept_us,
            ratio_note="2D walk / EPT walk",
            detail={"walks": n, "mmu": which},
        ),
        Result(
            "hw.bare_fill",
            "bare Unicorn TLB fill (trivial hook)",
            bare_fill_s,
            "s/fill",
            detail={"pages": n, "fills_per_run": bare_fills},
        ),
        Result(
            "hw.fill",
            "TLB-miss fill, nothing changed (Vcpu)",
            fill_s,
            "s/fill",
            baseline_key="hw.bare_fill",
            ratio=fill_s / bare_fill_s,
            ratio_note="ours/bare per fill",
            target=("<=", 2.0),
            detail={
                "pages": n,
                "fills_per_run": fills,
                "expected_fills": n + 1,
                "stats_fills_matches": fills == bare_fills == n + 1,
                "mmu": which,
            },
        ),
    ]
