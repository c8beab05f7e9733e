"""The guest's CPUID (arch/x86/kvm/cpuid.c): the table userspace sets with KVM_SET_CPUID2, the
lookup with Intel's out-of-range rule (kvm_cpuid(), get_out_of_range_cpuid_entry()), the bits KVM
keeps current (kvm_update_cpuid_runtime()), CPUID exits (kvm_emulate_cpuid()), and what KVM offers
(KVM_GET_SUPPORTED_CPUID: the emulated CPU's features, KVM's signature leaves).
"""

from .kvm_host import KvmIoctlError, EINVAL

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # (sic, uapi spelling)
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_FEATURE_NOP_IO_DELAY = 1

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
        return (
            f"KvmCpuidEntry2({self.function:#x}.{self.index:#x} eax {self.eax:#x} ebx {self.ebx:#x} "
            f"ecx {self.ecx:#x} edx {self.edx:#x})"
        )


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
            ebx &= 0x0000FFFF  # APIC id and logical count: userspace's
            ecx |= 1 << 21  # x2APIC
        elif (leaf, sub) == (7, 0):
            ebx |= 1 << 1  # TSC_ADJUST
            edx |= 1 << 29  # ARCH_CAPABILITIES
        elif leaf == 0xB:
            edx = 0
        flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX if leaf in INDEXED_LEAVES else 0
        out.append(KvmCpuidEntry2(leaf, sub, flags, eax, ebx, ecx, edx))
    sig = [int.from_bytes(KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8)]
    out.append(KvmCpuidEntry2(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, sig[0], sig[1], sig[2]))
    out.append(KvmCpuidEntry2(KVM_CPUID_FEATURES, 0, 0, 1 << KVM_FEATURE_NOP_IO_DELAY, 0, 0, 0))
    return out


class KvmVcpuCpuid:
    """The CPUID half of struct kvm_vcpu_arch: cpuid_entries and the lookup.  KVM keeps the table
    as plain tuples (function, index, flags, eax, ebx, ecx, edx), never changed in place: the bits
    kvm_update_cpuid_runtime() keeps current are applied as an entry is read (``_runtime``), which
    answers the same, and leaves nothing for a snapshot restored in place (emu.checkers.inplace)
    to put back."""

    def cpuid_entries(self):
        return self._cpuid_entries

    def set_cpuid2(self, entries):
        """KVM_SET_CPUID2: kvm_set_cpuid().  After the vCPU ran, only the same table is accepted,
        KVM's runtime bits set alike on both sides (kvm_cpuid_check_equal(): -EINVAL otherwise);
        a linear-address width other than 48 or 57 in 0x80000008 is -EINVAL (kvm_check_cpuid())."""
        table = [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in entries]
        if self.has_run:
            now = [t[:3] + self._runtime(t) for t in self._cpuid_entries]
            if [t[:3] + self._runtime(t) for t in table] != now:
                raise KvmIoctlError(EINVAL, "KVM_SET_CPUID2 after KVM_RUN with a different table (-EINVAL)")
            return
        for t in table:
            if t[0] == 0x80000008 and (t[3] >> 8 & 0xFF) not in (48, 57, 0):
                raise KvmIoctlError(
                    EINVAL, f"KVM_SET_CPUID2: linear-address width {t[3] >> 8 & 0xFF} is neither 48 nor 57 (-EINVAL)"
                )
        self._cpuid_entries = table

    def get_cpuid2(self):
        """KVM_GET_CPUID2: the table, with the runtime bits as they are now."""
        return [KvmCpuidEntry2(t[0], t[1], t[2], *self._runtime(t)) for t in self._cpuid_entries]

    def kvm_find_cpuid_entry_index(self, function, index):
        for t in self._cpuid_entries:
            if t[0] == function and (not t[2] & KVM_CPUID_FLAG_SIGNIFCANT_INDEX or index is None or t[1] == index):
                return t
        return None

    def kvm_find_cpuid_entry(self, function):
        return self.kvm_find_cpuid_entry_index(function, None)

    def guest_cpu_cap_has(self, feature):
        leaf, sub, reg, bit = feature
        t = self.kvm_find_cpuid_entry_index(leaf, sub)
        return t is not None and bool(t[3 + "abcd".index(reg[1])] >> bit & 1)

    def _runtime(self, t):
        """kvm_update_cpuid_runtime(): CPUID.1:ECX.OSXSAVE and CPUID.7.0:ECX.OSPKE follow CR4,
        CPUID.1:EDX.APIC follows IA32_APICBASE.EN.  (KVM redoes it when CR4 or APIC_BASE change;
        the model's CPU runs MOV to CR4 itself, so CR4 is read at each lookup.)"""
        eax, ebx, ecx, edx = t[3:]
        if t[0] == 1:
            cr4 = self.kvm.x86_ops.get_cr4(self)
            ecx = _set_bit(ecx, 27, cr4 & X86_CR4_OSXSAVE)
            edx = _set_bit(edx, 9, self.msrs.apic_base & MSR_IA32_APICBASE_ENABLE)
        elif t[0] == 7 and t[1] == 0:
            ecx = _set_bit(ecx, 4, self.kvm.x86_ops.get_cr4(self) & X86_CR4_PKE)
        return eax, ebx, ecx, edx

    def get_out_of_range_cpuid_entry(self, function, index):
        """Intel: a leaf above its class's maximum (basic 0, extended 0x80000000, the
        hypervisor range 0x40000000..., Centaur 0xc0000000) reads as the maximum basic leaf
        (with the requested index).  (function used, entry) or (function, None)."""
        basic = self.kvm_find_cpuid_entry(0)
        if basic is None:
            return function, None
        vendor = b"".join(r.to_bytes(4, "little") for r in (basic[4], basic[6], basic[5]))
        if vendor in (b"AuthenticAMD", b"HygonGenuine"):
            return function, None
        if 0x40000000 <= function <= 0x4FFFFFFF:
            cls = self.kvm_find_cpuid_entry(function & 0xFFFFFF00)
        elif function >= 0xC0000000:
            cls = self.kvm_find_cpuid_entry(0xC0000000)
        else:
            cls = self.kvm_find_cpuid_entry(function & 0x80000000)
        if cls is not None and function <= cls[3]:
            return function, None
        return basic[3], self.kvm_find_cpuid_entry_index(basic[3], index)

    def kvm_cpuid(self, function, index, exact_only=False):
        """kvm_cpuid(): (eax, ebx, ecx, edx, exact).  A missing leaf is zeros, except that leaves
        0xB and 0x1F pass CL through and give EDX (the x2APIC id) when their subleaf 1 exists."""
        orig = function
        entry = self.kvm_find_cpuid_entry_index(function, index)
        exact = entry is not None
        used_max_basic = False
        if entry is None and not exact_only:
            function, entry = self.get_out_of_range_cpuid_entry(function, index)
            used_max_basic = entry is not None
        if entry is not None:
            regs = self._runtime(entry)
        else:
            regs = (0, 0, 0, 0)
            if function in (0xB, 0x1F):
                e1 = self.kvm_find_cpuid_entry_index(function, 1)
                if e1 is not None:
                    regs = (0, 0, index & 0xFF, e1[6])
        self.kvm.trace_emit(
            "kvm_cpuid",
            self.vcpu_id,
            function=orig,
            index=index,
            rax=regs[0],
            rbx=regs[1],
            rcx=regs[2],
            rdx=regs[3],
            found="found" if exact else "not found",
            used_max_basic=", used max basic" if used_max_basic else "",
        )
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
