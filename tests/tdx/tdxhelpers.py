"""Helpers for register-level tests of the simulated TDX module (tdxmod).

Everything goes through ``TdxModule.seamcall``; state is checked in memory (S-EPT
entries read with ``mem.read64``, PAMT entries through ``module.pamt``) and in
the TD's fields.  The S-EPT entry encoding below is written from REFERENCE.md
3.4, independently of ``tdxmod/sept.py``, so a wrong encoding in the module
shows up as a failed comparison.
"""

from emu.host import Host
from tdxmod import abi as A
from tdxmod.module import (
    TD_PARAMS_ATTRIBUTES,
    TD_PARAMS_MAX_VCPUS,
    TD_PARAMS_EPTP_CONTROLS,
    TD_PARAMS_CONFIG_FLAGS,
    TDCS_PAGES,
    TDVPX_PAGES,
)

PAGE = 4096
MiB = 1 << 20
M2 = 2 * MiB
U64 = (1 << 64) - 1

# -- spec values (REFERENCE 3.3 / facts sheet), written out rather than imported -----------------
SUCCESS = 0
OPERAND_BUSY = 0x8000020000000000
PREVIOUS_TLB_EPOCH_BUSY = 0x8000020100000000
OPERAND_INVALID = 0xC000010000000000
OPERAND_ADDR_RANGE_ERROR = 0xC000010100000000
PAGE_METADATA_INCORRECT = 0xC000030000000000
TD_ASSOCIATED_PAGES_EXIST = 0xC000040000000000
TD_FATAL = 0xE000060400000000
LIFECYCLE_STATE_INCORRECT = 0xC000060700000000
OP_STATE_INCORRECT = 0xC000060800000000
TD_KEYS_NOT_CONFIGURED = 0x8000081000000000
KEY_CONFIGURED = 0x0000081500000000
WBCACHE_NOT_COMPLETE = 0x8000081700000000
FLUSHVP_NOT_DONE = 0x8000082400000000
EPT_WALK_FAILED = 0xC0000B0000000000
GPA_RANGE_NOT_BLOCKED = 0xC0000B0600000000
GPA_RANGE_ALREADY_BLOCKED = 0x00000B0700000000
TLB_TRACKING_NOT_DONE = 0xC0000B0800000000
EPT_ENTRY_STATE_INCORRECT = 0xC0000B0D00000000
EPT_PAGE_NOT_FREE = 0xC0000B0E00000000
VCPU_STATE_INCORRECT = 0xC000070000000000
MAX_VCPUS_EXCEEDED = 0xC000070500000000
X2APIC_ID_NOT_UNIQUE = 0xC000062100000000
TDCS_NOT_ALLOCATED = 0xC000060600000000
NO_VCPUS = 0xC000060900000000
TDCX_NUM_INCORRECT = 0xC000061000000000
HKID_NOT_FREE = 0xC000082000000000
EPT_ENTRY_NOT_PRESENT = 0xC0000B0300000000
OPERAND_BUSY_HOST_PRIORITY = 0x8000020400000000
PAGE_ALREADY_ACCEPTED = 0x00000B0A00000000
PAGE_SIZE_MISMATCH = 0xC0000B0B00000000
STATUS_MASK = 0xFFFFFFFF00000000

OP_RAX, OP_RCX, OP_RDX, OP_R8, OP_R9 = 0, 1, 2, 8, 9
OP_ATTRIBUTES, OP_EXEC_CONTROLS, OP_EPTP_CONTROLS = 64, 66, 67
OP_TDR, OP_SEPT_TREE, OP_TD_EPOCH, OP_OP_STATE = 0x80, 0x92, 0xA9, 0xAC

PT_NDA, PT_REG, PT_TDR, PT_TDCX, PT_TDVPR, PT_EPT = 0, 3, 4, 5, 6, 8

# -- S-EPT entry encoding (REFERENCE 3.4) ---------------------------------------------------------
SVE = 1 << 63
TDB = 1 << 55
TDP = 1 << 56
TDEL = 1 << 11
TDHP = 1 << 52
RWX = 7
LEAF_ATTRS = (6 << 3) | (1 << 6) | (1 << 7)  # MT=WB, IPAT, PS (state enc[6:5] = 11)
HPA_MASK = ((1 << 52) - 1) & ~0xFFF
FREE_ENTRY = 0x80E0000000000000

