"""TD management leaves: TDH.MNG.CREATE, TDH.MNG.KEY.CONFIG, TDH.MNG.ADDCX, TDH.MNG.INIT,
TDH.MNG.VPFLUSHDONE, TDH.MNG.KEY.FREEID.

Follows src/vmm_dispatcher/api_calls/tdh_mng_create.c, tdh_mng_key_config.c, tdh_mng_add_cx.c,
tdh_mng_init.c, tdh_mng_vpflushdone.c and tdh_mng_key_freeid.c of the TDX module (tdx_1.5).
"""

from ..abi import *  # noqa: F401,F403
from ..regs import Regs
from ..td_structures import (
    Td,
    PAGE,
    TDCS_PAGES,
    TD_PARAMS_ATTRIBUTES,
    TD_PARAMS_MAX_VCPUS,
    TD_PARAMS_EPTP_CONTROLS,
    TD_PARAMS_CONFIG_FLAGS,
)
from ..helpers import (
    seamcall_leaf,
    check_and_lock_private_hpa,
    check_lock_tdr,
    check_state_and_lock_op_state,
    shared_hpa_check,
)
from ..locks import TDX_LOCK_EXCLUSIVE, TDX_LOCK_NO_LOCK
from .. import sept as S


@seamcall_leaf
def tdh_mng_create(mod, r, caller, held):
    """tdh_mng_create.c: the HKID operand first, then the TDR page (PT_NDA, locked exclusively),
    then the KOT (HKID in use)."""
    tdr, hkid = r.rcx, r.rdx
    if not 0 < hkid < (1 << 6):  # reserved bits 63:16, is_private_hkid()
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    st = check_and_lock_private_hpa(
        mod, held, tdr, OPERAND_ID_RCX, TDX_LOCK_EXCLUSIVE, PT_NDA, caller=caller, point="tdr_locked"
    )
    if st:
        return Regs(st)
    if hkid in mod.hkids:
        return Regs(TDX_HKID_NOT_FREE)
    mod.mem.zero(tdr)
    mod.give_to_module(tdr, PT_TDR, 0)  # the TDR's PAMT owner is 0
    mod.tds[tdr] = Td(tdr, hkid)
    mod.hkids.add(hkid)
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mng_key_config(mod, r, caller, held):
    """tdh_mng_key_config.c: the TDR exclusively, TD_FATAL, the lifecycle.  This platform has one
    package, so the first call configures every package and the TD leaves HKID_ASSIGNED: a
    second call is LIFECYCLE_STATE_INCORRECT (TDX_KEY_CONFIGURED is for a package already
    configured while others are not)."""
    td, st = check_lock_tdr(mod, held, r.rcx, OPERAND_ID_RCX, TDX_LOCK_EXCLUSIVE, caller)
    if st:
        return Regs(st)
    if td.fatal:
        return Regs(TDX_TD_FATAL)
    if td.lifecycle != TD_HKID_ASSIGNED:
        return Regs(TDX_LIFECYCLE_STATE_INCORRECT)
    td.lifecycle = TD_KEYS_CONFIGURED
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mng_addcx(mod, r, caller, held):
    """tdh_mng_add_cx.c: the TDR exclusively, TD_FATAL, keys configured, the page count, then the
    new page (PT_NDA, locked exclusively)."""
    td, st = check_lock_tdr(mod, held, r.rdx, OPERAND_ID_RDX, TDX_LOCK_EXCLUSIVE, caller)
    if st:
        return Regs(st)
    if td.fatal:
        return Regs(TDX_TD_FATAL)
    if td.lifecycle != TD_KEYS_CONFIGURED:
        return Regs(TDX_TD_KEYS_NOT_CONFIGURED)
    if len(td.tdcx) >= TDCS_PAGES:
        return Regs(TDX_TDCX_NUM_INCORRECT)
    st = check_and_lock_private_hpa(mod, held, r.rcx, OPERAND_ID_RCX, TDX_LOCK_EXCLUSIVE, PT_NDA)
    if st:
        return Regs(st)
    mod.mem.zero(r.rcx)
    mod.give_to_module(r.rcx, PT_TDCX, td.tdr)
    td.tdcx.append(r.rcx)
    td.chldcnt += 1
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mng_init(mod, r, caller, held):
    """tdh_mng_init.c: the TDR exclusively, the TD's state (no op_state lock: the TDR is held
    exclusively), then TD_PARAMS, a shared page (OPERAND_INVALID|RDX otherwise)."""
    td, st = check_lock_tdr(mod, held, r.rcx, OPERAND_ID_RCX, TDX_LOCK_EXCLUSIVE, caller)
    if st:
        return Regs(st)
    st = check_state_and_lock_op_state(mod, held, td, TDH_MNG_INIT, TDX_LOCK_NO_LOCK)
    if st:
        return Regs(st)
    params = r.rdx
    if not shared_hpa_check(mod, params, 1024, read=True):
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    mem = mod.mem
    attributes = mem.read64(params + TD_PARAMS_ATTRIBUTES)
    max_vcpus = mem.read64(params + TD_PARAMS_MAX_VCPUS) & 0xFFFF
    eptp_controls = mem.read64(params + TD_PARAMS_EPTP_CONTROLS)
    config_flags = mem.read64(params + TD_PARAMS_CONFIG_FLAGS)
    pwl = ((eptp_controls >> 3) & 7) + 1
    if attributes & ~(TD_ATTR_DEBUG | TD_ATTR_SEPT_VE_DISABLE):
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_ATTRIBUTES)
    # eptp_controls: WB and a 4- or 5-level walk; A/D, SSS and the base address must be 0.
    if pwl not in (4, 5) or (eptp_controls & 7) != 6 or eptp_controls & ~0x3F:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_EPTP_CONTROLS)
    gpaw = config_flags & TD_CONFIG_FLAGS_MAX_GPAW
    if config_flags & ~(TD_CONFIG_FLAGS_MAX_GPAW | (1 << 2)) or (gpaw and pwl != 5):
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_CONFIG_FLAGS)
    td.attributes = attributes
    td.max_vcpus = max_vcpus or 1
    td.pwl = pwl
    td.gpaw = gpaw
    td.config_flags = config_flags
    td.shared_bit = 1 << (51 if gpaw else 47)
    td.sept_root = td.tdcx[-1]
    mem.buf[td.sept_root : td.sept_root + PAGE] = S.SEPT_FREE_ENTRY.to_bytes(8, "little") * 512
    td.op_state = OP_STATE_INITIALIZED
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mng_vpflushdone(mod, r, caller, held):
    """tdh_mng_vpflushdone.c: the TDR exclusively (no TD_FATAL check: a fatal TD is torn down),
    the lifecycle, then no vCPU still associated with a CPU (TDX_FLUSHVP_NOT_DONE)."""
    td, st = check_lock_tdr(mod, held, r.rcx, OPERAND_ID_RCX, TDX_LOCK_EXCLUSIVE, caller)
    if st:
        return Regs(st)
    if td.lifecycle not in (TD_HKID_ASSIGNED, TD_KEYS_CONFIGURED):
        return Regs(TDX_LIFECYCLE_STATE_INCORRECT)
    if len(td.tdcx) >= TDCS_PAGES and td.op_state != OP_STATE_UNINITIALIZED and td.num_assoc_vcpus:
        return Regs(TDX_FLUSHVP_NOT_DONE)
    td.lifecycle = TD_BLOCKED
    td.wbcache_needed = True
    return Regs(TDX_SUCCESS)


