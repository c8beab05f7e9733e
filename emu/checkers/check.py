"""Invariants that must hold whenever no vCPU is inside KVM (quiescence).

    problems = check_vm(kvm)     # [] when everything holds; else one line per broken invariant

- no SPTE is left REMOVED (frozen) in any root;
- for a TD, the mirror root and the S-EPT map exactly the same GPAs to the same
  HPAs at the same levels, and every such S-EPT leaf is in a present or pending
  state; no S-EPT table exists that the mirror does not have;
- every present leaf of KVM's roots maps a GFN that a memslot covers, and a page of
  the right memslot backing (shared: the slot's hva range; private: its guest_memfd range);
- an invalid root that was zapped has no present leaf; no vCPU holds a root that was freed;
- the PAMT owns exactly the TD's pages: its private pages (PT_REG), its S-EPT
  pages (PT_EPT, one per mirror table below the root) and its control pages;
- every page of the host's kernel allocator has exactly one owner in KVM's
  accounting (a page table, an S-EPT page KVM gave the module, a page in a vCPU's
  memory cache, a TD control page, or a page leaked on purpose), and the counts add up;
- no vCPU holds a cached translation the tables no longer give (unless a TLB flush
  request is still pending for it, which it will process before running the guest);
- every leaf is one KVM could make (leaf_problem()), MMIO SPTEs of the current generation map no
  memslot, and KVM's page stats count the leaves there are.
"""

from ..kvm.spte import spte_to_pfn, PT_WRITABLE_MASK, shadow_x_mask, MMIO_SPTE_GEN_MASK, get_mmio_spte_generation
from ..kvm.kvm_host import KVM_REQS_FLUSHING, OUTSIDE_GUEST_MODE
from ..kvm.tdp_mmu import KVM_DIRECT_ROOTS, KVM_MIRROR_ROOTS


def check_vm(kvm):
    problems = []
    tdp = kvm.tdp_mmu
    leaves_of = {}  # root -> its leaves: each table is read once per check
    mmio = []
    for root in tdp.roots:
        if root.invalid:
            continue
        leaves, removed = tdp.scan(root, mmio)
        leaves_of[root] = leaves
        for sptep, level in removed:
            problems.append(
                f"{'mirror' if root.is_mirror else 'direct'} root: SPTE at {sptep:#x} (level {level}) left REMOVED"
            )
        for gfn, level, spte in leaves:
            # (MMIO SPTEs are not present: a present leaf always needs a memslot)
            problem = leaf_problem(kvm, root.is_mirror, gfn, level, spte)
            if problem:
                problems.append(problem)
    problems += check_mmio_sptes(kvm, mmio)
    problems += check_page_stats(kvm, leaves_of)
    problems += check_roots(kvm)
    if kvm.has_mirrored_tdp:
        problems += check_mirror_sept(kvm, leaves_of)
    problems += check_attributes(kvm, leaves_of)
    problems += check_accounting(kvm)
    problems += check_tlbs(kvm)
    return problems


def check_page_stats(kvm, leaves_of=None):
    """kvm->stat.pages_{4k,2m,1g} (kvm_update_page_stats() in __handle_changed_spte()) count the
    leaves of every root, an invalid one that still has leaves too."""
    have = [0, 0, 0]
    for root in kvm.tdp_mmu.roots:
        for _, level, _ in _leaves(kvm, root, leaves_of):
            have[level - 1] += 1
    problems = []
    for level, key in enumerate(("pages_4k", "pages_2m", "pages_1g"), 1):
        stat = kvm.stat.get(key, 0)
        if stat != have[level - 1]:
            problems.append(f"KVM's {key} stat is {stat}, the roots have {have[level - 1]} {_SIZE[level]} leaves")
    return problems


