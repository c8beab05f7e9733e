"""Table dumps: what KVM's roots and (for a TD) the S-EPT map, one line per mapped GPA.

For a TD the three tables stand side by side: the mirror root, the S-EPT (with
each entry's TDX state) and the shared EPT (KVM's direct root, GPAs with the
shared bit).  A private GPA's mirror and S-EPT columns must agree.
"""

from .kvm.spte import spte_str

LEVEL_NAMES = {1: "4K", 2: "2M", 3: "1G"}


def _leaves(kvm, mirror):
    out = {}
    for root in kvm.tdp_mmu.roots:
        if root.invalid or root.is_mirror != mirror:
            continue
        for gfn, level, spte in kvm.tdp_mmu.leaves(root):
            out[gfn << 12] = (level, spte)
    return out


def _col(x):
    if x is None:
        return "-"
    level, spte = x
    return f"{LEVEL_NAMES.get(level, level)} {spte_str(spte)}"


def dump_tables(kvm, gpa_start=0, gpa_end=None):
    """The mappings of [gpa_start, gpa_end) as text."""

    def wanted(gpa):
        return gpa >= gpa_start and (gpa_end is None or gpa < gpa_end)

    direct = _leaves(kvm, False)
    if not kvm.has_mirrored_tdp:
        lines = [f"{'GPA':<16}EPT (KVM's root)"]
        for gpa in sorted(g for g in direct if wanted(g)):
            lines.append(f"{gpa:#016x}  {_col(direct[gpa])}")
        return "\n".join(lines)

    from tdxmod import sept as S

    mod = kvm.x86_ops.module
    td = mod.tds.get(kvm.tdx.tdr_pa)
    mirror = _leaves(kvm, True)
    sept = {}
    if td is not None:
        for gpa, lvl, state, hpa in mod.sept_leaves(td):
            sept[gpa] = f"{LEVEL_NAMES.get(lvl + 1)} {S.STATE_NAMES.get(state, state)} pfn {hpa >> 12:#x}"
    shared_bit = kvm.gfn_direct_bits << 12
    lines = [
        f"TD: shared bit {shared_bit:#x}; private GPAs: mirror root and S-EPT; shared: KVM's direct root",
        f"{'GPA':<16}{'mirror root':<34}{'S-EPT':<28}shared EPT (GPA | shared bit)",
    ]
    for gpa in sorted(g for g in set(mirror) | set(sept) | set(direct) if wanted(g)):
        lines.append(f"{gpa:#016x}  {_col(mirror.get(gpa)):<32}  {sept.get(gpa, '-'):<26}  {_col(direct.get(gpa))}")
    return "\n".join(lines)
