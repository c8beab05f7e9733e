"""The mirror hooks as Linux 6.16 (the seed's reflect_* freeze protocol) and 7.2 have them (one
set_external_spte(old_spte, new_spte) from __handle_changed_spte(), reclaim_external_sp()): the
same guests give the same results and the same SEAMCALLs, each change of a mirror SPTE reaches the
TDX code as one call of the kind it is, and the seed's race stays explorable in both shapes."""

import pytest

from emu.checkers.check import check_vm, check_destroyed
from emu.checkers.explore import Explorer
from emu.trace import Tracer, ListSink
from emu.userspace.vmm import Machine, MachineError

GUESTS = [("private", 1), ("convert", 1), ("accept2", 2), ("convspin", 2)]


@pytest.mark.parametrize("guest, vcpus", GUESTS)
def test_same_results_and_seamcalls(guest, vcpus):
    out = {}
    for hooks in ("6.16", "7.2"):
        m = Machine(guest, vm="tdx", vcpus=vcpus, mirror_hooks=hooks)
        res = m.run()
        assert res.ok, res.error
        assert check_vm(m.kvm) == []
        out[hooks] = (res.reports, res.stats["seamcalls"], res.stats["pages_mapped"])
        m.destroy()
        assert check_destroyed(m.kvm) == []
    assert out["6.16"] == out["7.2"]


def test_each_change_is_one_set_external_spte_of_its_kind():
    sink = ListSink()
    m = Machine("convert", vm="tdx", mirror_hooks="7.2", tracer=Tracer([sink], ["kvm_reflect", "seamcall"]))
    res = m.run()
    assert res.ok
    ops = [e.fields["op"] for e in sink.events if e.name == "kvm_reflect"]
    assert not any(op.startswith("reflect_") for op in ops)
    assert {"set_external_spte:link", "set_external_spte:map", "set_external_spte:zap"} <= set(ops)
    # the zap is BLOCK, TRACK, REMOVE, WBINVD, in that order, from the one call
    names = [(e.name, e.fields.get("op") or e.fields.get("leaf")) for e in sink.events]
    i = names.index(("kvm_reflect", "set_external_spte:zap"))
    leaves = [n for kind, n in names[:i] if kind == "seamcall"][-4:]
    assert leaves == ["TDH_MEM_RANGE_BLOCK", "TDH_MEM_TRACK", "TDH_MEM_PAGE_REMOVE", "TDH_PHYMEM_PAGE_WBINVD"]
    m.destroy()
    # teardown: every S-EPT page comes back through reclaim_external_sp()
    assert sum(e.fields["op"] == "reclaim_external_sp" for e in sink.events if e.name == "kvm_reflect") > 0
    assert check_destroyed(m.kvm) == []


def test_the_seeds_race_in_both_shapes():
    """--no-freeze (publish the mirror SPTE, then reflect it) is found by --dpor in either shape;
    with the freeze nothing is, and both shapes have the same classes of interleavings."""
    runs = {}
    for hooks in ("6.16", "7.2"):
        bad = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2, no_freeze=True, mirror_hooks=hooks)).dpor()
        assert bad.failures >= 1
        good = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2, mirror_hooks=hooks)).dpor()
        assert good.failures == 0 and good.complete
        runs[hooks] = good.runs
    assert runs["6.16"] == runs["7.2"]


def test_bad_mirror_hooks():
    with pytest.raises(MachineError, match="unknown mirror hooks"):
        Machine("hello", vm="tdx", mirror_hooks="6.1")
    with pytest.raises(MachineError, match="builds on the 7.2 mirror hooks"):
        Machine("hello", vm="tdx", hugepages="2m", tdx_huge_pages=True, mirror_hooks="6.16")
