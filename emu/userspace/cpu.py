"""The vCPU model the VMM gives KVM_SET_CPUID2: QEMU's ``-cpu host`` on this host.

The host is a Sapphire Rapids part (Xeon Platinum 8480+: family 6, model 0x8F, stepping 8;
QEMU's own "SapphireRapids" model, target/i386/cpu.c, lists the same identity), so the guest
sees its vendor, signature, brand string, caches (48K L1d, 32K L1i, 2M L2, 105M L3) and
topology.  Like ``-cpu host``, the features are those the host's CPU executes and KVM
supports: here the CPU is the emulated one (Unicorn's TCG, QEMU 5.0), so features it has no
instructions for (AVX, AVX2, AVX-512, AMX, FMA, SHA, GFNI, VAES) are left out, and so are
those the model's hardware walker or KVM does not implement (SMEP, SMAP, PKU, LA57, PCID,
MTRRs, MCA, x2APIC: there is no local APIC).  The address widths are the walkers' (48/48,
CPUID.80000008H).  KVM's leaves 0x40000000/0x40000001 come from KVM_GET_SUPPORTED_CPUID.
docs/exits.md lists the table.
"""

from ..kvm.cpuid import KvmCpuidEntry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_get_supported_cpuid

MAX_BASIC_LEAF = 0x20
MAX_EXTENDED_LEAF = 0x80000008
SIGNATURE = 0x000806F8                       # family 6, model 0x8F (extended model 8), stepping 8
BRAND = b"Intel(R) Xeon(R) Platinum 8480+"

# Feature bits by (leaf, subleaf, register)
LEAF1_ECX = (1 << 0 | 1 << 1 | 1 << 9 | 1 << 13 | 1 << 19 | 1 << 20 | 1 << 22 | 1 << 23 | 1 << 25 | 1 << 26 |
             1 << 30 | 1 << 31)
# SSE3 PCLMULQDQ SSSE3 CX16 SSE4.1 SSE4.2 MOVBE POPCNT AES XSAVE RDRAND HYPERVISOR (OSXSAVE: KVM's)
LEAF1_EDX = (1 << 0 | 1 << 1 | 1 << 2 | 1 << 3 | 1 << 4 | 1 << 5 | 1 << 6 | 1 << 7 | 1 << 8 | 1 << 9 | 1 << 11 |
             1 << 13 | 1 << 15 | 1 << 16 | 1 << 17 | 1 << 19 | 1 << 23 | 1 << 24 | 1 << 25 | 1 << 26 | 1 << 27)
# FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP PGE CMOV PAT PSE36 CLFLUSH MMX FXSR SSE SSE2 SS (HTT: SMP)
LEAF7_EBX = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 8 | 1 << 9 | 1 << 18 | 1 << 19 | 1 << 23 | 1 << 24
# FSGSBASE TSC_ADJUST BMI1 BMI2 ERMS RDSEED ADX CLFLUSHOPT CLWB
LEAF7_ECX = 1 << 22                          # RDPID
LEAF7_EDX = 1 << 4 | 1 << 29                 # FSRM ARCH_CAPABILITIES
LEAF7_1_EAX = 1 << 10 | 1 << 11 | 1 << 12    # FZRM FSRS FSRC (string-move hints)
EXT1_ECX = 1 << 0 | 1 << 5 | 1 << 8          # LAHF_LM ABM (LZCNT) 3DNOWPREFETCH (PREFETCHW)
EXT1_EDX = 1 << 11 | 1 << 20 | 1 << 26 | 1 << 27 | 1 << 29   # SYSCALL NX PDPE1GB RDTSCP LM
# IA32_ARCH_CAPABILITIES the VMM sets (QEMU's SapphireRapids model): RDCL_NO, IBRS_ALL,
# SKIP_L1DFL_VMENTRY, MDS_NO, PSCHANGE_MC_NO, TAA_NO
ARCH_CAPABILITIES = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 5 | 1 << 6 | 1 << 8

# Deterministic cache parameters (leaf 4): (type, level, ways, sets, shared by every vCPU)
CACHES = ((1, 1, 12, 64, False), (2, 1, 8, 64, False), (3, 2, 16, 2048, False), (3, 3, 15, 114688, True))


def _le(b):
    return int.from_bytes(b.ljust(4, b"\0")[:4], "little")


def cpuid_host(vcpu_index, nvcpus):
    """The CPUID table of vCPU ``vcpu_index`` of ``nvcpus`` (each vCPU a core of one package)."""
    E = KvmCpuidEntry2
    IDX = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    core_bits = max(nvcpus - 1, 0).bit_length()
    entries = [
        E(0, eax=MAX_BASIC_LEAF, ebx=_le(b"Genu"), edx=_le(b"ineI"), ecx=_le(b"ntel")),
        E(1, eax=SIGNATURE, ebx=(8 << 8) | (nvcpus << 16 if nvcpus > 1 else 0) | (vcpu_index << 24),
          ecx=LEAF1_ECX, edx=LEAF1_EDX | (1 << 28 if nvcpus > 1 else 0)),
        E(2, eax=0x00FEFF01, ebx=0xF0),
    ]
    for i, (ctype, level, ways, sets, shared) in enumerate(CACHES):
        threads = (1 << core_bits) if shared else 1
        entries.append(E(4, i, IDX, eax=ctype | level << 5 | 1 << 8 | (threads - 1) << 14 |
                         ((1 << core_bits) - 1) << 26, ebx=(ways - 1) << 22 | 63, ecx=sets - 1))
    entries.append(E(4, len(CACHES), IDX))
    entries += [
        E(6, eax=1 << 2),                                            # ARAT
        E(7, 0, IDX, eax=1, ebx=LEAF7_EBX, ecx=LEAF7_ECX, edx=LEAF7_EDX),
        E(7, 1, IDX, eax=LEAF7_1_EAX),
        E(0xB, 0, IDX, eax=0, ebx=1, ecx=0 | 1 << 8, edx=vcpu_index),
        E(0xB, 1, IDX, eax=core_bits, ebx=nvcpus, ecx=1 | 2 << 8, edx=vcpu_index),
        E(0xB, 2, IDX, ecx=2, edx=vcpu_index),
        E(0xD, 0, IDX, eax=0x3, ebx=576, ecx=576),                  # XCR0: x87, SSE
        E(0xD, 1, IDX, eax=1 << 0 | 1 << 2),                        # XSAVEOPT, XGETBV1
        E(0x80000000, eax=MAX_EXTENDED_LEAF),
        E(0x80000001, ecx=EXT1_ECX, edx=EXT1_EDX),
    ]
    brand = BRAND.ljust(48, b"\0")
    for k in range(3):
        chunk = brand[16 * k:16 * (k + 1)]
        entries.append(E(0x80000002 + k, eax=_le(chunk[0:4]), ebx=_le(chunk[4:8]), ecx=_le(chunk[8:12]),
                         edx=_le(chunk[12:16])))
    entries += [
        E(0x80000006, ecx=2048 << 16 | 0x8 << 12 | 64),             # L2: 2M, 16-way, 64-byte lines
        E(0x80000007, edx=1 << 8),                                   # invariant TSC
    ]
    for (function, index), regs in sorted(kvm_get_supported_cpuid().items()):
        entries.append(E(function, index, 0, *regs))
    return entries