FREE, NL_MAPPED, NL_BLOCKED, MAPPED, BLOCKED, PENDING, PENDING_BLOCKED = (
    "FREE",
    "NL_MAPPED",
    "NL_BLOCKED",
    "MAPPED",
    "BLOCKED",
    "PENDING",
    "PENDING_BLOCKED",
)
PUBLIC_STATE = {FREE: 0, BLOCKED: 1, PENDING: 2, PENDING_BLOCKED: 3, MAPPED: 4, NL_BLOCKED: 0x81, NL_MAPPED: 0x84}
LEAF_STATES = (MAPPED, BLOCKED, PENDING, PENDING_BLOCKED)


def entry_value(state, hpa=0):
    """The S-EPT entry the spec gives for ``state`` pointing at ``hpa``."""
    if state == FREE:
        return FREE_ENTRY
    if state == NL_MAPPED:
        return SVE | hpa | RWX
    if state == NL_BLOCKED:
        return SVE | hpa | TDB
    if state == MAPPED:
        return SVE | hpa | LEAF_ATTRS | RWX
    if state == BLOCKED:
        return SVE | hpa | LEAF_ATTRS | TDB
    if state == PENDING:
        return SVE | hpa | LEAF_ATTRS | TDP
    if state == PENDING_BLOCKED:
        return SVE | hpa | LEAF_ATTRS | TDP | TDB
    raise ValueError(state)


def decode_state(e):
    """State name from the 7-bit encoding: enc[0] = bit 9, enc[4:1] = bits 56:53, enc[6:5] = bits 7:6."""
    enc = ((e >> 9) & 1) | (((e >> 53) & 0xF) << 1) | (((e >> 6) & 3) << 5)
    return {
        0x0E: FREE,
        0x0C: "REMOVED",
        0x00: NL_MAPPED,
        0x08: NL_BLOCKED,
        0x60: MAPPED,
        0x68: BLOCKED,
        0x70: PENDING,
        0x78: PENDING_BLOCKED,
    }.get(enc, f"enc {enc:#x}")


def arch_entry(state, hpa=0):
    """RCX of an error (REFERENCE 3.2): FREE -> SVE only; leaf masked to RWX|MT|HPA|IPAT|PS|SVE; non-leaf RWX|PS."""
    e = entry_value(state, hpa)
    if state == FREE:
        return 0x8000000000000000
    if state in LEAF_STATES:
        return e & (RWX | (7 << 3) | HPA_MASK | (1 << 6) | (1 << 7) | SVE)
    return e & (RWX | (1 << 7))


def align(gpa, level):
    """``gpa`` rounded down to the range an entry at ``level`` maps (page-info operands must be aligned)."""
    return gpa & ~((PAGE << (9 * level)) - 1)


def info(state, level):
    """RDX of an error: level in bits 2:0, public state in bits 15:8."""
    return level | (PUBLIC_STATE[state] << 8)


