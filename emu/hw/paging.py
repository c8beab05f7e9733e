"""Guest paging: the IA-32e 4-level walk from CR3, two-dimensional under EPT.

Every guest paging-structure entry lives at a GPA, so each one is itself
translated through EPT before it is read (SDM: "guest-physical accesses" of the
walk).  An EPT failure there is reported with the guest-linear address valid
(qualification bit 7) and bit 8 clear; an EPT failure on the final GPA has bit 8
set.  Guest permission failures are guest page faults with the SDM error code.

The guest runs at CPL 0 (see README "Fidelity"): user-mode checks are modelled
but every access the vCPU makes is a supervisor access.
"""

import sys

from .ept import EptTranslation, EptViolation, EPT_VIOLATION_GVA_IS_VALID, EPT_VIOLATION_GVA_TRANSLATED

GUEST_MAXPHYADDR = 48  # CPUID.80000008H:EAX[7:0] as the guest sees it

PT_P = 1 << 0
PT_RW = 1 << 1
PT_US = 1 << 2
PT_A = 1 << 5
PT_D = 1 << 6
PT_PS = 1 << 7
PT_XD = 1 << 63
PT_ADDR = ((1 << GUEST_MAXPHYADDR) - 1) & ~0xFFF
_RSVD_HIGH = ((1 << 52) - 1) & ~((1 << GUEST_MAXPHYADDR) - 1)
_RSVD_PML4E = PT_PS
_RSVD_1G = 0x3FFFE000  # bits 29:13 (bit 12 is PAT)
_RSVD_2M = 0x1FE000  # bits 20:13

# Page-fault error code (SDM "Interrupt 14")
PFERR_PRESENT = 1 << 0
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_RSVD = 1 << 3
PFERR_FETCH = 1 << 4

# CR0 / CR4 / EFER bits the walk depends on
X86_CR0_WP = 1 << 16
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_NXE = 1 << 11

READ, WRITE, FETCH = 1, 2, 4
PAGING = 8  # a guest paging-structure read, as passed to the EPT callback


class PageFault:
    """Guest #PF (vector 14): ``gva`` goes to CR2, ``error_code`` per the SDM."""

    __slots__ = ("gva", "error_code")
    vector = 14

    def __init__(self, gva, error_code):
        self.gva, self.error_code = gva, error_code

    def __eq__(self, other):
        return type(other) is PageFault and (self.gva, self.error_code) == (other.gva, other.error_code)

    def __repr__(self):
        return f"PageFault(gva={self.gva:#x}, error_code={self.error_code:#x} [{decode_pfec(self.error_code)}])"


class GeneralProtection:
    """Guest #GP(0): a non-canonical linear address."""

    __slots__ = ("gva",)
    vector = 13
    error_code = 0

    def __init__(self, gva):
        self.gva = gva

    def __repr__(self):
        return f"GeneralProtection(gva={self.gva:#x})"


class Translation:
    """A completed 2D translation: host frame and the permissions a TLB entry may carry.

    ``perms`` (R=1 W=2 X=4) is what may be cached without another walk: W only
    when no dirty flag (guest PTE or EPT leaf) is still clear, so the first write
    to a page cached for reading walks again and sets D exactly then.
    """

    __slots__ = ("gva", "gpa", "hpa", "perms", "level", "ept_level")

    def __init__(self, gva, gpa, hpa, perms, level, ept_level):
        self.gva, self.gpa, self.hpa, self.perms = gva, gpa, hpa, perms
        self.level, self.ept_level = level, ept_level

    def __repr__(self):
        return (
            f"Translation(gva={self.gva:#x}, gpa={self.gpa:#x}, hpa={self.hpa:#x}, perms={self.perms}, "
            f"level={self.level}, ept_level={self.ept_level})"
        )


def decode_pfec(ec):
    names = ((PFERR_PRESENT, "P"), (PFERR_WRITE, "W"), (PFERR_USER, "U"), (PFERR_RSVD, "RSVD"), (PFERR_FETCH, "I/D"))
    return "|".join(n for b, n in names if ec & b) or "not-present,read"


def _ept_exit(res, paging_structure):
    q = res.qualification | EPT_VIOLATION_GVA_IS_VALID
    if not paging_structure:
        q |= EPT_VIOLATION_GVA_TRANSLATED
    return EptViolation(res.gpa, q, res.suppress_ve)


