"""Instruction disassembly (capstone) and symbolization from the guest ELF."""

import capstone

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


_KNOWN = {b"\x66\x0f\x01\xcc": "tdcall"}  # newer than capstone 5


def disassemble_one(code, addr):
    """``mov qword ptr [rdi], rax`` for the first instruction of ``code``; None if undecodable."""
    for insn in _cs.disasm(code, addr, 1):
        return f"{insn.mnemonic} {insn.op_str}".strip()
    for raw, text in _KNOWN.items():
        if code.startswith(raw):
            return text
    return None


def where(addr, image=None):
    """``touch_loop+0x12`` when the image has a symbol before ``addr``, else the hex address."""
    sym = image.symbolize(addr) if image is not None else None
    return sym or f"{addr:#x}"


_csd = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_csd.detail = True
_ENDS = frozenset({capstone.x86_const.X86_GRP_RET, capstone.x86_const.X86_GRP_IRET, capstone.x86_const.X86_GRP_INT})


def loop_range(read, rip, limit=64):
    """(lo, hi): the addresses of the instructions on the paths from ``rip`` back to ``rip``
    (the loop a vCPU stopped at ``rip`` spins in), or None when no path of at most ``limit``
    instructions comes back.  ``read(addr, n)`` gives code bytes.  Jumps are followed (both
    ways of a conditional one); a call is taken to return; a return, an indirect jump, HLT
    or an undecodable instruction ends a path."""
    from capstone import x86_const as C

    succ = {}  # address -> (size, successor addresses)
    todo = [rip]
    while todo and len(succ) < limit:
        a = todo.pop()
        if a in succ:
            continue
        insn = next(_csd.disasm(read(a, 15), a, 1), None)
        if insn is None or insn.mnemonic in ("hlt", "ud2") or _ENDS & set(insn.groups):
            succ[a] = (0 if insn is None else insn.size, ())
            continue
        nxt = [a + insn.size]
        if C.X86_GRP_JUMP in insn.groups:
            op = insn.operands[0] if insn.operands else None
            target = op.imm if op is not None and op.type == C.X86_OP_IMM else None
            nxt = ([] if insn.mnemonic == "jmp" else nxt) + ([target] if target is not None else [])
        succ[a] = (insn.size, tuple(nxt))
        todo.extend(nxt)
    # The instructions from which rip is reached again: the loop.
    back = set()
    grew = True
    while grew:
        grew = False
        for a, (_, nxt) in succ.items():
            if a not in back and any(n == rip or n in back for n in nxt):
                back.add(a)
                grew = True
    if rip not in back:
        return None
    return min(back), max(a + succ[a][0] for a in back)
