"""The guest's CPUID (arch/x86/kvm/cpuid.c): the table userspace sets with KVM_SET_CPUID2, the
lookup with Intel's out-of-range rule (kvm_cpuid(), get_out_of_range_cpuid_entry()), the bits KVM
keeps current (kvm_update_cpuid_runtime()), CPUID exits (kvm_emulate_cpuid()), and what KVM offers
(KVM_GET_SUPPORTED_CPUID: the emulated CPU's features, KVM's signature leaves).
"""

from .kvm_host import KvmIoctlError, EINVAL

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0          # (sic, uapi spelling)
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_FEATURE_NOP_IO_DELAY = 1
EBUSY = 16

# Feature bits (leaf, subleaf, register, bit) KVM reads or keeps current (cpufeatures.h)
X86_FEATURE_OSXSAVE = (1, 0, "ecx", 27)
X86_FEATURE_X2APIC = (1, 0, "ecx", 21)
X86_FEATURE_APIC = (1, 0, "edx", 9)
X86_FEATURE_XMM3 = (1, 0, "ecx", 0)
X86_FEATURE_TSC_ADJUST = (7, 0, "ebx", 1)
X86_FEATURE_OSPKE = (7, 0, "ecx", 4)
X86_FEATURE_ARCH_CAPABILITIES = (7, 0, "edx", 29)
X86_FEATURE_RDPID = (7, 0, "ecx", 22)
X86_FEATURE_NX = (0x80000001, 0, "edx", 20)
X86_FEATURE_LM = (0x80000001, 0, "edx", 29)
X86_FEATURE_RDTSCP = (0x80000001, 0, "edx", 27)
X86_CR4_OSXSAVE, X86_CR4_PKE = 1 << 18, 1 << 22
MSR_IA32_APICBASE_ENABLE = 1 << 11


class KvmCpuidEntry2:
    """struct kvm_cpuid_entry2"""
    __slots__ = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")

    def __init__(self, function, index=0, flags=0, eax=0, ebx=0, ecx=0, edx=0):
        self.function, self.index, self.flags = function, index, flags
        self.eax, self.ebx, self.ecx, self.edx = eax, ebx, ecx, edx

    def copy(self):
        return KvmCpuidEntry2(self.function, self.index, self.flags, self.eax, self.ebx, self.ecx, self.edx)

    def regs(self):
        return self.eax, self.ebx, self.ecx, self.edx

    def __eq__(self, other):
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    def __repr__(self):
        return (f"KvmCpuidEntry2({self.function:#x}.{self.index:#x} eax {self.eax:#x} ebx {self.ebx:#x} "
                f"ecx {self.ecx:#x} edx {self.edx:#x})")


def kvm_find_cpuid_entry2(entries, function, index=None):
    """The first entry for ``function`` whose index matches, or that has no significant index."""
    for e in entries:
        if e.function != function:
            continue
        if not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX or index is None or e.index == index:
            return e
    return None


def kvm_get_supported_cpuid():
    """KVM_GET_SUPPORTED_CPUID: what KVM can give a guest on this host, as KvmCpuidEntry2s: the
    CPU's own leaves (emu.hw.cpuid), plus what KVM emulates whatever the CPU (x2APIC,
    TSC_ADJUST, ARCH_CAPABILITIES), plus KVM's leaves 0x40000000 (signature, max KVM leaf) and
    0x40000001 (features: only KVM_FEATURE_NOP_IO_DELAY, the one this model honours: it has no
    kvmclock, async PF or PV EOI).  Per-vCPU fields (APIC ids, topology) are userspace's."""
    from ..hw.cpuid import native_cpuid_table, INDEXED_LEAVES
    out = []
    for (leaf, sub), regs in sorted(native_cpuid_table().items()):
        eax, ebx, ecx, edx = regs
        if leaf == 1:
            ebx &= 0x0000FFFF                   # APIC id and logical count: userspace's
            ecx |= 1 << 21                      # x2APIC
        elif (leaf, sub) == (7, 0):
            ebx |= 1 << 1                       # TSC_ADJUST
            edx |= 1 << 29                      # ARCH_CAPABILITIES
        elif leaf == 0xB:
            edx = 0
        flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX if leaf in INDEXED_LEAVES else 0
        out.append(KvmCpuidEntry2(leaf, sub, flags, eax, ebx, ecx, edx))
    sig = [int.from_bytes(KVM_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8)]
    out.append(KvmCpuidEntry2(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, sig[0], sig[1], sig[2]))
    out.append(KvmCpuidEntry2(KVM_CPUID_FEATURES, 0, 0, 1 << KVM_FEATURE_NOP_IO_DELAY, 0, 0, 0))
    return out