class TdEnv:
    """One host with a TDX module, and helpers to build one TD on it step by step."""

    HKID_SHIFT = None

    def __init__(self, host=None, user_size=24 * MiB):
        self.host = host if host is not None else Host(user_size, kernel_size=8 * MiB, tdx=True)
        self.mod = self.host.tdx_module
        self.mem = self.host.mem
        self.pamt = self.mod.pamt
        self.hkid_shift = self.mod.x86_phys_bits
        self.tdr = None
        self.hkid = None
        self.tdcs = []
        self.vcpus = []  # [(tdvpr, [tdvpx...])]
        self.sept_pages = []  # S-EPT pages given with SEPT.ADD (still owned)
        self.leaves = {}  # gpa -> (level, hpa) of AUGed/ADDed pages still mapped

    # -- plumbing -----------------------------------------------------------------------------------
    def call(self, leaf, **regs):
        return self.mod.seamcall(leaf, **regs)

    @property
    def td(self):
        return self.mod.tds[self.tdr]

    def kpage(self):
        return self.host.alloc_kernel_page()

    def upage(self, size=PAGE, align=PAGE):
        return self.host.mmap(size, align)

    def ok(self, out, what=""):
        assert out.rax == SUCCESS, f"{what}: {A.status_name(out.rax)} {out!r}"
        return out

    # -- TD build -----------------------------------------------------------------------------------
    def create(self, hkid=1):
        self.tdr = self.kpage()
        self.hkid = hkid
        self.ok(self.call(A.TDH_MNG_CREATE, rcx=self.tdr, rdx=hkid), "MNG.CREATE")
        return self

    def key_config(self):
        self.ok(self.call(A.TDH_MNG_KEY_CONFIG, rcx=self.tdr), "MNG.KEY.CONFIG")
        return self

    def addcx(self, n=TDCS_PAGES):
        for _ in range(n):
            page = self.kpage()
            self.ok(self.call(A.TDH_MNG_ADDCX, rcx=page, rdx=self.tdr), "MNG.ADDCX")
            self.tdcs.append(page)
        return self

    def td_params(
        self, attributes=A.TD_ATTR_SEPT_VE_DISABLE | A.TD_ATTR_DEBUG, max_vcpus=8, eptp_controls=0x1E, config_flags=0
    ):
        pa = self.kpage()  # 4K-aligned, so 1024-aligned
        self.mem.host_write64(pa + TD_PARAMS_ATTRIBUTES, attributes)
        self.mem.host_write64(pa + TD_PARAMS_MAX_VCPUS, max_vcpus)
        self.mem.host_write64(pa + TD_PARAMS_EPTP_CONTROLS, eptp_controls)
        self.mem.host_write64(pa + TD_PARAMS_CONFIG_FLAGS, config_flags)
        return pa

    def init(self, **params):
        self.ok(self.call(A.TDH_MNG_INIT, rcx=self.tdr, rdx=self.td_params(**params)), "MNG.INIT")
        return self

    def vp_create(self):
        tdvpr = self.kpage()
        self.ok(self.call(A.TDH_VP_CREATE, rcx=tdvpr, rdx=self.tdr), "VP.CREATE")
        self.vcpus.append((tdvpr, []))
        return tdvpr

    def vp_addcx(self, tdvpr):
        pages = dict(self.vcpus)[tdvpr]
        for _ in range(TDVPX_PAGES):
            page = self.kpage()
            self.ok(self.call(A.TDH_VP_ADDCX, rcx=page, rdx=tdvpr), "VP.ADDCX")
            pages.append(page)

    def vp_init(self, tdvpr, rcx=0, x2apic=None):
        if x2apic is None:
            x2apic = len(self.vcpus) - 1
        return self.call(A.TDH_VP_INIT | (1 << 16), rcx=tdvpr, rdx=rcx, r8=x2apic)

    def add_vcpu(self, rcx=0):
        tdvpr = self.vp_create()
        self.vp_addcx(tdvpr)
        self.ok(self.vp_init(tdvpr, rcx=rcx), "VP.INIT")
        return tdvpr

    def finalize(self):
        self.ok(self.call(A.TDH_MR_FINALIZE, rcx=self.tdr), "MR.FINALIZE")
        return self

    def build(self, stage, **params):
        """created -> keyed -> initialized -> vcpu -> runnable"""
        order = ("created", "keyed", "initialized", "vcpu", "runnable")
        n = order.index(stage)
        self.create()
        if n >= 1:
            self.key_config()
            self.addcx()
        if n >= 2:
            self.init(**params)
        if n >= 3:
            self.add_vcpu()
        if n >= 4:
            self.finalize()
        return self

    # -- S-EPT helpers ------------------------------------------------------------------------------------
    @property
    def top(self):
        return self.td.pwl - 1

    def sept_add(self, gpa, level, page=None, allow_existing=False):
        page = self.kpage() if page is None else page
        out = self.call(A.TDH_MEM_SEPT_ADD, rcx=gpa | level, rdx=self.tdr | int(allow_existing), r8=page)
        if out.rax == SUCCESS and self.pamt.page_type(page) == PT_EPT:
            self.sept_pages.append(page)
        return out

    def ensure_path(self, gpa, level):
        """SEPT.ADD from the top down so that the entry for ``gpa`` at ``level`` exists (maybe FREE)."""
        for lvl in range(self.top, level, -1):
            if decode_state(self.entry(gpa, lvl)) == FREE:
                self.ok(self.sept_add(align(gpa, lvl), lvl), f"SEPT.ADD {gpa:#x} level {lvl}")

    def entry_pa(self, gpa, level):
        """HPA of the S-EPT entry mapping ``gpa`` at ``level`` (follows NL_MAPPED and NL_BLOCKED), or None."""
        table = self.td.sept_root
        lvl = self.top
        while True:
            pa = table + (((gpa >> (12 + 9 * lvl)) & 511) << 3)
            if lvl == level:
                return pa
            e = self.mem.read64(pa)
            if decode_state(e) not in (NL_MAPPED, NL_BLOCKED):
                return None
            table = e & HPA_MASK
            lvl -= 1

    def entry(self, gpa, level):
        pa = self.entry_pa(gpa, level)
        assert pa is not None, f"no S-EPT table for {gpa:#x} level {level}"
        return self.mem.read64(pa)

    def aug(self, gpa, level=0, page=None):
        if page is None:
            page = self.upage(PAGE << (9 * level), align=PAGE << (9 * level))
        out = self.call(A.TDH_MEM_PAGE_AUG, rcx=gpa | level, rdx=self.tdr, r8=page)
        if out.rax == SUCCESS:
            self.leaves[gpa] = (level, page)
        return out, page

    def source(self, data=b""):
        src = self.upage()
        self.mem.host_write(src, data.ljust(PAGE, b"\0"))
        return src

    def page_add(self, gpa, data=b"", page=None):
        page = self.upage() if page is None else page
        out = self.call(A.TDH_MEM_PAGE_ADD, rcx=gpa, rdx=self.tdr, r8=page, r9=self.source(data))
        if out.rax == SUCCESS:
            self.leaves[gpa] = (0, page)
        return out, page

    def block(self, gpa, level=0):
        return self.call(A.TDH_MEM_RANGE_BLOCK, rcx=gpa | level, rdx=self.tdr)

    def unblock(self, gpa, level=0):
        return self.call(A.TDH_MEM_RANGE_UNBLOCK, rcx=gpa | level, rdx=self.tdr)

    def track(self):
        return self.call(A.TDH_MEM_TRACK, rcx=self.tdr)

    def remove(self, gpa, level=0):
        out = self.call(A.TDH_MEM_PAGE_REMOVE, rcx=gpa | level, rdx=self.tdr)
        if out.rax == SUCCESS:
            self.leaves.pop(gpa, None)
        return out

    def sept_remove(self, gpa, level):
        out = self.call(A.TDH_MEM_SEPT_REMOVE, rcx=gpa | level, rdx=self.tdr)
        if out.rax == SUCCESS and out.rcx in self.sept_pages:
            self.sept_pages.remove(out.rcx)
        return out

    # -- putting one entry in a given state (REFERENCE 3.5 matrices) ---------------------------------------
    def make_state(self, gpa, level, state):
        """Drive the entry for ``gpa`` at ``level`` into ``state``; returns the HPA it points at (0 if FREE).

        Level 0: FREE, MAPPED (PAGE.ADD: needs INITIALIZED), BLOCKED, PENDING, PENDING_BLOCKED.
        Level >= 1: FREE, NL_MAPPED, NL_BLOCKED and, at level 1, PENDING / PENDING_BLOCKED (a 2M AUG).
        """
        self.ensure_path(gpa, level)
        gpa = align(gpa, level)
        hpa = 0
        if state in (MAPPED, BLOCKED):
            assert level == 0
            out, hpa = self.page_add(gpa, b"page data")
            self.ok(out, "PAGE.ADD")
        elif state in (PENDING, PENDING_BLOCKED):
            out, hpa = self.aug(gpa, level)
            self.ok(out, "PAGE.AUG")
        elif state in (NL_MAPPED, NL_BLOCKED):
            hpa = self.kpage()
            self.ok(self.sept_add(gpa, level, hpa), "SEPT.ADD")
        if state in (BLOCKED, PENDING_BLOCKED, NL_BLOCKED):
            self.ok(self.block(gpa, level), "BLOCK")
        assert self.entry(gpa, level) == entry_value(state, hpa), f"setup of {state} at level {level}"
        return hpa


class RaceSched:
    """A fake scheduler: at the first scheduling point named ``at`` it runs ``action`` (the second caller)."""

    def __init__(self, at, action):
        self.at = at
        self.action = action
        self.fired = False
        self.result = None
        self.entry_during = None
        self.points = []

    def point(self, caller, what, *args):
        self.points.append(what)
        if what == self.at and not self.fired:
            self.fired = True
            self.result = self.action()
