"""Instruction disassembly (capstone) and symbolization from the guest ELF."""

import capstone

_cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


_KNOWN = {b"\x66\x0f\x01\xcc": "tdcall"}      # newer than capstone 5


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
