"""KVM's answers to a busy TDX module, as Linux 6.16's arch/x86/kvm/vmx/tdx.c gives them.

* tdx_sept_zap_private_spte() / tdx_track() / tdx_sept_drop_private_spte(): TDX_OPERAND_BUSY from
  TDH.MEM.RANGE.BLOCK, TDH.MEM.TRACK or TDH.MEM.PAGE.REMOVE is retried once between
  tdx_no_vcpus_enter_start() (wait_for_sept_zap set, KVM_REQ_OUTSIDE_GUEST_MODE to every vCPU) and
  tdx_no_vcpus_enter_stop();
* tdx_vcpu_run(): no TDH.VP.ENTER while wait_for_sept_zap is set (EXIT_FASTPATH_EXIT_HANDLED);
  a BUSY TDH.VP.ENTER is re-entered without going to userspace;
* tdx_handle_ept_violation(): the local retry of RET_PF_RETRY only for private GPAs.
"""

import pytest

from emu.kvm.kvm import KVM_REQ_OUTSIDE_GUEST_MODE
from emu.kvm.uapi import KVM_EXIT_HLT
from emu.kvm.tdp_mmu import KVM_MIRROR_ROOTS, RET_PF_RETRY
from emu.kvm.mmu import RET_PF_FIXED
from emu.userspace.vmm import Machine
from tdxmod import abi as A
from tdxmod.module import Regs

AREA = 0x1000000  # the area the private guest accepts
BUSY = A.TDX_OPERAND_BUSY
SUCCESS_STATUS = 0


class Recorder:
    """Wraps one module's seamcall: records (leaf name, rcx, wait_for_sept_zap, vCPUs asked out of
    guest mode) and answers the listed calls with a status instead of the module."""

    def __init__(self, m, busy=()):
        self.m = m
        self.mod = m.kvm.x86_ops.module
        self.real = self.mod.seamcall
        self.busy = list(busy)  # [leaf name, ...]: the next call of each gets BUSY
        self.calls = []
        self.mod.seamcall = self

    def __call__(self, leaf, caller=None, **regs):
        kvm = self.m.kvm
        name = A.seamcall_name(leaf)
        kicked = all(v.requests & KVM_REQ_OUTSIDE_GUEST_MODE for v in kvm.vcpus)
        self.calls.append((name, regs.get("rcx", 0), kvm.tdx.wait_for_sept_zap, kicked))
        for v in kvm.vcpus:
            v.requests &= ~KVM_REQ_OUTSIDE_GUEST_MODE
        if name in self.busy:
            self.busy.remove(name)
            return Regs(BUSY | A.OPERAND_ID_RCX)
        return self.real(leaf, caller=caller, **regs)

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def private_td():
    m = Machine("private", vm="tdx", vcpus=2)
    res = m.run()
    assert res.ok, res.error
    return m


def zap_area(m):
    kvm = m.kvm
    kvm.zap_gfn_range(AREA >> 12, (AREA >> 12) + 1, KVM_MIRROR_ROOTS)


@pytest.mark.parametrize("leaf", ["TDH_MEM_RANGE_BLOCK", "TDH_MEM_TRACK", "TDH_MEM_PAGE_REMOVE"])
def test_zap_busy_is_retried_once_with_no_vcpus_entering(private_td, leaf):
    """tdx_sept_zap_private_spte() / tdx_track() / tdx_sept_drop_private_spte(): the BUSY call is made
    again once, with wait_for_sept_zap set and every vCPU asked out of guest mode
    (tdx_no_vcpus_enter_start()); the flag is clear again afterwards (tdx_no_vcpus_enter_stop()), and
    TRACK is always followed by KVM_REQ_OUTSIDE_GUEST_MODE to every vCPU."""
    m = private_td
    rec = Recorder(m, busy=[leaf])
    zap_area(m)
    calls = [c for c in rec.calls if c[0] != "TDH_PHYMEM_PAGE_WBINVD"]
    order = ["TDH_MEM_RANGE_BLOCK", "TDH_MEM_TRACK", "TDH_MEM_PAGE_REMOVE"]
    expect = []
    for name in order:
        expect.append((name, False))
        if name == leaf:
            expect.append((name, True))
    assert [(c[0], c[2]) for c in calls] == expect
    retry = [c for c in calls if c[2]][0]
    assert retry[3]  # every vCPU kicked before the retry
    after_track = calls[[c[0] for c in calls].index("TDH_MEM_PAGE_REMOVE")]
    assert after_track[3]  # tdx_track() kicks after TRACK
    assert not m.kvm.tdx.wait_for_sept_zap and not m.kvm.vm_bugged
    assert "TDH_PHYMEM_PAGE_WBINVD" in rec.names()


