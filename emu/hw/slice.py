"""Guest mode that lasts across scheduling points: the slice budget and PAUSE.

A real vCPU in guest mode runs while the others run host code.  Here a vCPU's
guest code runs in slices: when another task could run, emu_start is armed
with a budget of translated blocks (the emulated VMX preemption timer), and a
window of PAUSE instructions (pause-loop exiting's window) also ends a slice.
At the end of a slice the vCPU is still in guest mode (its TLB, its TD epoch),
and it reaches a scheduling point; an IPI pending there makes it exit.

The budget counts blocks, not instructions: Unicorn's own instruction count
calls a hook on every instruction (measured 1.7-2x on a tight loop), a block
hook once per translated block.  The block hook is eight x86-64 instructions
of machine code placed in an executable page (the callback never enters
Python); where no executable page can be had (another host architecture, W^X),
a Python block hook does the same, slowly.

The same counter is the run's deterministic watchdog (``BlockLimit``, the VMM's
--max-insns): the blocks guest code runs are counted by the callback, so a run
stops after the same number of blocks, at the same instruction, every time.
"""

import ctypes
import mmap
import platform

# struct budget { int64 remaining; uint64 expired; void *uc_emu_stop; }
#   dec qword [rcx]; jle 1f; ret; 1: mov qword [rcx+8], 1; jmp [rcx+16]
# (SysV: rdi = uc, rsi = address, edx = size, rcx = user_data; the tail jump
#  calls uc_emu_stop(uc) with rdi untouched.)
_STUB = bytes.fromhex("48ff097e01c348c7410801000000ff6110")

_stub_addr = None
_stub_page = None


def block_hook_stub():
    """The address of the block-budget callback, or None where it cannot run."""
    global _stub_addr, _stub_page
    if _stub_addr is not None or _stub_page is False:
        return _stub_addr
    if platform.machine() not in ("x86_64", "AMD64"):
        _stub_page = False
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        _stub_page = False
        return None
    page.write(_STUB)
    _stub_page = page
    _stub_addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return _stub_addr


class Budget(ctypes.Structure):
    _fields_ = [("remaining", ctypes.c_int64), ("expired", ctypes.c_uint64), ("stop", ctypes.c_void_p)]


NO_BUDGET = 1 << 62  # a budget that never runs out


class BlockLimit:
    """Blocks of guest code the vCPUs that share it may still run, all together (``left``),
    and those they ran (``used``).  It is counted by the slice budget's callback, so it is
    deterministic: the same guest and schedule stop at the same block.  When none are left,
    each vCPU's next entry (or the slice that spends the last one) calls ``expire(vcpu)``
    (the VMM's watchdog, which signals every vCPU) and exits as an IPI would."""

    def __init__(self, blocks=NO_BUDGET, expire=None):
        self.left = blocks
        self.used = 0
        self.expire = expire or (lambda vcpu: None)

    def spend(self, n):
        self.left -= n
        self.used += n
