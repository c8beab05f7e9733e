"""KVM's userspace ABI constants (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h)."""

# enum kvm vm types (uapi)
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1  # private memory from guest_memfd and attributes, no hardware protection
KVM_X86_TDX_VM = 5
VM_TYPE_NAMES = {KVM_X86_DEFAULT_VM: "default", KVM_X86_SW_PROTECTED_VM: "sw-protected", KVM_X86_TDX_VM: "tdx"}

# struct kvm_userspace_memory_region2 flags
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_USER_MEM_SLOTS = 32764  # KVM_MAX_NR_USER_MEMSLOTS on x86: slot ids 0 .. 32763

# KVM_SET_MEMORY_ATTRIBUTES
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

# kvm_run.memory_fault.flags
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

# kvm_run.hypercall.flags
KVM_EXIT_HYPERCALL_LONG_MODE = 1 << 0

# include/uapi/linux/kvm_para.h
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 2
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0 << 4
# The hypercall error codes KVM returns in RAX (include/uapi/linux/kvm_para.h)
KVM_ENOSYS = 1000
KVM_EINVAL = 22

# kvm_run exit reasons (uapi kvm.h)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_INTR = 10
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
EXIT_NAMES = {
    KVM_EXIT_INTR: "intr",
    KVM_EXIT_UNKNOWN: "unknown",
    KVM_EXIT_HYPERCALL: "hypercall",
    KVM_EXIT_HLT: "hlt",
    KVM_EXIT_IO: "io",
    KVM_EXIT_X86_RDMSR: "x86_rdmsr",
    KVM_EXIT_X86_WRMSR: "x86_wrmsr",
    KVM_EXIT_MMIO: "mmio",
    KVM_EXIT_SHUTDOWN: "shutdown",
    KVM_EXIT_INTERNAL_ERROR: "internal_error",
    KVM_EXIT_SYSTEM_EVENT: "system_event",
    KVM_EXIT_MEMORY_FAULT: "memory_fault",
}

# Internal memslot flag (include/linux/kvm_host.h): the slot is being deleted or moved.
KVM_MEMSLOT_INVALID = 1 << 16

# kvm_run.io (KVM_EXIT_IO): direction; the data sit at data_offset from kvm_run, in the page after it
KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT = 0, 1
KVM_PIO_PAGE_OFFSET = 1

# kvm_run.msr (KVM_EXIT_X86_RDMSR/WRMSR): reason; KVM_CAP_X86_USER_SPACE_MSR takes a mask of them
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
KVM_MSR_EXIT_REASON_VALID_MASK = KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER

# KVM_X86_SET_MSR_FILTER (arch/x86/include/uapi/asm/kvm.h)
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1 << 0
KVM_MSR_FILTER_MAX_RANGES = 16
KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600