def test_zap_busy_twice_is_kvm_bug_on(private_td):
    """tdx_sept_zap_private_spte(): BUSY again on the retry -> KVM_BUG_ON; wait_for_sept_zap cleared."""
    m = private_td
    Recorder(m, busy=["TDH_MEM_RANGE_BLOCK", "TDH_MEM_RANGE_BLOCK"])
    zap_area(m)
    assert m.kvm.vm_bugged and "TDH.MEM.RANGE.BLOCK" in m.kvm.bug_reason
    assert not m.kvm.tdx.wait_for_sept_zap


def test_no_td_entry_while_a_zap_retries(private_td):
    """tdx_vcpu_run(): while wait_for_sept_zap is set no TDH.VP.ENTER is made; the run loop gets
    EXIT_FASTPATH_EXIT_HANDLED (handled, re-enter) instead, and waits outside guest mode (-3: the
    zap's kick must be able to find this vCPU out of vcpu_enter_guest)."""
    m = private_td
    rec = Recorder(m)
    vcpu = m.vcpus[0]
    ops = m.kvm.x86_ops
    m.kvm.tdx.wait_for_sept_zap = True
    try:
        ex = ops.vcpu_run(vcpu)
    finally:
        m.kvm.tdx.wait_for_sept_zap = False
    assert ex.reason == -3 and ops.handle_exit(vcpu, ex) == 1
    assert rec.calls == []


def test_busy_vp_enter_reenters(private_td):
    """tdx_vcpu_run() / tdx_handle_exit(): TDH.VP.ENTER BUSY (here the epoch lock, BUSY|TD_EPOCH) is
    EXIT_FASTPATH_EXIT_HANDLED: KVM enters again without a userspace exit."""
    m = private_td
    vcpu = m.vcpus[0]
    ops = m.kvm.x86_ops
    td = ops.module.tds[m.kvm.tdx.tdr_pa]
    td.epoch_locked = True  # a TRACK holds the epoch lock
    try:
        ex = ops.vcpu_run(vcpu)
    finally:
        td.epoch_locked = False
    assert vcpu.tdx_exit.rax == BUSY | A.OPERAND_ID_TD_EPOCH
    assert ex.reason == -2 and ops.handle_exit(vcpu, ex) == 1


@pytest.mark.parametrize("private,calls", [(True, 3), (False, 1)])
def test_local_retry_only_for_private_gpas(private_td, monkeypatch, private, calls):
    """tdx_handle_ept_violation(): RET_PF_RETRY is retried locally (no TD entry in between) only for a
    private GPA; a shared GPA goes back to the guest after one attempt."""
    m = private_td
    vcpu = m.vcpus[0]
    results = [RET_PF_RETRY, RET_PF_RETRY, RET_PF_FIXED]
    seen = []

    def fault(gpa, qual, rip):
        seen.append((gpa, qual))
        vcpu.last_pf_ret = results[len(seen) - 1]
        return 1

    monkeypatch.setattr(vcpu, "vmx_handle_ept_violation", fault)
    gpa = AREA if private else AREA | m.shared_bit
    out = Regs(48, rcx=0x181, rdx=0, r8=gpa)
    assert m.kvm.x86_ops.handle_ept_violation(vcpu, out) == 1
    assert len(seen) == calls
    # a private fault is forced to a write; a shared one keeps the module's qualification
    assert seen[0][1] == (0x2 if private else 0x181)


