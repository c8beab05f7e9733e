"""KVM's userspace ABI constants (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h)."""

# enum kvm vm types (uapi)
KVM_X86_DEFAULT_VM = 0
KVM_X86_TDX_VM = 5
VM_TYPE_NAMES = {KVM_X86_DEFAULT_VM: "default", KVM_X86_TDX_VM: "tdx"}

KVM_MEM_READONLY = 1 << 1

# kvm_run exit reasons (uapi kvm.h)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_INTR = 10
EXIT_NAMES = {KVM_EXIT_INTR: "intr", KVM_EXIT_UNKNOWN: "unknown", KVM_EXIT_HYPERCALL: "hypercall", KVM_EXIT_HLT: "hlt",
              KVM_EXIT_MMIO: "mmio", KVM_EXIT_SHUTDOWN: "shutdown", KVM_EXIT_INTERNAL_ERROR: "internal_error",
              KVM_EXIT_SYSTEM_EVENT: "system_event", KVM_EXIT_MEMORY_FAULT: "memory_fault"}

# Internal memslot flag (include/linux/kvm_host.h): the slot is being deleted or moved.
KVM_MEMSLOT_INVALID = 1 << 16
