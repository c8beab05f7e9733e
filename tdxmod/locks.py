"""The TDX module's locks (src/common/helpers/tdx_locks.h of the TDX module, tdx_1.5).

Every lock is a try-lock: a SEAMCALL that cannot take one returns a BUSY status to the host (or
the TDCALL to the guest) and changes nothing; nothing ever waits.  Two kinds:

* sharex (``sharex_lock_t``, 16 bits: bit 0 exclusive, bits 15:1 the readers): the S-EPT tree
  lock and the TD epoch lock in the TDCS.
* sharex with host priority (``sharex_hp_lock_t``, 16 bits: bit 0 exclusive, bit 1 host
  priority, bits 15:2 the readers): the PAMT entry locks (so the TDR's and the TDVPR's locks,
  which are their pages' PAMT entry locks) and the TDCS op_state lock.  A host that fails sets
  host priority; a guest then backs off with BUSY_HOST_PRIORITY until a host has taken the lock.

The functions here are pure: they take the lock word and return the new word and the outcome,
so a lock can live in memory (the PAMT) or in a structure's field.  A failed sanity check of the
source (``tdx_sanity_check``: releasing a lock not held) is the module's own panic: LockError.
"""

from .abi import TDX_SUCCESS, TDX_OPERAND_BUSY, TDX_OPERAND_BUSY_HOST_PRIORITY

TDX_LOCK_NO_LOCK = 0
TDX_LOCK_SHARED = 1
TDX_LOCK_EXCLUSIVE = 2

SHAREX_FREE = 0
SHAREX_EXCLUSIVE_LOCK = 1 << 0
SHAREX_SINGLE_READER = 1 << 1

SHAREX_HP_FREE = 0
SHAREX_HP_EXCLUSIVE_LOCK = 1 << 0
SHAREX_HP_HOST_PRIORITY = 1 << 1
SHAREX_HP_SINGLE_READER = 1 << 2

_U16 = 0xFFFF


class LockError(Exception):
    """tdx_sanity_check() failed in a lock primitive: the module itself is broken (a model bug)."""


# -- sharex ------------------------------------------------------------------------------------------------
def sharex_acquire(raw, lock_type):
    """acquire_sharex_lock(): (new word, True when taken).  A shared acquire counts the reader
    even when it fails (the source's xadd); the exclusive holder's release clears the count."""
    if lock_type == TDX_LOCK_EXCLUSIVE:
        if raw == SHAREX_FREE:
            return SHAREX_EXCLUSIVE_LOCK, True
        return raw, False
    if lock_type == TDX_LOCK_SHARED:
        return (raw + SHAREX_SINGLE_READER) & _U16, not raw & SHAREX_EXCLUSIVE_LOCK
    raise LockError(f"sharex acquire with lock type {lock_type}")


def sharex_release(raw, lock_type):
    """release_sharex_lock()"""
    if lock_type == TDX_LOCK_EXCLUSIVE:
        if not raw & SHAREX_EXCLUSIVE_LOCK:
            raise LockError(f"sharex exclusive release of a lock not held exclusively ({raw:#x})")
        return SHAREX_FREE
    if lock_type == TDX_LOCK_SHARED:
        if raw & SHAREX_EXCLUSIVE_LOCK or raw >> 1 == 0:
            raise LockError(f"sharex shared release of a lock with no reader ({raw:#x})")
        return (raw - SHAREX_SINGLE_READER) & _U16
    raise LockError(f"sharex release with lock type {lock_type}")


def sharex_readers(raw):
    return 0 if raw & SHAREX_EXCLUSIVE_LOCK else raw >> 1


# -- sharex with host priority ---------------------------------------------------------------------------
def sharex_hp_acquire(raw, lock_type, is_guest=False):
    """acquire_sharex_lock_hp(): (new word, TDX_SUCCESS / TDX_OPERAND_BUSY / _HOST_PRIORITY)."""
    if lock_type == TDX_LOCK_EXCLUSIVE:
        if raw == SHAREX_HP_FREE:
            return SHAREX_HP_EXCLUSIVE_LOCK, TDX_SUCCESS
        if raw == SHAREX_HP_HOST_PRIORITY:
            if is_guest:
                return raw, TDX_OPERAND_BUSY_HOST_PRIORITY
            return SHAREX_HP_EXCLUSIVE_LOCK, TDX_SUCCESS  # a host takes it and clears priority
        if is_guest:
            return raw, TDX_OPERAND_BUSY
        return raw | SHAREX_HP_HOST_PRIORITY, TDX_OPERAND_BUSY
    if lock_type == TDX_LOCK_SHARED:
        counted = (raw + SHAREX_HP_SINGLE_READER) & _U16
        if is_guest:
            if raw & SHAREX_HP_HOST_PRIORITY:
                return raw, TDX_OPERAND_BUSY_HOST_PRIORITY  # the count is given back
            if raw & SHAREX_HP_EXCLUSIVE_LOCK:
                return counted, TDX_OPERAND_BUSY
            return counted, TDX_SUCCESS
        if raw & SHAREX_HP_EXCLUSIVE_LOCK:
            return counted | SHAREX_HP_HOST_PRIORITY, TDX_OPERAND_BUSY
        return counted & ~SHAREX_HP_HOST_PRIORITY, TDX_SUCCESS
    raise LockError(f"sharex_hp acquire with lock type {lock_type}")


def sharex_hp_release(raw, lock_type):
    """release_sharex_lock_hp(): an exclusive release keeps host priority and clears the rest."""
    if lock_type == TDX_LOCK_EXCLUSIVE:
        if not raw & SHAREX_HP_EXCLUSIVE_LOCK:
            raise LockError(f"sharex_hp exclusive release of a lock not held exclusively ({raw:#x})")
        return raw & SHAREX_HP_HOST_PRIORITY
    if lock_type == TDX_LOCK_SHARED:
        if raw & SHAREX_HP_EXCLUSIVE_LOCK or raw >> 2 == 0:
            raise LockError(f"sharex_hp shared release of a lock with no reader ({raw:#x})")
        return (raw - SHAREX_HP_SINGLE_READER) & _U16
    raise LockError(f"sharex_hp release with lock type {lock_type}")


def sharex_hp_promote(raw):
    """promote_sharex_lock_hp(): the only reader becomes the exclusive holder, or BUSY (setting
    host priority when other readers hold it)."""
    if raw & SHAREX_HP_EXCLUSIVE_LOCK or raw == SHAREX_HP_FREE:
        raise LockError(f"sharex_hp promote of a lock not held shared ({raw:#x})")
    if raw in (SHAREX_HP_SINGLE_READER, SHAREX_HP_SINGLE_READER | SHAREX_HP_HOST_PRIORITY):
        return SHAREX_HP_EXCLUSIVE_LOCK, TDX_SUCCESS
    return raw | SHAREX_HP_HOST_PRIORITY, TDX_OPERAND_BUSY


def sharex_hp_readers(raw):
    return 0 if raw & SHAREX_HP_EXCLUSIVE_LOCK else raw >> 2


def is_a_read(old, new, status, hp=True):
    """(emu.checkers.dpor) Whether a shared acquire or release commutes with every other shared
    one: it succeeded and changed nothing but the reader count.  Anything else (a failure, host
    priority set or cleared, any exclusive operation) counts as a write of the lock."""
    mask = (SHAREX_HP_EXCLUSIVE_LOCK | SHAREX_HP_HOST_PRIORITY) if hp else SHAREX_EXCLUSIVE_LOCK
    return status == TDX_SUCCESS and (old & mask) == (new & mask)
