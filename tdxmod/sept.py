"""The Secure EPT: real EPT-format tables in module memory, with each entry's TDX state in its bits.

The hardware walker reads these tables like any EPT (RWX = 0 means not present),
so FREE, PENDING and BLOCKED entries fault; the module reads the state
encoded in the ignored bits.  Levels here are the module's: 0 = 4K (PTE),
1 = 2M (PDE), 2 = 1G, 3 = PML4E, 4 = PML5E.
"""

from emu.hw.ept import ADDR_MASK

# Entry bits (ia32e_sept_t)
SEPT_R, SEPT_W, SEPT_X = 1, 2, 4
SEPT_RWX = 7
SEPT_MT_WB = 6 << 3
SEPT_IPAT = 1 << 6
SEPT_PS = 1 << 7
SEPT_TDEL = 1 << 11  # entry lock
SEPT_TDHP = 1 << 52  # host priority (a host lost the entry lock)
SEPT_TDEX = 1 << 53
SEPT_TDBW = 1 << 54
SEPT_TDB = 1 << 55  # blocked
SEPT_TDP = 1 << 56  # pending
SEPT_SVE = 1 << 63
SEPT_HPA = ADDR_MASK
# A 2M leaf's bits 20:12 (its HPA's reserved bits): the INIT_COUNTER, how many 4K chunks a
# TDG.MEM.PAGE.ACCEPT at 2M has cleared so far (it is resumable: x86_defs.h accept_counter).
SEPT_ACCEPT_COUNTER = 0x1FF << 12
SEPT_ACCEPT_COUNTER_SHIFT = 12

# The state is 7 bits: enc[0] = bit 9, enc[4:1] = bits 56:53, enc[6:5] = bits 7:6.
_STATE_BITS = (1 << 9) | (0xF << 53) | (3 << 6)

SEPT_FREE = 0x0E
SEPT_REMOVED = 0x0C
SEPT_NL_MAPPED = 0x00
SEPT_NL_BLOCKED = 0x08
SEPT_MAPPED = 0x60
SEPT_BLOCKED = 0x68
SEPT_PENDING = 0x70
SEPT_PENDING_BLOCKED = 0x78

STATE_NAMES = {
    SEPT_FREE: "FREE",
    SEPT_REMOVED: "REMOVED",
    SEPT_NL_MAPPED: "NL_MAPPED",
    SEPT_NL_BLOCKED: "NL_BLOCKED",
    SEPT_MAPPED: "MAPPED",
    SEPT_BLOCKED: "BLOCKED",
    SEPT_PENDING: "PENDING",
    SEPT_PENDING_BLOCKED: "PENDING_BLOCKED",
}

# Public state codes reported in RDX[15:8] (Linux enum tdx_sept_entry_state)
PUBLIC_STATE = {
    SEPT_FREE: 0,
    SEPT_BLOCKED: 1,
    SEPT_PENDING: 2,
    SEPT_PENDING_BLOCKED: 3,
    SEPT_MAPPED: 4,
    SEPT_REMOVED: 5,
    SEPT_NL_BLOCKED: 0x81,
    SEPT_NL_MAPPED: 0x84,
}

# A new S-EPT page: every entry FREE, with suppress-#VE.
SEPT_FREE_ENTRY = 0x80E0000000000000

LEAF_STATES = (SEPT_MAPPED, SEPT_BLOCKED, SEPT_PENDING, SEPT_PENDING_BLOCKED)
NL_STATES = (SEPT_NL_MAPPED, SEPT_NL_BLOCKED)


def sept_state(e):
    enc = ((e >> 9) & 1) | (((e >> 53) & 0xF) << 1) | (((e >> 6) & 3) << 5)
    if enc & 0x60 == 0x60:
        # A leaf: bit 9 is then the dirty flag the CPU sets through the secure EPTP (A/D on);
        # only the migration states (not modelled) give it a meaning in the encoding.
        enc &= ~1
    return enc


def with_state(hpa, state, rwx=0):
    """An entry for ``hpa`` in ``state`` (bits of the state encoding, plus RWX/MT as the state implies)."""
    e = SEPT_SVE | (hpa & SEPT_HPA) | rwx
    e |= (state & 1) << 9
    e |= ((state >> 1) & 0xF) << 53
    e |= ((state >> 5) & 3) << 6
    if state in (SEPT_MAPPED, SEPT_BLOCKED, SEPT_PENDING, SEPT_PENDING_BLOCKED):
        e |= SEPT_MT_WB
    return e


def make_nl_mapped(child_hpa):
    return with_state(child_hpa, SEPT_NL_MAPPED, SEPT_RWX)


def make_mapped(hpa):
    return with_state(hpa, SEPT_MAPPED, SEPT_RWX)


def make_pending(hpa):
    return with_state(hpa, SEPT_PENDING)


def set_state(e, state, rwx=None):
    """``e`` moved to ``state`` (HPA, lock bits kept; RWX set as the state requires unless given)."""
    if rwx is None:
        rwx = SEPT_RWX if state in (SEPT_MAPPED, SEPT_NL_MAPPED) else 0
    keep = e & (SEPT_HPA | SEPT_TDEL | SEPT_TDHP)
    return with_state(keep, state, rwx) | (keep & (SEPT_TDEL | SEPT_TDHP))


