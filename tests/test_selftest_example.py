from pathlib import Path

import pytest
from emu.selftest import GuestVM, UCALL_SYNC, explore

GUEST = Path(__file__).parent / "guests" / "convert.c"


def make_vm(vm_type):
    vm = GuestVM(GUEST, vm=vm_type, vcpus=1)
    vm.mem_region_add(10, 1 << 32, 2 << 20, guest_memfd=True)  # vm_mem_add(): a memslot, its memory
    vm.sync_global_to_guest("pattern", 0x5A)  # before the run (a TD: before measuring)

    @vm.on_ucall  # on the vCPU's task: vcpu_run() + get_ucall()
    def host(vcpu, uc):
        if uc.cmd == UCALL_SYNC:
            gpa, size, pattern, _ = uc.args
            assert vm.read(gpa, size) == bytes([pattern]) * size, f"stage {uc.stage}"  # TEST_ASSERT

    return vm


@pytest.mark.parametrize("vm_type", ["sw-protected", "tdx"])
def test_convert(vm_type):
    run = make_vm(vm_type).run()
    run.assert_ok()  # a GUEST_ASSERT or a host assert raises here
    assert [s[1] for s in run.syncs] == [0, 1]  # (vcpu, stage, *args)
    assert run.printfs == [(0, "vCPU 0: private byte 0x22\n")]


def test_convert_explored():
    res = explore(lambda: make_vm("tdx"), random=20, seed=1)
    assert res.schedules == 20 and not res.failures
