"""MSR emulation, the half of arch/x86/kvm/x86.c that handles RDMSR and WRMSR: kvm_emulate_rdmsr/
wrmsr(), the MSR filter (KVM_X86_SET_MSR_FILTER, kvm_msr_allowed()), exits to userspace
(KVM_CAP_X86_USER_SPACE_MSR, KVM_EXIT_X86_RDMSR/WRMSR, kvm_msr_user_space()), the checks every
write gets (__kvm_set_msr()), and kvm_get_msr_common()/kvm_set_msr_common() for the MSRs KVM
emulates itself.  The vendor's hook (vmx_get_msr()/vmx_set_msr() in vmx.py, tdx_get_msr()/
tdx_set_msr() in tdx.py) comes between the two, as kvm_x86_ops.get_msr/set_msr.

Emulated here: EFER (set_efer(): legal bits SCE, LME, LMA, NX; LME may not change while paging
is on; LMA is the CPU's), APIC_BASE (kvm_apic_set_base(), no in-kernel local APIC), IA32_TSC and
IA32_TSC_ADJUST (the L1 TSC offset), PAT (kvm_pat_valid()), MISC_ENABLE (its read-only and
ignored bits), UCODE_REV, ARCH_CAPABILITIES, POWER_CTL, and the MSRs read as 0 (PLATFORM_ID,
EBL_CR_POWERON).  Any other MSR is KVM_MSR_RET_UNSUPPORTED: #GP, or userspace's.
"""

from ..hw.msr import (
    MSR_IA32_TSC,
    MSR_IA32_PLATFORM_ID,
    MSR_IA32_APICBASE,
    MSR_EBL_CR_POWERON,
    MSR_IA32_TSC_ADJUST,
    MSR_IA32_UCODE_REV,
    MSR_IA32_ARCH_CAPABILITIES,
    MSR_IA32_MISC_ENABLE,
    MSR_IA32_CR_PAT,
    MSR_EFER,
    MSR_FS_BASE,
    MSR_GS_BASE,
    MSR_KERNEL_GS_BASE,
    MSR_CSTAR,
    MSR_LSTAR,
    MSR_IA32_SYSENTER_EIP,
    MSR_IA32_SYSENTER_ESP,
    MSR_TSC_AUX,
    APIC_BASE_MSR,
    EFER_SCE,
    EFER_LME,
    EFER_LMA,
    EFER_NX,
    is_canonical,
    msr_name,
)
from ..hw.ept import MAXPHYADDR
from .cpuid import (
    X86_FEATURE_LM,
    X86_FEATURE_NX,
    X86_FEATURE_X2APIC,
    X86_FEATURE_TSC_ADJUST,
    X86_FEATURE_ARCH_CAPABILITIES,
    X86_FEATURE_RDTSCP,
    X86_FEATURE_RDPID,
)
from .kvm_host import KvmIoctlError, EINVAL
from .uapi import (
    KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR,
    KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN,
    KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_EXIT_REASON_VALID_MASK,
    KVM_MSR_FILTER_READ,
    KVM_MSR_FILTER_WRITE,
    KVM_MSR_FILTER_DEFAULT_DENY,
    KVM_MSR_FILTER_MAX_RANGES,
    KVM_MSR_FILTER_MAX_BITMAP_SIZE,
)

KVM_MSR_RET_UNSUPPORTED = 2
KVM_MSR_RET_FILTERED = 3

# efer_reserved_bits: SCE, LME, LMA, and NX (vmx hardware_setup(): kvm_enable_efer_bits(EFER_NX))
EFER_RESERVED_BITS = ~(EFER_SCE | EFER_LME | EFER_LMA | EFER_NX) & ((1 << 64) - 1)
MSR_IA32_APICBASE_BSP, MSR_IA32_APICBASE_ENABLE, X2APIC_ENABLE = 1 << 8, 1 << 11, 1 << 10
APIC_DEFAULT_PHYS_BASE = 0xFEE00000
MSR_IA32_MISC_ENABLE_EMON = 1 << 7
MSR_IA32_MISC_ENABLE_BTS_UNAVAIL = 1 << 11
MSR_IA32_MISC_ENABLE_PEBS_UNAVAIL = 1 << 12
MSR_IA32_MISC_ENABLE_MWAIT = 1 << 18
MSR_IA32_MISC_ENABLE_PMU_RO_MASK = MSR_IA32_MISC_ENABLE_PEBS_UNAVAIL | MSR_IA32_MISC_ENABLE_BTS_UNAVAIL
PAT_DEFAULT = 0x0007040600070406
LAPIC_MODE_DISABLED, LAPIC_MODE_INVALID, LAPIC_MODE_XAPIC, LAPIC_MODE_X2APIC = (
    0,
    X2APIC_ENABLE,
    MSR_IA32_APICBASE_ENABLE,
    MSR_IA32_APICBASE_ENABLE | X2APIC_ENABLE,
)
MSR_IA32_POWER_CTL = 0x1FC
_U64 = (1 << 64) - 1


