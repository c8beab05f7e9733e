"""Event delivery through the guest's 64-bit IDT (Intel SDM Vol. 3A 6.12, 6.14, 6.15).

Runs only when an exception is to be delivered (never on the guest's hot path).  The IDT,
the GDT and the stack are read and written as the CPU does: supervisor implicit accesses
at linear addresses, through the guest's paging and EPT (``translate``).  A fault while
delivering is handled by the SDM's double-fault rules (Table 6-5); a fault while delivering
#DF shuts the CPU down (triple fault).  An EPT violation or misconfiguration while
delivering is a VM exit: the event stays pending and is delivered again on the next entry
(as the IDT-vectoring information makes the hypervisor re-inject it).

In IA-32e mode: 16-byte gates, only types 0xE (interrupt gate: IF cleared) and 0xF (trap
gate); the gate's code segment must be a present 64-bit code segment (L=1, D=0) in the
GDT; RSP is aligned down to 16 (or loaded from the TSS's IST slot); SS, RSP, RFLAGS, CS,
RIP and, for vectors 8, 10-14, 17 and 21, an error code are pushed.  The guest runs at
CPL 0, so no privilege change and no stack switch other than IST.
"""

from .paging import Translation, PageFault, GeneralProtection, translate, READ, WRITE

DE, DB, NMI, BP, OF, BR, UD, NM, DF, TS, NP, SS, GP, PF, MF, AC, MC, XM, VE, CP = (
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    10,
    11,
    12,
    13,
    14,
    16,
    17,
    18,
    19,
    20,
    21,
)
ERROR_CODE_VECTORS = frozenset((DF, TS, NP, SS, GP, PF, AC, CP))
CONTRIBUTORY = frozenset((DE, TS, NP, SS, GP, CP))
PAGE_FAULT_CLASS = frozenset((PF, VE))
# Fault-class exceptions: the RFLAGS image pushed has RF set (SDM 17.3.1.1), RIP is the
# faulting instruction.  (#DB is a fault only for instruction breakpoints: not generated here.)
FAULTS = frozenset((DE, BR, UD, NM, TS, NP, SS, GP, PF, MF, AC, XM, VE, CP))
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17
IDT_BIT = 2  # error code bit 1: the index refers to the IDT


class Event:
    """An event to deliver: ``vector``, ``error_code`` (None when the vector has none),
    ``soft`` for INT n / INT3 / INTO (EXT = 0; RIP already past the instruction)."""

    __slots__ = ("vector", "error_code", "soft")

    def __init__(self, vector, error_code=None, soft=False):
        self.vector, self.error_code, self.soft = vector, error_code, soft

    def __repr__(self):
        ec = "" if self.error_code is None else f" ec {self.error_code:#x}"
        return f"Event({self.vector}{ec}{' soft' if self.soft else ''})"


class _Fault(Exception):
    """An exception raised while delivering: vector, error code, CR2 (for #PF)."""

    def __init__(self, vector, error_code=None, cr2=None, why=""):
        self.vector, self.error_code, self.cr2, self.why = vector, error_code, cr2, why


class _Exit(Exception):
    """An EPT violation or misconfiguration of a delivery access: a VM exit."""

    def __init__(self, result, gla):
        self.result, self.gla = result, gla


class Shutdown:
    """Delivery failed for good: the triple fault.  ``chain`` lists (vector, error code, why)
    of each exception on the way, the first being the one the guest raised."""

    __slots__ = ("chain",)

    def __init__(self, chain):
        self.chain = chain


def _canonical(va):
    return va < (1 << 47) or va >= (0xFFFF8 << 44)


class Delivery:
    """One delivery attempt on vCPU ``cpu`` (an emu.hw.vcpu.Vcpu): its registers, its EPT walk."""

    def __init__(self, cpu):
        self.cpu = cpu
        self.cr3 = cpu.reg("cr3")
        self.wp = cpu.reg("cr0") & (1 << 16)
        self.writes = []  # (hpa, bytes) committed only when delivery succeeds

    def _hpa(self, va, access):
        cpu = self.cpu
        if not _canonical(va):
            raise _Fault(GP, 0, why=f"non-canonical address {va:#x}")
        r = translate(cpu.mem.q, cpu._ept, self.cr3, va, access, wp=self.wp, nxe=cpu._nxe)
        if r.__class__ is Translation:
            return r.hpa
        if r.__class__ is PageFault:
            raise _Fault(PF, r.error_code, cr2=va, why=f"#PF at {va:#x}")
        if r.__class__ is GeneralProtection:
            raise _Fault(GP, 0, why=f"#GP at {va:#x}")
        raise _Exit(r, va)

    def read64(self, va):
        if va & 0xFFF > 0xFF8:
            lo = self._read_bytes(va, 0x1000 - (va & 0xFFF))
            return int.from_bytes(lo + self._read_bytes(va + len(lo), 8 - len(lo)), "little")
        return int.from_bytes(self.cpu.mem.read(self._hpa(va, READ), 8), "little")

    def _read_bytes(self, va, n):
        return self.cpu.mem.read(self._hpa(va, READ), n)

    def push_frame(self, rsp, values):
        """Translate (and check) every qword of the frame before anything is written."""
        va = rsp
        for v in values:
            va -= 8
            hpa = self._hpa(va, WRITE)
            self.writes.append((hpa, v.to_bytes(8, "little")))
        return va