@seamcall_leaf
def tdh_mng_key_freeid(mod, r, caller, held):
    """tdh_mng_key_freeid.c: the TDR exclusively, the lifecycle, then TDH.PHYMEM.CACHE.WB done."""
    td, st = check_lock_tdr(mod, held, r.rcx, OPERAND_ID_RCX, TDX_LOCK_EXCLUSIVE, caller)
    if st:
        return Regs(st)
    if td.lifecycle != TD_BLOCKED:
        return Regs(TDX_LIFECYCLE_STATE_INCORRECT)
    if td.wbcache_needed:
        return Regs(TDX_WBCACHE_NOT_COMPLETE)
    td.lifecycle = TD_TEARDOWN
    mod.hkids.discard(td.hkid)
    return Regs(TDX_SUCCESS)


# leaf number -> handler (the dispatcher's table: tdxmod/vmm_dispatcher.py)
LEAVES = {
    TDH_MNG_CREATE: tdh_mng_create,
    TDH_MNG_KEY_CONFIG: tdh_mng_key_config,
    TDH_MNG_ADDCX: tdh_mng_addcx,
    TDH_MNG_INIT: tdh_mng_init,
    TDH_MNG_VPFLUSHDONE: tdh_mng_vpflushdone,
    TDH_MNG_KEY_FREEID: tdh_mng_key_freeid,
}
