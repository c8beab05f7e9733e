"""The shipped port of upstream's private_mem_conversions_test (tests/test_selftest_ports.py) on
4 vCPUs, as a selftest user runs it: every variant and range, each vCPU converting its own
4 MiB while the others run, the host side checking every page at every sync.  A time, not a
ratio (the kernel's own test on hardware runs in under a second); per sync and per converted
page in the detail."""

import importlib.util
import os

from . import Result, time_best

PORTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "test_selftest_ports.py")
NR_VCPUS = 4


def _ports():
    spec = importlib.util.spec_from_file_location("emu_selftest_ports", PORTS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def bench_conversions(ctx):
    """private_mem_conversions_test with 4 vCPUs on a sw-protected VM and on a TD (seconds a run)."""
    ports = _ports()
    out = []
    for vm_type in ("sw-protected", "tdx"):
        runs = []

        def prepare(vm_type=vm_type):
            vm = ports.conversions_vm(vm_type, nr_vcpus=NR_VCPUS)
            assert vm.machine is not None  # built (a TD measured) before the clock starts
            return lambda: runs.append(vm.run())

        (best,), _ = time_best([prepare], max(1, min(ctx.repeats, 2)))
        run = runs[-1]
        run.assert_ok()
        syncs = len(run.syncs)
        pages = sum(s[3] for s in run.syncs) // 4096  # the pages the host checked, all syncs
        out.append(
            Result(
                f"selftest.conversions.{vm_type.replace('-', '_')}",
                f"private_mem_conversions_test, {NR_VCPUS} vCPUs, {vm_type} ({syncs} syncs)",
                best,
                "s",
                detail={"syncs": syncs, "us_per_checked_page": round(best / pages * 1e6, 2)},
            )
        )
    return out