def is_leaf_state(state):
    return state in LEAF_STATES


def cleanup_if_pending(e, level):
    """sept_cleanup_if_pending(): a PENDING 2M leaf's INIT_COUNTER zeroed (BLOCK, REMOVE, DEMOTE,
    PROMOTE and the error details all look at the entry so)."""
    if level == 1 and sept_state(e) in PENDING_GUEST_ACCEPTABLE:
        return e & ~SEPT_ACCEPT_COUNTER
    return e


def leaf_hpa(e, level):
    """leaf_ept_entry_to_hpa() at offset 0: the page a leaf at ``level`` maps (bits below the
    page size, a 2M leaf's INIT_COUNTER, are not part of it)."""
    return e & SEPT_HPA & ~((0x1000 << (9 * level)) - 1)


MAPPED_OR_PENDING = (SEPT_MAPPED, SEPT_PENDING)  # mapped_or_pending
# tlb_tracking_required: every state DEMOTE, PROMOTE and REMOVE act on
TLB_TRACKING_REQUIRED = (SEPT_NL_MAPPED, SEPT_NL_BLOCKED, SEPT_MAPPED, SEPT_BLOCKED, SEPT_PENDING, SEPT_PENDING_BLOCKED)
# sept_unblock(): a blocked entry's state before its BLOCK
UNBLOCKED = {SEPT_NL_BLOCKED: SEPT_NL_MAPPED, SEPT_BLOCKED: SEPT_MAPPED, SEPT_PENDING_BLOCKED: SEPT_PENDING}


def architectural_entry(e):
    """RCX of an error: the entry as the ABI reports it (FREE -> 0x8000000000000000)."""
    state = sept_state(e)
    if state == SEPT_FREE:
        return SEPT_SVE
    if is_leaf_state(state):
        return e & (SEPT_RWX | (7 << 3) | SEPT_HPA | SEPT_IPAT | SEPT_PS | SEPT_SVE)
    return e & (SEPT_RWX | SEPT_PS)


def entry_info(state, level):
    """RDX of an error: level in bits 2:0, public state in bits 15:8."""
    return level | (PUBLIC_STATE.get(state, 0xFF) << 8)


def index(gpa, level):
    return (gpa >> GPA_INDEX_SHIFT[level]) & 511


# By level: where a GPA's index bits into that level's table start (a lookup for the walks).
GPA_INDEX_SHIFT = tuple(12 + 9 * level for level in range(5))


def describe(e):
    state = sept_state(e)
    name = STATE_NAMES.get(state, f"state {state:#x}")
    return f"{name} hpa {e & SEPT_HPA:#x}" if state not in (SEPT_FREE,) else name


# The legal starting states of each leaf (auto_gen/sept_state_lookup.c of TDX module 1.5,
# restricted to the states this model has).  Keys are SEAMCALL leaf numbers; TDCALL_LEGAL_STATES
# is keyed by TDCALL leaf number.
SEAMCALL_LEGAL_STATES = {
    2: (SEPT_FREE,),  # TDH.MEM.PAGE.ADD
    3: (SEPT_FREE, SEPT_NL_MAPPED),  # TDH.MEM.SEPT.ADD
    6: (SEPT_FREE, SEPT_REMOVED),  # TDH.MEM.PAGE.AUG
    7: (SEPT_NL_MAPPED, SEPT_MAPPED, SEPT_PENDING),  # TDH.MEM.RANGE.BLOCK
    15: (SEPT_MAPPED, SEPT_BLOCKED, SEPT_PENDING, SEPT_PENDING_BLOCKED),  # TDH.MEM.PAGE.DEMOTE
    16: (SEPT_MAPPED,),  # TDH.MR.EXTEND
    23: (SEPT_NL_MAPPED, SEPT_NL_BLOCKED),  # TDH.MEM.PAGE.PROMOTE
    29: (SEPT_MAPPED, SEPT_BLOCKED, SEPT_PENDING, SEPT_PENDING_BLOCKED),  # TDH.MEM.PAGE.REMOVE
    30: (SEPT_NL_MAPPED, SEPT_NL_BLOCKED),  # TDH.MEM.SEPT.REMOVE
    39: (SEPT_NL_BLOCKED, SEPT_BLOCKED, SEPT_PENDING_BLOCKED),  # TDH.MEM.RANGE.UNBLOCK
}
TDCALL_LEGAL_STATES = {6: (SEPT_PENDING,)}  # TDG.MEM.PAGE.ACCEPT

BLOCKED_STATES = (SEPT_NL_BLOCKED, SEPT_BLOCKED, SEPT_PENDING_BLOCKED)  # any_blocked
GUEST_ACCESSIBLE_LEAF = (SEPT_MAPPED,)  # guest_accessible_leaf
PENDING_GUEST_ACCEPTABLE = (SEPT_PENDING,)  # any_pending_and_guest_acceptable


def seamcall_allowed(leaf, state):
    """sept_state_is_seamcall_leaf_allowed()"""
    return state in SEAMCALL_LEGAL_STATES.get(leaf, ())
