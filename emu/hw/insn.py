"""What the faulting instruction accesses: exact linear addresses and read-modify-write.

Unicorn's TLB-fill hook is told only the page and the kind of access it is
filling, not the address the instruction used, and a read-modify-write
instruction fills for its load first.  A real CPU reports the exact
guest-linear and guest-physical address, and bit 1 (write) for a
read-modify-write.  So on an exit (never on the fill fast path) the vCPU
decodes the instruction at RIP with capstone, computes the effective address
of each memory operand from the registers, and finds the operand that touches
the faulting page.  Decodes are cached per (RIP, bytes).
"""

import capstone
from capstone import x86_const as CX
from unicorn import x86_const as UX

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_cs.detail = True

_READ = capstone.CS_AC_READ
_WRITE = capstone.CS_AC_WRITE


def _uc_reg(cs_reg):
    name = _cs.reg_name(cs_reg)
    if name is None:
        return None
    return getattr(UX, "UC_X86_REG_" + name.upper(), None)


class MemOperand:
    __slots__ = ("seg", "base", "index", "scale", "disp", "size", "read", "write", "rip_relative")

    def __init__(self, op):
        m = op.mem
        self.rip_relative = m.base == CX.X86_REG_RIP
        self.seg = {CX.X86_REG_FS: UX.UC_X86_REG_FS_BASE, CX.X86_REG_GS: UX.UC_X86_REG_GS_BASE}.get(m.segment)
        self.base = None if m.base in (0, CX.X86_REG_RIP) else _uc_reg(m.base)
        self.index = None if m.index == 0 else _uc_reg(m.index)
        self.scale, self.disp, self.size = m.scale, m.disp, op.size
        self.read = bool(op.access & _READ)
        self.write = bool(op.access & _WRITE)


class Insn:
    __slots__ = ("size", "mem", "text")

    def __init__(self, size, mem, text):
        self.size, self.mem, self.text = size, mem, text


_cache = {}


def decode(code, rip):
    """An Insn for the instruction at ``rip`` (``code`` holds its bytes); None if undecodable."""
    key = (rip, code)
    d = _cache.get(key)
    if d is None:
        d = None
        for i in _cs.disasm(code, rip, 1):
            mem = [MemOperand(op) for op in i.operands if op.type == CX.X86_OP_MEM]
            d = Insn(i.size, mem, f"{i.mnemonic} {i.op_str}".strip())
        if len(_cache) > 4096:
            _cache.clear()
        _cache[key] = d
    return d


def effective_address(op, insn, rip, reg):
    ea = op.disp
    if op.rip_relative:
        ea += rip + insn.size
    if op.base is not None:
        ea += reg(op.base)
    if op.index is not None:
        ea += reg(op.index) * op.scale
    if op.seg is not None:
        ea += reg(op.seg)
    return ea & ((1 << 64) - 1)


def locate(insn, rip, reg, page):
    """(exact linear address, writes it) of the operand that touches ``page``; None if none does
    (an implicit access: the stack of push/call, a descriptor table, ...)."""
    for op in insn.mem:
        ea = effective_address(op, insn, rip, reg)
        first, last = ea & ~0xFFF, (ea + max(op.size, 1) - 1) & ~0xFFF
        if first == page:
            return ea, op.write
        if last == page:
            return page, op.write  # the access starts on the previous page
    return None
