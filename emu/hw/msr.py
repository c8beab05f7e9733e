"""Model-specific registers as the emulated CPU has them: their numbers (Linux's
arch/x86/include/asm/msr-index.h names), the VMCS MSR bitmap (SDM Vol. 3C "MSR-Bitmap Address"),
and the CPU's own checks on the MSRs it keeps in its state.

The MSR bitmap is one 4 KiB page: read bitmap for MSRs 0x00000000-0x00001FFF at byte 0, read
bitmap for 0xC0000000-0xC0001FFF at 1024, the two write bitmaps at 2048 and 3072.  A set bit
makes RDMSR/WRMSR of that MSR a VM exit; an MSR outside both ranges always exits, and so does
every MSR when the "use MSR bitmaps" control is 0 (``Vcpu.msr_bitmap`` None).
"""

MSR_IA32_TSC = 0x10
MSR_IA32_PLATFORM_ID = 0x17
MSR_IA32_APICBASE = 0x1B
MSR_EBL_CR_POWERON = 0x2A
MSR_IA32_FEAT_CTL = 0x3A
MSR_IA32_TSC_ADJUST = 0x3B
MSR_IA32_UCODE_REV = 0x8B
MSR_IA32_ARCH_CAPABILITIES = 0x10A
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_CR_PAT = 0x277
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
APIC_BASE_MSR = 0x800  # the x2APIC registers: 0x800-0x8FF

MSR_NAMES = {
    MSR_IA32_TSC: "IA32_TSC",
    MSR_IA32_PLATFORM_ID: "IA32_PLATFORM_ID",
    MSR_IA32_APICBASE: "IA32_APICBASE",
    MSR_EBL_CR_POWERON: "EBL_CR_POWERON",
    MSR_IA32_FEAT_CTL: "IA32_FEAT_CTL",
    MSR_IA32_TSC_ADJUST: "IA32_TSC_ADJUST",
    MSR_IA32_UCODE_REV: "IA32_UCODE_REV",
    MSR_IA32_ARCH_CAPABILITIES: "IA32_ARCH_CAPABILITIES",
    MSR_IA32_SYSENTER_CS: "IA32_SYSENTER_CS",
    MSR_IA32_SYSENTER_ESP: "IA32_SYSENTER_ESP",
    MSR_IA32_SYSENTER_EIP: "IA32_SYSENTER_EIP",
    MSR_IA32_MISC_ENABLE: "IA32_MISC_ENABLE",
    MSR_IA32_CR_PAT: "IA32_CR_PAT",
    MSR_EFER: "EFER",
    MSR_STAR: "STAR",
    MSR_LSTAR: "LSTAR",
    MSR_CSTAR: "CSTAR",
    MSR_SYSCALL_MASK: "SYSCALL_MASK",
    MSR_FS_BASE: "FS_BASE",
    MSR_GS_BASE: "GS_BASE",
    MSR_KERNEL_GS_BASE: "KERNEL_GS_BASE",
    MSR_TSC_AUX: "TSC_AUX",
}


def msr_name(index):
    return MSR_NAMES.get(index, f"MSR {index:#x}")


# EFER bits
EFER_SCE, EFER_LME, EFER_LMA, EFER_NX = 1 << 0, 1 << 8, 1 << 10, 1 << 11

# MSRs whose value the CPU checks for a canonical address on WRMSR (SDM WRMSR: #GP(0)); also
# what KVM checks before it writes them (__kvm_set_msr()).
CANONICAL_MSRS = frozenset(
    (MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_CSTAR, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP)
)
VIRT_ADDR_BITS = 48  # the linear-address width the paging walker implements


def is_canonical(addr, bits=VIRT_ADDR_BITS):
    """Bits 63:bits-1 all equal (SDM "Canonical Addressing")."""
    top = (addr & ((1 << 64) - 1)) >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


MSR_TYPE_R, MSR_TYPE_W = 1, 2
MSR_TYPE_RW = MSR_TYPE_R | MSR_TYPE_W
_HIGH_BASE = 0xC0000000


def _bit(index, write):
    """(byte offset, bit) of ``index`` in the bitmap page; None outside both ranges."""
    if index < 0x2000:
        base = 0
    elif _HIGH_BASE <= index < _HIGH_BASE + 0x2000:
        base, index = 1024, index - _HIGH_BASE
    else:
        return None
    return base + (2048 if write else 0) + (index >> 3), index & 7


class MsrBitmap:
    """The VMCS MSR bitmap: a 4 KiB page, every bit set (every MSR intercepted) to begin with."""

    def __init__(self):
        self.page = bytearray(b"\xff" * 4096)

    def intercepted(self, index, write):
        where = _bit(index, write)
        if where is None:
            return True
        off, bit = where
        return bool(self.page[off] >> bit & 1)

    def set_intercept(self, index, types, intercept):
        """vmx_{enable,disable}_intercept_for_msr(): set or clear the read and/or write bit."""
        for write, t in ((False, MSR_TYPE_R), (True, MSR_TYPE_W)):
            if types & t:
                where = _bit(index, write)
                if where is None:
                    raise ValueError(f"MSR {index:#x} is outside the MSR bitmap's ranges")
                off, bit = where
                if intercept:
                    self.page[off] |= 1 << bit
                else:
                    self.page[off] &= ~(1 << bit) & 0xFF
