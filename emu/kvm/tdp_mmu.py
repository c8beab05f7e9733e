"""KVM's TDP MMU (arch/x86/kvm/mmu/tdp_mmu.c) over tables in emulated host memory.

Roots, the fault-path map (kvm_tdp_mmu_map), the atomic and non-atomic SPTE
setters with their bookkeeping (handle_changed_spte, handle_removed_pt), and
the zap paths.  For a TDX VM the mirror root's SPTEs are reflected into the
TDX module's S-EPT through the x86 ops reflect_* hooks, with the SPTE frozen
to REMOVED_SPTE while the hook runs (the seed patch "KVM: x86/tdp_mmu:
Reflect building mirror page tables").

Locking model: the fault path runs with mmu_lock held for read and changes
SPTEs only with cmpxchg; zaps hold it for write.  Removed tables are freed
after an RCU grace period, because lockless walkers (other vCPUs' faults)
may still be reading them.
"""

from .spte import (
    SHADOW_NONPRESENT_VALUE,
    REMOVED_SPTE,
    PG_LEVEL_4K,
    PG_LEVEL_2M,
    PG_LEVEL_1G,
    KVM_PAGES_PER_HPAGE,
    is_shadow_present_pte,
    is_last_spte,
    is_removed_spte,
    is_large_pte,
    spte_to_pfn,
    make_nonleaf_spte,
    make_spte,
    make_mmio_spte,
    is_mmio_spte,
    ACC_ALL,
    PT_WRITABLE_MASK,
    shadow_x_mask,
    shadow_user_mask,
    spte_str,
    PT_PAGE_SIZE_MASK,
    SPTE_MMU_PRESENT_MASK,
    EPT_SPTE_MMU_WRITABLE,
    SPTE_TDP_AD_MASK,
    SPTE_TDP_AD_ENABLED,
    shadow_accessed_mask,
    shadow_dirty_mask,
    PAGES_PER_HPAGE,
)
from ..hw.memory import table_entries
from .tdp_iter import TdpIter, for_each_tdp_pte_min_level, spte_to_child_pt
from .mmu_internal import (  # noqa: F401  (tdp_mmu.c's users take the RET_PF_* names from here)
    RET_PF_CONTINUE,
    RET_PF_RETRY,
    RET_PF_EMULATE,
    RET_PF_WRITE_PROTECTED,
    RET_PF_INVALID,
    RET_PF_FIXED,
    RET_PF_SPURIOUS,
    RET_PF_NAMES,
)

EBUSY = 16
EIO = 5
EINVAL = 22
ENOMEM = 12


# union kvm_mmu_page_role, bit positions
ROLE_LEVEL_MASK = 0xF
ROLE_DIRECT = 1 << 7
ROLE_ACCESS_SHIFT = 8
ROLE_INVALID = 1 << 11
ROLE_EFER_NX = 1 << 12
ROLE_CR0_WP = 1 << 13
ROLE_AD_DISABLED = 1 << 16
ROLE_IS_MIRROR = 1 << 19
ROLE_SMM_SHIFT = 24

# enum kvm_tdp_mmu_root_types
KVM_INVALID_ROOTS, KVM_DIRECT_ROOTS, KVM_MIRROR_ROOTS = 1, 2, 4
KVM_VALID_ROOTS = KVM_DIRECT_ROOTS | KVM_MIRROR_ROOTS
KVM_ALL_ROOTS = KVM_VALID_ROOTS | KVM_INVALID_ROOTS

# The shape of the mirror hooks (--mirror-hooks): the seed's reflect_* freeze protocol as in Linux
# 6.16, or 7.2's one set_external_spte(old_spte, new_spte) from __handle_changed_spte().
MIRROR_HOOKS_616, MIRROR_HOOKS_72 = "6.16", "7.2"
MIRROR_HOOKS = (MIRROR_HOOKS_616, MIRROR_HOOKS_72)
# The fault point in front of each kind of set_external_spte() (the 6.16 hooks' names).
_KIND_FAULT_POINT = {"link": "link_spt", "map": "set_spte", "split": "split_spte", "zap": "remove_spte"}


def external_spte_kind(old_spte, new_spte, level):
    """What tdx_sept_set_private_spte() makes of a mirror SPTE's change: a split (present to
    present), a zap (present to not present), a link (a new table) or a map (a new leaf)."""
    if is_shadow_present_pte(old_spte):
        return "split" if is_shadow_present_pte(new_spte) else "zap"
    return "map" if is_last_spte(new_spte, level) else "link"


class KvmMmuPage:
    """struct kvm_mmu_page for the TDP MMU: ``spt`` is the HPA of its 512-entry table."""

    __slots__ = (
        "role",
        "gfn",
        "spt",
        "ptep",
        "external_spt",
        "tdp_mmu_root_count",
        "role_level",
        "as_id",
        "is_mirror",
        "zapped",
        "tdp_mmu_scheduled_root_to_zap",
        "nx_huge_page_disallowed",
    )

    def __init__(self, spt):
        self.spt = spt
        # sp->nx_huge_page_disallowed: made by a fault that could not use a huge page because of
        # the NX huge page mitigation (an exec fault); on the possible-NX list while linked.
        self.nx_huge_page_disallowed = False
        self.external_spt = None
        self.tdp_mmu_root_count = 0
        self.ptep = None
        self.zapped = False  # an invalidated root whose zap is done
        self.tdp_mmu_scheduled_root_to_zap = False

    def init(self, sptep, gfn, role):
        """tdp_mmu_init_sp()"""
        self.role = role
        self.role_level = role & ROLE_LEVEL_MASK
        self.as_id = role >> ROLE_SMM_SHIFT
        self.is_mirror = bool(role & ROLE_IS_MIRROR)
        self.gfn = gfn
        self.ptep = sptep

    @property
    def invalid(self):
        return bool(self.role & ROLE_INVALID)

    def __repr__(self):
        kind = "mirror" if self.is_mirror else "direct"
        return f"<sp {kind} level {self.role_level} gfn {self.gfn:#x} spt {self.spt:#x}>"


