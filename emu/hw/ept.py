"""The EPT walker of the emulated CPU (Intel SDM Vol. 3C, EPT chapter).

``walk(mem, eptp, gpa, access)`` is a pure function of host memory (apart from
the accessed/dirty flags it sets when the EPTP enables them).  It returns
exactly one of EptTranslation, EptViolation or EptMisconfig.

The emulated CPU (IA32_VMX_EPT_VPID_CAP as it would report it):
  execute-only pages, 4- and 5-level walks, UC and WB EPTP memory types,
  2M and 1G pages, accessed/dirty flags.  Not supported: mode-based execute
  control (bit 10 is ignored), advanced EPT-violation information (bits 9-11
  of the qualification stay 0), sub-page write permissions.  The walk reports
  the suppress-#VE bit (63) of the entry that decides whether a violation is
  convertible (SDM "Convertible EPT Violations": the non-present entry, else the
  leaf); the vCPU turns a convertible one into a #VE when its "EPT-violation
  #VE" control is on (emu.hw.vcpu), which only a TD's is.

Rules per entry, in the order the checks are made (Bochs'
translate_guest_physical makes the same ones):
  not present (bits 2:0 = 000)            -> violation, the walk stops
  W without R (bits 2:0 = 010 or 110)     -> misconfiguration
  reserved bits (51:MAXPHYADDR, and per level: PML5E/PML4E 7:3,
  non-leaf PDPTE/PDE 6:3, 1G leaf 29:12, 2M leaf 20:12)  -> misconfiguration
  leaf memory type 2, 3 or 7              -> misconfiguration
A misconfiguration anywhere on the path wins over a permission violation,
which is decided on the permissions ANDed over every entry of the path.
"""

from __future__ import annotations

import enum
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .memory import HostMemory

MAXPHYADDR = 48
ADDR_MASK = ((1 << MAXPHYADDR) - 1) & ~0xFFF  # bits N-1:12
RSVD_HIGH = ((1 << 52) - 1) & ~((1 << MAXPHYADDR) - 1)  # bits 51:N

# EPT entry bits
EPT_R = 1 << 0
EPT_W = 1 << 1
EPT_X = 1 << 2
EPT_RWX = 7
EPT_MT_SHIFT = 3
EPT_MT_MASK = 7 << 3
EPT_IPAT = 1 << 6
EPT_PS = 1 << 7  # page size: leaf above level 1
EPT_A = 1 << 8
EPT_D = 1 << 9
EPT_XU = 1 << 10
EPT_SVE = 1 << 63

MT_UC, MT_WC, MT_WT, MT_WP, MT_WB = 0, 1, 4, 5, 6
_BAD_MT = (2, 3, 7)

# EPTP bits
EPTP_MT_MASK = 7
EPTP_PWL_SHIFT = 3
EPTP_PWL_4 = 3 << 3  # VMX_EPTP_PWL_4 = 0x18
EPTP_PWL_5 = 4 << 3  # VMX_EPTP_PWL_5 = 0x20
EPTP_AD = 1 << 6
EPTP_RSVD = 0xF00 | RSVD_HIGH | (0xFFF << 52)

# EPT-violation exit qualification (Linux: EPT_VIOLATION_*)
EPT_VIOLATION_ACC_READ = 1 << 0
EPT_VIOLATION_ACC_WRITE = 1 << 1
EPT_VIOLATION_ACC_INSTR = 1 << 2
EPT_VIOLATION_PROT_READ = 1 << 3
EPT_VIOLATION_PROT_WRITE = 1 << 4
EPT_VIOLATION_PROT_EXEC = 1 << 5
EPT_VIOLATION_EXEC_FOR_RING3_LIN = 1 << 6
EPT_VIOLATION_GVA_IS_VALID = 1 << 7
EPT_VIOLATION_GVA_TRANSLATED = 1 << 8

QUALIFICATION_BITS = {
    0: "read",
    1: "write",
    2: "fetch",
    3: "R",
    4: "W",
    5: "X",
    6: "XU",
    7: "gla-valid",
    8: "final-translation",
    12: "nmi-unblocking",
}

# Reserved bits below bit 12 (plus the large-frame alignment bits) of a present entry.
_RSVD_NONLEAF_TOP = 0xF8  # PML5E, PML4E: bits 7:3
_RSVD_NONLEAF = 0x78  # PDPTE->PD, PDE->PT: bits 6:3
_RSVD_1G = 0x3FFFF000  # bits 29:12
_RSVD_2M = 0x1FF000  # bits 20:12


class Access(enum.IntEnum):
    """The kind of access; the value is its bit in the exit qualification."""

    READ = 1
    WRITE = 2
    FETCH = 4


