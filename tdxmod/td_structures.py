"""The TD's and the vCPU's control structures: TDR + TDCS (Td) and TDVPR + TDVPS (TdVcpu).

Follows src/common/data_structures/td_control_structures.h and tdx_tdvps.h of the TDX module
(tdx_1.5): the fields the model has, as Python objects tied to the pages the VMM gave
(TDH.MNG.CREATE, TDH.MNG.ADDCX, TDH.VP.CREATE, TDH.VP.ADDCX), which the host cannot read.
"""

import hashlib

from emu.hw.ept import make_eptp
from emu.hw.exits import VeInfo
from .abi import *  # noqa: F401,F403
from . import locks as L

PAGE = 4096
KEYID_BITS = 6  # MKTME key-id bits at the top of MAXPHYADDR
TDCS_PAGES = 4  # TDH.MNG.ADDCX pages per TD (the last one is the S-EPT root)
TDVPX_PAGES = 1  # TDH.VP.ADDCX pages per vCPU
MAX_VCPUS_DEFAULT = 64

# TD_PARAMS (a 1 KiB structure in shared memory; offsets as in the ABI)
TD_PARAMS_ATTRIBUTES = 0
TD_PARAMS_XFAM = 8
TD_PARAMS_MAX_VCPUS = 16
TD_PARAMS_EPTP_CONTROLS = 24  # bits 2:0 memory type, 5:3 page-walk length - 1
TD_PARAMS_CONFIG_FLAGS = 32  # bit 0 MAX_GPAW: the shared bit is GPA[51]

# TDH.VP.RD/WR field ids (class in bits 63:56 of this model's encoding)
MD_TDVPS_VMCS_SHARED_EPTP = 0x203C  # VMCS field: SHARED_EPT_POINTER
MD_TDVPS_GPR_BASE = 0x0100  # + index of the GPR (rax=0 .. r15=15), debug TDs only
MD_TDVPS_RIP = 0x0120
MD_TDVPS_CR3 = 0x0121
GPR_ORDER = (
    "rax",
    "rcx",
    "rdx",
    "rbx",
    "rsp",
    "rbp",
    "rsi",
    "rdi",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
)


class Td:
    """TDR + TDCS of one TD."""

    def __init__(self, tdr, hkid):
        self.tdr = tdr
        self.hkid = hkid
        self.lifecycle = TD_HKID_ASSIGNED
        self.op_state = OP_STATE_UNINITIALIZED
        self.tdcx = []
        self.chldcnt = 0
        self.attributes = 0
        self.max_vcpus = MAX_VCPUS_DEFAULT
        self.pwl = 4
        self.gpaw = 0
        self.config_flags = 0
        self.shared_bit = 1 << 47
        self.sept_root = None
        self.epoch = 1
        self.refcount = [0, 0]
        self.mrtd = hashlib.sha384()
        self.finalized_mrtd = None
        self.vcpus = {}
        self.num_vcpus = 0  # vCPUs initialized (TDH.VP.INIT)
        self.fatal = False  # TDR.FATAL: set by a TD exit the module deems non-recoverable
        self.num_assoc_vcpus = 0  # TDCS.NUM_ASSOC_VCPUS: vCPUs associated with a logical CPU
        # The TDCS locks (tdxmod.locks): the op_state lock (sharex_hp), the S-EPT tree lock
        # (secure_ept_lock, sharex) and the TD epoch lock (sharex).  The TDR's own lock is its
        # page's PAMT entry lock (in the PAMT, as the TDVPR's is).
        self.op_state_lock = 0
        self.secure_ept_lock = 0
        self.epoch_lock = 0
        self.wbcache_needed = False

    # Views of the lock words (tests, invariants)
    @property
    def sept_readers(self):
        return L.sharex_readers(self.secure_ept_lock)

    @property
    def sept_writer(self):
        return bool(self.secure_ept_lock & L.SHAREX_EXCLUSIVE_LOCK)

    @property
    def epoch_locked(self):
        return bool(self.epoch_lock & L.SHAREX_EXCLUSIVE_LOCK)

    @epoch_locked.setter
    def epoch_locked(self, held):
        """(tests) another CPU's TDH.MEM.TRACK holds the epoch lock (or not)."""
        self.epoch_lock = L.SHAREX_EXCLUSIVE_LOCK if held else L.SHAREX_FREE

    @property
    def secure_eptp(self):
        return make_eptp(self.sept_root, levels=self.pwl, ad=True)

    @property
    def sept_top_level(self):
        return self.pwl - 1


class TdVcpu:
    """TDVPR + TDVPS of one TD vCPU.  ``hw`` is the CPU context the module runs it on."""

    def __init__(self, td, tdvpr):
        self.td = td
        self.tdvpr = tdvpr
        self.tdvpx = []
        self.state = VCPU_UNINITIALIZED  # TDVPS.STATE: READY after TDH.VP.INIT, ACTIVE while in the TD
        self.assoc_lpid = None  # TDVPS.ASSOC_LPID: the logical CPU it is associated with (None: -1)
        self.last_td_exit = LAST_EXIT_ASYNC_FAULT
        self.exit_state = None  # (in TDH.VP.ENTER) the TDVPS.STATE the TD exit stores; None: the TD died
        self.hw = None
        self.shared_eptp = None
        self.epoch = None  # the epoch this vCPU entered in (counted in td.refcount)
        self.vmcall_pending = None  # the TDCALL awaiting the VMM's TDG.VP.VMCALL answer
        self.launched = False
        self.x2apic_id = None
        self.vcpu_index = None  # the order of TDH.VP.INIT
        self.last_tdcall_leaf = None  # for the trace
        self.last_tdcall_rcx = 0
        self.vmcall_control = 0  # the guest's TDG.VP.VMCALL RCX (which GPRs the VMM answers)
        # Zero-step mitigation (td_exit_stepping.c): EPT violations at one RIP, and the GPAs
        # recorded once they pass STEPPING_EPF_THRESHOLD.
        self.rip_on_tdentry = None
        self.possibly_epf_stepping = 0
        self.last_epf_gpa_list = []
        # TDVPS.VE_INFO (tdvps_ve_info_t): valid is 0xFFFFFFFF while a #VE's information is
        # unread; TDG.VP.VEINFO.GET reads it and clears valid.  It is also the TD VMCS's
        # virtualization-exception information area: the CPU fills it for a convertible EPT
        # violation (init_guest_td_address_fields(); TDH.VP.INIT hands it to the vCPU).
        self.ve_info = VeInfo()
        self.debugctl = 0  # the guest's IA32_DEBUGCTL (td_msr: the module emulates it)

    @property
    def initialized(self):
        return self.state != VCPU_UNINITIALIZED

    @property
    def associated(self):
        return self.assoc_lpid is not None

    @property
    def in_td(self):
        """Between TD entry and TD exit (counted in td.refcount)."""
        return self.state == VCPU_ACTIVE