class TdpMmu:
    """The per-VM TDP MMU state (kvm->arch.tdp_mmu_*)."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.mem = kvm.mem
        self.roots = []  # kvm->arch.tdp_mmu_roots
        self.pages = 0  # kvm->arch.tdp_mmu_pages
        self.sp_of = {}  # table HPA -> KvmMmuPage (the kernel keeps it in page->private)
        # kvm->arch.possible_nx_huge_pages: tables that replace a huge page only because of the NX
        # huge page mitigation, oldest first; the recovery worker zaps them (under
        # tdp_mmu_pages_lock upstream; ``kvm.touch("possible_nx")`` here, the list and the flags).
        self.possible_nx_huge_pages = []
        # (the checker) how often each table page was freed: a walker that entered a table and
        # then sees another count read a freed page, even if the page was reused since.
        self.frees = {}
        # The seed patch's protocol; False reproduces the code before it (issue: --no-freeze).
        self.freeze_mirror_sptes = True
        # The shape of the mirror hooks: 6.16's reflect_* (the seed's) or 7.2's set_external_spte.
        self.mirror_hooks = MIRROR_HOOKS_616

    # -- helpers ------------------------------------------------------------------------------------------
    def sptep_to_sp(self, sptep):
        return self.sp_of[sptep & ~0xFFF]

    def is_mirror_sptep(self, sptep):
        return self.sp_of[sptep & ~0xFFF].is_mirror

    def _cmpxchg_lost(self):
        """The spte_cmpxchg fault point: as if another writer changed the SPTE first."""
        inj = self.kvm.inject
        return inj is not None and bool(inj.should_fail("spte_cmpxchg"))

    def _reflect_fault(self, op):
        inj = self.kvm.inject
        return inj.should_fail("reflect." + op) if inj is not None else None

    def _point(self, vcpu, what, arg=None):
        s = self.kvm.sched
        if s is not None:
            s.point(vcpu, what, arg)

    # -- page allocation -----------------------------------------------------------------------------------
    def alloc_sp(self, vcpu):
        """tdp_mmu_alloc_sp(): the table page comes from the vCPU's topped-up cache."""
        spt = vcpu.mmu_shadow_page_cache.alloc()
        sp = KvmMmuPage(spt)
        self.sp_of[spt] = sp
        return sp

    def alloc_external_spt(self, vcpu, sp):
        """kvm_mmu_alloc_external_spt(): the page the TDX module will own as the S-EPT table."""
        sp.external_spt = vcpu.mmu_external_spt_cache.alloc()

    def free_sp(self, sp):
        """tdp_mmu_free_sp()"""
        host = self.kvm.host
        if sp.external_spt is not None:
            self.kvm.check_td_page_freed(
                sp.external_spt,
                "tdp_mmu_free_sp() frees an S-EPT page after TDH.PHYMEM.PAGE.RECLAIM (tdx_sept_free_private_spt())",
            )
            host.free_kernel_page(sp.external_spt)
        del self.sp_of[sp.spt]
        self.kvm.touch(("table", sp.spt))
        self.frees[sp.spt] = self.frees.get(sp.spt, 0) + 1
        host.free_kernel_page(sp.spt)

    def init_child_sp(self, child, it):
        parent = self.sptep_to_sp(it.sptep)
        role = (parent.role & ~ROLE_LEVEL_MASK) | (parent.role_level - 1)
        child.init(it.sptep, it.gfn, role)
        if self.kvm.tracer.enabled:
            self.kvm.trace_emit(
                "kvm_mmu_get_page",
                msg=f"sp gfn {it.gfn:x} l{role & 0xF} {'mirror' if role & ROLE_IS_MIRROR else 'direct'} new",
            )

    def account_mmu_page(self, sp):
        self.pages += 1

    def unaccount_mmu_page(self, sp):
        self.pages -= 1

    # -- the NX huge page mitigation ------------------------------------------------------------------
    def track_possible_nx_huge_page(self, sp):
        """track_possible_nx_huge_page(): the table may be replaced by a huge page once no exec
        fault needs it; the recovery worker finds it on the list (kvm->stat.nx_lpage_splits)."""
        self.kvm.touch("possible_nx")
        if sp in self.possible_nx_huge_pages:
            return
        self.possible_nx_huge_pages.append(sp)
        self.kvm.stat["nx_lpage_splits"] += 1

    def untrack_possible_nx_huge_page(self, sp):
        self.kvm.touch("possible_nx")
        if sp in self.possible_nx_huge_pages:
            self.possible_nx_huge_pages.remove(sp)
            self.kvm.stat["nx_lpage_splits"] -= 1

    def unaccount_nx_huge_page(self, sp):
        """unaccount_nx_huge_page(): clear the flag and take it off the list."""
        self.kvm.touch("possible_nx")
        sp.nx_huge_page_disallowed = False
        self.untrack_possible_nx_huge_page(sp)

    def unlink_sp(self, sp):
        """tdp_mmu_unlink_sp(): unaccount, and untrack it if it was a possible NX huge page."""
        self.unaccount_mmu_page(sp)
        self.kvm.touch("possible_nx", False)
        if not sp.nx_huge_page_disallowed:
            return
        self.unaccount_nx_huge_page(sp)

    def disallowed_hugepage_adjust(self, fault, spte, cur_level):
        """disallowed_hugepage_adjust(): a table made for an exec fault (or any table of a mirror
        root) sits where this fault wants a huge page: go one level down instead (into that
        table), and give the pfn back the next 9 bits of the address."""
        if (
            cur_level > PG_LEVEL_4K
            and cur_level == fault.goal_level
            and is_shadow_present_pte(spte)
            and not is_large_pte(spte)
        ):
            self.kvm.touch("possible_nx", False)
            child = self.sp_of.get(spte_to_child_pt(spte, cur_level))
            if child is not None and (child.nx_huge_page_disallowed or child.is_mirror):
                page_mask = KVM_PAGES_PER_HPAGE(cur_level) - KVM_PAGES_PER_HPAGE(cur_level - 1)
                fault.pfn |= fault.gfn & page_mask
                fault.goal_level -= 1

    def zap_possible_nx_huge_page(self, sp, who=None):
        """The TDP MMU's recovery of one possible NX huge page, under mmu_lock for read: zap the
        entry that points to the table with a cmpxchg, if it still does; handle_removed_pt()
        frees the table through call_rcu() (as tdp_mmu_zap_possible_nx_huge_page() upstream
        since the recovery runs under the read lock, Linux 6.17)."""
        kvm = self.kvm
        kvm.lockdep_assert_held_read()
        if sp.ptep is None:
            kvm.warn("possible NX huge page without a parent entry (a root)")
            return False
        self._point(who, "spte_read", sp.ptep)
        old = self.mem.q[sp.ptep >> 3]
        # Another task may have changed the entry (the read lock is shared): zap it only while
        # it still points to this table.
        if spte_to_child_pt(old, sp.role_level + 1) != sp.spt or self.sp_of.get(sp.spt) is not sp:
            return False
        it = _SpIter(sp.ptep, old, sp.gfn, sp.role_level + 1, sp.as_id)
        return not self.tdp_mmu_set_spte_atomic(it, SHADOW_NONPRESENT_VALUE, who)

    # -- roots --------------------------------------------------------------------------------------------
    def root_role(self, level, mirror):
        """kvm_calc_tdp_mmu_root_page_role(), plus is_mirror for the mirror root."""
        role = level | ROLE_DIRECT | (ACC_ALL << ROLE_ACCESS_SHIFT) | ROLE_EFER_NX | ROLE_CR0_WP
        if mirror:
            role |= ROLE_IS_MIRROR
        return role

    def alloc_root(self, vcpu, mirror):
        """kvm_tdp_mmu_alloc_root(): reuse a valid root with the same role, else make one."""
        role = self.root_role(vcpu.root_level, mirror)
        self.kvm.touch("roots")
        for root in self.roots:
            if root.role == role and root.tdp_mmu_root_count > 0:
                root.tdp_mmu_root_count += 1
                return root
        root = self.alloc_sp(vcpu)
        root.init(None, 0, role)
        # One reference for the vCPU, one for the MMU (dropped when the root is invalidated).
        root.tdp_mmu_root_count = 2
        self.roots.append(root)
        self.kvm.trace_emit(
            "kvm_mmu_get_page", msg=f"root l{role & 0xF} {'mirror' if mirror else 'direct'} spt {root.spt:#x} new"
        )
        return root

    def put_root(self, root):
        """kvm_tdp_mmu_put_root(): the last reference frees the (already zapped) root after a grace period."""
        self.kvm.touch("roots")
        root.tdp_mmu_root_count -= 1
        if root.tdp_mmu_root_count:
            return
        self.roots.remove(root)
        self.kvm.rcu.call_rcu(lambda: self.free_sp(root))

    def roots_of_types(self, types):
        """for_each_tdp_mmu_root with a root-type filter (tdp_mmu_root_match)."""
        out = []
        self.kvm.touch("roots", False)
        for r in self.roots:
            if r.invalid:
                if types & KVM_INVALID_ROOTS:
                    out.append(r)
                continue
            if types & (KVM_MIRROR_ROOTS if r.is_mirror else KVM_DIRECT_ROOTS):
                out.append(r)
        return out

    def gfn_root_bits(self, root):
        """kvm_gfn_root_bits(): the shared bit is part of the index only in the direct root."""
        return 0 if root.is_mirror else self.kvm.gfn_direct_bits

    # -- setting SPTEs ------------------------------------------------------------------------------------
    @property
    def mirror_hooks(self):
        return self._mirror_hooks

    @mirror_hooks.setter
    def mirror_hooks(self, hooks):
        self._mirror_hooks = hooks
        # The mirror hooks as Linux 7.2 has them (one set_external_spte(old, new) from
        # __handle_changed_spte()), not the seed's reflect_* freeze protocol of 6.16 (a plain
        # attribute: the fault path tests it twice a fault).
        self.mirror_hooks_72 = hooks == MIRROR_HOOKS_72

    def handle_changed_spte(self, as_id, gfn, old_spte, new_spte, level, shared, vcpu=None, sptep=None):
        """handle_changed_spte(): bookkeeping after an SPTE changed (non-atomically, or an entry of a
        removed table), and the recursion into removed tables.  With the 7.2 hooks a change of a
        mirror SPTE (``sptep`` names the table it is in) reaches the TDX code from here; the
        callers cannot handle a failure, so it bugs the VM, and a page the S-EPT may still map
        is leaked."""
        sp = None if sptep is None else self.sp_of.get(sptep & ~0xFFF)
        # Only a leaf's removal or split (v5 34/45): making a mirror SPTE present is the atomic
        # path's, which must know the S-EPT took it before it publishes the SPTE.
        r = self._handle_changed_spte(sp, as_id, gfn, old_spte, new_spte, level, shared, vcpu, leaf_only=True)
        if r and self.kvm.KVM_BUG_ON(
            True,
            f"set_external_spte gfn {gfn:#x} level {level} {spte_str(old_spte)} -> {spte_str(new_spte)} failed ({r})",
        ):
            if (
                is_shadow_present_pte(old_spte)
                and is_last_spte(old_spte, level)
                and not is_shadow_present_pte(new_spte)
            ):
                self.kvm.leak_page(
                    spte_to_pfn(old_spte) << 12, f"private page of gfn {gfn:#x} level {level} still in the S-EPT"
                )

    def _handle_changed_spte(self, sp, as_id, gfn, old_spte, new_spte, level, shared, vcpu=None, leaf_only=False):
        """__handle_changed_spte(): 0, or the error of the external SPTE update (7.2 hooks).

        Removing a table is handle_removed_pt()'s (the TDX module wants every child gone before
        its parent); every other change of a mirror SPTE (link, map, split, zap) goes to
        set_external_spte() here, before the trace and the page stats, so that a failed update
        leaves no trace of a change that the caller will undo (Sean's fix to v5 08/45)."""
        kvm = self.kvm
        was_present = is_shadow_present_pte(old_spte)
        is_present = is_shadow_present_pte(new_spte)
        was_leaf = was_present and is_last_spte(old_spte, level)
        is_leaf = is_present and is_last_spte(new_spte, level)
        # (only a present old SPTE has a pfn that can change)
        pfn_changed = was_present and spte_to_pfn(old_spte) != spte_to_pfn(new_spte)

        assert 1 <= level <= 5 and not gfn & (PAGES_PER_HPAGE[level] - 1), (level, gfn)
        if was_leaf and is_leaf and pfn_changed:
            # pr_err + BUG() upstream: a leaf may not be repointed without a zap in between.
            kvm.kvm_bug(
                f"leaf SPTE for gfn {gfn:#x} changed pfn {spte_to_pfn(old_spte):#x} -> {spte_to_pfn(new_spte):#x}"
            )
        if old_spte == new_spte:
            return 0
        hooks_72 = self.mirror_hooks_72
        tracing = kvm.tracer.enabled
        if tracing and (not hooks_72 or not was_present and not is_present):
            # (7.2 traces a change that reaches the S-EPT once the S-EPT took it, below)
            self._trace_spte_changed(vcpu, as_id, gfn, level, old_spte, new_spte)
        if not was_present and not is_present:
            # Non-present to non-present happens only for MMIO SPTEs and freezing.
            return 0
        removed_pt = was_present and not was_leaf and (is_leaf or not is_present or pfn_changed)
        if hooks_72:
            if removed_pt:
                self.handle_removed_pt(spte_to_child_pt(old_spte, level), shared, vcpu)
            elif sp is not None and sp.is_mirror and (was_leaf and not is_leaf or not leaf_only):
                r = self.set_external_spte(gfn, old_spte, new_spte, level, vcpu)
                if r:
                    return r
            if tracing:
                self._trace_spte_changed(vcpu, as_id, gfn, level, old_spte, new_spte)
        if was_present:
            # A translation may have gone: until a flush (or the TD's TRACK and kick) completes,
            # a vCPU in guest mode may still use it (the checker allows it only meanwhile).
            kvm.touch("flush")
            kvm.flush_owed = True
            kvm.tables_generation += 1
        if is_leaf != was_leaf:
            kvm.update_page_stats(level, 1 if is_leaf else -1)
        if is_leaf and (not was_leaf or pfn_changed) and kvm.checker is not None:
            kvm.checker.leaf_installed(kvm, gfn, level, new_spte, None if sp is None else sp.is_mirror)
        if removed_pt and not hooks_72:
            self.handle_removed_pt(spte_to_child_pt(old_spte, level), shared, vcpu)
        return 0

    def _trace_spte_changed(self, vcpu, as_id, gfn, level, old_spte, new_spte):
        self.kvm.trace_emit(
            "kvm_tdp_mmu_spte_changed", vcpu, as_id=as_id, gfn=gfn, level=level, old_spte=old_spte, new_spte=new_spte
        )

    def handle_removed_pt(self, pt, shared, vcpu=None):
        """A table was unlinked: freeze and process each of its entries, then free it after RCU."""
        kvm = self.kvm
        q = self.mem.q
        sp = self.sptep_to_sp(pt)
        level = sp.role_level
        base_gfn = sp.gfn
        kvm.trace_emit(
            "kvm_mmu_prepare_zap_page",
            vcpu,
            msg=f"sp gfn {base_gfn:x} l{level} {'mirror' if sp.is_mirror else 'direct'}",
        )
        self.unlink_sp(sp)
        for i in range(512):
            sptep = pt + i * 8
            gfn = base_gfn + i * KVM_PAGES_PER_HPAGE(level)
            if shared:
                # Another vCPU may have frozen this entry to install it: wait until it
                # is done (the freeze is short), then take the final value with xchg.
                while True:
                    self._point(vcpu, "spte_xchg", sptep)
                    old = self.mem.xchg64(sptep, REMOVED_SPTE)
                    if not is_removed_spte(old):
                        break
                    self.mem.write64(sptep, old)
                    self._point(vcpu, "frozen_wait", sptep)
            else:
                old = q[sptep >> 3]
                if not is_shadow_present_pte(old):
                    continue
                kvm.touch(("spte", sptep))
                old = self.mem.xchg64(sptep, REMOVED_SPTE)
            if sp.is_mirror and not shared and self.mirror_hooks_72:
                # 7.2: a leaf's removal reaches the S-EPT through set_external_spte(), from
                # handle_changed_spte() (v5 08/45, 34/45).
                self.handle_changed_spte(sp.as_id, gfn, old, REMOVED_SPTE, level, shared, vcpu, sptep)
                continue
            self.handle_changed_spte(sp.as_id, gfn, old, REMOVED_SPTE, level, shared, vcpu)
            if sp.is_mirror:
                if kvm.KVM_BUG_ON(shared, "removing a mirror table under the shared mmu_lock"):
                    continue
                self.remove_external_spte(gfn, old, level, vcpu)
        if sp.is_mirror and sp.external_spt is not None:
            if self.mirror_hooks_72:
                self.reclaim_external_sp(base_gfn, sp)
            elif self._reflect_fault("free_spt") or kvm.x86_ops.reflect_free_spt(kvm, base_gfn, level, sp.external_spt):
                # WARN upstream: the module still owns the page, so it is leaked on purpose.
                kvm.leak_page(sp.external_spt, f"S-EPT page of gfn {base_gfn:#x} level {level}")
                sp.external_spt = None
        kvm.rcu.call_rcu(lambda: self.free_sp(sp))

    # -- the 7.2 mirror hooks: kvm_x86_ops.set_external_spte() and .reclaim_external_sp() ------------
    def set_external_spte(self, gfn, old_spte, new_spte, level, vcpu=None):
        """kvm_x86_call(set_external_spte)(kvm, gfn, old_spte, new_spte, level): the one hook through
        which 7.2 reflects a mirror SPTE's change (the TDX code decides what it is: link, map,
        split or zap).  The reflect.* fault points stand before it, one per kind."""
        kvm = self.kvm
        kind = external_spte_kind(old_spte, new_spte, level)
        err = self._reflect_fault(_KIND_FAULT_POINT[kind])
        if err:
            # As the TDX code would return it: -EBUSY (a retry for link and map), or a KVM_BUG_ON
            # and -EIO (split and zap bug the VM in handle_changed_spte()).
            if err != -EBUSY and kind in ("link", "map"):
                kvm.kvm_bug(f"set_external_spte ({kind}) gfn {gfn:#x} level {level} failed ({err}, injected)")
            ret = err
        else:
            ret = kvm.x86_ops.set_external_spte(kvm, gfn, old_spte, new_spte, level, vcpu)
        if kvm.tracer.enabled:
            kvm.trace_emit("kvm_reflect", vcpu, op=f"set_external_spte:{kind}", gfn=gfn, level=level, ret=ret)
        return ret

    def reclaim_external_sp(self, gfn, sp):
        """kvm_x86_call(reclaim_external_sp)(kvm, gfn, sp) (v5 09/45): the TDX code reclaims the
        S-EPT page, or clears sp->external_spt to leak it."""
        kvm = self.kvm
        if self._reflect_fault("free_spt"):
            kvm.leak_page(sp.external_spt, f"S-EPT page of gfn {gfn:#x} level {sp.role_level} (injected)")
            sp.external_spt = None
        else:
            kvm.x86_ops.reclaim_external_sp(kvm, gfn, sp)
        if kvm.tracer.enabled:
            kvm.trace_emit(
                "kvm_reflect",
                None,
                op="reclaim_external_sp",
                gfn=gfn,
                level=sp.role_level,
                ret=0 if sp.external_spt is not None else "leaked",
            )

    def remove_external_spte(self, gfn, old_spte, level, vcpu=None):
        """remove_external_spte(): only leaves have a page in the S-EPT to remove."""
        if not is_last_spte(old_spte, level) or not is_shadow_present_pte(old_spte):
            return
        kvm = self.kvm
        kvm.lockdep_assert_held_write()
        ret = self._reflect_fault("remove_spte") or kvm.x86_ops.reflect_remove_spte(
            kvm, gfn, level, spte_to_pfn(old_spte)
        )
        self._trace_reflect("reflect_remove_spte", gfn, level, None, ret)
        if kvm.KVM_BUG_ON(ret, f"reflect_remove_spte gfn {gfn:#x} failed ({ret})"):
            # The module still maps the page: KVM cannot give it back, so it is leaked (as upstream).
            kvm.leak_page(spte_to_pfn(old_spte) << 12, f"private page of gfn {gfn:#x} still in the S-EPT")

    def set_external_spte_present(self, sptep, gfn, old_spte, new_spte, level, vcpu):
        """Freeze, reflect, then publish (or restore).  The freeze makes the S-EPT
        and the mirror change together as far as any other vCPU can tell: a walker
        that meets REMOVED_SPTE retries its fault, and a cmpxchg against the frozen
        value fails, so nobody builds below an entry the S-EPT does not have yet."""
        kvm = self.kvm
        was_present = is_shadow_present_pte(old_spte)
        is_leaf = is_last_spte(new_spte, level)
        if kvm.KVM_BUG_ON(was_present, f"mirror SPTE for gfn {gfn:#x} already present"):
            return -EIO
        self._point(vcpu, "spte_cmpxchg", sptep)
        if self._cmpxchg_lost() or not self.mem.cmpxchg64(sptep, old_spte, REMOVED_SPTE):
            return -EBUSY
        if kvm.tracer.enabled:
            kvm.trace_emit("kvm_tdp_mmu_spte_frozen", vcpu, gfn=gfn, level=level, old_spte=old_spte)
        ret = self.reflect(gfn, level, new_spte, is_leaf, vcpu)
        self._point(vcpu, "spte_write", sptep)
        if ret and kvm.bugs.reflect_error_leaves_frozen:
            return ret  # bug switch: the SPTE stays REMOVED_SPTE
        if ret:
            self.mem.write64(sptep, old_spte)
            if kvm.tracer.enabled:
                kvm.trace_emit(
                    "kvm_tdp_mmu_spte_unfrozen", vcpu, gfn=gfn, level=level, what="restored", spte=old_spte, ret=ret
                )
        else:
            self.mem.write64(sptep, new_spte)
            if kvm.tracer.enabled:
                kvm.trace_emit("kvm_tdp_mmu_spte_unfrozen", vcpu, gfn=gfn, level=level, what="new_spte", spte=new_spte)
        return ret

    def reflect(self, gfn, level, new_spte, is_leaf, vcpu):
        """The reflect_* op for a new mirror SPTE: set for a leaf, link for a table."""
        kvm = self.kvm
        if is_leaf:
            err = self._reflect_fault("set_spte")
            if err:
                return self._trace_reflect(
                    "reflect_set_spte", gfn, level, vcpu, self._reflect_error(err, "reflect_set_spte", gfn, level)
                )
            return self._trace_reflect(
                "reflect_set_spte",
                gfn,
                level,
                vcpu,
                kvm.x86_ops.reflect_set_spte(kvm, gfn, level, spte_to_pfn(new_spte), vcpu),
            )
        child = self.sp_of.get(spte_to_child_pt(new_spte, level))
        if kvm.KVM_BUG_ON(
            child is None or child.external_spt is None,
            f"mirror link for gfn {gfn:#x} level {level} without a mirrored page",
        ):
            return -EIO
        if child.role_level + 1 != level or child.gfn != gfn:
            kvm.warn(
                f"mirror link mismatch: child level {child.role_level} gfn {child.gfn:#x}, "
                f"parent level {level} gfn {gfn:#x}"
            )
        err = self._reflect_fault("link_spt")
        if err:
            return self._trace_reflect(
                "reflect_link_spt", gfn, level, vcpu, self._reflect_error(err, "reflect_link_spt", gfn, level)
            )
        return self._trace_reflect(
            "reflect_link_spt",
            gfn,
            level,
            vcpu,
            kvm.x86_ops.reflect_link_spt(kvm, gfn, level, child.external_spt, vcpu),
        )

    def _trace_reflect(self, op, gfn, level, vcpu, ret):
        if self.kvm.tracer.enabled:
            self.kvm.trace_emit("kvm_reflect", vcpu, op=op, gfn=gfn, level=level, ret=ret)
        return ret

    def _reflect_error(self, err, op, gfn, level):
        """An injected reflect error, as the TDX backend would return it: -EBUSY, or KVM_BUG_ON + -EIO."""
        if err != -EBUSY:
            self.kvm.kvm_bug(f"{op} gfn {gfn:#x} level {level} failed ({err}, injected)")
        return err

    def __tdp_mmu_set_spte_atomic(self, it, new_spte, vcpu):
        kvm = self.kvm
        # (is_removed_spte() twice, and is_mirror_sptep(), written out: every fault's SPTE)
        if it.yielded or it.old_spte == REMOVED_SPTE:
            kvm.warn("atomic SPTE update on a yielded iterator or a frozen SPTE")
        if new_spte != REMOVED_SPTE and self.sp_of[it.sptep & ~0xFFF].is_mirror:
            if self.mirror_hooks_72:
                return self._set_mirror_spte_atomic(it, new_spte, vcpu)
            # Mirror SPTEs can only be installed atomically: zapping one needs the
            # S-EPT's BLOCK/TRACK/REMOVE sequence, which runs under the write lock.
            if kvm.KVM_BUG_ON(not is_shadow_present_pte(new_spte), f"atomic zap of mirror SPTE for gfn {it.gfn:#x}"):
                return -EBUSY
            if self.freeze_mirror_sptes:
                return self.set_external_spte_present(it.sptep, it.gfn, it.old_spte, new_spte, it.level, vcpu)
            return self._set_mirror_spte_without_freeze(it, new_spte, vcpu)
        sched = kvm.sched
        if sched is not None:
            sched.point(vcpu, "spte_cmpxchg", it.sptep)
            if isinstance(it, TdpIter):
                it.check_table(it.sptep, "cmpxchgs")
        if kvm.inject is not None and self._cmpxchg_lost() or not self.mem.cmpxchg64(it.sptep, it.old_spte, new_spte):
            it.old_spte = self.mem.q[it.sptep >> 3]  # try_cmpxchg64 refreshes the snapshot
            return -EBUSY
        return 0

    def _set_mirror_spte_atomic(self, it, new_spte, vcpu):
        """__tdp_mmu_set_spte_atomic() for a mirror SPTE with the 7.2 hooks (v5 06/45 and Sean's
        fix to 08/45): freeze the SPTE, let __handle_changed_spte() propagate the change through
        set_external_spte(), then publish the new value, or put the old one back on failure, so
        that installing a mirror SPTE is atomic as far as other vCPUs can tell.  Under the read
        lock KVM neither zaps nor splits a mirror SPTE: a present old SPTE bugs the VM."""
        kvm = self.kvm
        sp = self.sptep_to_sp(it.sptep)
        old_spte = it.old_spte
        if kvm.KVM_BUG_ON(
            is_shadow_present_pte(old_spte) and not kvm.bugs.split_under_shared_lock,
            f"mirror SPTE for gfn {it.gfn:#x} level {it.level} zapped or split under the shared mmu_lock",
        ) or kvm.KVM_BUG_ON(not is_shadow_present_pte(new_spte), f"atomic zap of mirror SPTE for gfn {it.gfn:#x}"):
            return -EBUSY
        self._point(vcpu, "spte_cmpxchg", it.sptep)
        if not self.freeze_mirror_sptes:
            # --no-freeze: publish first, then reflect (before the seed patch).
            if self._cmpxchg_lost() or not self.mem.cmpxchg64(it.sptep, old_spte, new_spte):
                it.old_spte = self.mem.q[it.sptep >> 3]
                return -EBUSY
            ret = self._handle_changed_spte(sp, it.as_id, it.gfn, old_spte, new_spte, it.level, True, vcpu)
            if ret:
                self._point(vcpu, "spte_write", it.sptep)
                self.mem.write64(it.sptep, old_spte)
            return ret
        if self._cmpxchg_lost() or not self.mem.cmpxchg64(it.sptep, old_spte, REMOVED_SPTE):
            it.old_spte = self.mem.q[it.sptep >> 3]  # v5 02/45: the snapshot is refreshed
            return -EBUSY
        if kvm.tracer.enabled:
            kvm.trace_emit("kvm_tdp_mmu_spte_frozen", vcpu, gfn=it.gfn, level=it.level, old_spte=old_spte)
        ret = self._handle_changed_spte(sp, it.as_id, it.gfn, old_spte, new_spte, it.level, True, vcpu)
        self._point(vcpu, "spte_write", it.sptep)
        if ret and kvm.bugs.reflect_error_leaves_frozen:
            return ret  # bug switch: the SPTE stays FROZEN_SPTE
        if ret:
            self.mem.write64(it.sptep, old_spte)
            if kvm.tracer.enabled:
                kvm.trace_emit(
                    "kvm_tdp_mmu_spte_unfrozen",
                    vcpu,
                    gfn=it.gfn,
                    level=it.level,
                    what="restored",
                    spte=old_spte,
                    ret=ret,
                )
        else:
            self.mem.write64(it.sptep, new_spte)
            if kvm.tracer.enabled:
                kvm.trace_emit(
                    "kvm_tdp_mmu_spte_unfrozen", vcpu, gfn=it.gfn, level=it.level, what="new_spte", spte=new_spte
                )
        return ret

    def _set_mirror_spte_without_freeze(self, it, new_spte, vcpu):
        """What the code did before the seed patch (--no-freeze): publish the mirror
        SPTE first, then reflect it.  Between the two, another vCPU can walk below the
        new entry and reach the TDX module before the S-EPT has the level."""
        self._point(vcpu, "spte_cmpxchg", it.sptep)
        if self._cmpxchg_lost() or not self.mem.cmpxchg64(it.sptep, it.old_spte, new_spte):
            it.old_spte = self.mem.q[it.sptep >> 3]
            return -EBUSY
        ret = self.reflect(it.gfn, it.level, new_spte, is_last_spte(new_spte, it.level), vcpu)
        if ret:
            self._point(vcpu, "spte_write", it.sptep)
            self.mem.write64(it.sptep, it.old_spte)
        return ret

    def tdp_mmu_set_spte_atomic(self, it, new_spte, vcpu=None):
        """Install ``new_spte`` if the SPTE still holds ``it.old_spte``; 0 or -EBUSY (or the reflect error)."""
        kvm = self.kvm
        kvm.lockdep_assert_held_read()
        ret = self.__tdp_mmu_set_spte_atomic(it, new_spte, vcpu)
        if ret:
            return ret
        if self.mirror_hooks_72 and not is_removed_spte(new_spte) and self.is_mirror_sptep(it.sptep):
            return 0  # handled inside the freeze
        self.handle_changed_spte(it.as_id, it.gfn, it.old_spte, new_spte, it.level, True, vcpu, it.sptep)
        return 0

    def tdp_mmu_set_spte(self, as_id, sptep, old_spte, new_spte, gfn, level, vcpu=None):
        """Non-atomic set under the write lock; returns the value replaced."""
        kvm = self.kvm
        kvm.lockdep_assert_held_write()
        if is_removed_spte(old_spte) or is_removed_spte(new_spte):
            kvm.warn(f"non-atomic set with a frozen SPTE (gfn {gfn:#x})")
        self._point(vcpu, "spte_write", sptep)
        old_spte = self.kvm_tdp_mmu_write_spte(sptep, old_spte, new_spte, level)
        if self.mirror_hooks_72:
            # 7.2: the change reaches the S-EPT from handle_changed_spte() (a zap, or a split).
            self.handle_changed_spte(as_id, gfn, old_spte, new_spte, level, False, vcpu, sptep)
            if self.is_mirror_sptep(sptep):
                # Non-atomic writes make a mirror SPTE present only to split a huge leaf (the
                # split runs under the write lock: v5 39/45); anything else is not propagated.
                split = (
                    is_shadow_present_pte(old_spte)
                    and is_last_spte(old_spte, level)
                    and not is_last_spte(new_spte, level)
                )
                kvm.KVM_BUG_ON(
                    is_shadow_present_pte(new_spte) and not split,
                    f"non-atomic set of a present mirror SPTE for gfn {gfn:#x}",
                )
            return old_spte
        self.handle_changed_spte(as_id, gfn, old_spte, new_spte, level, False, vcpu, sptep)
        if self.is_mirror_sptep(sptep):
            # Mirror SPTEs are made present only through the atomic (reflecting) path.
            kvm.KVM_BUG_ON(is_shadow_present_pte(new_spte), f"non-atomic set of a present mirror SPTE for gfn {gfn:#x}")
            self.remove_external_spte(gfn, old_spte, level, vcpu)
        return old_spte

    def kvm_tdp_mmu_write_spte(self, sptep, old_spte, new_spte, level):
        """kvm_tdp_mmu_write_spte(): an xchg (returning what the SPTE held) when the CPU may
        change the old SPTE meanwhile (its A/D bits: kvm_tdp_mmu_spte_need_atomic_update()),
        else a plain store, and the caller's ``old_spte`` is taken as what it replaced."""
        if is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level) and spte_needs_atomic_update(old_spte):
            return self.mem.xchg64(sptep, new_spte)
        self.mem.write64(sptep, new_spte)
        return old_spte

    def iter_set_spte(self, it, new_spte, vcpu=None):
        if it.yielded:
            self.kvm.warn("set on a yielded iterator")
        it.old_spte = self.tdp_mmu_set_spte(it.as_id, it.sptep, it.old_spte, new_spte, it.gfn, it.level, vcpu)

    def link_sp(self, it, sp, shared, vcpu):
        """tdp_mmu_link_sp()"""
        spte = make_nonleaf_spte(sp.spt)
        if shared:
            ret = self.tdp_mmu_set_spte_atomic(it, spte, vcpu)
            if ret:
                return ret
        else:
            self.iter_set_spte(it, spte, vcpu)
        self.account_mmu_page(sp)
        return 0

    # -- the fault path -----------------------------------------------------------------------------------
    def get_root_for_fault(self, vcpu, fault):
        """tdp_mmu_get_root_for_fault(): private GPAs use the mirror root."""
        if self.kvm.has_mirrored_tdp and not self.kvm.is_addr_direct(fault.addr):
            return vcpu.mirror_root
        return vcpu.root

    def map(self, vcpu, fault):
        """kvm_tdp_mmu_map(): walk to the goal level, linking tables as needed, then map."""
        kvm = self.kvm
        root = self.get_root_for_fault(vcpu, fault)
        vcpu.kvm_mmu_hugepage_adjust(fault)
        if kvm.tracer.enabled:
            kvm.trace_emit(
                "kvm_mmu_spte_requested",
                vcpu.vcpu_id,
                gfn=fault.gfn,
                pfn=fault.pfn,
                level=fault.goal_level,
                root="mirror" if root.is_mirror else "direct",
            )
        kvm.rcu.read_lock(vcpu.vcpu_id)
        try:
            it = TdpIter(kvm, root, PG_LEVEL_4K, fault.gfn, self.gfn_root_bits(root), vcpu.vcpu_id)
            nx_workaround = kvm.nx_huge_pages  # fault->nx_huge_page_workaround_enabled
            end = fault.gfn + 1
            # tdp_mmu_for_each_pte(it, kvm, root, fault->gfn, fault->gfn + 1), the loop written
            # out (for_each_tdp_pte_min_level() without the generator: this is every fault's walk)
            while it.valid and it.gfn < end:
                # Don't replace a table with a huge SPTE (promotion) if the NX huge page
                # workaround is on (thrashing), nor in a mirror root: KVM does not promote S-EPT
                # entries under the read lock (v5 "Prevent hugepage promotion for mirror roots
                # in fault path": PROMOTE needs BLOCK first, and all 512 children alike).
                if nx_workaround or root.is_mirror:
                    self.disallowed_hugepage_adjust(fault, it.old_spte, it.level)
                old_spte = it.old_spte
                if old_spte == REMOVED_SPTE:  # is_removed_spte()
                    # Another vCPU is installing this entry (frozen while it reflects):
                    # give up and let the guest fault again.
                    kvm.trace_emit("kvm_tdp_mmu_spte_frozen_retry", vcpu.vcpu_id, gfn=it.gfn, level=it.level)
                    self._point(vcpu.vcpu_id, "frozen_retry", it.sptep)
                    return RET_PF_RETRY
                if it.level == fault.goal_level:
                    return self.map_handle_target_level(vcpu, fault, it)
                # Step down into existing non-leaf SPTEs (is_shadow_present_pte() and not
                # is_large_pte(), the bit tests written out: every level of every fault).
                if old_spte & SPTE_MMU_PRESENT_MASK and not old_spte & PT_PAGE_SIZE_MASK:
                    it.next()
                    continue
                # Missing table (or a huge page to split): make one and link it.
                sp = self.alloc_sp(vcpu)
                self.init_child_sp(sp, it)
                if sp.is_mirror:
                    self.alloc_external_spt(vcpu, sp)
                sp.nx_huge_page_disallowed = fault.huge_page_disallowed
                if is_shadow_present_pte(it.old_spte):
                    # A huge mirror SPTE above the goal: 6.16 has no huge mirror SPTEs at all; with
                    # the 7.2 hooks the atomic path refuses it (v5 06/45: no split under the read
                    # lock; a mismatched ACCEPT splits under the write lock before the fault).
                    if not self.mirror_hooks_72 and kvm.KVM_BUG_ON(sp.is_mirror, "splitting a huge mirror SPTE"):
                        self.free_sp(sp)
                        return RET_PF_RETRY
                    r = self.split_huge_page(it, sp, vcpu)
                else:
                    r = self.link_sp(it, sp, True, vcpu.vcpu_id)
                if r:
                    self.free_sp(sp)
                    return RET_PF_RETRY
                if fault.huge_page_disallowed and fault.req_level >= it.level:
                    kvm.touch("possible_nx", False)
                    if sp.nx_huge_page_disallowed:
                        self.track_possible_nx_huge_page(sp)
                it.next()
            # The walk ended above the goal level: an SPTE changed under us.
            return RET_PF_RETRY
        finally:
            kvm.rcu.read_unlock(vcpu.vcpu_id)

    def split_huge_page(self, it, sp, vcpu, shared=True):
        """tdp_mmu_split_huge_page(): fill the new table with the huge page's pieces, then link it
        (atomically under the read lock, or with a plain write under the write lock).  A mirror
        table's link is the S-EPT's split (set_external_spte(): BLOCK, TRACK, DEMOTE)."""
        huge = it.old_spte
        level = it.level
        child_level = level - 1
        who = vcpu.vcpu_id if hasattr(vcpu, "vcpu_id") else vcpu
        for i in range(512):
            self.mem.write64(sp.spt + i * 8, make_small_spte(huge, child_level, i, self.kvm.nx_huge_pages))
        ret = self.link_sp(it, sp, shared, who)
        if ret:
            return ret
        # handle_changed_spte already dropped the huge leaf; its pieces count one level down.
        self.kvm.update_page_stats(child_level, 512)
        if self.kvm.tracer.enabled:
            self.kvm.trace_emit("kvm_mmu_split_huge_page", who, gfn=it.gfn, spte=huge, level=level, errno=0)
        return 0

    # -- splitting huge pages outside the fault path (tdp_mmu_split_huge_pages_root) ---------------
    def tdp_mmu_alloc_sp_for_split(self, it, vcpu=None):
        """tdp_mmu_alloc_sp_for_split() (v5 37/45, 38/45): a table page, and for a mirror root its
        S-EPT page and the split cache's top-up; allocated with mmu_lock dropped (it may sleep).
        None when the host has no page."""
        kvm = self.kvm
        # GFP_KERNEL_ACCOUNT may sleep: with mmu_lock dropped, others run meanwhile.
        self._point(vcpu, "split_alloc")
        spt = kvm.alloc_page_for("split")
        if spt is None:
            return None
        kvm.mem.buf[spt : spt + 4096] = SHADOW_NONPRESENT_VALUE.to_bytes(8, "little") * 512
        sp = KvmMmuPage(spt)
        self.sp_of[spt] = sp
        if self.is_mirror_sptep(it.sptep):
            sp.external_spt = kvm.alloc_page_for("split")
            if sp.external_spt is None or kvm.x86_ops.topup_external_cache(kvm, vcpu, 1):
                self.free_sp(sp)
                return None
        return sp

    def tdp_mmu_split_huge_pages_root(self, root, start, end, target_level, shared, vcpu=None):
        """tdp_mmu_split_huge_pages_root(): split every huge page of [start, end) in ``root`` one
        level at a time down to ``target_level`` (the walk is pre-order, so a 1G page's 2M
        pieces are met again).  To allocate, mmu_lock is dropped and taken again, and the walk
        restarts at the same GFN so the SPTE is read again: another task may have split or
        zapped it meanwhile.  0, or -ENOMEM."""
        kvm = self.kvm
        lock = kvm.mmu_lock
        who = kvm.rcu_reader()
        sp = None
        end = min(end, kvm.max_gfn_exclusive)
        kvm.rcu.read_lock(who)
        try:
            it = TdpIter(kvm, root, target_level + 1, start, self.gfn_root_bits(root), vcpu)
            for it in for_each_tdp_pte_min_level(it, end):
                while True:  # "retry:"
                    if kvm.vm_dead:
                        return -EIO  # (a bugged VM's hooks fail for good)
                    if self.cond_resched(it, False, shared):
                        break
                    if not is_shadow_present_pte(it.old_spte) or not is_large_pte(it.old_spte):
                        break
                    if sp is None:
                        kvm.rcu.read_unlock(who)
                        lock.read_unlock() if shared else lock.write_unlock()
                        sp = self.tdp_mmu_alloc_sp_for_split(it, vcpu)
                        lock.read_lock() if shared else lock.write_lock()
                        if sp is None:
                            kvm.trace_emit(
                                "kvm_mmu_split_huge_page",
                                vcpu,
                                gfn=it.gfn,
                                spte=it.old_spte,
                                level=it.level,
                                errno=-ENOMEM,
                            )
                            return -ENOMEM
                        kvm.rcu.read_lock(who)
                        if kvm.bugs.split_alloc_no_recheck:
                            continue  # bug switch: split what was read before
                        it.yielded = True  # read the SPTE again: restart the walk here
                        break
                    self.init_child_sp(sp, it)
                    if self.split_huge_page(it, sp, vcpu, shared):
                        continue  # "goto retry" (it.old_spte was refreshed)
                    sp = None
                    break
        finally:
            kvm.rcu.read_unlock(who)
        # A split that lost its race to another task's leaves an sp unused.
        if sp is not None:
            self.free_sp(sp)
        return 0

    def tdp_mmu_split_huge_pages(self, types, start, end, target_level, shared, vcpu=None):
        """tdp_mmu_split_huge_pages() (v5, before 41/45): every root of ``types``."""
        kvm = self.kvm
        if shared:
            kvm.lockdep_assert_held_read()
        else:
            kvm.lockdep_assert_held_write()
        for root in self.roots_of_types(types):
            r = self.tdp_mmu_split_huge_pages_root(root, start, end, target_level, shared, vcpu)
            if r:
                return r
        return 0

    def kvm_tdp_mmu_mirrors_split_huge_pages(self, start, end, target_level, shared=False, vcpu=None):
        """kvm_tdp_mmu_mirrors_split_huge_pages() (Sean, 2026-01-29): split the huge pages of
        [start, end) in every mirror root (in practice there is one valid mirror root) under
        mmu_lock held for write.  Used for a mismatched ACCEPT and before a conversion."""
        return self.tdp_mmu_split_huge_pages(KVM_MIRROR_ROOTS, start, end, target_level, shared, vcpu)

    def map_handle_target_level(self, vcpu, fault, it):
        """tdp_mmu_map_handle_target_level()"""
        kvm = self.kvm
        if (
            is_shadow_present_pte(it.old_spte)
            and is_last_spte(it.old_spte, it.level)
            and is_access_allowed(fault, it.old_spte)
        ):
            return RET_PF_SPURIOUS
        if fault.slot is None:
            sp = self.sptep_to_sp(it.sptep)
            new_spte = make_mmio_spte(it.gfn | self.gfn_root_bits(sp), kvm.memslots_generation, kvm.shadow_mmio_value)
        else:
            new_spte, _wrprot = make_spte(
                it.level,
                fault.pfn,
                ACC_ALL,
                kvm.mt_mask,
                host_writable=fault.map_writable,
                nx_huge_pages=kvm.nx_huge_pages,
            )
        if new_spte == it.old_spte:
            ret = RET_PF_SPURIOUS
        elif self.tdp_mmu_set_spte_atomic(it, new_spte, vcpu.vcpu_id):
            return RET_PF_RETRY
        elif is_shadow_present_pte(it.old_spte) and not is_last_spte(it.old_spte, it.level):
            kvm.flush_remote_tlbs_gfn(it.gfn, it.level)
            ret = RET_PF_FIXED
        else:
            ret = RET_PF_FIXED
        if is_mmio_spte(new_spte, kvm.shadow_mmio_value):
            vcpu.stat["pf_mmio_spte_created"] += 1
            return RET_PF_EMULATE
        if kvm.tracer.enabled:
            kvm.trace_emit(
                "kvm_mmu_set_spte", vcpu.vcpu_id, gfn=it.gfn, level=it.level, spte=new_spte, decoded=spte_str(new_spte)
            )
        return ret

    # -- zapping ------------------------------------------------------------------------------------------
    def cond_resched(self, it, flush, shared):
        """tdp_mmu_iter_cond_resched(): yield only when asked and when progress was made."""
        kvm = self.kvm
        if it.next_last_level_gfn == it.yielded_gfn or not kvm.need_resched():
            return False
        if flush:
            kvm.flush_remote_tlbs()
        who = kvm.rcu_reader()
        kvm.rcu.read_unlock(who)
        # cond_resched_rwlock_read/write(): drop mmu_lock, let the waiter in, take it again.
        lock = kvm.mmu_lock
        if shared:
            lock.read_unlock()
            kvm.cond_resched()
            lock.read_lock()
        else:
            lock.write_unlock()
            kvm.cond_resched()
            lock.write_lock()
        kvm.rcu.read_lock(who)
        it.yielded = True
        return True

    def zap_leafs(self, root, start, end, can_yield, flush):
        """tdp_mmu_zap_leafs() under the write lock: zap present leaves in [start, end)."""
        kvm = self.kvm
        kvm.lockdep_assert_held_write()
        end = min(end, kvm.max_gfn_exclusive)
        kvm.rcu.read_lock(kvm.rcu_reader())
        it = TdpIter(kvm, root, PG_LEVEL_4K, start, self.gfn_root_bits(root))
        for it in for_each_tdp_pte_min_level(it, end):
            if can_yield and self.cond_resched(it, flush, False):
                flush = False
                continue
            if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
                continue
            if root.is_mirror and kvm.checker is not None:
                # A private page outside [start, end) would go with the leaf (its data lost).
                kvm.checker.zap_range(kvm, it.gfn, it.level, start, end)
            self.iter_set_spte(it, SHADOW_NONPRESENT_VALUE)
            # No vCPU uses an invalid root, so its zapped SPTEs need no TLB flush.
            if not root.invalid:
                flush = True
        kvm.rcu.read_unlock(kvm.rcu_reader())
        return flush

    def kvm_tdp_mmu_zap_leafs(self, start, end, flush):
        for root in self.roots_of_types(KVM_VALID_ROOTS):
            flush = self.zap_leafs(root, start, end, True, flush)
        return flush

    def unmap_gfn_range(self, start, end, types, flush):
        """kvm_tdp_mmu_unmap_gfn_range(): the filter's roots plus invalid ones."""
        for root in self.roots_of_types(types | KVM_INVALID_ROOTS):
            flush = self.zap_leafs(root, start, end, True, flush)
        return flush

    def __zap_root(self, root, shared, zap_level):
        kvm = self.kvm
        it = TdpIter(kvm, root, zap_level, 0, 0)
        its = for_each_tdp_pte_min_level(it, kvm.max_gfn_exclusive)
        for it in its:
            while True:
                if self.cond_resched(it, False, shared):
                    break
                if not is_shadow_present_pte(it.old_spte) or it.level > zap_level:
                    break
                if not shared:
                    self.iter_set_spte(it, SHADOW_NONPRESENT_VALUE)
                    break
                if not self.tdp_mmu_set_spte_atomic(it, SHADOW_NONPRESENT_VALUE):
                    break
                # -EBUSY: it.old_spte was refreshed, try again on the same entry.

    def zap_root(self, root, shared):
        """tdp_mmu_zap_root(): leaves first, then each level up, so each step frees little."""
        kvm = self.kvm
        kvm.rcu.read_lock(kvm.rcu_reader())
        for level in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, root.role_level):
            self.__zap_root(root, shared, level)
        kvm.rcu.read_unlock(kvm.rcu_reader())

    def invalidate_roots(self, types):
        """kvm_tdp_mmu_invalidate_roots(): mark roots invalid (role.invalid) and schedule them for
        kvm_tdp_mmu_zap_invalidated_roots(), which is gifted the MMU's reference.  Under the
        write lock (or with no other user of the VM: its destruction)."""
        self.kvm.touch("roots")
        self.kvm.touch("roots_valid")
        for root in self.roots_of_types(types & ~KVM_INVALID_ROOTS):
            if not root.invalid:
                root.tdp_mmu_scheduled_root_to_zap = True
                root.role |= ROLE_INVALID

    def zap_invalidated_roots(self, shared):
        """kvm_tdp_mmu_zap_invalidated_roots(): under mmu_lock for read (``shared``) or write,
        zap every root scheduled by invalidate_roots(), then put the MMU's reference (after the
        zap: the root must stay reachable by mmu_notifiers while it is zapped).  No TLB flush: a
        vCPU flushes when it loads its new root (kvm_mmu_load())."""
        kvm = self.kvm
        lock = kvm.mmu_lock
        lock.read_lock() if shared else lock.write_lock()
        try:
            for root in list(self.roots):
                if not root.tdp_mmu_scheduled_root_to_zap:
                    continue
                root.tdp_mmu_scheduled_root_to_zap = False
                kvm.KVM_BUG_ON(not root.invalid, "a root scheduled to zap is not invalid")
                self.zap_root(root, shared)
                root.zapped = True
                self.put_root(root)  # the MMU's reference
        finally:
            lock.read_unlock() if shared else lock.write_unlock()

    # -- dumping ------------------------------------------------------------------------------------------
    def scan(self, root, mmio=None):
        """One walk of ``root``'s tables: (its leaves as leaves() gives them, its REMOVED SPTEs
        as removed_sptes() gives them); with a list ``mmio``, its MMIO SPTEs are appended to it
        as (gfn, level, spte).  The invariant checker runs after every explored schedule, so
        each table is scanned once, and in C (emu.hw.memory.table_entries)."""
        leaves, removed = [], []
        mem = self.mem
        mmio_value = self.kvm.shadow_mmio_value

        def walk(table, level, gfn):
            step = KVM_PAGES_PER_HPAGE(level)
            for i, spte in table_entries(mem, table, SHADOW_NONPRESENT_VALUE):
                if spte == REMOVED_SPTE:
                    removed.append((table + i * 8, level))
                elif spte & SPTE_MMU_PRESENT_MASK:
                    g = gfn + i * step
                    if is_last_spte(spte, level):
                        leaves.append((g, level, spte))
                    else:
                        walk(spte_to_child_pt(spte, level), level - 1, g)
                elif mmio is not None and is_mmio_spte(spte, mmio_value):
                    mmio.append((gfn + i * step, level, spte))

        n = 0 if mmio is None else len(mmio)
        walk(root.spt, root.role_level, 0)
        bits = self.gfn_root_bits(root)
        if bits:
            leaves = [(g & ~bits, l, s) for g, l, s in leaves]
            if mmio:
                mmio[n:] = [(g & ~bits, l, s) for g, l, s in mmio[n:]]
        return leaves, removed

    def leaves(self, root):
        """(gfn, level, spte) for every present leaf of ``root`` (gfn without the shared bit)."""
        return self.scan(root)[0]

    def removed_sptes(self, root):
        """Every SPTE still REMOVED in the tables reachable from ``root`` (must be none at quiescence)."""
        return self.scan(root)[1]