class EptTranslation:
    """Success: ``hpa`` of the byte, leaf ``level`` (1 = 4K, 2 = 2M, 3 = 1G), ANDed ``perms`` (R=1 W=2 X=4).

    ``dirty`` tells whether the leaf's D flag is set after this walk (always True
    when the EPTP does not enable A/D): a TLB may allow writes without another walk
    only then.
    """

    __slots__ = ("hpa", "level", "perms", "dirty")

    def __init__(self, hpa, level, perms, dirty=True):
        self.hpa, self.level, self.perms, self.dirty = hpa, level, perms, dirty

    def __eq__(self, other):
        return (
            type(other) is EptTranslation
            and self.hpa == other.hpa
            and self.level == other.level
            and self.perms == other.perms
        )

    def __repr__(self):
        return f"EptTranslation(hpa={self.hpa:#x}, level={self.level}, perms={perms_str(self.perms)})"


class EptViolation:
    """Exit reason 48.  ``qualification`` has bits 0-5 set; bits 7 and 8 are the caller's to add.

    ``suppress_ve`` is bit 63 of the one entry whose bit decides whether the violation is
    convertible to a #VE (SDM Vol. 3C "Convertible EPT Violations"): the entry that was not
    present, or else the leaf that maps the page.  Not part of equality (a walk's outcome)."""

    __slots__ = ("gpa", "qualification", "suppress_ve")
    reason = 48

    def __init__(self, gpa, qualification, suppress_ve=True):
        self.gpa, self.qualification, self.suppress_ve = gpa, qualification, suppress_ve

    def __eq__(self, other):
        return type(other) is EptViolation and self.gpa == other.gpa and self.qualification == other.qualification

    def __repr__(self):
        return f"EptViolation(gpa={self.gpa:#x}, qualification={self.qualification:#x} [{decode_qualification(self.qualification)}])"


class EptMisconfig:
    """Exit reason 49.  ``reason`` names the rule; ``level`` and ``entry`` say where."""

    __slots__ = ("gpa", "reason", "level", "entry")
    reason_code = 49

    def __init__(self, gpa, reason, level=None, entry=None):
        self.gpa, self.reason, self.level, self.entry = gpa, reason, level, entry

    def __eq__(self, other):
        return type(other) is EptMisconfig and self.gpa == other.gpa and self.reason == other.reason

    def __repr__(self):
        where = f", level={self.level}, entry={self.entry:#x}" if self.entry is not None else ""
        return f"EptMisconfig(gpa={self.gpa:#x}, reason={self.reason!r}{where})"


# Misconfiguration reasons (the compiled walker, emu/hw/mmu.c, reports the same codes).
M_WNR, M_RSVD_HIGH, M_RSVD_1G, M_RSVD_2M, M_MEMTYPE, M_RSVD_TOP, M_RSVD_NONLEAF = range(1, 8)
MISCONFIG_REASONS = {
    M_WNR: "write without read",
    M_RSVD_HIGH: f"reserved address bits 51:{MAXPHYADDR}",
    M_RSVD_1G: "reserved bits 29:12 in a 1G leaf",
    M_RSVD_2M: "reserved bits 20:12 in a 2M leaf",
    M_MEMTYPE: "reserved memory type {mt}",
    M_RSVD_TOP: "reserved bits 7:3 in a level-{level} entry",
    M_RSVD_NONLEAF: "reserved bits 6:3 in a level-{level} non-leaf entry",
}


def _misconfig(gpa, reason, level, e):
    return EptMisconfig(gpa, MISCONFIG_REASONS[reason].format(level=level, mt=(e >> EPT_MT_SHIFT) & 7), level, e)


class InvalidEptp(ValueError):
    """An EPTP that VM entry would refuse (SDM: checks on VMX controls)."""


def perms_str(perms):
    return "".join(c if perms & b else "-" for c, b in (("R", 1), ("W", 2), ("X", 4)))


def decode_qualification(q):
    return ",".join(name for bit, name in QUALIFICATION_BITS.items() if q >> bit & 1)


def make_eptp(root_hpa, levels=4, ad=False, memtype=MT_WB):
    return root_hpa | memtype | ((levels - 1) << EPTP_PWL_SHIFT) | (EPTP_AD if ad else 0)


_eptp_cache: dict[int, tuple] = {}


def decode_eptp(eptp):
    """(root HPA, number of levels, A/D enabled) of a valid EPTP; InvalidEptp otherwise."""
    d = _eptp_cache.get(eptp)
    if d is not None:
        return d
    mt = eptp & EPTP_MT_MASK
    if mt not in (MT_UC, MT_WB):
        raise InvalidEptp(f"EPTP {eptp:#x}: memory type {mt} is not UC or WB")
    pwl = ((eptp >> EPTP_PWL_SHIFT) & 7) + 1
    if pwl not in (4, 5):
        raise InvalidEptp(f"EPTP {eptp:#x}: page-walk length {pwl} is not 4 or 5")
    if eptp & EPTP_RSVD:
        raise InvalidEptp(f"EPTP {eptp:#x}: reserved bits set ({eptp & EPTP_RSVD:#x})")
    d = (eptp & ADDR_MASK, pwl, bool(eptp & EPTP_AD))
    _eptp_cache[eptp] = d
    return d