def check_mmio_sptes(kvm, mmio):
    """An MMIO SPTE of the current memslots generation was made by a fault that saw the current
    memslots, so no memslot covers its GFN (kvm_swap_active_memslots() bumps the generation
    only after the readers of the old memslots are gone).  One that does cover it would be
    taken for MMIO, not the slot's memory, until the next memslot change."""
    if kvm.memslots_gen_in_progress:
        return []
    gen = kvm.memslots_generation & MMIO_SPTE_GEN_MASK
    problems = []
    for gfn, level, spte in mmio:
        slot = kvm.gfn_to_memslot(gfn)
        if slot is not None and get_mmio_spte_generation(spte) == gen:
            problems.append(
                f"an MMIO SPTE of the current memslots generation ({gen}) for gfn {gfn:#x}, which "
                f"memslot {slot.id} covers: the guest's accesses there are taken for MMIO"
            )
    return problems


def check_roots(kvm):
    """An invalid root, once zapped, has no present leaf (nothing maps into it any more: every
    fault on it is stale); no vCPU holds a root that was freed (put for the last time)."""
    problems = []
    tdp = kvm.tdp_mmu
    for root in tdp.roots:
        if root.invalid and root.zapped:
            leaves = tdp.leaves(root)
            if leaves:
                gfn, level, _ = leaves[0]
                problems.append(
                    f"an invalid {'mirror' if root.is_mirror else 'direct'} root that was zapped "
                    f"still maps gfn {gfn:#x} (level {level}) and {len(leaves) - 1} more"
                )
    for v in kvm.vcpus:
        problems += freed_roots(kvm, v)
    return problems


def freed_roots(kvm, v):
    """The roots vCPU ``v`` holds that were freed (no longer a root of the TDP MMU)."""
    tdp = kvm.tdp_mmu
    out = []
    for what in ("root", "mirror_root"):
        root = getattr(v, what, None)
        if root is not None and (root not in tdp.roots or tdp.sp_of.get(root.spt) is not root):
            out.append(f"vCPU {v.vcpu_id} holds {what.replace('_', ' ')} {root!r}, which was freed")
    return out


def _leaves(kvm, root, leaves_of):
    if leaves_of is not None and root in leaves_of:
        return leaves_of[root]
    return kvm.tdp_mmu.leaves(root)


def check_step(kvm):
    """The invariants that hold between any two scheduling points, not only at quiescence:
    every present leaf maps its memslot's backing, and every private page the S-EPT maps is
    the TD's in the PAMT."""
    problems = []
    for root in kvm.tdp_mmu.roots:
        if root.invalid:
            continue
        for gfn, level, spte in kvm.tdp_mmu.leaves(root):
            problem = leaf_problem(kvm, root.is_mirror, gfn, level, spte)
            if problem:
                problems.append(problem)
    if kvm.has_mirrored_tdp and getattr(kvm, "tdx", None) is not None:
        from tdxmod.abi import PT_REG

        mod = kvm.x86_ops.module
        td = mod.tds.get(kvm.tdx.tdr_pa)
        if td is not None:
            for gpa, lvl, state, hpa in mod.sept_leaves(td):
                if mod.pamt.page_type(hpa) != PT_REG or mod.pamt.owner(hpa) != td.tdr:
                    problems.append(f"S-EPT maps gpa {gpa:#x} to {hpa:#x}, which the PAMT does not give the TD")
    return problems


_SIZE = {1: "4K", 2: "2M", 3: "1G"}