ACCEPT_GUEST = """\
.intel_syntax noprefix
.include "emu.inc"
    .text
    .globl _start
_start:
    mov rax, 6
    TDCALL
    EXIT                # TDG.VP.VMCALL<Instruction.HLT> (a bare HLT in a TD is a #VE)
"""


def test_zap_meets_a_guest_holding_the_entry_lock(tmp_path):
    """End to end under the scheduler: vCPU 0 is in the TD inside TDG.MEM.PAGE.ACCEPT, holding the page's
    entry lock (sept_lock_acquire_guest()), when another task zaps that page.  TDH.MEM.RANGE.BLOCK gets
    BUSY|RCX (and sets TDHP); KVM (tdx_sept_zap_private_spte()) sets wait_for_sept_zap, kicks every vCPU
    out of guest mode and waits for them, so the ACCEPT finishes and the vCPU leaves the TD; the retried
    BLOCK succeeds, then TRACK, REMOVE and WBINVD; no KVM_BUG_ON."""
    from emu.checkers.sched import Scheduler, Strategy

    path = tmp_path / "accept1.S"
    path.write_text(ACCEPT_GUEST)
    m = Machine(str(path), vm="tdx")
    kvm = m.kvm
    ops = kvm.x86_ops
    vcpu = m.vcpus[0]
    ops.set_regs(vcpu, {"rcx": AREA})
    rec = Recorder(m)
    at_lock = {}

    class AtTheLock(Strategy):
        def choose(self, sched, enabled, current, what):
            if what == "sept_entry_locked_guest" and not at_lock:
                at_lock["seen"] = True
                zapper = [t for t in enabled if t.index == 1]
                if zapper:
                    return zapper[0]
            return sched.default_choice(enabled, current, what)

    sched = Scheduler(AtTheLock())
    kvm.sched = sched
    ops.module.sched = sched
    runs = []

    def vcpu_task():
        runs.append(vcpu.run())

    def zapper():
        sched.wait_until(lambda: bool(at_lock), what="lock_wait")
        kvm.zap_gfn_range(AREA >> 12, (AREA >> 12) + 1, KVM_MIRROR_ROOTS)

    sched.spawn(vcpu_task)
    sched.spawn(zapper)
    try:
        sched.run()
    finally:
        kvm.sched = None
        ops.module.sched = None
    assert at_lock and not kvm.vm_bugged and not kvm.vm_dead, kvm.bug_reason
    assert runs and runs[0].exit_reason == KVM_EXIT_HLT
    zap = [
        (c[0], c[2])
        for c in rec.calls
        if c[0] in ("TDH_MEM_RANGE_BLOCK", "TDH_MEM_TRACK", "TDH_MEM_PAGE_REMOVE", "TDH_PHYMEM_PAGE_WBINVD")
    ]
    assert zap == [
        ("TDH_MEM_RANGE_BLOCK", False),
        ("TDH_MEM_RANGE_BLOCK", True),
        ("TDH_MEM_TRACK", False),
        ("TDH_MEM_PAGE_REMOVE", False),
        ("TDH_PHYMEM_PAGE_WBINVD", False),
    ]
    assert not kvm.tdx.wait_for_sept_zap
    # the guest's ACCEPT completed (RAX = 0) before the page was removed
    assert ops.get_regs(vcpu)["rax"] == SUCCESS_STATUS
    td = ops.module.tds[kvm.tdx.tdr_pa]
    assert all(gpa != AREA for gpa, *_ in ops.module.sept_leaves(td))
