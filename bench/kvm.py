"""The KVM layer: a new 4K page through KVM's real fault path, against a bare Unicorn fault."""

import os

from . import Result
from bench import hw
from emu.userspace.vmm import Machine

GUEST = os.path.join(os.path.dirname(__file__), "guests", "newpages.S")
NEWPAGES = 2048


def machine_prepare(guest, vm, **kw):
    """A prepare_new_pages: build a fresh Machine (untimed), return the callable that runs it."""
    m = Machine(guest, vm=vm, mem=64 << 20, vcpus=1, **kw)

    def run():
        res = m.run()
        assert res.ok, res.error

    return run


def kvm_prepare(n):
    """The default VM whose guest touches NEWPAGES new pages."""
    assert n == NEWPAGES
    return machine_prepare(GUEST, "default")


def bench_new_page(ctx):
    """New 4K page through KVM's fault path (default VM) vs the bare Unicorn fault, target <= 3x."""
    bare = hw.bare_fault_per_page(ctx)
    per, _ = hw.per_new_page(kvm_prepare, NEWPAGES, ctx.repeats)
    return [
        Result(
            "kvm.new_page",
            "new 4K page, default VM: exit+walk+map+resume (KVM)",
            per,
            "s/page",
            baseline_key="hw.bare_fault",
            ratio=per / bare,
            target=("<=", 3.0),
            ratio_note="ours/bare fault per page",
        )
    ]
