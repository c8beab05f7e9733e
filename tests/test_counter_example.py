from pathlib import Path

import pytest
from emu.selftest import run_guest, VM_TYPES

GUEST = Path(__file__).parent / "guests" / "counter.c"


@pytest.mark.parametrize("vm", VM_TYPES)
def test_counter(vm):
    run = run_guest(GUEST, vm=vm, vcpus=2)
    run.assert_ok()  # raises with the guest's message on a failed assert
    assert run.syncs_of(0) == [2, 10] and run.syncs_of(1) == [2, 20]  # each vCPU's, in its order
    assert sorted(run.reports) == [(0, 10), (1, 20)]  # (vcpu, value)
    assert run.exit == "hlt"