class _SpIter:
    """The iterator tdp_mmu_zap_possible_nx_huge_page() fills from the sp itself (no walk)."""

    __slots__ = ("sptep", "old_spte", "gfn", "level", "as_id", "yielded")

    def __init__(self, sptep, old_spte, gfn, level, as_id):
        self.sptep, self.old_spte, self.gfn, self.level, self.as_id = sptep, old_spte, gfn, level, as_id
        self.yielded = False


def spte_needs_atomic_update(spte):
    """spte_needs_atomic_update(): the CPU may set A or D (or KVM's fast path W) under us."""
    if not spte & PT_WRITABLE_MASK and spte & EPT_SPTE_MMU_WRITABLE:
        return True
    if spte & SPTE_TDP_AD_MASK != SPTE_TDP_AD_ENABLED:
        return False
    return not spte & shadow_accessed_mask or bool(spte & PT_WRITABLE_MASK and not spte & shadow_dirty_mask)


def is_access_allowed(fault, spte):
    if fault.exec:
        return bool(spte & shadow_x_mask)
    if fault.write:
        return bool(spte & PT_WRITABLE_MASK)
    return bool(spte & shadow_user_mask)


def make_small_spte(huge_spte, child_level, index, nx_huge_pages=False):
    """make_small_spte(): one piece of a split huge page (a leaf one level down); a 4K piece of
    a huge page made non-executable by the NX huge page mitigation is executable again."""
    spte = huge_spte + ((index * KVM_PAGES_PER_HPAGE(child_level)) << 12)
    if child_level == PG_LEVEL_4K:
        spte &= ~PT_PAGE_SIZE_MASK
        if nx_huge_pages:
            spte |= shadow_x_mask
    return spte
