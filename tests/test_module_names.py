"""0.1's top-level module names keep importing: scripts were written against them."""

import importlib

import pytest

import emu


@pytest.mark.parametrize("old,new", sorted(emu.MOVED.items()))
def test_old_module_name_is_the_new_module(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)


def test_the_readme_imports():
    from emu.vmm import Machine
    from emu.host import Host
    from emu.selftest import run_guest, VM_TYPES
    from emu.explore import Explorer
    import emu.userspace.vmm as vmm
    import emu.userspace.selftest as selftest

    assert Machine is vmm.Machine and run_guest is selftest.run_guest and VM_TYPES is selftest.VM_TYPES
    assert Host.__module__ == "emu.host" and Explorer.__module__ == "emu.checkers.explore"
