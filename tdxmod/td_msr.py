"""RDMSR and WRMSR in a TD (src/td_dispatcher/vm_exits/td_msr_access.c, include/auto_gen/
msr_config_lookup.c): the TD VMCS's MSR bitmap and what the module does with an MSR exit.

MSR_LOOKUP is the module's table: for each MSR range, whether the bitmap lets the TD's reads and
writes through (FIXED_0: the CPU does them with the TD's own MSR state) or makes them exit
(FIXED_1, or DYN_*: exiting unless the TD's attributes, XFAM or CPUID enable the feature; the
model's TDs have no PERFMON attribute and an XFAM of x87 and SSE, so every DYN_* MSR exits), and
the action on an exit: #VE (the guest asks the VMM with TDG.VP.VMCALL<Instruction.RDMSR/WRMSR>),
#GP, GP_OR_VE (#GP unless the TD has the feature: none of DCA, TME, MKTME, TSC deadline here) or
OTHER (the module emulates it: EFER writes of SCE only, IA32_XSS, DEBUGCTL, MISC_ENABLE,
ARCH_CAPABILITIES, PERF_CAPABILITIES, XAPIC_DISABLE_STATUS and the VMX capability MSRs).  An MSR
the table does not list, or outside the bitmap's ranges, is a #VE.
"""

from emu.hw.msr import MsrBitmap, MSR_TYPE_R, MSR_TYPE_W, MSR_EFER, EFER_LMA, EFER_SCE

TD_MSR_ACCESS_SUCCESS, TD_MSR_ACCESS_GP, TD_MSR_ACCESS_MSR_NON_ARCH_EXCEPTION = 0, 1, 2

