"""Table dumps: what KVM's roots (and, for a TD, the S-EPT) map, one line per mapping."""

from .kvm.spte import spte_str, spte_to_pfn

LEVEL_NAMES = {1: "4K", 2: "2M", 3: "1G"}


def dump_tables(kvm, gfn_start=0, gfn_end=None):
    lines = []
    for root in kvm.tdp_mmu.roots:
        kind = "mirror" if root.is_mirror else "direct"
        if root.invalid:
            continue
        lines.append(f"{kind} root (spt {root.spt:#x}, level {root.role_level}):")
        for gfn, level, spte in kvm.tdp_mmu.leaves(root):
            if gfn < gfn_start or (gfn_end is not None and gfn >= gfn_end):
                continue
            lines.append(f"  gpa {gfn << 12:#014x} {LEVEL_NAMES.get(level, level):>2} -> hpa "
                         f"{spte_to_pfn(spte) << 12:#014x}  {spte_str(spte)}")
    return "\n".join(lines)