def walk(
    mem: HostMemory, eptp: int, gpa: int, access: Access | int, path: list | None = None, set_ad: bool = True
) -> EptTranslation | EptViolation | EptMisconfig:
    """Translate ``gpa`` for ``access`` through the EPT rooted at ``eptp``.

    ``access`` is an Access, or READ|WRITE (3) for a guest paging-structure access
    when the EPTP enables A/D (the SDM treats those as writes and reports bits 0 and 1).

    ``path``, when a list, receives one (level, entry HPA, entry value) per entry
    read, for tracing.  ``set_ad=False`` makes a side-effect-free probe (as a
    debugger would), leaving A/D flags alone.
    """
    root, levels, ad = decode_eptp(eptp)
    if gpa >> (12 + 9 * levels):
        raise ValueError(f"GPA {gpa:#x} is wider than a {levels}-level EPT walk translates")
    q = mem.q
    table = root
    perms = EPT_RWX
    used = []  # entry HPAs whose A flag the walk sets
    level = levels
    while True:
        shift = 12 + 9 * (level - 1)
        ptr = table + (((gpa >> shift) & 511) << 3)
        e = q[ptr >> 3]
        if path is not None:
            path.append((level, ptr, e))
        rwx = e & EPT_RWX
        if not rwx:
            # Not present: bits 3-5 report the AND over the path, which includes this entry's 000.
            # This entry's bit 63 decides whether the violation is convertible.
            return EptViolation(gpa, int(access), bool(e & EPT_SVE))
        if rwx & 3 == 2:
            return _misconfig(gpa, M_WNR, level, e)
        if e & RSVD_HIGH:
            return _misconfig(gpa, M_RSVD_HIGH, level, e)
        leaf = level == 1 or (e & EPT_PS and level <= 3)
        if leaf:
            if level == 3 and e & _RSVD_1G:
                return _misconfig(gpa, M_RSVD_1G, level, e)
            if level == 2 and e & _RSVD_2M:
                return _misconfig(gpa, M_RSVD_2M, level, e)
            mt = (e >> EPT_MT_SHIFT) & 7
            if mt in _BAD_MT:
                return _misconfig(gpa, M_MEMTYPE, level, e)
        elif level >= 4:
            if e & _RSVD_NONLEAF_TOP:
                return _misconfig(gpa, M_RSVD_TOP, level, e)
        elif e & _RSVD_NONLEAF:
            return _misconfig(gpa, M_RSVD_NONLEAF, level, e)
        perms &= rwx
        if ad and set_ad and not e & EPT_A:
            used.append(ptr)
        if leaf:
            break
        table = e & ADDR_MASK
        level -= 1

    if perms & access != access:
        # A permission violation: the leaf's bit 63 decides (non-leaf entries' bit 63 is not used).
        return EptViolation(gpa, int(access) | (perms << 3), bool(e & EPT_SVE))

    dirty = True
    if ad:
        if set_ad:
            for p in used:
                _set_bits(q, p, EPT_A)
            if access & 2 and not e & EPT_D:  # a write sets D in the leaf
                _set_bits(q, ptr, EPT_D)
                e |= EPT_D
        dirty = bool(e & EPT_D)
    page_mask = (1 << shift) - 1
    return EptTranslation((e & ADDR_MASK & ~page_mask) | (gpa & page_mask), level, perms, dirty)


# (emu.checkers.dpor) while footprints are recorded: the entries whose A/D bits a walk set (the
# hardware writes the SPTE: a cmpxchg of KVM's against it then fails).
AD_LOG = None


def _set_bits(q, ptr, bits):
    """Set flag bits with a locked read-modify-write, as the CPU does (a plain store could
    lose a concurrent update by software or by another vCPU's walker)."""
    i = ptr >> 3
    while True:
        old = q[i]
        if old & bits == bits:
            return
        # cmpxchg: between the read and the store nothing runs (see HostMemory.cmpxchg64)
        if q[i] == old:
            q[i] = old | bits
            if AD_LOG is not None:
                AD_LOG.append(ptr)
            return


# The compiled walker (emu/hw/mmu.c, through emu.hw.native) takes over ``walk`` when it is
# built: the same function, proven equal to the Python one above (tests/hw/test_native.py),
# which stays the reference, the fallback for what the compiled one leaves to it (a path to
# record, an invalid EPTP, a GPA too wide), and the whole walker with EMU_PURE_PYTHON=1.
walk_py = walk
from . import native as _native  # noqa: E402  (after the classes the compiled walk creates)

if _native.load(sys.modules[__name__], walk_py) is not None:
    walk = _native.mmu.walk  # type: ignore[attr-defined]
