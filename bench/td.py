"""The TDX layer: a TD private page, and exploring the seed's race."""

import os

from . import Result
from . import hw
from .kvm import machine_prepare
from emu.vmm import Machine
from emu.explore import Explorer, default_jobs

GUEST = os.path.join(os.path.dirname(__file__), "guests", "tdpages.S")
TDPAGES = 1024


def td_prepare(n):
    """A TD whose guest accepts and touches TDPAGES private pages."""
    assert n == TDPAGES
    return machine_prepare(GUEST, "tdx")


def bench_private_page(ctx):
    """TD private page (ACCEPT exit, SEPT.ADD/AUG with the freeze, ACCEPT, access) vs the bare fault, <= 4x."""
    bare = hw.bare_fault_per_page(ctx)
    per, _ = hw.per_new_page(td_prepare, TDPAGES, max(2, ctx.repeats // 2))
    return [Result("td.private_page", "TD private page: violation, freeze, SEAMCALLs, ACCEPT, access", per,
                   "s/page", baseline_key="hw.bare_fault", ratio=per / bare, target=("<=", 4.0),
                   ratio_note="ours/bare fault per page")]


def bench_explore(ctx):
    """Schedules explored per second on race2 (freeze protocol on, so every run goes to the end)."""
    runs = max(50, int(300 * ctx.scale))
    ex = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2))
    res = ex.random(runs=runs, seed=1, depth=3)
    assert res.failures == 0
    return [Result("td.explore", f"seed race explored (race2, PCT, {default_jobs()} workers)", res.rate,
                   "schedules/s",
                   ratio=res.rate / 500.0, target=(">=", 1.0), ratio_note="rate / 500 schedules/s")]
