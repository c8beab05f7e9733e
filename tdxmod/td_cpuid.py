"""CPUID in a TD (src/td_dispatcher/vm_exits/td_cpuid.c, include/auto_gen/cpuid_configurations.c).

The module answers the leaves of its CPUID table itself; a leaf not in the table, or marked
faulting (6, 0x1F, 0x80000006), is a #VE (exit reason 10) that the guest answers with
TDG.VP.VMCALL<Instruction.CPUID>, i.e. from the VMM's table (KVM's kvm_cpuid()).  The hypervisor
range 0x40000000-0x4FFFFFFF is never in the table.  A leaf above the last basic leaf (0x23) or
the CPU's last extended leaf reads as leaf 0x23.

Values: the CPU's own CPUID (emu.hw.cpuid), with the table's fixed-0 and dynamic bits cleared
and its fixed-1 bits set (TDH.MNG.INIT's computation, without the configurable bits the VMM may
choose in TD_PARAMS: the model keeps the CPU's value for them), then the dynamic ones: the
vCPU index as the initial APIC id, OSXSAVE and OSPKE from CR4, SYSCALL in 64-bit mode.
"""

from emu.hw.cpuid import native_cpuid, MAX_EXTENDED_LEAF

CPUID_LAST_BASE_LEAF = 0x23
CPUID_RESERVED_START, CPUID_RESERVED_END = 0x40000000, 0x4FFFFFFF
CPUID_MAX_EXTENDED_VAL_LEAF = 0x80000000
NA = None  # CPUID_SUBLEAF_NA: the leaf has no subleaves


def _r(eax=0, ebx=0, ecx=0, edx=0):
    return (eax, ebx, ecx, edx)


# (leaf, subleaf) -> (faulting, fixed1, fixed0_or_dynamic), cpuid_configurations.c of tdx_1.5
CPUID_LOOKUP = {
    (0x0, NA): (False, _r(eax=0x23), _r(eax=0xFFFFFFDC)),
    (0x1, NA): (False, _r(ecx=0x80000000, edx=0x200), _r(0xF000C000, 0xFF0000FF, 0x8010060, 0x40120400)),
    (0x3, NA): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    (0x4, 0): (False, _r(), _r(eax=0x3C00, edx=0x4)),
    (0x4, 1): (False, _r(), _r(eax=0x3C00, edx=0x4)),
    (0x4, 2): (False, _r(), _r(eax=0x3C00, edx=0x4)),
    (0x4, 3): (False, _r(), _r(eax=0x3C00, edx=0xFFFFFFF8)),
    (0x4, 4): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    (0x5, NA): (False, _r(), _r(0xFFFF0000, 0xFFFF0000, 0xFFFFFFFC)),
    (0x6, NA): (True, _r(), _r()),
    (0x7, 0): (False, _r(), _r(ebx=0x404006, ecx=0x643E8010, edx=0x2298C3)),
    (0x7, 1): (False, _r(), _r(0xFFFFE2CF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    (0x7, 2): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFC0)),
    (0x8, NA): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    (0xA, NA): (False, _r(), _r(edx=0xFFFF6000)),
    (0xD, 0): (False, _r(), _r(eax=0xFFF9FD18, ebx=0xFFFFFFFF, edx=0xFFFFFFFF)),
    (0xD, 1): (False, _r(), _r(0xFFFFFFE0, 0xFFFFFFFF, 0xFFFF26FF, 0xFFFFFFFF)),
    **{(0xD, k): (False, _r(), _r(edx=0xFFFFFFFF)) for k in range(2, 0x13)},
    (0xE, NA): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    (0x11, NA): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    (0x12, NA): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    (0x13, NA): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    (0x14, 0): (False, _r(), _r(ebx=0xFFFFFE00, ecx=0x7FFFFFF0, edx=0xFFFFFFFF)),
    (0x14, 1): (False, _r(), _r(eax=0xFFF8, ecx=0xFFFFFFFF, edx=0xFFFFFFFF)),
    (0x15, NA): (False, _r(eax=0x1, ecx=0x17D7840), _r(eax=0xFFFFFFFE, ecx=0xFE8287BF, edx=0xFFFFFFFF)),
    (0x19, NA): (False, _r(), _r(0xFFFFFFF8, 0xFFFFFFEB, 0xFFFFFFFD, 0xFFFFFFFF)),
    (0x1C, NA): (False, _r(), _r()),
    (0x1D, 0): (False, _r(), _r()),
    (0x1D, 1): (False, _r(), _r()),
    (0x1E, NA): (False, _r(), _r()),
    **{(0x1F, k): (True, _r(), _r()) for k in range(6)},
    (0x20, NA): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    # "IntelTDX    ": EBX, EDX, ECX (Linux's tdx_early_init() looks for it)
    (0x21, 0): (False, _r(0, 0x65746E49, 0x20202020, 0x5844546C), _r(0xFFFFFFFF, 0x9A8B91B6, 0xDFDFDFDF, 0xA7BBAB93)),
    (0x22, NA): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    (0x23, 0): (False, _r(), _r(eax=0xFFFFFFF0, ecx=0xFFFFFFFF, edx=0xFFFFFFFF)),
    (0x23, 1): (False, _r(), _r(ecx=0xFFFFFFFF, edx=0xFFFFFFFF)),
    (0x23, 2): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    (0x23, 3): (False, _r(), _r(ebx=0xFFFFFFFF, ecx=0xFFFFFFFF, edx=0xFFFFFFFF)),
    (0x80000000, NA): (False, _r(eax=0x80000008), _r(0x7FFFFFF7, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF)),
    (0x80000001, NA): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFEDE, 0xD3EFFFFF)),
    (0x80000006, NA): (True, _r(), _r()),
    (0x80000007, NA): (False, _r(), _r(0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFEFF)),
    (0x80000008, NA): (False, _r(), _r(0xFFFF0000, 0xFFFFFDFF, 0xFFFFFFFF, 0xFFFFFFFF)),
}
X86_CR4_OSXSAVE, X86_CR4_PKE = 1 << 18, 1 << 22


