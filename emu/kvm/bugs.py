"""Realistic KVM/TDX MMU bugs, each a small change to KVM's model, switched in one at a time.

They measure the checker: with one switched in, `explore` or `campaign` must report it on a
shipped guest (tests/test_bugs.py; the README's table gives the command and the time).
`--no-freeze` (the seed's race) predates this list and stays its own option.
"""

BUGS = {
    "kick-misses-running-vcpu": "kvm_make_vcpus_request() sends no IPI to a vCPU that is running guest code: a remote TLB "
    "flush (or KVM_REQ_OUTSIDE_GUEST_MODE) misses it, and it goes on with stale translations",
    "entry-ignores-requests": "vcpu_enter_guest() does not look at requests again after setting IN_GUEST_MODE: a request "
    "made in that window is neither kicked nor seen",
    "no-track": "tdx_sept_remove_private_spte() skips TDH.MEM.TRACK and the kick between BLOCK and REMOVE",
    "no-kick-after-track": "tdx_track() runs TDH.MEM.TRACK but does not kick the vCPUs out of the TD",
    "reflect-error-leaves-frozen": "tdp_mmu_set_spte_atomic() leaves the SPTE frozen (REMOVED_SPTE) when the reflect op fails",
    "busy-is-fatal": "TDX_OPERAND_BUSY from SEPT.ADD/AUG is treated as a hard error (KVM_BUG_ON) instead of a retry",
    "free-without-grace-period": "page tables unlinked by a zap are freed at once, not after an RCU grace period",
    "no-clear-page": "tdx_clear_page() is skipped: pages KVM takes back from a TD (TDH.MEM.PAGE.REMOVE, "
    "TDH.PHYMEM.PAGE.RECLAIM) go back to the host with the TD's integrity bit in their cache lines",
    "fault-ignores-invalidation": "the page fault does not check mmu_invalidate_seq/in_progress (is_page_fault_stale() is false)",
    "memslot-no-srcu-wait": "kvm_swap_active_memslots() does not wait in synchronize_srcu(): a fault that looked up a memslot "
    "before it was deleted maps its page after the slot was zapped, for a GPA no memslot covers",
    "mmio-gen-before-srcu-wait": "kvm_swap_active_memslots() bumps the memslots generation before synchronize_srcu(), with "
    "no update-in-progress mark: an MMIO SPTE made by a fault that saw the old memslots looks current after the "
    "change (the bug 'kvm: fix potentially corrupt mmio cache' fixed, 2014)",
    # TDX private huge pages (issue 24): the races reviewers raised against the series.
    "split-under-shared-lock": "the split for a mismatched ACCEPT runs under mmu_lock held for read: the atomic path freezes "
    "the huge mirror SPTE and splits it (BLOCK, TRACK, DEMOTE) while other vCPUs fault",
    "guest-inhibit-cleared": "GUEST_INHIBIT is transient: set before the split and cleared after it (v5 sets it after the "
    "split and never clears it)",
    "demote-interrupted-is-error": "TDX huge pages stay on without ENHANCED_DEMOTE_INTERRUPTIBILITY, and TDX_INTERRUPTED_RESTARTABLE "
    "from DEMOTE is an error (KVM_BUG_ON)",
    "demote-interrupted-retried-forever": "TDX huge pages stay on without ENHANCED_DEMOTE_INTERRUPTIBILITY, and DEMOTE is retried while it "
    "returns TDX_INTERRUPTED_RESTARTABLE, without bound (RFC v1's loop)",
    "split-alloc-no-recheck": "the split drops mmu_lock to allocate, then splits the SPTE it read before without reading it again",
    "inhibit-on-shared-root": "the mismatched-ACCEPT split works on the vCPU's shared root (vcpu->arch.mmu->root), not the "
    "mirror roots (v5 41/45 as posted)",
}


class Bugs:
    """The switches, all off: ``kvm.bugs.<name with _>`` is True when that bug is in."""

    def __init__(self, names=()):
        for name in BUGS:
            setattr(self, name.replace("-", "_"), False)
        for name in names:
            self.enable(name)

    def enable(self, name):
        if name not in BUGS:
            raise ValueError(f"unknown bug {name!r}; the bugs are: {', '.join(BUGS)}")
        setattr(self, name.replace("-", "_"), True)

    @property
    def enabled(self):
        return [n for n in BUGS if getattr(self, n.replace("-", "_"))]