def kvm_pat_valid(data):
    """Each byte a memory type 0, 1, 4, 5, 6 or 7."""
    if data & 0xF8F8F8F8F8F8F8F8:
        return False
    return (data | ((data & 0x0202020202020202) << 1)) == data


def kvm_apic_mode(value):
    return value & (MSR_IA32_APICBASE_ENABLE | X2APIC_ENABLE)


class VcpuMsrs:
    """The MSR fields of struct kvm_vcpu_arch (and vcpu_vmx's feature control), at vCPU reset."""

    def __init__(self):
        self.apic_base = 0  # the VMM sets it (KVM_SET_MSRS, host-initiated)
        self.pat = PAT_DEFAULT
        self.ia32_misc_enable_msr = MSR_IA32_MISC_ENABLE_PEBS_UNAVAIL | MSR_IA32_MISC_ENABLE_BTS_UNAVAIL
        self.microcode_version = 0x100000000
        self.arch_capabilities = 0
        self.ia32_tsc_adjust_msr = 0
        self.feature_control = 0  # vmx->msr_ia32_feature_control
        self.feature_control_valid_bits = 1  # FEAT_CTL_LOCKED
        self.msr_ia32_power_ctl = 0


class KvmMsrFilter:
    """struct kvm_x86_msr_filter: default_allow and up to 16 ranges (flags, base, nmsrs, bitmap)."""

    def __init__(self, default_allow, ranges):
        self.default_allow = default_allow
        self.ranges = ranges