def leaf_problem(kvm, is_mirror, gfn, level, spte, backing=True):
    """What is wrong with one present leaf SPTE of KVM's roots (a line), or None.

    - the leaf and its pfn are aligned to its size (a huge leaf maps a naturally aligned range);
    - one memslot covers its whole range (kvm_mmu_max_mapping_level() never maps past a slot:
      lpage_info's disallow_lpage at unaligned slot ends);
    - it maps the slot's backing, page for page (guest_memfd for private memory, the VMM's page
      tables for shared; a huge leaf only where the host backing is contiguous, as
      host_pfn_mapping_level() allows);
    - a read-only memslot's page is not writable (make_spte() without host_writable);
    - with the NX huge page mitigation a huge leaf is not executable (make_spte());
    - no larger than the host's page behind it (or guest_memfd's and the vendor's limit).

    ``backing=False`` leaves out the VMM page-table lookups of a shared 4K leaf (the run-time
    check on every installed leaf; the quiescence checks do them)."""
    n = 1 << (9 * (level - 1))
    pfn = spte_to_pfn(spte)
    size = _SIZE.get(level, f"level-{level}")
    if gfn & (n - 1) or pfn & (n - 1):
        return f"the {size} leaf at gfn {gfn:#x} maps pfn {pfn:#x}: not aligned to its size"
    slot = kvm.gfn_to_memslot(gfn)
    if slot is None:
        return _no_memslot_line(is_mirror, gfn, level)
    if gfn + n > slot.base_gfn + slot.npages:
        return (
            f"the {size} leaf at gfn {gfn:#x} reaches past the end of memslot {slot.id} "
            f"(gfn {slot.base_gfn:#x}-{slot.base_gfn + slot.npages:#x})"
        )
    # (the attributes read directly: a check is no access of the model's, emu.checkers.dpor)
    attrs = kvm.private_gfns if kvm.has_private_mem else None
    private = is_mirror or attrs is not None and not kvm.has_mirrored_tdp and slot.can_be_private and gfn in attrs
    if private or backing or n > 1:
        # guest_memfd backs a slot linearly: its first page says it all.  The VMM's pages are
        # checked one by one (a 1G leaf: the first page of each 2M and the last).
        pages = [0] if private or n == 1 else [*range(0, n, 1 if n <= 512 else 512), n - 1]
        for i in pages:
            want = _backing_pfn(kvm, slot, gfn + i, private)
            if pfn + i != want:
                return f"gfn {gfn + i:#x} ({size} leaf at gfn {gfn:#x}) maps pfn {pfn + i:#x}, its backing is pfn {want:#x}"
    # kvm_mmu_max_mapping_level(): no larger than the host's page (host_pfn_mapping_level()) or,
    # for private memory, than guest_memfd and the vendor allow (gmem_max_mapping_level()).
    limit = slot.backing_level if not private else min(slot.backing_level, kvm.x86_ops.gmem_max_mapping_level(kvm, gfn))
    if level > limit:
        return (
            f"the {size} {'private' if private else 'shared'} leaf at gfn {gfn:#x} is larger than the "
            f"{_SIZE.get(limit, limit)} pages its {'guest_memfd' if private else 'host mapping'} allows"
        )
    if n > 1 and attrs is not None and (not attrs.covers(gfn, gfn + n) if private else attrs.intersects(gfn, gfn + n)):
        # A huge leaf only where every page has the same attribute (KVM_LPAGE_MIXED_FLAG).
        return f"the {size} {'private' if private else 'shared'} leaf at gfn {gfn:#x} covers GFNs of both attributes"
    if spte & PT_WRITABLE_MASK and slot.readonly and not private:
        return f"gfn {gfn:#x} of read-only memslot {slot.id} is mapped writable"
    if level > 1 and spte & shadow_x_mask and kvm.nx_huge_pages:
        return f"the {size} leaf at gfn {gfn:#x} is executable, with the NX huge page mitigation on"
    return None


def _no_memslot_line(is_mirror, gfn, level):
    return f"the {'mirror' if is_mirror else 'direct'} root maps gfn {gfn:#x} (level {level}), which no memslot covers"


def _backing_pfn(kvm, slot, gfn, private):
    """What backs ``gfn`` now: guest_memfd for private, the VMM's page tables for shared."""
    if private:
        return (slot.gmem_addr >> 12) + gfn - slot.base_gfn
    return kvm.host.mm.lookup(slot.userspace_addr + ((gfn - slot.base_gfn) << 12))


def check_attributes(kvm, leaves_of=None):
    """In a VM with private memory, a mapping agrees with the page's attribute: the direct
    (shared) root maps only shared GFNs, the mirror only private ones."""
    if not kvm.has_mirrored_tdp:
        return []
    problems = []
    for root in kvm.tdp_mmu.roots:
        if root.invalid:
            continue
        for gfn, level, spte in _leaves(kvm, root, leaves_of):
            for g in range(gfn, gfn + (1 << (9 * (level - 1)))):
                if kvm.mem_is_private(g) != root.is_mirror:
                    problems.append(
                        f"the {'mirror' if root.is_mirror else 'direct'} root maps gfn {g:#x}, "
                        f"whose attribute is {'private' if kvm.mem_is_private(g) else 'shared'}"
                    )
                    break
    return problems


