"""The emulated CPU's own CPUID: what CPUID returns on the host, before any hypervisor answers it.

The CPU is a Sapphire Rapids part (Xeon Platinum 8480+: family 6, model 0x8F, stepping 8; QEMU's
"SapphireRapids" model, target/i386/cpu.c, has the same identity): its vendor, signature, brand
string, caches (48K L1d, 32K L1i, 2M L2, 105M L3) and leaves.  Its features are those the
emulated CPU has: Unicorn's TCG (QEMU 5.0) executes no AVX, AVX2, AVX-512, AMX, FMA, SHA, GFNI or
VAES, and the model's walkers and CPU implement no SMEP, SMAP, PKU, LA57, PCID, MTRRs, MCA or
local APIC, so those bits are clear.  The address widths are the walkers' (48/48, 80000008H).
KVM builds KVM_GET_SUPPORTED_CPUID from it (emu.kvm.cpuid), the TDX module its virtualized
CPUID (tdxmod.td_cpuid), the VMM its -cpu host table (emu.userspace.cpu).  docs/exits.md lists
the table.
"""

from .ept import MAXPHYADDR
from .msr import VIRT_ADDR_BITS


MAX_BASIC_LEAF = 0x20
MAX_EXTENDED_LEAF = 0x80000008
SIGNATURE = 0x000806F8  # family 6, model 0x8F (extended model 8), stepping 8
BRAND = b"Intel(R) Xeon(R) Platinum 8480+"

# Feature bits by (leaf, subleaf, register)
LEAF1_ECX = 1 << 0 | 1 << 1 | 1 << 9 | 1 << 13 | 1 << 19 | 1 << 20 | 1 << 22 | 1 << 23 | 1 << 25 | 1 << 26 | 1 << 30
# SSE3 PCLMULQDQ SSSE3 CX16 SSE4.1 SSE4.2 MOVBE POPCNT AES XSAVE RDRAND (OSXSAVE: CR4's)
LEAF1_EDX = (
    1 << 0
    | 1 << 1
    | 1 << 2
    | 1 << 3
    | 1 << 4
    | 1 << 5
    | 1 << 6
    | 1 << 7
    | 1 << 8
    | 1 << 9
    | 1 << 11
    | 1 << 13
    | 1 << 15
    | 1 << 16
    | 1 << 17
    | 1 << 19
    | 1 << 23
    | 1 << 24
    | 1 << 25
    | 1 << 26
    | 1 << 27
)
# FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP PGE CMOV PAT PSE36 CLFLUSH MMX FXSR SSE SSE2 SS
LEAF7_EBX = 1 << 0 | 1 << 3 | 1 << 8 | 1 << 9 | 1 << 18 | 1 << 19 | 1 << 23 | 1 << 24
# FSGSBASE BMI1 BMI2 ERMS RDSEED ADX CLFLUSHOPT CLWB
LEAF7_ECX = 1 << 22  # RDPID
LEAF7_EDX = 1 << 4  # FSRM
LEAF7_1_EAX = 1 << 10 | 1 << 11 | 1 << 12  # FZRM FSRS FSRC (string-move hints)
EXT1_ECX = 1 << 0 | 1 << 5 | 1 << 8  # LAHF_LM ABM (LZCNT) 3DNOWPREFETCH (PREFETCHW)
EXT1_EDX = 1 << 11 | 1 << 20 | 1 << 26 | 1 << 27 | 1 << 29  # SYSCALL NX PDPE1GB RDTSCP LM

# Deterministic cache parameters (leaf 4): (type, level, ways, sets, shared by every vCPU)
CACHES = ((1, 1, 12, 64, False), (2, 1, 8, 64, False), (3, 2, 16, 2048, False), (3, 3, 15, 114688, True))


def _le(b):
    return int.from_bytes(b.ljust(4, b"\0")[:4], "little")


INDEXED_LEAVES = frozenset((4, 7, 0xB, 0xD))  # leaves whose ECX selects a subleaf


def native_cpuid_table(apic_id=0):
    """(leaf, subleaf) -> (eax, ebx, ecx, edx) of the CPU with this x2APIC id (one logical CPU per
    core as far as CPUID tells; subleaf 0 for the leaves that take none)."""
    t = {
        (0, 0): (MAX_BASIC_LEAF, _le(b"Genu"), _le(b"ntel"), _le(b"ineI")),
        (1, 0): (SIGNATURE, 8 << 8 | apic_id << 24, LEAF1_ECX, LEAF1_EDX),
        (2, 0): (0x00FEFF01, 0xF0, 0, 0),
    }
    for i, (ctype, level, ways, sets, _shared) in enumerate(CACHES):
        t[(4, i)] = (ctype | level << 5 | 1 << 8, (ways - 1) << 22 | 63, sets - 1, 0)
    t[(4, len(CACHES))] = (0, 0, 0, 0)
    t.update(
        {
            (6, 0): (1 << 2, 0, 0, 0),  # ARAT
            (7, 0): (1, LEAF7_EBX, LEAF7_ECX, LEAF7_EDX),
            (7, 1): (LEAF7_1_EAX, 0, 0, 0),
            (0xB, 0): (0, 1, 0 | 1 << 8, apic_id),
            (0xB, 1): (0, 1, 1 | 2 << 8, apic_id),
            (0xB, 2): (0, 0, 2, apic_id),
            (0xD, 0): (0x3, 576, 576, 0),  # XCR0: x87, SSE
            (0xD, 1): (1 << 0 | 1 << 2, 0, 0, 0),  # XSAVEOPT, XGETBV1
            (0x80000000, 0): (MAX_EXTENDED_LEAF, 0, 0, 0),
            (0x80000001, 0): (0, 0, EXT1_ECX, EXT1_EDX),
        }
    )
    brand = BRAND.ljust(48, b"\0")
    for k in range(3):
        c = brand[16 * k : 16 * (k + 1)]
        t[(0x80000002 + k, 0)] = (_le(c[0:4]), _le(c[4:8]), _le(c[8:12]), _le(c[12:16]))
    t[(0x80000006, 0)] = (0, 0, 2048 << 16 | 0x8 << 12 | 64, 0)  # L2: 2M, 16-way, 64-byte lines
    t[(0x80000007, 0)] = (0, 0, 0, 1 << 8)  # invariant TSC
    t[(0x80000008, 0)] = (MAXPHYADDR | VIRT_ADDR_BITS << 8, 0, 0, 0)
    return t


def native_cpuid(leaf, subleaf, apic_id=0):
    """CPUID on the bare CPU: a leaf above its range's maximum reads as the maximum basic leaf
    (Intel); a leaf the CPU has not is zeros."""
    t = native_cpuid_table(apic_id)
    sub = subleaf if leaf in INDEXED_LEAVES else 0
    if (leaf, sub) in t:
        return t[(leaf, sub)]
    top = MAX_EXTENDED_LEAF if leaf & 0x80000000 else MAX_BASIC_LEAF
    if leaf > top or 0x40000000 <= leaf < 0x80000000:
        return t.get((MAX_BASIC_LEAF, subleaf), (0, 0, 0, 0))
    return (0, 0, 0, 0)