class KvmX86Msr:
    """The VM ioctls: KVM_X86_SET_MSR_FILTER and KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)."""

    def enable_cap_user_space_msr(self, mask):
        """KVM_CAP_X86_USER_SPACE_MSR: which failed MSR accesses exit to userspace."""
        if mask & ~KVM_MSR_EXIT_REASON_VALID_MASK:
            raise KvmIoctlError(EINVAL, f"KVM_CAP_X86_USER_SPACE_MSR: bad reasons {mask:#x} (-EINVAL)")
        self.user_space_msr_mask = mask

    def set_msr_filter(self, flags, ranges):
        """KVM_X86_SET_MSR_FILTER (kvm_vm_ioctl_set_msr_filter()): ``ranges`` a list of
        (flags, base, nmsrs, bitmap bytes), a set bit allowing the access.  Then every vCPU's
        MSR bitmap is recomputed (KVM_REQ_MSR_FILTER_CHANGED: the model does it at once), so an
        MSR KVM passes through to the guest is intercepted again where the filter denies it."""
        if flags & ~KVM_MSR_FILTER_DEFAULT_DENY or len(ranges) > KVM_MSR_FILTER_MAX_RANGES:
            raise KvmIoctlError(EINVAL, "KVM_X86_SET_MSR_FILTER: bad flags or too many ranges (-EINVAL)")
        default_allow = not flags & KVM_MSR_FILTER_DEFAULT_DENY
        kept = []
        for rflags, base, nmsrs, bitmap in ranges:
            if not nmsrs:
                continue
            if rflags & ~(KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE) or not rflags:
                raise KvmIoctlError(EINVAL, "KVM_X86_SET_MSR_FILTER: a range with bad flags (-EINVAL)")
            size = -(-nmsrs // 64) * 8  # BITS_TO_LONGS(nmsrs) * sizeof(long)
            if size > KVM_MSR_FILTER_MAX_BITMAP_SIZE:
                raise KvmIoctlError(EINVAL, "KVM_X86_SET_MSR_FILTER: bitmap too large (-EINVAL)")
            kept.append((rflags, base, nmsrs, int.from_bytes(bytes(bitmap[:size]), "little")))
        if not kept and not default_allow:
            raise KvmIoctlError(EINVAL, "KVM_X86_SET_MSR_FILTER: deny by default with no range (-EINVAL)")
        self.msr_filter = KvmMsrFilter(default_allow, kept)
        self.touch_all()  # (emu.checkers.dpor) every MSR access reads it
        for v in self.vcpus:
            self.x86_ops.recalc_msr_intercepts(v)


class KvmVcpuMsr:
    """RDMSR/WRMSR of struct kvm_vcpu: x86.c's half."""

    def kvm_msr_allowed(self, index, type_):
        """kvm_msr_allowed(): x2APIC MSRs are never filtered; the first range that holds the MSR
        for this access type decides; else the filter's default."""
        if 0x800 <= index <= 0x8FF:
            return True
        f = self.kvm.msr_filter
        if f is None:
            return True
        for flags, base, nmsrs, bitmap in f.ranges:
            if base <= index < base + nmsrs and flags & type_:
                return bool(bitmap >> (index - base) & 1)
        return f.default_allow

    # -- the common layer ------------------------------------------------------------------------------------
    def set_efer(self, data, host_initiated):
        old = self.kvm.x86_ops.get_efer(self)
        if data & EFER_RESERVED_BITS:
            return 1
        if not host_initiated:
            if data & (EFER_LME | EFER_LMA) and not self.guest_cpu_cap_has(X86_FEATURE_LM):
                return 1  # __kvm_valid_efer()
            if data & EFER_NX and not self.guest_cpu_cap_has(X86_FEATURE_NX):
                return 1
            if self.kvm.x86_ops.is_paging(self) and (old & EFER_LME) != (data & EFER_LME):
                return 1
        data = (data & ~EFER_LMA) | (old & EFER_LMA)
        self.kvm.x86_ops.set_efer(self, data)
        return 0

    def kvm_apic_set_base(self, value, host_initiated):
        m = self.msrs
        if m.apic_base == value:
            return 0
        reserved = (
            (_U64 << MAXPHYADDR & _U64) | 0x2FF | (0 if self.guest_cpu_cap_has(X86_FEATURE_X2APIC) else X2APIC_ENABLE)
        )
        old_mode, new_mode = kvm_apic_mode(m.apic_base), kvm_apic_mode(value)
        if value & reserved or new_mode == LAPIC_MODE_INVALID:
            return 1
        if not host_initiated:
            if old_mode == LAPIC_MODE_X2APIC and new_mode == LAPIC_MODE_XAPIC:
                return 1
            if old_mode == LAPIC_MODE_DISABLED and new_mode == LAPIC_MODE_X2APIC:
                return 1
        m.apic_base = value  # (CPUID.1:EDX.APIC follows it: emu.kvm.cpuid)
        return 0

    def adjust_tsc_offset_guest(self, adj):
        hw = self.hw
        hw.tsc_offset = (hw.tsc_offset + adj) & _U64

    def kvm_set_msr_common(self, index, data, host_initiated):
        m = self.msrs
        if index == MSR_IA32_UCODE_REV:
            if host_initiated:
                m.microcode_version = data
            return 0  # a guest's write is dropped
        if index == MSR_IA32_ARCH_CAPABILITIES:
            if not host_initiated or not self.guest_cpu_cap_has(X86_FEATURE_ARCH_CAPABILITIES):
                return KVM_MSR_RET_UNSUPPORTED
            m.arch_capabilities = data
            return 0
        if index == MSR_EFER:
            return self.set_efer(data, host_initiated)
        if index == MSR_IA32_CR_PAT:
            if not kvm_pat_valid(data):
                return 1
            m.pat = data
            return 0
        if index == MSR_IA32_APICBASE:
            return self.kvm_apic_set_base(data, host_initiated)
        if APIC_BASE_MSR <= index <= APIC_BASE_MSR + 0xFF:
            return 1  # kvm_x2apic_msr_write(): no in-kernel local APIC
        if index == MSR_IA32_TSC_ADJUST:
            if self.guest_cpu_cap_has(X86_FEATURE_TSC_ADJUST):
                if not host_initiated:
                    self.adjust_tsc_offset_guest((data - m.ia32_tsc_adjust_msr) & _U64)
                m.ia32_tsc_adjust_msr = data
            return 0
        if index == MSR_IA32_MISC_ENABLE:
            old = m.ia32_misc_enable_msr
            if not host_initiated:
                if (old ^ data) & MSR_IA32_MISC_ENABLE_PMU_RO_MASK:
                    return 1  # read-only bits
                data = (data & ~MSR_IA32_MISC_ENABLE_EMON) | (old & MSR_IA32_MISC_ENABLE_EMON)
            # KVM_X86_QUIRK_MISC_ENABLE_NO_MWAIT (on by default): MWAIT's bit is not checked
            m.ia32_misc_enable_msr = data
            return 0
        if index == MSR_IA32_POWER_CTL:
            m.msr_ia32_power_ctl = data
            return 0
        if index == MSR_IA32_TSC:
            hw = self.hw
            if host_initiated:
                # kvm_synchronize_tsc(): the offset that makes the TSC read ``data`` now
                hw.tsc_offset = (data - hw.host_tsc) & _U64
            else:
                # kvm_compute_l1_tsc_offset(data) - l1_tsc_offset
                adj = (data - hw.host_tsc - hw.tsc_offset) & _U64
                self.adjust_tsc_offset_guest(adj)
                m.ia32_tsc_adjust_msr = (m.ia32_tsc_adjust_msr + adj) & _U64
            return 0
        return KVM_MSR_RET_UNSUPPORTED

    def kvm_get_msr_common(self, index, host_initiated):
        """(ret, data)"""
        m = self.msrs
        if index in (MSR_IA32_PLATFORM_ID, MSR_EBL_CR_POWERON):
            return 0, 0
        if index == MSR_IA32_UCODE_REV:
            return 0, m.microcode_version
        if index == MSR_IA32_ARCH_CAPABILITIES:
            if not self.guest_cpu_cap_has(X86_FEATURE_ARCH_CAPABILITIES):
                return KVM_MSR_RET_UNSUPPORTED, 0
            return 0, m.arch_capabilities
        if index == MSR_IA32_TSC:
            return 0, (self.hw.host_tsc + self.hw.tsc_offset) & _U64
        if index == MSR_IA32_TSC_ADJUST:
            return 0, m.ia32_tsc_adjust_msr
        if index == MSR_IA32_CR_PAT:
            return 0, m.pat
        if index == MSR_IA32_APICBASE:
            return 0, m.apic_base
        if APIC_BASE_MSR <= index <= APIC_BASE_MSR + 0xFF:
            return 1, 0  # kvm_x2apic_msr_read(): no in-kernel local APIC
        if index == MSR_IA32_MISC_ENABLE:
            return 0, m.ia32_misc_enable_msr
        if index == MSR_IA32_POWER_CTL:
            return 0, m.msr_ia32_power_ctl
        if index == MSR_EFER:
            return 0, self.kvm.x86_ops.get_efer(self)
        return KVM_MSR_RET_UNSUPPORTED, 0

    def __kvm_set_msr(self, index, data, host_initiated):
        """__kvm_set_msr(): the checks every write gets before the vendor's set_msr."""
        if index in (MSR_FS_BASE, MSR_GS_BASE, MSR_KERNEL_GS_BASE, MSR_CSTAR, MSR_LSTAR):
            if not is_canonical(data):
                return 1
        elif index in (MSR_IA32_SYSENTER_EIP, MSR_IA32_SYSENTER_ESP):
            data = _canonical(data)  # __canonical_address(): Intel would #GP on VM entry
        elif index == MSR_TSC_AUX:
            if (
                not host_initiated
                and not self.guest_cpu_cap_has(X86_FEATURE_RDTSCP)
                and not self.guest_cpu_cap_has(X86_FEATURE_RDPID)
            ):
                return 1
            if data >> 32:
                return 1  # Intel: bits 63:32 reserved
        return self.kvm.x86_ops.set_msr(self, index, data, host_initiated)

    def __kvm_get_msr(self, index, host_initiated):
        if (
            index == MSR_TSC_AUX
            and not host_initiated
            and not self.guest_cpu_cap_has(X86_FEATURE_RDTSCP)
            and not self.guest_cpu_cap_has(X86_FEATURE_RDPID)
        ):
            return 1, 0
        return self.kvm.x86_ops.get_msr(self, index, host_initiated)

    def kvm_do_msr_access(self, ret, data, host_initiated):
        """kvm_do_msr_access(): a failed read reads 0; an unsupported MSR is ignored only with
        the kvm.ignore_msrs module parameter (off, as by default)."""
        if ret == KVM_MSR_RET_UNSUPPORTED and self.kvm.ignore_msrs:
            return 0
        return ret

    def kvm_get_msr_with_filter(self, index):
        if not self.kvm_msr_allowed(index, KVM_MSR_FILTER_READ):
            return KVM_MSR_RET_FILTERED, 0
        ret, data = self.__kvm_get_msr(index, False)
        if ret:
            data = 0
        return self.kvm_do_msr_access(ret, data, False), data

    def kvm_set_msr_with_filter(self, index, data):
        if not self.kvm_msr_allowed(index, KVM_MSR_FILTER_WRITE):
            return KVM_MSR_RET_FILTERED
        return self.kvm_do_msr_access(self.__kvm_set_msr(index, data, False), data, False)

    # -- KVM_GET_MSRS / KVM_SET_MSRS (host-initiated) ---------------------------------------------------------
    def get_msrs(self, indices):
        """KVM_GET_MSRS: {index: value} for the MSRs that could be read (the ioctl stops at the
        first one that cannot, as msr_io() does)."""
        out = {}
        for index in indices:
            ret, data = self.__kvm_get_msr(index, True)
            if ret:
                break
            out[index] = data
        return out

    def set_msrs(self, values):
        """KVM_SET_MSRS: the number of MSRs written (stopping at the first refused)."""
        n = 0
        for index, data in values.items():
            if self.__kvm_set_msr(index, data & _U64, True):
                break
            n += 1
        return n

    # -- RDMSR / WRMSR exits ------------------------------------------------------------------------------------
    def kvm_msr_user_space(self, index, exit_reason, data, completion, r):
        """kvm_msr_user_space(): exit to userspace when it asked for this kind of failure."""
        reason = {
            KVM_MSR_RET_UNSUPPORTED: KVM_MSR_EXIT_REASON_UNKNOWN,
            KVM_MSR_RET_FILTERED: KVM_MSR_EXIT_REASON_FILTER,
        }.get(r, KVM_MSR_EXIT_REASON_INVAL)
        if not self.kvm.user_space_msr_mask & reason:
            return False
        self.exit_to_user(exit_reason, error=0, reason=reason, index=index, data=data)
        self.complete_userspace_io = completion
        return True

    def kvm_emulate_rdmsr(self, exit, ecx=None):
        """kvm_emulate_rdmsr(): EDX:EAX = the MSR, or the failure to userspace or #GP."""
        ecx = (self.hw.reg("rcx") if ecx is None else ecx) & 0xFFFFFFFF
        self.emulated_exit = exit
        r, data = self.kvm_get_msr_with_filter(ecx)
        if not r:
            self.trace_msr("read", ecx, data)
            self.kvm.x86_ops.write_edx_eax(self, data)
        else:
            if self.kvm_msr_user_space(ecx, KVM_EXIT_X86_RDMSR, 0, _complete_fast_rdmsr, r):
                return 0
            self.trace_msr("read", ecx, 0, ex=True)
        return self.kvm.x86_ops.complete_emulated_msr(self, exit, r)

    def kvm_emulate_wrmsr(self, exit, ecx=None, data=None):
        ecx = (self.hw.reg("rcx") if ecx is None else ecx) & 0xFFFFFFFF
        if data is None:
            data = (self.hw.reg("rdx") & 0xFFFFFFFF) << 32 | self.hw.reg("rax") & 0xFFFFFFFF
        self.emulated_exit = exit
        r = self.kvm_set_msr_with_filter(ecx, data)
        if not r:
            self.trace_msr("write", ecx, data)
        else:
            if self.kvm_msr_user_space(ecx, KVM_EXIT_X86_WRMSR, data, _complete_fast_msr_access, r):
                return 0
            if r < 0:
                return r
            self.trace_msr("write", ecx, data, ex=True)
        return self.kvm.x86_ops.complete_emulated_msr(self, exit, r)

    def trace_msr(self, rw, index, data, ex=False):
        """kvm_msr: 'msr_write c0000080 = 0x500' (kvm_msr_read_ex/write_ex add ' (#GP)')."""
        self.kvm.trace_emit(
            "kvm_msr", self.vcpu_id, rw=rw, index=index, data=data, ex=" (#GP)" if ex else "", msr=msr_name(index)
        )

    def kvm_complete_insn_gp(self, exit, err):
        """kvm_complete_insn_gp(): #GP(0) for a failure, else skip the instruction."""
        if err:
            self.hw.inject_event(13, 0)
        else:
            self.skip_emulated_instruction(exit)
        return 1


def _complete_fast_rdmsr(vcpu, run):
    """complete_fast_rdmsr(): EDX:EAX = run.msr.data unless userspace set run.msr.error."""
    if not run.error:
        vcpu.kvm.x86_ops.write_edx_eax(vcpu, run.data & _U64)
    return vcpu.kvm.x86_ops.complete_emulated_msr(vcpu, vcpu.emulated_exit, run.error)


def _complete_fast_msr_access(vcpu, run):
    return vcpu.kvm.x86_ops.complete_emulated_msr(vcpu, vcpu.emulated_exit, run.error)


def _canonical(addr, bits=48):
    addr &= _U64
    shift = 64 - bits
    v = (addr << shift) & _U64
    return ((v ^ (1 << 63)) - (1 << 63)) >> shift & _U64