def get_cpuid_lookup_entry(leaf, subleaf):
    """The table's entry for (leaf, subleaf): a leaf without subleaves matches any; None if absent."""
    e = CPUID_LOOKUP.get((leaf, NA))
    if e is not None:
        return e
    return CPUID_LOOKUP.get((leaf, subleaf))


def td_cpuid_value(v, hw, leaf, subleaf, entry):
    """cpuid_config_vals[] with the dynamic adjustments of td_cpuid_exit()."""
    _fault, fixed1, fixed0 = entry
    native = native_cpuid(leaf, subleaf)
    eax, ebx, ecx, edx = ((n & ~f0 | f1) & 0xFFFFFFFF for n, f0, f1 in zip(native, fixed0, fixed1))
    if leaf == 1:
        ebx = ebx & ~0xFF000000 | (v.vcpu_index & 0xFF) << 24  # INITIAL_APIC_ID = VCPU_INDEX
        ecx = ecx & ~(1 << 27) | (1 << 27 if hw.reg("cr4") & X86_CR4_OSXSAVE else 0)
    elif leaf == 7 and subleaf == 0:
        ecx = ecx & ~(1 << 4) | (1 << 4 if hw.reg("cr4") & X86_CR4_PKE else 0)
    elif leaf == 0xD and subleaf <= 1:
        ebx = native[1]  # the CPU's XSAVE size
    elif leaf == 0x80000001:
        edx |= 1 << 11  # SYSCALL: the TD is in 64-bit mode
    return eax, ebx, ecx, edx


def td_cpuid_exit(v, hw, ex):
    """td_cpuid_exit(): the module's answer (RIP past the CPUID) and False, or True when the
    leaf is a #VE (the dispatcher injects it: tdx_inject_ve(VMEXIT_REASON_CPUID_INSTRUCTION))."""
    leaf = hw.reg("rax") & 0xFFFFFFFF
    subleaf = hw.reg("rcx") & 0xFFFFFFFF
    if not CPUID_RESERVED_START <= leaf <= CPUID_RESERVED_END and (
        leaf > MAX_EXTENDED_LEAF or CPUID_LAST_BASE_LEAF < leaf < CPUID_MAX_EXTENDED_VAL_LEAF
    ):
        leaf = CPUID_LAST_BASE_LEAF
    entry = get_cpuid_lookup_entry(leaf, subleaf)
    if entry is None or entry[0]:
        return True
    eax, ebx, ecx, edx = td_cpuid_value(v, hw, leaf, subleaf, entry)
    hw.set_regs({"rax": eax, "rbx": ebx, "rcx": ecx, "rdx": edx, "rip": ex.rip + ex.insn_len})
    return False
