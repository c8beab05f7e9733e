"""Tests of C guests in the shape of KVM selftests: build a VM for a guest, run it,
look at what the guest said (GUEST_SYNC, emu_report, GUEST_ASSERT).

    import pytest
    from emu.userspace.selftest import run_guest, VM_TYPES

    @pytest.mark.parametrize("vm", VM_TYPES)
    def test_counter(vm):
        run = run_guest("tests/guests/counter.c", vm=vm, vcpus=2)
        run.assert_ok()                         # a failed GUEST_ASSERT raises with its message
        assert run.syncs == [(0, 1), (1, 1)]    # (vCPU, value) in the order the guest made them
        assert run.syncs_of(1) == [1]

The guest is a .c (compiled, see emu.userspace.guests), a .S, an ELF or a name from
guest/.  A guest that does not build raises emu.userspace.vmm.MachineError with the
compiler's output.  Each run builds a new VM (a KVM selftest's
vm_create_with_vcpus), runs every vCPU until it halts or the run fails, and
keeps the Machine for a closer look (``run.machine.kvm``, ``run.machine.read_gpa``).
"""

import dataclasses

from .vmm import Machine, parse_size

VM_TYPES = ("default", "tdx")


@dataclasses.dataclass(frozen=True)
class GuestAssert:
    """A GUEST_ASSERT or GUEST_ASSERT_EQ that failed: where, what, and (for _EQ) the two values."""
    vcpu: int
    file: str
    line: int
    expr: str
    kind: str               # "assert" or "eq"
    a: int
    b: int
    message: str            # 'GUEST_ASSERT_EQ failed at x.c:42: a == b (0x3 != 0x4)'


class GuestRun:
    """The outcome of one run of a guest."""

    def __init__(self, machine, result):
        self.machine = machine
        self.result = result                    # emu.userspace.vmm.Result: exit, error, stats, vcpus, ...
        self.syncs = list(result.syncs)         # [(vcpu, value)] of GUEST_SYNC, in order
        self.reports = list(result.reports)     # [(vcpu, value)] of emu_report, in order
        ga = result.guest_assert
        self.guest_assert = GuestAssert(**ga) if ga is not None else None

    @property
    def exit(self):
        """"hlt" when every vCPU finished (GUEST_DONE or returned from guest_main), else the
        exit that ended the run ("fail" for a failed GUEST_ASSERT)."""
        return self.result.exit

    @property
    def error(self):
        """One line when the run ended in an error, else None."""
        return self.result.error

    @property
    def ok(self):
        return self.result.error is None

    def syncs_of(self, vcpu):
        """The values vCPU ``vcpu`` passed to GUEST_SYNC, in order."""
        return [v for c, v in self.syncs if c == vcpu]

    def reports_of(self, vcpu):
        """The values vCPU ``vcpu`` reported, in order."""
        return [v for c, v in self.reports if c == vcpu]

    def assert_ok(self):
        """Raise AssertionError with the guest's message when a GUEST_ASSERT failed or the run
        ended in any other error (what REPORT_GUEST_ASSERT does in a KVM selftest)."""
        if self.error is not None:
            raise AssertionError(f"guest run failed ({self.exit}): {self.error}")
        return self

    def __repr__(self):
        return (f"GuestRun(exit={self.exit!r}, error={self.error!r}, syncs={self.syncs!r}, "
                f"reports={self.reports!r})")


class GuestVM:
    """A VM built for a guest: ``GuestVM("my.c", vm="tdx", vcpus=2).run()``.

    ``mem`` is bytes or a size such as "64M"; the other keywords go to emu.userspace.vmm.Machine
    (``hugepages``, ``tracer``, ``inject``, ``seed``, ...)."""

    def __init__(self, guest, vm="default", vcpus=1, mem="64M", **machine_kwargs):
        mem = parse_size(mem) if isinstance(mem, str) else mem
        self.machine = Machine(str(guest), vm=vm, mem=mem, vcpus=vcpus, **machine_kwargs)

    def run(self):
        return GuestRun(self.machine, self.machine.run())


def run_guest(guest, vm="default", vcpus=1, mem="64M", **machine_kwargs):
    """Build a VM for ``guest``, run it, and return a GuestRun."""
    return GuestVM(guest, vm=vm, vcpus=vcpus, mem=mem, **machine_kwargs).run()
