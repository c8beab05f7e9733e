"""The vCPU model the VMM gives KVM_SET_CPUID2: QEMU's ``-cpu host``.

It is KVM_GET_SUPPORTED_CPUID (the host CPU's leaves, emu.hw.cpuid: a Sapphire Rapids part, with
the features the emulated CPU has), with what QEMU adds per vCPU: the HYPERVISOR bit, the
initial APIC id and logical count in leaf 1, the topology of ``-smp N`` (N cores of one
thread) in leaves 4 and 0xB.  x2APIC is kept for a TD only (KVM requires it there: the TD's
local APIC is in x2APIC mode; a plain VM of this model has no local APIC to put in it).
docs/exits.md lists the table.
"""

from ..kvm.cpuid import kvm_get_supported_cpuid

# IA32_ARCH_CAPABILITIES the VMM sets (QEMU's SapphireRapids model): RDCL_NO, IBRS_ALL,
# SKIP_L1DFL_VMENTRY, MDS_NO, PSCHANGE_MC_NO, TAA_NO
ARCH_CAPABILITIES = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 5 | 1 << 6 | 1 << 8
CPUID_EXT_HYPERVISOR, CPUID_EXT_X2APIC, CPUID_HTT = 1 << 31, 1 << 21, 1 << 28


def cpuid_host(vcpu_index, nvcpus, td=False):
    """The CPUID table of vCPU ``vcpu_index`` of ``nvcpus`` (each vCPU a core of one package)."""
    core_bits = max(nvcpus - 1, 0).bit_length()
    entries = kvm_get_supported_cpuid()
    for e in entries:
        if e.function == 1:
            e.ebx |= vcpu_index << 24 | (nvcpus << 16 if nvcpus > 1 else 0)
            e.ecx |= CPUID_EXT_HYPERVISOR
            if not td:
                e.ecx &= ~CPUID_EXT_X2APIC
            if nvcpus > 1:
                e.edx |= CPUID_HTT
        elif e.function == 4 and e.eax:
            shared = (e.eax >> 5 & 7) == 3  # the L3: every core of the package
            e.eax |= ((1 << core_bits) - 1 if shared else 0) << 14 | ((1 << core_bits) - 1) << 26
        elif e.function == 0xB:
            e.edx = vcpu_index
            if e.index == 1:
                e.eax, e.ebx = core_bits, nvcpus
    return entries
