"""tdp_iter: a pre-order walk over the SPTEs of one root (arch/x86/kvm/mmu/tdp_iter.[ch]).

The iterator steps down into present non-leaf entries, sideways within a
table, and up when a table is done, exactly in KVM's order.  ``old_spte`` is
the snapshot KVM's cmpxchg compares against; every read of an SPTE is a
scheduling point (another vCPU may run between two reads).
"""

from .spte import (
    KVM_PAGES_PER_HPAGE,
    SPTE_INDEX,
    gfn_round_for_level,
    SPTE_MMU_PRESENT_MASK,
    PT_PAGE_SIZE_MASK,
    PG_LEVEL_4K,
    SPTE_BASE_ADDR_MASK,
    PT64_ROOT_MAX_LEVEL,
    PAGES_PER_HPAGE,
    GFN_INDEX_SHIFT,
    SPTE_INDEX_MASK,
)


class TdpIter:
    __slots__ = (
        "next_last_level_gfn",
        "yielded_gfn",
        "pt_path",
        "sptep",
        "gfn",
        "gfn_bits",
        "root_level",
        "min_level",
        "level",
        "as_id",
        "old_spte",
        "valid",
        "yielded",
        "q",
        "sched",
        "vcpu",
        "kvm",
        "frees",
        "entered",
    )

    def __init__(self, kvm, root, min_level, start_gfn, gfn_bits, vcpu=None):
        self.q = kvm.mem.q
        self.sched = kvm.sched
        self.kvm = kvm
        self.vcpu = vcpu
        self.pt_path = [0] * PT64_ROOT_MAX_LEVEL
        # (the checker) table -> how often it had been freed when this walker stepped into it;
        # only a scheduled run checks it (check_table), so only a scheduled run records it.
        self.entered = {} if self.sched is not None else None
        self.frees = kvm.tdp_mmu.frees if self.sched is not None else None
        self.yielded = False
        self.start(root, min_level, start_gfn, gfn_bits)

    def read_spte(self, sptep):
        # kvm_tdp_mmu_read_spte(): READ_ONCE(*sptep)
        if self.sched is not None:
            self.sched.point(self.vcpu, "spte_read", sptep)
            self.check_table(sptep)
        return self.q[sptep >> 3]

    def check_table(self, sptep, what="reads"):
        """The checker, when the walker reads (or cmpxchgs) an SPTE of a table it is inside
        (under RCU): the table must not have been freed since the walker stepped in, even if
        its page was reused since (then its entries would be another table's)."""
        table = sptep & ~0xFFF
        if getattr(self.sched, "fp", None) is not None:
            self.sched.touch(("table", table), False)  # the table's free (emu.checkers.dpor)
        # (an iterator made with no scheduler recorded nothing: only the freed page is checked)
        entered = self.entered.get(table) if self.entered is not None else None
        if entered is not None and self.frees.get(table, 0) != entered or table in self.kvm.host.kernel.freed:
            who = "vCPU " + str(self.vcpu) if self.vcpu is not None else "a zap"
            self.kvm.checker_violation(
                f"use after free: {who} {what} SPTE {sptep:#x} of a page table freed since it stepped in"
            )

    def start(self, root, min_level, next_last_level_gfn, gfn_bits):
        level = root.role_level
        if level < 1 or level > PT64_ROOT_MAX_LEVEL or (gfn_bits and next_last_level_gfn >= gfn_bits):
            self.valid = False
            return
        self.next_last_level_gfn = next_last_level_gfn
        self.gfn_bits = gfn_bits
        self.root_level = level
        self.min_level = min_level
        self.pt_path[level - 1] = root.spt
        if self.entered is not None:
            self.entered[root.spt] = self.frees.get(root.spt, 0)
        self.as_id = root.as_id
        self.restart()

    def restart(self):
        self.yielded = False
        self.yielded_gfn = self.next_last_level_gfn
        self.level = self.root_level
        self.gfn = gfn_round_for_level(self.next_last_level_gfn, self.level)
        self.refresh_sptep()
        self.valid = True

    def refresh_sptep(self):
        level = self.level
        # SPTE_INDEX((gfn | gfn_bits) << 12, level), by lookup
        index = ((self.gfn | self.gfn_bits) >> GFN_INDEX_SHIFT[level]) & SPTE_INDEX_MASK
        sptep = self.sptep = self.pt_path[level - 1] + (index << 3)
        # read_spte() without its scheduling point when there is no scheduler (the hot path)
        self.old_spte = self.q[sptep >> 3] if self.sched is None else self.read_spte(sptep)

    def try_step_down(self):
        level = self.level
        if level == self.min_level:
            return False
        # Re-read: the snapshot may be stale, and stepping into a table that was
        # just zapped would walk a page on its way to being freed.
        sptep = self.sptep
        spte = self.old_spte = self.q[sptep >> 3] if self.sched is None else self.read_spte(sptep)
        child = spte_to_child_pt(spte, level)
        if child is None:
            return False
        level = self.level = level - 1
        self.pt_path[level - 1] = child
        if self.entered is not None:
            self.entered[child] = self.frees.get(child, 0)
        self.gfn = self.next_last_level_gfn & -PAGES_PER_HPAGE[level]  # gfn_round_for_level()
        self.refresh_sptep()
        return True

    def try_step_side(self):
        # At the last entry of the table: nothing to the side.
        if SPTE_INDEX((self.gfn | self.gfn_bits) << 12, self.level) == 511:
            return False
        self.gfn += KVM_PAGES_PER_HPAGE(self.level)
        self.next_last_level_gfn = self.gfn
        sptep = self.sptep = self.sptep + 8
        self.old_spte = self.q[sptep >> 3] if self.sched is None else self.read_spte(sptep)
        return True

    def try_step_up(self):
        if self.level == self.root_level:
            return False
        self.level += 1
        self.gfn = gfn_round_for_level(self.gfn, self.level)
        self.refresh_sptep()
        return True

    def next(self):
        """tdp_iter_next(): pre-order successor; after a yield, restart from the root."""
        if self.yielded:
            self.restart()
            return
        if self.try_step_down():
            return
        while True:
            if self.try_step_side():
                return
            if not self.try_step_up():
                break
        self.valid = False


def spte_to_child_pt(spte, level):
    """The HPA of the table a non-leaf SPTE points to; None for a leaf or a non-present SPTE."""
    # not is_shadow_present_pte() or is_last_spte(), written out: every step down of every
    # walk comes here
    if not spte & SPTE_MMU_PRESENT_MASK or level == PG_LEVEL_4K or spte & PT_PAGE_SIZE_MASK:
        return None
    return spte & SPTE_BASE_ADDR_MASK


def for_each_tdp_pte_min_level(it, end):
    """for_each_tdp_pte_min_level(): yields the same iterator at each step while gfn < end."""
    while it.valid and it.gfn < end:
        yield it
        it.next()
