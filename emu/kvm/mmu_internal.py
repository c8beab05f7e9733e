"""What the MMU's files share (arch/x86/kvm/mmu/mmu_internal.h, and the PFERR_* bits of kvm_host.h):
struct kvm_page_fault and the RET_PF_* results.  tdp_mmu.py includes this, as tdp_mmu.c does, and
reaches mmu.c's functions (kvm_mmu_hugepage_adjust) through the vCPU, so mmu.py may import
tdp_mmu.py without a circle.
"""

from .spte import PG_LEVEL_4K, PG_LEVEL_1G

# Page-fault error code bits KVM uses (kvm_host.h)
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4
PFERR_GUEST_FINAL_MASK = 1 << 32
PFERR_GUEST_PAGE_MASK = 1 << 33
PFERR_PRIVATE_ACCESS = 1 << 49

# enum RET_PF_* (mmu_internal.h)
RET_PF_CONTINUE, RET_PF_RETRY, RET_PF_EMULATE, RET_PF_WRITE_PROTECTED, RET_PF_INVALID, RET_PF_FIXED, RET_PF_SPURIOUS = (
    range(7)
)
RET_PF_NAMES = ["CONTINUE", "RETRY", "EMULATE", "WRITE_PROTECTED", "INVALID", "FIXED", "SPURIOUS"]

KVM_MAX_HUGEPAGE_LEVEL = PG_LEVEL_1G
KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE = 40


class KvmPageFault:
    """struct kvm_page_fault"""

    __slots__ = (
        "addr",
        "error_code",
        "prefetch",
        "exec",
        "write",
        "present",
        "rsvd",
        "user",
        "is_tdp",
        "is_private",
        "max_level",
        "req_level",
        "goal_level",
        "gfn",
        "slot",
        "pfn",
        "map_writable",
        "huge_page_disallowed",
        "mmu_seq",
    )

    def __init__(self, addr, error_code, prefetch=False):
        self.addr = addr
        self.error_code = error_code
        self.prefetch = prefetch
        self.exec = error_code & PFERR_FETCH_MASK != 0
        self.write = error_code & PFERR_WRITE_MASK != 0
        self.present = error_code & PFERR_PRESENT_MASK != 0
        self.rsvd = error_code & PFERR_RSVD_MASK != 0
        self.user = error_code & PFERR_USER_MASK != 0
        self.is_tdp = True
        self.is_private = error_code & PFERR_PRIVATE_ACCESS != 0
        self.max_level = KVM_MAX_HUGEPAGE_LEVEL
        self.req_level = PG_LEVEL_4K
        self.goal_level = PG_LEVEL_4K
        self.huge_page_disallowed = False
        self.slot = None
        self.pfn = None
        self.map_writable = False