def deliver(cpu, event, regs):
    """Deliver ``event`` on ``cpu``.  ``regs`` has rip (what to push), rsp, rflags, cs, ss.
    Returns None (delivered: RIP, RSP, RFLAGS, CS set), a Shutdown, or the VM exit result
    (EptViolation/EptMisconfig, with the linear address) as a tuple."""
    chain = [(event.vector, event.error_code, "raised")]
    vector, ec, soft = event.vector, event.error_code, event.soft
    while True:
        try:
            _deliver_one(cpu, vector, ec, soft, regs)
            return None
        except _Exit as e:
            return (e.result, e.gla)
        except _Fault as f:
            chain.append((f.vector, f.error_code, f.why))
            if f.vector == PF and f.cr2 is not None:
                cpu.set_reg("cr2", f.cr2)  # CR2 is loaded when the #PF is recognized
            if vector == DF and not soft and (f.vector in CONTRIBUTORY or f.vector in PAGE_FAULT_CLASS):
                return Shutdown(chain)
            first_contrib = not soft and vector in CONTRIBUTORY
            first_pf = not soft and vector in PAGE_FAULT_CLASS
            if (first_contrib and f.vector in CONTRIBUTORY) or (
                first_pf and (f.vector in CONTRIBUTORY or f.vector in PAGE_FAULT_CLASS)
            ):
                vector, ec = DF, 0
            else:
                vector, ec = f.vector, f.error_code  # handled serially (a benign first event)
            soft = False


def _deliver_one(cpu, vector, ec, soft, regs):
    from unicorn import x86_const as X

    uc = cpu.uc
    ext = 0 if soft else 1
    idt_ec = vector * 8 + IDT_BIT + ext
    _, idt_base, idt_limit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
    if vector * 16 + 15 > idt_limit:
        raise _Fault(GP, idt_ec, why=f"vector {vector} beyond the IDT limit {idt_limit:#x}")
    d = Delivery(cpu)
    lo = d.read64(idt_base + vector * 16)
    hi = d.read64(idt_base + vector * 16 + 8)
    gtype, dpl, present = (lo >> 40) & 0xF, (lo >> 45) & 3, lo >> 47 & 1
    if gtype not in (GATE_INTERRUPT, GATE_TRAP):
        raise _Fault(GP, idt_ec, why=f"IDT[{vector}] type {gtype:#x} is not a 64-bit interrupt or trap gate")
    if soft and dpl < 0:  # CPL 0: never
        raise _Fault(GP, idt_ec)
    if not present:
        raise _Fault(NP, idt_ec, why=f"IDT[{vector}] not present")
    selector = (lo >> 16) & 0xFFFF
    offset = (lo & 0xFFFF) | ((lo >> 48) << 16) | ((hi & 0xFFFFFFFF) << 32)
    ist = (lo >> 32) & 7
    # The gate's code segment (SDM 6.12.1.1): a present 64-bit code segment in the GDT.
    sel_ec = (selector & 0xFFFC) + ext
    if selector & 0xFFFC == 0:
        raise _Fault(GP, ext, why=f"IDT[{vector}] has a null code selector")
    if selector & 4:
        raise _Fault(GP, sel_ec, why=f"IDT[{vector}] selector {selector:#x} is in the LDT (none here)")
    _, gdt_base, gdt_limit, _ = uc.reg_read(X.UC_X86_REG_GDTR)
    if (selector & ~7) + 7 > gdt_limit:
        raise _Fault(GP, sel_ec, why=f"selector {selector:#x} beyond the GDT limit {gdt_limit:#x}")
    desc = d.read64(gdt_base + (selector & ~7))
    is_code = (desc >> 44) & 1 and (desc >> 43) & 1
    if not is_code or not (desc >> 53) & 1 or (desc >> 54) & 1 or (desc >> 45) & 3 > 0:
        raise _Fault(GP, sel_ec, why=f"selector {selector:#x} is not a 64-bit ring-0 code segment")
    if not (desc >> 47) & 1:
        raise _Fault(NP, sel_ec, why=f"code segment {selector:#x} not present")
    if ist:
        _, tss_base, tss_limit, _ = uc.reg_read(X.UC_X86_REG_TR)
        if 0x24 + 8 * (ist - 1) + 7 > tss_limit:
            raise _Fault(TS, (uc.reg_read(X.UC_X86_REG_TR)[0] & 0xFFFC) + ext, why=f"IST{ist} beyond the TSS")
        rsp = d.read64(tss_base + 0x24 + 8 * (ist - 1))
    else:
        rsp = regs["rsp"]
    if not _canonical(rsp):
        raise _Fault(SS, ext, why=f"non-canonical stack {rsp:#x}")
    rflags = regs["rflags"]
    pushed_flags = rflags | (RFLAGS_RF if not soft and vector in FAULTS else 0)
    frame = [regs["ss"], regs["rsp"], pushed_flags, regs["cs"], regs["rip"]]
    if ec is not None and not soft and vector in ERROR_CODE_VECTORS:
        frame.append(ec)
    try:
        new_rsp = d.push_frame(rsp & ~0xF, frame)
    except _Fault as f:
        if f.vector == GP and f.cr2 is None and "non-canonical" in f.why:
            raise _Fault(SS, ext, why=f.why) from None
        raise
    for hpa, data in d.writes:
        cpu.mem.write(hpa, data)
    new_flags = rflags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if gtype == GATE_INTERRUPT:
        new_flags &= ~RFLAGS_IF
    if selector != regs["cs"]:
        uc.reg_write(X.UC_X86_REG_CS, selector)
    cpu.set_regs({"rsp": new_rsp, "rflags": new_flags, "rip": offset})