def translate(q, ept, cr3, gva, access, wp=True, nxe=True, user=False, path=None, pscache=None):
    """Translate ``gva`` for ``access`` (READ/WRITE/FETCH).

    ``q`` is host memory as 64-bit words (HostMemory.q); ``ept(gpa, access)`` is the
    EPT walk the vCPU uses (it picks shared or secure EPTP by GPA).  Guest
    paging-structure reads are passed as access PAGING: the EPT side makes them
    writes (READ|WRITE) when its EPTP enables A/D, as the SDM says.
    ``path`` receives (level, entry GPA, entry HPA, entry) per guest entry read.

    ``nxe`` (EFER.NXE) may be a callable: it is asked only when it matters (a fetch,
    or an entry with XD set), which keeps an MSR read off most fills.

    ``pscache`` is the vCPU's paging-structure cache (SDM "Paging-Structure Caches"):
    the PML4E, PDPTE and PDE of each 2M region, with the host addresses EPT gave
    their GPAs.  A cached walk re-reads those entries and uses them only if they
    are unchanged, so it always gives what a full walk gives; the vCPU drops the
    cache with its TLB (INVEPT), as it drops the EPT translations it rests on.

    Returns Translation, PageFault, GeneralProtection, or the EPT exit
    (EptViolation with bits 7/8 set, or EptMisconfig).
    """
    if (gva >> 47) not in (0, 0x1FFFF):
        return GeneralProtection(gva)
    if access == FETCH and nxe.__class__ is not bool:
        nxe = bool(nxe())
    pfec = (
        (PFERR_WRITE if access == WRITE else 0)
        | (PFERR_USER if user else 0)
        | (PFERR_FETCH if access == FETCH and nxe else 0)
    )
    rsvd_high = _RSVD_HIGH

    table = cr3 & PT_ADDR
    rw = us = 1
    xd = 0
    entries = []  # (entry GPA, entry HPA, value) from the top
    level = 4
    key = None
    cached_leaf = False
    if pscache is not None and path is None:
        key = (table, gva >> 21)
        hit = pscache.get(key)
        if hit is not None:
            for egpa, ehpa, e in hit:
                if q[ehpa >> 3] != e:
                    del pscache[key]
                    hit = None
                    break
        if hit is not None:
            entries = list(hit)
            pde = hit[-1][2]
            both = hit[0][2] & hit[1][2] & pde
            rw, us = both >> 1, both >> 2
            if pde & PT_PS:  # a 2M page: the walk is done
                level, shift, e = 2, 21, pde
                key = None
                cached_leaf = True
            else:
                level, table = 1, pde & PT_ADDR
    while not cached_leaf:
        shift = 12 + 9 * (level - 1)
        egpa = table + (((gva >> shift) & 511) << 3)
        t = ept(egpa, PAGING)
        if t.__class__ is not EptTranslation:
            return _ept_exit(t, True) if t.__class__ is EptViolation else t
        ehpa = t.hpa
        e = q[ehpa >> 3]
        if path is not None:
            path.append((level, egpa, ehpa, e))
        if not e & PT_P:
            return PageFault(gva, pfec)
        rsvd = rsvd_high
        leaf = level == 1 or (e & PT_PS and level <= 3)
        if level == 4:
            rsvd |= _RSVD_PML4E
        elif leaf and level == 3:
            rsvd |= _RSVD_1G
        elif leaf and level == 2:
            rsvd |= _RSVD_2M
        if e & PT_XD:
            if nxe.__class__ is not bool:
                nxe = bool(nxe())
            if not nxe:
                rsvd |= PT_XD  # XD is reserved unless EFER.NXE
        if e & rsvd:
            return PageFault(gva, pfec | PFERR_PRESENT | PFERR_RSVD)
        rw &= e >> 1
        us &= e >> 2
        xd |= e >> 63
        entries.append((egpa, ehpa, e))
        if leaf:
            break
        table = e & PT_ADDR
        level -= 1
    if (
        key is not None
        and len(entries) >= 3
        and not xd
        and entries[2][2] & PT_A
        and entries[0][2] & entries[1][2] & PT_A
    ):
        pscache[key] = tuple(entries[:3])  # through the PDE: all present, accessed, no XD

    # Permission checks on the combined rights (SDM "Access Rights").
    guest_w = rw & 1 or (not user and not wp)
    if access == WRITE and not guest_w:
        return PageFault(gva, pfec | PFERR_PRESENT)
    if user and not us & 1:
        return PageFault(gva, pfec | PFERR_PRESENT)
    guest_x = not (xd and nxe)
    if access == FETCH and not guest_x:
        return PageFault(gva, pfec | PFERR_PRESENT)

    # Accessed flags in every entry, dirty in the leaf on a write: locked RMWs of
    # guest memory, so each is an EPT write access (with EPT A/D on, the read above
    # already was one and this second walk changes nothing).
    last = len(entries) - 1
    for i, (egpa, ehpa, e) in enumerate(entries):
        want = PT_A | (PT_D if i == last and access == WRITE else 0)
        if e & want == want:
            continue
        t = ept(egpa, WRITE)
        if t.__class__ is not EptTranslation:
            return _ept_exit(t, True) if t.__class__ is EptViolation else t
        _set_bits(q, ehpa, want)
    leaf_dirty = access == WRITE or entries[last][2] & PT_D

    page_mask = (1 << shift) - 1
    gpa = (e & PT_ADDR & ~page_mask) | (gva & page_mask)
    t = ept(gpa, access)
    if t.__class__ is not EptTranslation:
        return _ept_exit(t, False) if t.__class__ is EptViolation else t
    perms = t.perms & READ
    if guest_x:
        perms |= t.perms & FETCH
    if guest_w and t.perms & WRITE and leaf_dirty and t.dirty:
        perms |= WRITE
    return Translation(gva, gpa, t.hpa, perms, level, t.level)


# (emu.checkers.dpor) while footprints are recorded: the guest entries whose A/D bits a walk set.
AD_LOG = None


def _set_bits(q, ptr, bits):
    i = ptr >> 3
    old = q[i]
    if old & bits != bits:
        q[i] = old | bits  # a locked OR: nothing else runs inside this call
        if AD_LOG is not None:
            AD_LOG.append(ptr)


def probe(q, ept, cr3, gva):
    """The GPA a linear address maps to, without side effects (no A/D); None if unmapped."""
    table = cr3 & PT_ADDR
    for level in (4, 3, 2, 1):
        shift = 12 + 9 * (level - 1)
        t = ept(table + (((gva >> shift) & 511) << 3))
        if t is None:
            return None
        e = q[t >> 3]
        if not e & PT_P:
            return None
        if level == 1 or (e & PT_PS and level <= 3):
            mask = (1 << shift) - 1
            return (e & PT_ADDR & ~mask) | (gva & mask)
        table = e & PT_ADDR
    return None


# The compiled 2D walk (emu/hw/mmu.c) creates this module's classes: it learns them here.
from . import native as _native  # noqa: E402

if _native.mmu is not None:
    _native.mmu.setup_paging(sys.modules[__name__])