def check_accounting(kvm):
    """Kernel pages: each owned once, and the owners add up to what the allocator handed out."""
    owners = {}
    problems = []

    def own(hpa, what):
        if hpa in owners:
            problems.append(f"page {hpa:#x} owned twice: {owners[hpa]} and {what}")
        owners[hpa] = what

    for spt, sp in kvm.tdp_mmu.sp_of.items():
        own(spt, f"page table of {sp!r}")
        if sp.external_spt is not None:
            own(sp.external_spt, f"S-EPT page of {sp!r}")
    for v in kvm.vcpus:
        for page in v.mmu_shadow_page_cache.objects + v.mmu_external_spt_cache.objects:
            own(page, f"vCPU {v.vcpu_id}'s MMU cache")
        arch = v.arch
        if arch is not None:
            for page in [arch.tdvpr_pa] + arch.tdvpx_pa:
                own(page, f"vCPU {v.vcpu_id}'s TDVPR/TDVPX")
    tdx = getattr(kvm, "tdx", None)
    if tdx is not None:
        for page in [tdx.tdr_pa] + tdx.tdcs_pa:
            own(page, "the TD's TDR/TDCS")
    for hpa, why in kvm.host.leaked:
        if hpa < kvm.host.user_base:
            own(hpa, f"leaked ({why})")
    # Pages freed by RCU callbacks that have not run yet are still KVM's.
    pending = sum(len(w) >= 0 for w, _ in kvm.rcu.pending)
    in_use = kvm.host.kernel.in_use
    if len(owners) != in_use and not pending:
        problems.append(f"the host handed out {in_use} kernel pages, KVM accounts for {len(owners)}")
    return problems


def check_tlbs(kvm):
    """No stale guest-physical translation in any vCPU (the part of the TLB KVM must keep right)."""
    problems = []
    for v in kvm.vcpus:
        # A vCPU with a flush owed (a TLB flush, or an obsolete root to drop: kvm_mmu_reload()
        # flushes) flushes before it runs guest code again.
        if v.hw is None or v.requests & KVM_REQS_FLUSHING:
            continue
        problems += stale_translations(kvm, v)
    return problems


def stale_translations(kvm, v):
    """The guest-physical translations vCPU ``v`` caches that its EPT (or S-EPT) no longer gives."""
    from ..hw.ept import walk, EptTranslation

    hw = v.hw
    if hw is None or hw.eptp is None:
        return []
    problems = []
    for gfn, (hpa, level, perms, dirty) in list(hw.gpa_cache.items()):
        gpa = gfn << 12
        secure = hw.secure_eptp is not None and not gpa & hw.shared_mask
        t = walk(kvm.mem, hw.secure_eptp if secure else hw.eptp, gpa, 1 if perms & 1 else 4, set_ad=False)
        if t.__class__ is not EptTranslation or t.hpa & ~0xFFF != hpa or t.perms & perms != perms:
            problems.append(f"vCPU {v.vcpu_id} caches gpa {gpa:#x} -> {hpa:#x} ({perms}), the tables give {t!r}")
    return problems


