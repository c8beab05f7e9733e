"""The public API is annotated (mypy checks the annotations in `make lint`, run by CI): every
parameter and the return of each function people's scripts call.  A new public function of these
must come annotated."""

import inspect

import pytest

from emu import selftest
from emu.checkers.campaign import Campaign
from emu.checkers.explore import Explorer
from emu.hw import ept
from emu.userspace.vmm import Machine

PUBLIC = [
    selftest.run_guest,
    selftest.explore,
    *(
        getattr(selftest.GuestVM, n)
        for n in (
            "__init__",
            "machine",
            "built",
            "run",
            "on_ucall",
            "spawn",
            "check",
            "wait_for",
            "read",
            "write",
            "sync_global_to_guest",
            "virt_map",
            "mem_region_add",
            "mem_region_delete",
            "mem_region_move",
            "set_memory_attributes",
            "mem_set_private",
            "mem_set_shared",
            "guest_mem_fallocate",
        )
    ),
    *(
        getattr(selftest.GuestRun, n)
        for n in (
            "exit",
            "error",
            "errno",
            "memory_fault",
            "host_exception",
            "ok",
            "syncs_of",
            "reports_of",
            "assert_ok",
        )
    ),
    Machine.__init__,
    Machine.run,
    Machine.read_gpa,
    Machine.write_gpa,
    Explorer.__init__,
    Explorer.dfs,
    Explorer.dpor,
    Explorer.random,
    Explorer.replay,
    Campaign.__init__,
    Campaign.run,
    ept.walk_py,
]


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: getattr(f, "__qualname__", None) or f.fget.__qualname__)
def test_public_function_is_annotated(fn):
    fn = fn.fget if isinstance(fn, property) else fn
    sig = inspect.signature(fn)
    missing = [p.name for p in sig.parameters.values() if p.name != "self" and p.annotation is inspect.Parameter.empty]
    assert not missing, f"{fn.__qualname__}: parameters without a type: {missing}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{fn.__qualname__}: no return type"
