"""Invariants that must hold whenever no vCPU is inside KVM (quiescence).

    problems = check_vm(kvm)     # [] when everything holds; else one line per broken invariant

- no SPTE is left REMOVED (frozen) in any root;
- for a TD, the mirror root and the S-EPT map exactly the same GPAs to the same
  HPAs at the same levels, and every such S-EPT leaf is in a present or pending
  state; no S-EPT table exists that the mirror does not have;
- every present leaf of KVM's roots maps a page of the right memslot backing
  (shared: the slot's hva range; private: its guest_memfd range);
- the PAMT owns exactly the TD's pages: its private pages (PT_REG), its S-EPT
  pages (PT_EPT, one per mirror table below the root) and its control pages.
"""

from .kvm.spte import spte_to_pfn


def check_vm(kvm):
    problems = []
    tdp = kvm.tdp_mmu
    for root in tdp.roots:
        if root.invalid:
            continue
        for sptep, level in tdp.removed_sptes(root):
            problems.append(f"{'mirror' if root.is_mirror else 'direct'} root: SPTE at {sptep:#x} "
                            f"(level {level}) left REMOVED")
        for gfn, level, spte in tdp.leaves(root):
            slot = kvm.gfn_to_memslot(gfn)
            if slot is None:
                continue                     # MMIO SPTEs are not leaves (not present)
            base = slot.gmem_addr if root.is_mirror else slot.userspace_addr
            want = (base >> 12) + gfn - slot.base_gfn
            if spte_to_pfn(spte) != want:
                problems.append(f"gfn {gfn:#x} maps pfn {spte_to_pfn(spte):#x}, its backing is pfn {want:#x}")
    if kvm.has_mirrored_tdp:
        problems += check_mirror_sept(kvm)
    return problems


def check_mirror_sept(kvm):
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
        for gfn, level, spte in kvm.tdp_mmu.leaves(mirror):
            mirror_leaves[gfn << 12] = (level, spte_to_pfn(spte) << 12)
    sept_leaves = {}
    for gpa, lvl, state, hpa in mod.sept_leaves(td):
        sept_leaves[gpa] = (lvl + 1, hpa)
        if state not in (S.SEPT_MAPPED, S.SEPT_PENDING):
            problems.append(f"S-EPT leaf gpa {gpa:#x} in state {S.STATE_NAMES.get(state, state)} at quiescence")
    for gpa in sorted(set(mirror_leaves) | set(sept_leaves)):
        m, s = mirror_leaves.get(gpa), sept_leaves.get(gpa)
        if m != s:
            problems.append(f"gpa {gpa:#x}: mirror {_fmt(m)} but S-EPT {_fmt(s)}")
    # Tables: every S-EPT table below the root is some mirror SP's external page.
    ext = {sp.external_spt for sp in kvm.tdp_mmu.sp_of.values() if sp.is_mirror and sp.external_spt}
    for gpa, lvl, child in mod.sept_tables(td):
        if child not in ext:
            problems.append(f"S-EPT table {child:#x} (gpa {gpa:#x}, level {lvl}) has no mirror page")
    # PAMT: the TD's pages and nothing else.
    owned = mod.pamt.owned_pages(td.tdr)
    regs = {hpa for hpa, pt, _ in owned if pt == PT_REG}
    epts = {hpa for hpa, pt, _ in owned if pt == PT_EPT}
    want_regs = {hpa for _, hpa in sept_leaves.values()}
    if regs != want_regs:
        problems.append(f"PAMT: {len(regs)} PT_REG pages, the S-EPT maps {len(want_regs)}")
    if epts != {c for _, _, c in mod.sept_tables(td)}:
        problems.append(f"PAMT: {len(epts)} PT_EPT pages, the S-EPT has {len(mod.sept_tables(td))} tables")
    if td.chldcnt != len(owned) - 1:
        problems.append(f"TDR child count {td.chldcnt}, PAMT owns {len(owned) - 1} pages besides the TDR")
    return problems


def _fmt(x):
    if x is None:
        return "nothing"
    level, hpa = x
    return f"{('4K', '2M', '1G')[level - 1] if level <= 3 else level} -> {hpa:#x}"


def check_pamt_empty(module):
    """After every TD is destroyed: no page owned in the PAMT."""
    owned = module.pamt.owned_pages()
    return [f"PAMT still owns {len(owned)} pages, e.g. {owned[0][0]:#x}"] if owned else []