def check_mirror_sept(kvm, leaves_of=None):
    from tdxmod import sept as S
    from tdxmod.abi import PT_REG, PT_EPT

    problems = []
    mod = kvm.x86_ops.module
    td = mod.tds.get(kvm.tdx.tdr_pa)
    if td is None:
        return problems
    mirror = next((r for r in kvm.tdp_mmu.roots if r.is_mirror and not r.invalid), None)
    mirror_leaves = {}
    if mirror is not None:
        for gfn, level, spte in _leaves(kvm, mirror, leaves_of):
            mirror_leaves[gfn << 12] = (level, spte_to_pfn(spte) << 12)
    sept_leaves = {}
    leaves, tables = mod.sept_scan(td)
    for gpa, lvl, state, hpa in leaves:
        sept_leaves[gpa] = (lvl + 1, hpa)
        if state not in (S.SEPT_MAPPED, S.SEPT_PENDING):
            problems.append(f"S-EPT leaf gpa {gpa:#x} in state {S.STATE_NAMES.get(state, state)} at quiescence")
    for gpa in sorted(set(mirror_leaves) | set(sept_leaves)):
        m, s = mirror_leaves.get(gpa), sept_leaves.get(gpa)
        if m != s:
            problems.append(f"gpa {gpa:#x}: mirror {_fmt(m)} but S-EPT {_fmt(s)}")
    # Tables: every S-EPT table below the root is some mirror SP's external page.
    ext = {sp.external_spt for sp in kvm.tdp_mmu.sp_of.values() if sp.is_mirror and sp.external_spt}
    for gpa, lvl, child in tables:
        if child not in ext:
            problems.append(f"S-EPT table {child:#x} (gpa {gpa:#x}, level {lvl}) has no mirror page")
    # PAMT: the TD's pages and nothing else.
    owned = mod.pamt.owned_pages(td.tdr)
    regs = {hpa for hpa, pt, _ in owned if pt == PT_REG}
    epts = {hpa for hpa, pt, _ in owned if pt == PT_EPT}
    want_regs = {hpa for _, hpa in sept_leaves.values()}
    if regs != want_regs:
        problems.append(f"PAMT: {len(regs)} PT_REG pages, the S-EPT maps {len(want_regs)}")
    if epts != {c for _, _, c in tables}:
        problems.append(f"PAMT: {len(epts)} PT_EPT pages, the S-EPT has {len(tables)} tables")
    # A 2M page is one PAMT entry (its 2M entry) and 512 children of the TDR.
    pages = sum(512 ** mod.pamt.index[hpa][2] for hpa, _, _ in owned)
    if td.chldcnt != pages:
        # The TDR's own PAMT owner is 0 (tdh_mng_create), so ``owned`` is every page but the TDR.
        problems.append(f"TDR child count {td.chldcnt}, PAMT owns {pages} pages besides the TDR")
    return problems


def _fmt(x):
    if x is None:
        return "nothing"
    level, hpa = x
    return f"{('4K', '2M', '1G')[level - 1] if level <= 3 else level} -> {hpa:#x}"


def check_destroyed(kvm):
    """After VM destruction: every kernel page is back, except those leaked on purpose (and
    accounted), and the PAMT owns nothing but those."""
    problems = []
    leaked = {hpa for hpa, _ in kvm.host.leaked}
    kernel_leaked = {hpa for hpa in leaked if hpa < kvm.host.user_base}
    if kvm.host.kernel.in_use != len(kernel_leaked):
        problems.append(
            f"after destroy {kvm.host.kernel.in_use} kernel pages are in use, "
            f"{len(kernel_leaked)} were leaked on purpose"
        )
    module = getattr(kvm.x86_ops, "module", None)
    if module is not None:
        owned = {hpa for hpa, _, _ in module.pamt.owned_pages()}
        if owned - leaked:
            problems.append(
                f"after destroy the PAMT owns {len(owned - leaked)} pages nobody leaked, e.g. {min(owned - leaked):#x}"
            )
    if kvm.rcu.pending:
        problems.append(f"{len(kvm.rcu.pending)} RCU callbacks never ran")
    return problems


def check_pamt_empty(module):
    """After every TD is destroyed: no page owned in the PAMT."""
    owned = module.pamt.owned_pages()
    return [f"PAMT still owns {len(owned)} pages, e.g. {owned[0][0]:#x}"] if owned else []