# (first, last, read bit meaning, read action, write bit meaning, write action), msr_config_lookup.c
MSR_LOOKUP = (
    (0x10, 0x10, "FIXED_0", "FATAL_ERROR", "FIXED_1", "VE"),  # IA32_TIME_STAMP_COUNTER
    (0x48, 0x48, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_SPEC_CTRL
    (0x49, 0x49, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_PRED_CMD
    (0x87, 0x87, "FIXED_1", "GP_OR_VE", "FIXED_1", "GP_OR_VE"),  # IA32_MKTME_PARTITIONING
    (0x8C, 0x8F, "FIXED_1", "GP", "FIXED_1", "GP"),  # IA32_SGXLEPUBKEYHASHx
    (0x98, 0x98, "FIXED_1", "GP", "FIXED_1", "GP"),  # MSR_WBINVDP
    (0x99, 0x99, "FIXED_1", "GP", "FIXED_1", "GP"),  # MSR_WBNOINVDP
    (0x9A, 0x9A, "FIXED_1", "GP", "FIXED_1", "GP"),  # MSR_INTR_PENDING
    (0x9B, 0x9B, "FIXED_1", "GP", "FIXED_1", "GP"),  # IA32_SMM_MONITOR_CTL
    (0x9E, 0x9E, "FIXED_1", "GP", "FIXED_1", "GP"),  # IA32_SMBASE
    (0xBC, 0xBC, "FIXED_0", "FATAL_ERROR", "FIXED_1", "VE"),  # IA32_MISC_PACKAGE_CTLS
    (0xBD, 0xBD, "FIXED_1", "OTHER", "FIXED_0", "FATAL_ERROR"),  # IA32_XAPIC_DISABLE_STATUS
    (0xC1, 0xC8, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # IA32_PMCx
    (0xE1, 0xE1, "DYN_UMWAIT", "GP", "DYN_UMWAIT", "GP"),  # IA32_UMWAIT_CONTROL
    (0x10A, 0x10A, "FIXED_1", "OTHER", "FIXED_0", "FATAL_ERROR"),  # IA32_ARCH_CAPABILITIES
    (0x10B, 0x10B, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_FLUSH_CMD
    (0x122, 0x122, "DYN_TSX", "GP", "DYN_TSX", "GP"),  # IA32_TSX_CTRL
    (0x174, 0x174, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_SYSENTER_CS
    (0x175, 0x175, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_SYSENTER_ESP
    (0x176, 0x176, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_SYSENTER_EIP
    (0x186, 0x18D, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # IA32_PERFEVTSELx
    (0x195, 0x195, "FIXED_1", "GP", "FIXED_1", "GP"),  # IA32_OVERCLOCKING_STATUS
    (0x1A0, 0x1A0, "DYN_PERFMON", "OTHER", "FIXED_1", "VE"),  # IA32_MISC_ENABLE
    (0x1A6, 0x1A7, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # MSR_OFFCORE_RSPx
    (0x1C4, 0x1C4, "DYN_XFD", "GP", "DYN_XFD", "GP"),  # IA32_XFD
    (0x1C5, 0x1C5, "DYN_XFD", "GP", "DYN_XFD", "GP"),  # IA32_XFD_ERR
    (0x1D9, 0x1D9, "FIXED_1", "OTHER", "FIXED_1", "OTHER"),  # IA32_DEBUGCTL
    (0x1F8, 0x1F8, "FIXED_1", "GP_OR_VE", "FIXED_1", "GP_OR_VE"),  # IA32_PLATFORM_DCA_CAP
    (0x1F9, 0x1F9, "FIXED_1", "GP_OR_VE", "FIXED_1", "GP_OR_VE"),  # IA32_CPU_DCA_CAP
    (0x1FA, 0x1FA, "FIXED_1", "GP_OR_VE", "FIXED_1", "GP_OR_VE"),  # IA32_DCA_0_CAP
    (0x276, 0x276, "FIXED_1", "GP", "FIXED_1", "GP"),  # MSR_SLAM_ENABLE
    (0x277, 0x277, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_PAT
    (0x309, 0x310, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # IA32_FIXED_CTRx
    (0x329, 0x329, "DYN_OTHER", "GP", "DYN_OTHER", "GP"),  # IA32_PERF_METRICS
    (0x345, 0x345, "DYN_OTHER", "OTHER", "DYN_PERFMON", "GP"),  # IA32_PERF_CAPABILITIES
    (0x38D, 0x38D, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # IA32_FIXED_CTR_CTRL
    (0x38E, 0x38E, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # IA32_PERF_GLOBAL_STATUS
    (0x38F, 0x38F, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # IA32_PERF_GLOBAL_CTRL
    (0x390, 0x390, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # IA32_PERF_GLOBAL_STATUS_RESET
    (0x391, 0x391, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # IA32_PERF_GLOBAL_STATUS_SET
    (0x392, 0x392, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # IA32_PERF_GLOBAL_INUSE
    (0x3F1, 0x3F1, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # IA32_PEBS_ENABLE
    (0x3F2, 0x3F2, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # MSR_PEBS_MATRIX_VECT
    (0x3F6, 0x3F6, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # MSR_PEBS_LD_LATENCY
    (0x3F7, 0x3F7, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # MSR_PEBS_FRONTEND
    (0x480, 0x480, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_BASIC
    (0x481, 0x481, "FIXED_1", "VE", "FIXED_1", "GP"),  # IA32_VMX_PINBASED_CTLS
    (0x482, 0x482, "FIXED_1", "VE", "FIXED_1", "GP"),  # IA32_VMX_PROCBASED_CTLS
    (0x483, 0x483, "FIXED_1", "VE", "FIXED_1", "GP"),  # IA32_VMX_EXIT_CTLS
    (0x484, 0x484, "FIXED_1", "VE", "FIXED_1", "GP"),  # IA32_VMX_ENTRY_CTLS
    (0x485, 0x485, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_MISC
    (0x486, 0x486, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_CR0_FIXED0
    (0x487, 0x487, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_CR0_FIXED1
    (0x488, 0x488, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_CR4_FIXED0
    (0x489, 0x489, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_CR4_FIXED1
    (0x48A, 0x48A, "FIXED_1", "VE", "FIXED_1", "GP"),  # IA32_VMX_VMCS_ENUM
    (0x48B, 0x48B, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_PROCBASED_CTLS2
    (0x48C, 0x48C, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_EPT_VPID_CAP
    (0x48D, 0x48D, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_TRUE_PINBASED_CTLS
    (0x48E, 0x48E, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_TRUE_PROCBASED_CTLS
    (0x48F, 0x48F, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_TRUE_EXIT_CTLS
    (0x490, 0x490, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_TRUE_ENTRY_CTLS
    (0x491, 0x491, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_VMFUNC
    (0x492, 0x492, "FIXED_1", "OTHER", "FIXED_1", "GP"),  # IA32_VMX_PROCBASED_CTLS3
    (0x4C1, 0x4C8, "DYN_PERFMON", "GP", "DYN_PERFMON", "GP"),  # IA32_A_PMCx
    (0x500, 0x500, "FIXED_1", "GP", "FIXED_1", "GP"),  # IA32_SGX_SVN_STATUS
    (0x560, 0x560, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_OUTPUT_BASE
    (0x561, 0x561, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_OUTPUT_MASK_PTRS
    (0x570, 0x570, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_CTL
    (0x571, 0x571, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_STATUS
    (0x572, 0x572, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_CR3_MATCH
    (0x580, 0x580, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_ADDR0_A
    (0x581, 0x581, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_ADDR0_B
    (0x582, 0x582, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_ADDR1_A
    (0x583, 0x583, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_ADDR1_B
    (0x584, 0x584, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_ADDR2_A
    (0x585, 0x585, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_ADDR2_B
    (0x586, 0x586, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_ADDR3_A
    (0x587, 0x587, "DYN_XFAM_PT", "GP", "DYN_XFAM_PT", "GP"),  # IA32_RTIT_ADDR3_B
    (0x600, 0x600, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_DS_AREA
    (0x6A0, 0x6A0, "DYN_XFAM_CET", "GP", "DYN_XFAM_CET", "GP"),  # IA32_U_CET
    (0x6A2, 0x6A2, "DYN_XFAM_CET", "GP", "DYN_XFAM_CET", "GP"),  # IA32_S_CET
    (0x6A4, 0x6A4, "DYN_XFAM_CET", "GP", "DYN_XFAM_CET", "GP"),  # IA32_PL0_SSP
    (0x6A5, 0x6A5, "DYN_XFAM_CET", "GP", "DYN_XFAM_CET", "GP"),  # IA32_PL1_SSP
    (0x6A6, 0x6A6, "DYN_XFAM_CET", "GP", "DYN_XFAM_CET", "GP"),  # IA32_PL2_SSP
    (0x6A7, 0x6A7, "DYN_XFAM_CET", "GP", "DYN_XFAM_CET", "GP"),  # IA32_PL3_SSP
    (0x6A8, 0x6A8, "DYN_XFAM_CET", "GP", "DYN_XFAM_CET", "GP"),  # IA32_INTERRUPT_SSP_TABLE_ADDR
    (0x6E0, 0x6E0, "FIXED_1", "GP_OR_VE", "FIXED_1", "GP_OR_VE"),  # IA32_TSC_DEADLINE
    (0x6E1, 0x6E1, "DYN_PKS", "GP", "DYN_PKS", "GP"),  # IA32_PKRS
    (0x800, 0x801, "FIXED_1", "GP", "FIXED_1", "GP"),  # Reserved for xAPIC MSRs
    (0x804, 0x807, "FIXED_1", "GP", "FIXED_1", "GP"),  # Reserved for xAPIC MSRs
    (0x808, 0x808, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_X2APIC_TPR
    (0x809, 0x809, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # Reserved for xAPIC MSRs
    (0x80A, 0x80A, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_X2APIC_PPR
    (0x80B, 0x80B, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_X2APIC_EOI
    (0x80C, 0x80C, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # Reserved for xAPIC MSRs
    (0x80E, 0x80E, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # Reserved for xAPIC MSRs
    (0x810, 0x817, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_X2APIC_ISRx
    (0x818, 0x81F, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_X2APIC_TMRx
    (0x820, 0x827, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_X2APIC_IRRx
    (0x829, 0x82E, "FIXED_1", "GP", "FIXED_1", "GP"),  # Reserved for xAPIC MSRs
    (0x831, 0x831, "FIXED_1", "GP", "FIXED_1", "GP"),  # Reserved for xAPIC MSRs
    (0x83F, 0x83F, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_X2APIC_SELF_IPI
    (0x840, 0x87F, "FIXED_1", "GP", "FIXED_1", "GP"),  # Reserved for xAPIC MSRs
    (0x880, 0x8BF, "FIXED_1", "GP", "FIXED_1", "GP"),  # Reserved for xAPIC MSRs
    (0x8C0, 0x8FF, "FIXED_1", "GP", "FIXED_1", "GP"),  # Reserved for xAPIC MSRs
    (0x981, 0x981, "FIXED_1", "GP_OR_VE", "FIXED_1", "GP_OR_VE"),  # IA32_TME_CAPABILITY
    (0x982, 0x982, "FIXED_1", "GP_OR_VE", "FIXED_1", "GP_OR_VE"),  # IA32_TME_ACTIVATE
    (0x983, 0x983, "FIXED_1", "GP_OR_VE", "FIXED_1", "GP_OR_VE"),  # IA32_TME_EXCLUDE_MASK
    (0x984, 0x984, "FIXED_1", "GP_OR_VE", "FIXED_1", "GP_OR_VE"),  # IA32_TME_EXCLUDE_BASE
    (0x985, 0x985, "DYN_XFAM_ULI", "GP", "DYN_XFAM_ULI", "GP"),  # IA32_UINTR_RR
    (0x986, 0x986, "DYN_XFAM_ULI", "GP", "DYN_XFAM_ULI", "GP"),  # IA32_UINTR_HANDLER
    (0x987, 0x987, "DYN_XFAM_ULI", "GP", "DYN_XFAM_ULI", "GP"),  # IA32_UINTR_STACKADJUST
    (0x988, 0x988, "DYN_XFAM_ULI", "GP", "DYN_XFAM_ULI", "GP"),  # IA32_UINTR_MISC
    (0x989, 0x989, "DYN_XFAM_ULI", "GP", "DYN_XFAM_ULI", "GP"),  # IA32_UINTR_PD
    (0x98A, 0x98A, "DYN_XFAM_ULI", "GP", "DYN_XFAM_ULI", "GP"),  # IA32_UINTR_TT
    (0xC80, 0xC80, "FIXED_0", "FATAL_ERROR", "FIXED_1", "VE"),  # IA32_DEBUG_INTERFACE
    (0xD90, 0xD90, "FIXED_1", "GP", "FIXED_1", "GP"),  # IA32_BNDCFGS
    (0xD93, 0xD93, "FIXED_1", "GP", "FIXED_1", "GP"),  # IA32_PASID
    (0xDA0, 0xDA0, "FIXED_0", "FATAL_ERROR", "FIXED_1", "OTHER"),  # IA32_XSS
    (0x1200, 0x12FF, "DYN_XFAM_LBR", "GP", "DYN_XFAM_LBR", "GP"),  # IA32_LBR_INFO
    (0x14CE, 0x14CE, "DYN_XFAM_LBR", "GP", "DYN_XFAM_LBR", "GP"),  # IA32_LBR_CTL
    (0x14CF, 0x14CF, "DYN_XFAM_LBR", "GP", "DYN_XFAM_LBR", "GP"),  # IA32_LBR_DEPTH
    (0x1500, 0x15FF, "DYN_XFAM_LBR", "GP", "DYN_XFAM_LBR", "GP"),  # IA32_LBR_x_FROM_IP
    (0x1600, 0x16FF, "DYN_XFAM_LBR", "GP", "DYN_XFAM_LBR", "GP"),  # IA32_LBR_x_TO_IP
    (0x1B01, 0x1B01, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_UARCH_MISC_CTL
    (0xC0000080, 0xC0000080, "FIXED_0", "FATAL_ERROR", "FIXED_1", "OTHER"),  # IA32_EFER
    (0xC0000081, 0xC0000081, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_STAR
    (0xC0000082, 0xC0000082, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_LSTAR
    (0xC0000084, 0xC0000084, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_FMASK
    (0xC0000100, 0xC0000100, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_FSBASE
    (0xC0000101, 0xC0000101, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_GSBASE
    (0xC0000102, 0xC0000102, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_KERNEL_GS_BASE
    (0xC0000103, 0xC0000103, "FIXED_0", "FATAL_ERROR", "FIXED_0", "FATAL_ERROR"),  # IA32_TSC_AUX
)

IA32_MISC_ENABLES = 0x1A0
IA32_DEBUGCTL = 0x1D9
IA32_XSS = 0xDA0
IA32_ARCH_CAPABILITIES = 0x10A
IA32_PERF_CAPABILITIES = 0x345
IA32_XAPIC_DISABLE_STATUS = 0xBD
IA32_VMX_BASIC, IA32_VMX_PROCBASED_CTLS3 = 0x480, 0x492
# TDCS.VIRT_MSRS.VIRT_IA32_ARCH_CAPABILITIES as TDH.MNG.INIT computes it for this platform: RDCL_NO,
# IBRS_ALL, SKIP_L1DFL_VMENTRY, MDS_NO, PSCHANGE_MC_NO, TAA_NO (the platform's bits the module keeps)
VIRT_IA32_ARCH_CAPABILITIES = 1 << 0 | 1 << 1 | 1 << 3 | 1 << 5 | 1 << 6 | 1 << 8
IA32_XSS_SUPPORTED_MASK = 0  # the platform supports no supervisor XSAVE state
_HIGH = 0xC0000000


def find_msr_entry(index):
    for entry in MSR_LOOKUP:
        if entry[0] <= index <= entry[1]:
            return entry
        if index < entry[0]:
            return None
    return None


def is_msr_covered_by_bitmap(index):
    return index < 0x2000 or _HIGH <= index < _HIGH + 0x2000


def td_msr_bitmap():
    """The TD VMCS's MSR bitmap (init_msr_bitmaps()): every MSR exits but the FIXED_0 ones."""
    bm = MsrBitmap()
    for first, last, rd_bit, _ra, wr_bit, _wa in MSR_LOOKUP:
        for index in range(first, last + 1):
            if rd_bit == "FIXED_0":
                bm.set_intercept(index, MSR_TYPE_R, False)
            if wr_bit == "FIXED_0":
                bm.set_intercept(index, MSR_TYPE_W, False)
    return bm


def _edx_eax(hw):
    return (hw.reg("rdx") & 0xFFFFFFFF) << 32 | hw.reg("rax") & 0xFFFFFFFF


def _rdmsr_result(hw, value):
    hw.set_regs({"rax": value & 0xFFFFFFFF, "rdx": value >> 32 & 0xFFFFFFFF})
    return TD_MSR_ACCESS_SUCCESS


def _generic_case(index, write):
    """rd_wr_msr_generic_case(): the table's action for an exiting MSR with no handler of its own."""
    entry = find_msr_entry(index)
    if entry is None:
        return TD_MSR_ACCESS_MSR_NON_ARCH_EXCEPTION
    action = entry[5] if write else entry[3]
    if action == "VE":
        return TD_MSR_ACCESS_MSR_NON_ARCH_EXCEPTION
    if action in ("GP", "GP_OR_VE"):
        # GP_OR_VE: #GP since the TD has none of DCA, TME, MKTME, TSC deadline
        return TD_MSR_ACCESS_GP
    raise AssertionError(f"MSR {index:#x}: action {action} on an exit (FATAL_ERROR in the module)")


def td_wrmsr_exit(v, hw):
    """td_wrmsr_exit()"""
    index = hw.reg("rcx") & 0xFFFFFFFF
    if not is_msr_covered_by_bitmap(index):
        return TD_MSR_ACCESS_MSR_NON_ARCH_EXCEPTION
    value = _edx_eax(hw)
    if index == IA32_XSS:
        # wrmsr_ia32_xss(): every bit set must be supported by IA32_XSS and XFAM
        if value & ~IA32_XSS_SUPPORTED_MASK:
            return TD_MSR_ACCESS_GP
        return TD_MSR_ACCESS_SUCCESS
    if index == IA32_DEBUGCTL:
        # wrmsr_ia32_debugctl(): reserved bits 5:2 and 63:16 #GP; TR without BTS #VE; bit 13 kept
        if value & 0x3C or value >> 16:
            return TD_MSR_ACCESS_GP
        if value & (1 << 6) and not value & (1 << 7):
            return TD_MSR_ACCESS_MSR_NON_ARCH_EXCEPTION
        v.debugctl = value & ~(1 << 13) | v.debugctl & (1 << 13)
        return TD_MSR_ACCESS_SUCCESS
    if index == MSR_EFER:
        # wrmsr_ia32_efer(): LMA is read-only, only SCE may change; anything else is a #VE
        old = hw.uc.msr_read(MSR_EFER)
        new = value & ~EFER_LMA | old & EFER_LMA
        if (old & ~EFER_SCE | new & EFER_SCE) != new:
            return TD_MSR_ACCESS_MSR_NON_ARCH_EXCEPTION
        hw.uc.msr_write(MSR_EFER, new)
        return TD_MSR_ACCESS_SUCCESS
    return _generic_case(index, True)


def td_rdmsr_exit(v, hw):
    """td_rdmsr_exit()"""
    index = hw.reg("rcx") & 0xFFFFFFFF
    if not is_msr_covered_by_bitmap(index):
        return TD_MSR_ACCESS_MSR_NON_ARCH_EXCEPTION
    if index == IA32_DEBUGCTL:
        return _rdmsr_result(hw, v.debugctl & ~(1 << 13))
    if index == IA32_MISC_ENABLES:
        # rdmsr_ia32_misc_enables() without PERFMON: the CPU's value, PERFMON_AVAILABLE 0,
        # PEBS_UNAVAILABLE 1
        value = hw.uc.msr_read(IA32_MISC_ENABLES)
        return _rdmsr_result(hw, value & ~(1 << 7) | 1 << 12)
    if index == IA32_PERF_CAPABILITIES:
        return _rdmsr_result(hw, 0)  # without PERFMON
    if index == IA32_ARCH_CAPABILITIES:
        return _rdmsr_result(hw, VIRT_IA32_ARCH_CAPABILITIES)
    if index == IA32_XAPIC_DISABLE_STATUS:
        return _rdmsr_result(hw, 1)  # LEGACY_XAPIC_DISABLED
    entry = find_msr_entry(index)
    if IA32_VMX_BASIC <= index <= IA32_VMX_PROCBASED_CTLS3 and entry is not None and entry[3] == "OTHER":
        # rdmsr_l1_only_special_msrs(): the TDCS's virtual VMX capabilities; the model has no
        # TD partitioning (no L2 VM) and reads them as 0
        return _rdmsr_result(hw, 0)
    return _generic_case(index, False)