class KvmVcpuCpuid:
    """The CPUID half of struct kvm_vcpu_arch: cpuid_entries and the lookup."""

    def cpuid_entries(self):
        entries = getattr(self, "_cpuid_entries", None)
        if entries is None:
            entries = self._cpuid_entries = []
        return entries

    def set_cpuid2(self, entries):
        """KVM_SET_CPUID2: kvm_set_cpuid().  After the vCPU ran, only the same table is accepted
        (-EBUSY otherwise, kvm_cpuid_check_equal()); a linear-address width other than 48 or 57
        in 0x80000008 is -EINVAL (kvm_check_cpuid())."""
        entries = [e.copy() for e in entries]
        if self.has_run:
            old = self.cpuid_entries()
            if len(old) != len(entries) or any(a != b for a, b in zip(old, entries)):
                raise KvmIoctlError(EBUSY, "KVM_SET_CPUID2 after KVM_RUN with a different table (-EBUSY)")
            return
        e = kvm_find_cpuid_entry2(entries, 0x80000008)
        if e is not None and (e.eax >> 8 & 0xFF) not in (48, 57, 0):
            raise KvmIoctlError(EINVAL, f"KVM_SET_CPUID2: linear-address width {e.eax >> 8 & 0xFF} "
                                        f"is neither 48 nor 57 (-EINVAL)")
        self._cpuid_entries = entries
        self.cpuid_dynamic_bits_dirty = True

    def get_cpuid2(self):
        return [e.copy() for e in self.cpuid_entries()]

    def kvm_find_cpuid_entry_index(self, function, index):
        return kvm_find_cpuid_entry2(self.cpuid_entries(), function, index)

    def kvm_find_cpuid_entry(self, function):
        return kvm_find_cpuid_entry2(self.cpuid_entries(), function)

    def guest_cpu_cap_has(self, feature):
        leaf, sub, reg, bit = feature
        e = self.kvm_find_cpuid_entry_index(leaf, sub)
        return e is not None and bool(getattr(e, reg) >> bit & 1)

    def kvm_update_cpuid_runtime(self):
        """The bits that follow guest state: OSXSAVE and OSPKE (CR4), APIC (APIC_BASE.EN)."""
        self.cpuid_dynamic_bits_dirty = False
        cr4 = self.kvm.x86_ops.get_cr4(self)
        e = self.kvm_find_cpuid_entry(1)
        if e is not None:
            e.ecx = _set_bit(e.ecx, 27, cr4 & X86_CR4_OSXSAVE)
            e.edx = _set_bit(e.edx, 9, self.msrs.apic_base & MSR_IA32_APICBASE_ENABLE)
        e = self.kvm_find_cpuid_entry_index(7, 0)
        if e is not None:
            e.ecx = _set_bit(e.ecx, 4, cr4 & X86_CR4_PKE)

    def get_out_of_range_cpuid_entry(self, function, index):
        """Intel: a leaf above its class's maximum (basic 0, extended 0x80000000, the
        hypervisor range 0x40000000..., Centaur 0xc0000000) reads as the maximum basic leaf
        (with the requested index).  (function used, entry) or (function, None)."""
        basic = self.kvm_find_cpuid_entry(0)
        if basic is None:
            return function, None
        vendor = b"".join(r.to_bytes(4, "little") for r in (basic.ebx, basic.edx, basic.ecx))
        if vendor in (b"AuthenticAMD", b"HygonGenuine"):
            return function, None
        if 0x40000000 <= function <= 0x4FFFFFFF:
            cls = self.kvm_find_cpuid_entry(function & 0xFFFFFF00)
        elif function >= 0xC0000000:
            cls = self.kvm_find_cpuid_entry(0xC0000000)
        else:
            cls = self.kvm_find_cpuid_entry(function & 0x80000000)
        if cls is not None and function <= cls.eax:
            return function, None
        return basic.eax, self.kvm_find_cpuid_entry_index(basic.eax, index)

    def kvm_cpuid(self, function, index, exact_only=False):
        """kvm_cpuid(): (eax, ebx, ecx, edx, exact).  A missing leaf is zeros, except that leaves
        0xB and 0x1F pass CL through and give EDX (the x2APIC id) when their subleaf 1 exists."""
        # cpuid_dynamic_bits_dirty: KVM sets it when CR4 or APIC_BASE change.  The model's CPU
        # runs MOV to CR4 itself (no exit), so CR4's bits are read again at every CPUID.
        self.kvm_update_cpuid_runtime()
        orig = function
        entry = self.kvm_find_cpuid_entry_index(function, index)
        exact = entry is not None
        used_max_basic = False
        if entry is None and not exact_only:
            function, entry = self.get_out_of_range_cpuid_entry(function, index)
            used_max_basic = entry is not None
        if entry is not None:
            regs = entry.regs()
        else:
            regs = (0, 0, 0, 0)
            if function in (0xB, 0x1F):
                e1 = self.kvm_find_cpuid_entry_index(function, 1)
                if e1 is not None:
                    regs = (0, 0, index & 0xFF, e1.edx)
        self.kvm.trace_emit("kvm_cpuid", self.vcpu_id, function=orig, index=index, rax=regs[0], rbx=regs[1],
                            rcx=regs[2], rdx=regs[3], found="found" if exact else "not found",
                            used_max_basic=", used max basic" if used_max_basic else "")
        return regs + (exact,)

    def kvm_emulate_cpuid(self, exit):
        """kvm_emulate_cpuid(): EAX/ECX in, the four registers out, then skip the instruction."""
        hw = self.hw
        eax, ebx, ecx, edx, _ = self.kvm_cpuid(hw.reg("rax") & 0xFFFFFFFF, hw.reg("rcx") & 0xFFFFFFFF)
        hw.set_regs({"rax": eax, "rbx": ebx, "rcx": ecx, "rdx": edx})
        self.skip_emulated_instruction(exit)
        return 1


def _set_bit(value, bit, on):
    return value | (1 << bit) if on else value & ~(1 << bit)