class RunChecks:
    """The checks that run while a VM runs, installed into the model as ``kvm.checker``
    (``install``): the model calls them at the moments it defines (a vCPU entering the guest
    or between two slices, kvm_flush_remote_tlbs() returning, the host freeing a page) and
    they record what broke with ``kvm.checker_violation()``; the run then fails with it."""

    def guest_tlbs(self, kvm, when, vcpus=None, entering=False):
        """No vCPU in guest mode may use a translation the tables no longer give once no flush
        is owed (every zap's flush, or the TD's TRACK and kick, completed).  A vCPU outside
        guest mode may: it flushes before it enters, if a request is pending."""
        kvm.touch("flush", False)
        if kvm.flush_owed or kvm.tables_checked == kvm.tables_generation and vcpus is None:
            return
        if vcpus is None:
            kvm.touch_all(False)  # (emu.checkers.dpor) it reads every vCPU's TLB and every table
        else:
            for v in vcpus:  # (emu.checkers.dpor) the entries behind their TLBs
                v.touch_tlb()
        for v in kvm.vcpus if vcpus is None else vcpus:
            if (
                v.hw is None
                or not entering
                and not v.hw.in_guest
                and (v.mode == OUTSIDE_GUEST_MODE or v.requests & KVM_REQS_FLUSHING)
            ):
                continue  # not running guest code, or will flush before it does
            for problem in stale_translations(kvm, v)[:1]:
                kvm.checker_violation(f"{when}: {problem} while in guest mode")
        if vcpus is None:
            kvm.tables_checked = kvm.tables_generation

    def leaf_installed(self, kvm, gfn, level, spte=None, is_mirror=None):
        """A present leaf was just installed for ``gfn``: a memslot covers it (one being deleted
        or moved still does, marked KVM_MEMSLOT_INVALID, until its mappings are zapped).  A leaf
        for a GFN no memslot covers outlives the memslot deletion that should have removed it:
        nothing will ever zap it.  The leaf is also what leaf_problem() allows (size, memslot
        range, backing, read-only, NX huge pages), the VMM's page tables read only for a huge
        leaf.  (``is_mirror`` None: the table is not known, only the memslot is checked.)"""
        slot = kvm.gfn_to_memslot(gfn)
        if slot is None:
            kvm.checker_violation(
                f"a leaf SPTE (level {level}) was installed for gfn {gfn:#x}, which no "
                f"memslot covers (a fault that looked its memslot up before the slot "
                f"was deleted?)"
            )
        elif is_mirror is not None and (level > 1 or is_mirror or slot.flags or slot.gmem_addr is not None):
            # (A shared 4K leaf of a plain writable slot has nothing more to check without the
            # VMM's page tables: the fault path's common case stays cheap.)
            problem = leaf_problem(kvm, is_mirror, gfn, level, spte, backing=False)
            if problem:
                kvm.checker_violation(f"a leaf SPTE was installed wrong: {problem}")

    def mmio_spte_taken(self, kvm, gpa):
        """check_mmio_spte() took the MMIO SPTE of ``gpa`` as current: no memslot covers the GFN
        (see check_mmio_sptes()); otherwise the guest's access to the slot's memory becomes an
        MMIO exit, and every later one too."""
        gfn = (gpa >> 12) & ~kvm.gfn_direct_bits
        slot = kvm.gfn_to_memslot(gfn)
        if slot is not None:
            kvm.checker_violation(
                f"an MMIO SPTE for gfn {gfn:#x} was taken as current (memslots generation "
                f"{kvm.memslots_generation}), but memslot {slot.id} covers the GFN: made while a "
                f"memslot update was in progress?"
            )

    def range_unmapped(self, kvm, start, end, types, what):
        """``what`` unmapped [start, end) from the roots of ``types`` and its invalidation is still
        in progress (no fault can map the range again before it ends): none of those roots maps a
        page of the range.  A leaf left there keeps a page the guest no longer has (a shared
        mapping of a page gone private, a private page punched out of guest_memfd) until the next
        zap, if one ever comes.  (A dead VM is not checked: a failed zap kills it on purpose.)"""
        if kvm.vm_dead:
            return
        tdp = kvm.tdp_mmu
        for root in tdp.roots:
            if root.invalid or not types & (KVM_MIRROR_ROOTS if root.is_mirror else KVM_DIRECT_ROOTS):
                continue
            for gfn, level, _ in tdp.leaves(root):
                if gfn < end and start < gfn + (1 << (9 * (level - 1))):
                    kvm.checker_violation(
                        f"{what} unmapped gfn {start:#x}-{end:#x}, but the "
                        f"{'mirror' if root.is_mirror else 'direct'} root still maps gfn {gfn:#x} (level {level})"
                    )
                    return

    def memslot_removed(self, kvm, slot):
        """A memslot was deleted (or moved away) and the new memslots are in: nothing maps its old
        GFNs.  The flush zapped them once no fault could still be mapping from the old slot (the
        SRCU wait); a leaf there now was installed by a fault the flush did not wait for, and
        nothing will ever zap it."""
        start, end = slot.base_gfn, slot.base_gfn + slot.npages
        tdp = kvm.tdp_mmu
        for root in tdp.roots:
            for gfn, level, _ in tdp.leaves(root):
                if gfn < end and start < gfn + (1 << (9 * (level - 1))) and kvm.gfn_to_memslot(gfn) is None:
                    kvm.checker_violation(
                        f"memslot {slot.id} (gfn {start:#x}-{end:#x}) is gone, but the "
                        f"{'mirror' if root.is_mirror else 'direct'} root still maps gfn "
                        f"{gfn:#x} (level {level}): a fault mapped it after the memslot "
                        f"was flushed"
                    )
                    return

    def vcpu_entering(self, kvm, v):
        """A vCPU enters the guest: on roots that are still the TDP MMU's (not freed)."""
        for problem in freed_roots(kvm, v)[:1]:
            kvm.checker_violation(f"vCPU {v.vcpu_id} entering the guest: {problem}")

    def zap_range(self, kvm, gfn, level, start, end):
        """A zap of private memory [start, end) meets a mirror leaf: the leaf must lie inside the
        range.  A TD's private page is its data (its lifetime is the S-EPT mapping's): a huge
        leaf that reaches out of the range would take pages the zap was not asked for (KVM splits
        the head and tail huge pages first: tdx_gmem_convert())."""
        last = gfn + (1 << (9 * (level - 1)))
        if gfn < start or last > end:
            kvm.checker_violation(
                f"zap of gfn {start:#x}-{end:#x} removes the {('4K', '2M', '1G')[level - 1]} "
                f"private page at gfn {gfn:#x}-{last:#x}: beyond the range asked"
            )

    def page_freed(self, kvm, pfn, what):
        """When the host frees a page: no SPTE maps it, no vCPU running guest code (or about
        to) caches it."""
        tdp = kvm.tdp_mmu
        for root in tdp.roots:
            if root.invalid or root.is_mirror:
                continue
            for gfn, level, spte in tdp.leaves(root):
                first = (spte >> 12) & ((1 << 40) - 1)
                if first <= pfn < first + (1 << (9 * (level - 1))):
                    kvm.checker_violation(f"{what}: pfn {pfn:#x} freed while gfn {gfn:#x} still maps it")
                    return
        for v in kvm.vcpus:
            hw = v.hw
            if hw is None or not hw.in_guest and (v.mode == OUTSIDE_GUEST_MODE or v.requests & KVM_REQS_FLUSHING):
                continue
            if any(hpa >> 12 == pfn for hpa, _, _, _ in hw.gpa_cache.values()):
                kvm.checker_violation(
                    f"{what}: pfn {pfn:#x} freed while vCPU {v.vcpu_id} in guest mode still caches a translation to it"
                )
                return

    def td_page_freed(self, kvm, hpa, what):
        """A page a TD had goes back to the host allocator: none of its cache lines may still
        hold the TD bit (KVM clears every page it takes back: tdx_clear_page())."""
        n = kvm.mem.td_line_count(hpa >> 12)
        if n:
            kvm.checker_violation(
                f"{what}: page {hpa:#x} goes back to the host with {n} of its 64 cache lines "
                f"still holding the TD's integrity bit (not cleared with tdx_clear_page())"
            )

    def machine_check(self, kvm, hpa, what):
        kvm.checker_violation(what)


RUN_CHECKS = RunChecks()


def install(kvm):
    """Arm the run-time checks on ``kvm`` (the VMM does it for every VM it builds)."""
    kvm.checker = RUN_CHECKS
    kvm.mem.on_machine_check = lambda hpa, what: RUN_CHECKS.machine_check(kvm, hpa, what)
    return kvm
