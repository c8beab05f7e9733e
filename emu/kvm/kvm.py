"""struct kvm and struct kvm_vcpu, shaped like KVM's userspace API (and KVM selftests).

    kvm = Kvm(host, KVM_X86_DEFAULT_VM)
    kvm.set_user_memory_region(0, 0, gpa, size, hva)
    vcpu = kvm.create_vcpu(0); vcpu.set_regs({...})
    run = vcpu.run()        # KVM_RUN: returns a KvmRun with exit_reason, as kvm_run does

EPT violations are handled inside run(), as KVM handles them in the kernel;
only what KVM would hand to userspace comes out.

The two classes hold the state; their functions live in the files upstream keeps them in:

    kvm_main.py    virt/kvm/kvm_main.c        VM creation and death, memslots, the invalidation
                                              protocol, memory attributes, requests and kicks
    guest_memfd.py virt/kvm/guest_memfd.c     punching holes in a TD's private memory
    x86.py         arch/x86/kvm/x86.c         KVM_RUN: vcpu_run, vcpu_enter_guest, hypercalls
    x86_msr.py     arch/x86/kvm/x86.c         RDMSR/WRMSR: the MSR filter, kvm_{get,set}_msr_common
    x86_pio.py     arch/x86/kvm/x86.c         IN/OUT (kvm_fast_pio), INS/OUTS (emulate.c), KVM_EXIT_IO
    cpuid.py       arch/x86/kvm/cpuid.c       KVM_SET_CPUID2, kvm_cpuid, kvm_emulate_cpuid
    mmu.py         arch/x86/kvm/mmu/mmu.c     the page fault, roots, zapping, NX recovery
    tdp_mmu.py     arch/x86/kvm/mmu/tdp_mmu.c the TDP MMU (and its mirror root)
    vmx.py         arch/x86/kvm/vmx/vmx.c     VMX exit handlers
    tdx.py         arch/x86/kvm/vmx/tdx.c     the TDX backend (TdxX86Ops)
    kvm_host.py    include/linux/kvm_host.h   errno, requests, modes, memslots, kvm_run
    srcu.py        kernel/rcu/srcutree.c      kvm->srcu: memslot readers, synchronize_srcu

This module is also the one place the names scripts import from ``emu.kvm.kvm`` keep living.
"""

from .guest_memfd import KvmGmem
from .kvm_main import KvmMain, KvmVcpuMain
from .mmu import KvmMmu, KvmVcpuMmu
from .vmx import KvmVcpuVmx
from .x86 import KvmVcpuX86
from .x86_msr import KvmVcpuMsr, KvmX86Msr, VcpuMsrs
from .x86_pio import KvmVcpuPio, KvmPio
from .cpuid import KvmVcpuCpuid
from .kvm_host import (  # noqa: F401  (emu.kvm.kvm's names since 0.1)
    KVM_ENOSYS,
    EINVAL,
    EEXIST,
    EFAULT,
    EIO,
    ENOENT,
    KVM_REQ_TLB_FLUSH,
    KVM_REQ_OUTSIDE_GUEST_MODE,
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    KVM_REQ_VM_DEAD,
    KVM_REQS_FLUSHING,
    OUTSIDE_GUEST_MODE,
    IN_GUEST_MODE,
    EXITING_GUEST_MODE,
    MODE_NAMES,
    GUEST_SLICE_BLOCKS,
    KvmIoctlError,
    KvmMemorySlot,
    KvmRun,
)
from .locking import MmuLock  # noqa: F401
from .uapi import *  # noqa: F401,F403  (KVM_X86_*_VM, KVM_MEM_READONLY, KVM_EXIT_*)
from .uapi import KVM_MEMSLOT_INVALID  # noqa: F401
from .uapi import KVM_X86_DEFAULT_VM


class KvmVcpu(KvmVcpuX86, KvmVcpuMsr, KvmVcpuPio, KvmVcpuCpuid, KvmVcpuMmu, KvmVcpuVmx, KvmVcpuMain):
    """struct kvm_vcpu (x86, VMX/TDX)."""

    def __init__(self, kvm, vcpu_id):
        # kvm_arch_vcpu_create()'s MSR, PIO and CPUID state, before the vendor's vcpu_create
        self.msrs = VcpuMsrs()
        self.pio = KvmPio()
        self.has_run = False
        self._cpuid_entries = []  # vcpu->arch.cpuid_entries (emu.kvm.cpuid)
        self.emulated_exit = None  # the exit an instruction KVM completes later came from
        self.cui_linear_rip = None  # vcpu->arch.cui_linear_rip
        KvmVcpuX86.__init__(self, kvm, vcpu_id)
        self.stat["io_exits"] = 0


class Kvm(KvmMain, KvmMmu, KvmGmem, KvmX86Msr):
    """struct kvm: one VM."""

    def __init__(self, host, vm_type=KVM_X86_DEFAULT_VM, tracer=None, x86_ops=None):
        self.msr_filter = None  # KVM_X86_SET_MSR_FILTER (kvm->arch.msr_filter)
        self.user_space_msr_mask = 0  # KVM_CAP_X86_USER_SPACE_MSR
        self.ignore_msrs = False  # the kvm.ignore_msrs module parameter
        KvmMain.__init__(self, host, vm_type, tracer, x86_ops)

    vcpu_class = KvmVcpu
