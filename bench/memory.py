"""Memory: a 4 GiB guest touching a few thousand pages must stay small (lazily committed memory)."""

import os
import resource

from . import Result
from .explore_helpers import in_child_value

GUEST = os.path.join(os.path.dirname(__file__), "guests", "spread.S")


def _peak_rss_of_run(vm):
    from emu.userspace.vmm import Machine

    m = Machine(GUEST, vm=vm, mem=4 << 30, vcpus=1)
    res = m.run()
    assert res.ok, res.error
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, res.stats["ept_violations"]


def bench_memory(ctx):
    """Peak RSS of a 4 GiB guest (VM and TD) touching 3000 pages spread over it, target < 400 MB."""
    out = []
    for vm in ("default", "tdx"):
        rss, faults = in_child_value(lambda: _peak_rss_of_run(vm))
        out.append(
            Result(
                f"mem.{vm}",
                f"4 GiB {vm} guest touching 3000 pages: peak RSS ({faults} EPT violations)",
                rss / (1 << 20),
                "MiB",
                ratio=rss / (400 << 20),
                target=("<=", 1.0),
                ratio_note="peak RSS / 400 MiB",
            )
        )
    return out
