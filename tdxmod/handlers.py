"""SEAMCALL handlers (all but TDH.VP.ENTER, which is in td_dispatch.py).

Each takes (module, input Regs, caller) and returns output Regs.  Checks come
in the module's order: operands, TD state, locks, S-EPT walk and entry state,
PAMT; nothing changes until every check has passed.
"""

from .abi import *  # noqa: F401,F403
from .module import (Regs, Td, TdVcpu, PAGE, TDCS_PAGES, TDVPX_PAGES, TD_PARAMS_ATTRIBUTES, TD_PARAMS_MAX_VCPUS,
                     TD_PARAMS_EPTP_CONTROLS, TD_PARAMS_CONFIG_FLAGS, MD_TDVPS_VMCS_SHARED_EPTP,
                     MD_TDVPS_GPR_BASE, MD_TDVPS_RIP, MD_TDVPS_CR3, GPR_ORDER)
from . import sept as S

HANDLERS = {}


def leaf(number):
    def register(fn):
        HANDLERS[number] = fn
        return fn
    return register


def _page_info(mod, td, rcx, levels):
    """(gpa, level) of a page-info operand, or (None, status)."""
    level = rcx & 7
    gpa = rcx & ~0xFFF & ((1 << 52) - 1)
    if rcx & 0xFF8 or rcx >> 52 or level not in levels or gpa & ((PAGE << (9 * level)) - 1):
        return None, TDX_OPERAND_INVALID | OPERAND_ID_RCX
    if not mod.private_gpa_ok(td, gpa):
        return None, TDX_OPERAND_INVALID | OPERAND_ID_RCX
    return (gpa, level), None


def _op_state_ok(td, allowed):
    return td.op_state in allowed


def _sept_lock(mod, td, exclusive, caller):
    """Take the S-EPT tree lock; False (-> BUSY|SEPT) when another holder conflicts."""
    if exclusive:
        if td.sept_writer or td.sept_readers:
            return False
        td.sept_writer = True
    else:
        if td.sept_writer:
            return False
        td.sept_readers += 1
    return True


def _sept_unlock(td, exclusive):
    if exclusive:
        td.sept_writer = False
    else:
        td.sept_readers -= 1


def _begin(mod, r, caller, levels, exclusive, tdr=None):
    """The prologue the S-EPT leaves share, in the module's order: the TDR operand, op_state,
    the page-info operand, then the S-EPT tree lock.  Returns ((td, gpa, level), None) with
    the lock held (the caller releases it), or (None, the error Regs)."""
    td, st = mod.td_operand(r.rdx if tdr is None else tdr, OPERAND_ID_RDX)
    if st:
        return None, Regs(st)
    if not _op_state_ok(td, _RUN_STATES):
        return None, Regs(TDX_OP_STATE_INCORRECT)
    pi, st = _page_info(mod, td, r.rcx, levels(td))
    if st:
        return None, Regs(st)
    if not _sept_lock(mod, td, exclusive, caller):
        return None, Regs(TDX_OPERAND_BUSY | OPERAND_ID_SEPT)
    return (td,) + pi, None


# -- TD and vCPU management ---------------------------------------------------------------------------------
@leaf(TDH_MNG_CREATE)
def tdh_mng_create(mod, r, caller):
    """tdh_mng_create.c: the HKID operand first, then the TDR page, then the KOT (HKID in use)."""
    tdr, hkid = r.rcx, r.rdx
    if not 0 < hkid < (1 << 6):                       # reserved bits 63:16, is_private_hkid()
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    st = mod.hpa_operand(tdr, OPERAND_ID_RCX)
    if st:
        return Regs(st)
    if hkid in mod.hkids:
        return Regs(TDX_HKID_NOT_FREE)
    mod.mem.zero(tdr)
    mod.give_to_module(tdr, PT_TDR, 0)                # the TDR's PAMT owner is 0
    mod.tds[tdr] = Td(tdr, hkid)
    mod.hkids.add(hkid)
    return Regs(TDX_SUCCESS)


@leaf(TDH_MNG_KEY_CONFIG)
def tdh_mng_key_config(mod, r, caller):
    """tdh_mng_key_config.c.  This platform has one package, so the first call configures every
    package and the TD leaves HKID_ASSIGNED: a second call is LIFECYCLE_STATE_INCORRECT
    (TDX_KEY_CONFIGURED is for a package already configured while others are not)."""
    td, st = mod.td_operand(r.rcx, keys=False)
    if st:
        return Regs(st)
    if td.lifecycle != TD_HKID_ASSIGNED:
        return Regs(TDX_LIFECYCLE_STATE_INCORRECT)
    td.lifecycle = TD_KEYS_CONFIGURED
    return Regs(TDX_SUCCESS)


@leaf(TDH_MNG_ADDCX)
def tdh_mng_addcx(mod, r, caller):
    td, st = mod.td_operand(r.rdx, OPERAND_ID_RDX, tdcs=False)
    if st:
        return Regs(st)
    if len(td.tdcx) >= TDCS_PAGES:
        return Regs(TDX_TDCX_NUM_INCORRECT)
    st = mod.hpa_operand(r.rcx, OPERAND_ID_RCX)
    if st:
        return Regs(st)
    mod.mem.zero(r.rcx)
    mod.give_to_module(r.rcx, PT_TDCX, td.tdr)
    td.tdcx.append(r.rcx)
    td.chldcnt += 1
    return Regs(TDX_SUCCESS)


@leaf(TDH_MNG_INIT)
def tdh_mng_init(mod, r, caller):
    td, st = mod.td_operand(r.rcx)
    if st:
        return Regs(st)
    if td.op_state != OP_STATE_UNINITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    params = r.rdx
    if params & 0x3FF or params + 1024 > mod.mem.size:
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
    mem.buf[td.sept_root:td.sept_root + PAGE] = S.SEPT_FREE_ENTRY.to_bytes(8, "little") * 512
    td.op_state = OP_STATE_INITIALIZED
    return Regs(TDX_SUCCESS)


@leaf(TDH_VP_CREATE)
def tdh_vp_create(mod, r, caller):
    td, st = mod.td_operand(r.rdx, OPERAND_ID_RDX)
    if st:
        return Regs(st)
    if td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    st = mod.hpa_operand(r.rcx, OPERAND_ID_RCX)
    if st:
        return Regs(st)
    mod.mem.zero(r.rcx)
    mod.give_to_module(r.rcx, PT_TDVPR, td.tdr)
    v = TdVcpu(td, r.rcx)
    td.vcpus[r.rcx] = v
    mod.vcpus[r.rcx] = v
    td.chldcnt += 1
    return Regs(TDX_SUCCESS)


def _vcpu_operand(mod, tdvpr, op=OPERAND_ID_RCX):
    if tdvpr & 0xFFF or tdvpr >> mod.x86_phys_bits:
        return None, TDX_OPERAND_INVALID | op
    if not mod.pamt.covers(tdvpr):
        return None, TDX_OPERAND_ADDR_RANGE_ERROR | op
    if mod.pamt.page_type(tdvpr) != PT_TDVPR:
        return None, TDX_PAGE_METADATA_INCORRECT | op
    v = mod.vcpus[tdvpr]
    if v.td.fatal:
        return None, TDX_TD_FATAL
    if v.td.lifecycle != TD_KEYS_CONFIGURED:
        return None, TDX_TD_KEYS_NOT_CONFIGURED
    return v, None


@leaf(TDH_VP_ADDCX)
def tdh_vp_addcx(mod, r, caller):
    v, st = _vcpu_operand(mod, r.rdx, OPERAND_ID_RDX)
    if st:
        return Regs(st)
    if v.td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    if v.initialized:
        return Regs(TDX_VCPU_STATE_INCORRECT)
    if len(v.tdvpx) >= TDVPX_PAGES:
        return Regs(TDX_TDCX_NUM_INCORRECT)
    st = mod.hpa_operand(r.rcx, OPERAND_ID_RCX)
    if st:
        return Regs(st)
    mod.mem.zero(r.rcx)
    mod.give_to_module(r.rcx, PT_TDCX, v.td.tdr)
    v.tdvpx.append(r.rcx)
    v.td.chldcnt += 1
    return Regs(TDX_SUCCESS)


@leaf(TDH_VP_INIT)
def tdh_vp_init(mod, r, caller):
    """tdh_vp_init.c.  Version 0 is the 1.5.01 leaf (RCX, RDX); version 1 (later 1.5 builds, what
    Linux 6.16 calls) adds the x2APIC id in R8.  The vCPU count is enforced here, not at VP.CREATE."""
    version = (r.rax >> 16) & 0xFF
    if version > 1:
        return Regs(TDX_OPERAND_INVALID)                    # operand id 0: RAX
    v, st = _vcpu_operand(mod, r.rcx)
    if st:
        return Regs(st)
    if v.td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    if len(v.tdvpx) != TDVPX_PAGES:
        return Regs(TDX_TDCX_NUM_INCORRECT)                 # map_tdvps() fails
    if v.initialized:
        return Regs(TDX_VCPU_STATE_INCORRECT)
    if v.td.num_vcpus >= v.td.max_vcpus:
        return Regs(TDX_MAX_VCPUS_EXCEEDED)
    if version == 1:
        if r.r8 >> 32:
            return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R8)
        if any(x.initialized and x.x2apic_id == r.r8 for x in v.td.vcpus.values()):
            return Regs(TDX_X2APIC_ID_NOT_UNIQUE | r.r8)
        v.x2apic_id = r.r8
    index = v.td.num_vcpus
    v.td.num_vcpus += 1
    v.vcpu_index = index
    v.hw = mod.make_cpu(index)
    # The TD VMCS intercepts no exception the guest could raise (only #MC): every other one is
    # delivered through the TD's own IDT.
    v.hw.exception_bitmap = 1 << 18
    # The "EPT-violation #VE" control is 1 for every TD (PROCBASED_CTLS2_INIT has bit 18, whatever
    # the attributes: SEPT_VE_DISABLE is about PENDING pages only), and the VE information area
    # is TDVPS.VE_INFO (init_guest_td_address_fields()).  The S-EPT's entries all suppress #VE,
    # so only a shared-EPT entry of KVM's with bit 63 clear (its MMIO SPTE) is ever converted.
    v.hw.ve_info = v.ve_info
    # The TD's CPUID: leaf 0x21 names the TDX module (Linux's tdx_early_init looks for it).
    vendor = b"IntelTDX    "
    le = lambda b: int.from_bytes(b, "little")
    v.hw.cpuid[0x21] = (0, le(vendor[0:4]), le(vendor[8:12]), le(vendor[4:8]))
    # init_vcpu_gprs_and_registers(): RCX = R8 = the initial RCX, RSI = the vCPU index.
    v.hw.set_regs({"rcx": r.rdx, "r8": r.rdx, "rsi": index, "rbx": 48 if not v.td.gpaw else 52})
    v.initialized = True
    v.associated = True          # associated with this CPU until TDH.VP.FLUSH
    return Regs(TDX_SUCCESS)


def _vp_field(v, field, write=None):
    """Read (or write) one TDVPS field; None for a field this model does not have."""
    hw = v.hw
    if field == MD_TDVPS_VMCS_SHARED_EPTP:
        # Only bits 51:12 (the root HPA) are the VMM's; the module supplies WB, the walk
        # length and A/D when it loads the EPTP.
        if write is not None:
            v.shared_eptp = write & 0x000FFFFFFFFFF000
        return v.shared_eptp or 0
    debug = v.td.attributes & TD_ATTR_DEBUG
    if not debug or hw is None:
        return None
    if MD_TDVPS_GPR_BASE <= field < MD_TDVPS_GPR_BASE + 16:
        name = GPR_ORDER[field - MD_TDVPS_GPR_BASE]
    elif field == MD_TDVPS_RIP:
        name = "rip"
    elif field == MD_TDVPS_CR3:
        name = "cr3"
    else:
        return None
    if write is not None:
        hw.set_reg(name, write)
    return hw.reg(name)


@leaf(TDH_VP_RD)
def tdh_vp_rd(mod, r, caller):
    v, st = _vcpu_operand(mod, r.rcx)
    if st:
        return Regs(st)
    value = _vp_field(v, r.rdx)
    if value is None:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    return Regs(TDX_SUCCESS, rdx=r.rdx, r8=value)


@leaf(TDH_VP_WR)
def tdh_vp_wr(mod, r, caller):
    v, st = _vcpu_operand(mod, r.rcx)
    if st:
        return Regs(st)
    old = _vp_field(v, r.rdx)
    if old is None:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    mask = r.r9                      # the caller's mask (ANDed with the field's writable bits)
    _vp_field(v, r.rdx, (old & ~mask) | (r.r8 & mask))
    return Regs(TDX_SUCCESS, r8=old)


@leaf(TDH_VP_FLUSH)
def tdh_vp_flush(mod, r, caller):
    v, st = _vcpu_operand(mod, r.rcx)
    if st:
        return Regs(st)
    if v.hw is not None:
        v.hw.flush_tlb()
    v.associated = False
    return Regs(TDX_SUCCESS)


@leaf(TDH_MNG_VPFLUSHDONE)
def tdh_mng_vpflushdone(mod, r, caller):
    td, st = mod.td_operand(r.rcx, keys=False)
    if st:
        return Regs(st)
    if td.lifecycle not in (TD_HKID_ASSIGNED, TD_KEYS_CONFIGURED):
        return Regs(TDX_LIFECYCLE_STATE_INCORRECT)
    if any(v.associated for v in td.vcpus.values()):
        return Regs(TDX_FLUSHVP_NOT_DONE)
    td.lifecycle = TD_BLOCKED
    td.wbcache_needed = True
    return Regs(TDX_SUCCESS)


@leaf(TDH_PHYMEM_CACHE_WB)
def tdh_phymem_cache_wb(mod, r, caller):
    """Write back and invalidate the caches (one package here): every blocked TD's key is clean."""
    for td in mod.tds.values():
        td.wbcache_needed = False
    return Regs(TDX_SUCCESS)


@leaf(TDH_MNG_KEY_FREEID)
def tdh_mng_key_freeid(mod, r, caller):
    td, st = mod.td_operand(r.rcx, keys=False)
    if st:
        return Regs(st)
    if td.lifecycle != TD_BLOCKED:
        return Regs(TDX_LIFECYCLE_STATE_INCORRECT)
    if td.wbcache_needed:
        return Regs(TDX_WBCACHE_NOT_COMPLETE)
    td.lifecycle = TD_TEARDOWN
    mod.hkids.discard(td.hkid)
    return Regs(TDX_SUCCESS)


# -- measurement ----------------------------------------------------------------------------------------------
@leaf(TDH_MR_EXTEND)
def tdh_mr_extend(mod, r, caller):
    td, st = mod.td_operand(r.rdx, OPERAND_ID_RDX)
    if st:
        return Regs(st)
    if td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    gpa = r.rcx
    if gpa & 0xFF or not mod.private_gpa_ok(td, gpa):
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    # check_and_walk_private_gpa_to_leaf(): the walk must end at a leaf with RWX != 0.
    ptr, e, lvl = mod.sept_walk(td, gpa, 0)
    if not S.is_leaf_state(S.sept_state(e)) or not e & S.SEPT_RWX:
        rcx, rdx = mod.sept_details(e, lvl)
        return Regs(TDX_EPT_ENTRY_NOT_PRESENT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    if not S.seamcall_allowed(TDH_MR_EXTEND, S.sept_state(e)):
        return Regs(TDX_EPT_ENTRY_NOT_PRESENT)
    hpa = (e & S.SEPT_HPA) + (gpa & ((PAGE << (9 * lvl)) - 1))    # leaf_ept_entry_to_hpa()
    td.mrtd.update(b"MR.EXTEND" + gpa.to_bytes(8, "little") + mod.mem.read(hpa, 256))
    return Regs(TDX_SUCCESS)


@leaf(TDH_MR_FINALIZE)
def tdh_mr_finalize(mod, r, caller):
    td, st = mod.td_operand(r.rcx)
    if st:
        return Regs(st)
    if td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    if td.num_vcpus == 0:
        return Regs(TDX_NO_VCPUS)
    td.finalized_mrtd = td.mrtd.hexdigest()
    td.op_state = OP_STATE_RUNNABLE
    return Regs(TDX_SUCCESS)


# -- the S-EPT ----------------------------------------------------------------------------------------------
_RUN_STATES = (OP_STATE_INITIALIZED, OP_STATE_RUNNABLE)


def _tlb_tracking_required(td):
    return td.op_state == OP_STATE_RUNNABLE


def _host_lock(mod, ptr, e, lvl, caller, what):
    """sept_lock_acquire_host() on the walked entry, the copy re-read under the lock, then a
    scheduling point while the lock is held (another CPU may meet it there) before the caller
    checks the state.  Returns (the copy, None), or (None, BUSY|RCX with the walked entry's
    details in RCX/RDX)."""
    if not mod.lock_entry(ptr):
        rcx, rdx = mod.sept_details(e, lvl)
        return None, Regs(TDX_OPERAND_BUSY | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    e = mod.mem.q[ptr >> 3]
    mod.point(caller, what)
    return e, None


@leaf(TDH_MEM_SEPT_ADD)
def tdh_mem_sept_add(mod, r, caller):
    if r.rdx & 0xFFE:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RDX)
    allow_existing = r.rdx & 1
    new = r.r8
    got, err = _begin(mod, r, caller, lambda td: range(1, td.pwl), False, tdr=r.rdx & ~0xFFF)
    if err:
        return err
    td, gpa, level = got
    ptr = None
    try:
        ptr, e, lvl = mod.sept_walk(td, gpa, level)
        if lvl != level:
            ptr = None
            return mod.walk_failed(e, lvl)
        e, busy = _host_lock(mod, ptr, e, lvl, caller, "sept_entry_locked")
        if busy:
            ptr = None
            return busy
        state = S.sept_state(e)
        if not S.seamcall_allowed(TDH_MEM_SEPT_ADD, state):
            return mod.state_incorrect(e, lvl)
        # process_l1_page()
        if not new:
            return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R8)    # version 0: R8 must name the new page
        if state != S.SEPT_FREE:
            if allow_existing:
                return Regs(TDX_SUCCESS)
            return mod.state_incorrect(e, lvl)
        st = mod.hpa_operand(new, OPERAND_ID_R8)
        if st:
            return Regs(st)
        if not mod.pamt.try_lock(new):
            return Regs(TDX_OPERAND_BUSY | OPERAND_ID_R8)
        mod.mem.buf[new:new + PAGE] = S.SEPT_FREE_ENTRY.to_bytes(8, "little") * 512
        mod.give_to_module(new, PT_EPT, td.tdr)
        mod.pamt.unlock(new)
        td.chldcnt += 1
        mod.mem.q[ptr >> 3] = S.make_nl_mapped(new)      # written unlocked
        ptr = None
        return Regs(TDX_SUCCESS)
    finally:
        if ptr is not None:
            mod.unlock_entry(ptr)
        _sept_unlock(td, False)


@leaf(TDH_MEM_PAGE_AUG)
def tdh_mem_page_aug(mod, r, caller):
    got, err = _begin(mod, r, caller, lambda td: (0, 1), False)
    if err:
        return err
    td, gpa, level = got
    page = r.r8
    ptr = None
    try:
        ptr, e, lvl = mod.sept_walk(td, gpa, level)
        if lvl != level:
            ptr = None
            return mod.walk_failed(e, lvl)
        e, busy = _host_lock(mod, ptr, e, lvl, caller, "sept_entry_locked")
        if busy:
            ptr = None
            return busy
        if not S.seamcall_allowed(TDH_MEM_PAGE_AUG, S.sept_state(e)):
            return mod.state_incorrect(e, lvl)
        # check_and_lock_free_range_hpa()
        npages = 512 ** level
        if page & ((PAGE << (9 * level)) - 1):
            return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R8)
        for k in range(npages):
            st = mod.hpa_operand(page + k * PAGE, OPERAND_ID_R8)
            if st:
                return Regs(st)
        if not mod.pamt.try_lock(page):
            return Regs(TDX_OPERAND_BUSY | OPERAND_ID_R8)
        mod.give_to_td(page, td.tdr, npages)
        mod.pamt.set_bepoch(page, 0)
        mod.pamt.unlock(page)
        td.chldcnt += npages
        mod.mem.q[ptr >> 3] = S.make_pending(page)       # sept_set_leaf_and_release_locks()
        ptr = None
        return Regs(TDX_SUCCESS)
    finally:
        if ptr is not None:
            mod.unlock_entry(ptr)
        _sept_unlock(td, False)


@leaf(TDH_MEM_PAGE_ADD)
def tdh_mem_page_add(mod, r, caller):
    """No S-EPT tree or entry lock: PAGE.ADD holds the TDR exclusively instead (tdh_mem_page_add.c)."""
    td, st = mod.td_operand(r.rdx, OPERAND_ID_RDX)
    if st:
        return Regs(st)
    if td.op_state != OP_STATE_INITIALIZED:
        return Regs(TDX_OP_STATE_INCORRECT)
    pi, st = _page_info(mod, td, r.rcx, (0,))
    if st:
        return Regs(st)
    gpa, level = pi
    target, source = r.r8, r.r9
    ptr, e, lvl = mod.sept_walk(td, gpa, 0)
    if lvl != 0:
        return mod.walk_failed(e, lvl)
    if not S.seamcall_allowed(TDH_MEM_PAGE_ADD, S.sept_state(e)):
        return mod.state_incorrect(e, lvl)
    if source & 0xFFF or source + PAGE > mod.mem.size:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R9)
    if mod.pamt.covers(source) and mod.pamt.page_type(source) != PT_NDA:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_R9)          # the source must be shared memory
    st = mod.hpa_operand(target, OPERAND_ID_R8)
    if st:
        return Regs(st)
    mod.mem.write(target, mod.mem.read(source, PAGE))
    mod.give_to_td(target, td.tdr)
    td.chldcnt += 1
    mod.mem.q[ptr >> 3] = S.make_mapped(target)
    td.mrtd.update(b"MEM.PAGE.ADD" + gpa.to_bytes(8, "little"))
    return Regs(TDX_SUCCESS)


@leaf(TDH_MEM_RANGE_BLOCK)
def tdh_mem_range_block(mod, r, caller):
    got, err = _begin(mod, r, caller, lambda td: range(0, td.pwl), True)
    if err:
        return err
    td, gpa, level = got
    ptr = None
    try:
        ptr, e, lvl = mod.sept_walk(td, gpa, level)
        if lvl != level:
            ptr = None
            return mod.walk_failed(e, lvl)
        e, busy = _host_lock(mod, ptr, e, lvl, caller, "sept_locked_exclusive")
        if busy:
            ptr = None
            return busy
        state = S.sept_state(e)
        if not S.seamcall_allowed(TDH_MEM_RANGE_BLOCK, state):
            rcx, rdx = mod.sept_details(e, level)
            if state in S.BLOCKED_STATES:
                return Regs(TDX_GPA_RANGE_ALREADY_BLOCKED | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
            return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        new = {S.SEPT_NL_MAPPED: S.SEPT_NL_BLOCKED, S.SEPT_MAPPED: S.SEPT_BLOCKED,
               S.SEPT_PENDING: S.SEPT_PENDING_BLOCKED}[state]
        mod.mem.q[ptr >> 3] = S.set_state(e, new)          # still locked: released below
        mod.pamt.set_bepoch(e & S.SEPT_HPA, td.epoch)
        return Regs(TDX_SUCCESS)
    finally:
        if ptr is not None:
            mod.unlock_entry(ptr)
        _sept_unlock(td, True)


@leaf(TDH_MEM_RANGE_UNBLOCK)
def tdh_mem_range_unblock(mod, r, caller):
    got, err = _begin(mod, r, caller, lambda td: range(0, td.pwl), True)
    if err:
        return err
    td, gpa, level = got
    ptr = None
    try:
        ptr, e, lvl = mod.sept_walk(td, gpa, level)
        if lvl != level:
            ptr = None
            return mod.walk_failed(e, lvl)
        e, busy = _host_lock(mod, ptr, e, lvl, caller, "sept_locked_exclusive")
        if busy:
            ptr = None
            return busy
        state = S.sept_state(e)
        if not S.seamcall_allowed(TDH_MEM_RANGE_UNBLOCK, state):
            rcx, rdx = mod.sept_details(e, level)
            return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        if _tlb_tracking_required(td) and not mod.is_tlb_tracked(td, mod.pamt.bepoch(e & S.SEPT_HPA)):
            return Regs(TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_SEPT)    # the source's operand id: 0x92
        new = {S.SEPT_NL_BLOCKED: S.SEPT_NL_MAPPED, S.SEPT_BLOCKED: S.SEPT_MAPPED,
               S.SEPT_PENDING_BLOCKED: S.SEPT_PENDING}[state]
        mod.mem.q[ptr >> 3] = S.set_state(e, new) & ~S.SEPT_TDEL
        ptr = None
        return Regs(TDX_SUCCESS)
    finally:
        if ptr is not None:
            mod.unlock_entry(ptr)
        _sept_unlock(td, True)


@leaf(TDH_MEM_TRACK)
def tdh_mem_track(mod, r, caller):
    td, st = mod.td_operand(r.rcx)
    if st:
        return Regs(st)
    if not _op_state_ok(td, _RUN_STATES):
        return Regs(TDX_OP_STATE_INCORRECT)
    if td.epoch_locked:
        return Regs(TDX_OPERAND_BUSY | OPERAND_ID_TD_EPOCH)
    td.epoch_locked = True
    try:
        mod.point(caller, "epoch_locked")
        if td.refcount[1 - (td.epoch & 1)]:
            return Regs(TDX_PREVIOUS_TLB_EPOCH_BUSY)
        td.epoch += 1
        return Regs(TDX_SUCCESS)
    finally:
        td.epoch_locked = False


def _check_blocked_and_tracked(mod, td, e, state, level, child_hpa):
    """The TLB-tracking checks of PAGE.REMOVE / SEPT.REMOVE (a status Regs, or None)."""
    if not _tlb_tracking_required(td):
        return None
    if state not in S.BLOCKED_STATES:
        rcx, rdx = mod.sept_details(e, level)
        return Regs(TDX_GPA_RANGE_NOT_BLOCKED | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
    if not mod.is_tlb_tracked(td, mod.pamt.bepoch(child_hpa)):
        return Regs(TDX_TLB_TRACKING_NOT_DONE | OPERAND_ID_RCX)
    return None


@leaf(TDH_MEM_PAGE_REMOVE)
def tdh_mem_page_remove(mod, r, caller):
    got, err = _begin(mod, r, caller, lambda td: (0, 1, 2), False)
    if err:
        return err
    td, gpa, level = got
    ptr = None
    hpa = None
    try:
        ptr, e, lvl = mod.sept_walk(td, gpa, level)
        if lvl != level:
            ptr = None
            return mod.walk_failed(e, lvl)
        e, busy = _host_lock(mod, ptr, e, lvl, caller, "sept_entry_locked")
        if busy:
            ptr = None
            return busy
        state = S.sept_state(e)
        if not S.is_leaf_state(state) or not S.seamcall_allowed(TDH_MEM_PAGE_REMOVE, state):
            rcx, rdx = mod.sept_details(e, level)
            return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        if not mod.pamt.try_lock(e & S.SEPT_HPA):
            return Regs(TDX_OPERAND_BUSY | OPERAND_ID_RCX)
        hpa = e & S.SEPT_HPA
        bad = _check_blocked_and_tracked(mod, td, e, state, level, hpa)
        if bad:
            return bad
        npages = 512 ** level
        mod.mem.q[ptr >> 3] = S.SEPT_FREE_ENTRY              # septe_set_free_or_removed_and_release_locks()
        ptr = None
        mod.release(hpa, npages)
        td.chldcnt -= npages
        return Regs(TDX_SUCCESS, rcx=hpa)
    finally:
        if hpa is not None:
            mod.pamt.unlock(hpa)
        if ptr is not None:
            mod.unlock_entry(ptr)
        _sept_unlock(td, False)


@leaf(TDH_MEM_SEPT_REMOVE)
def tdh_mem_sept_remove(mod, r, caller):
    got, err = _begin(mod, r, caller, lambda td: range(1, td.pwl), True)
    if err:
        return err
    td, gpa, level = got
    ptr = None
    child = None
    try:
        ptr, e, lvl = mod.sept_walk(td, gpa, level)
        if lvl != level:
            ptr = None
            return mod.walk_failed(e, lvl)
        e, busy = _host_lock(mod, ptr, e, lvl, caller, "sept_locked_exclusive")
        if busy:
            ptr = None
            return busy
        state = S.sept_state(e)
        if not S.seamcall_allowed(TDH_MEM_SEPT_REMOVE, state):
            rcx, rdx = mod.sept_details(e, level)
            return Regs(TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        if not mod.pamt.try_lock(e & S.SEPT_HPA):
            return Regs(TDX_OPERAND_BUSY | OPERAND_ID_RCX)
        child = e & S.SEPT_HPA
        bad = _check_blocked_and_tracked(mod, td, e, state, level, child)
        if bad:
            return bad
        q = mod.mem.q
        if any(S.sept_state(q[(child >> 3) + i]) != S.SEPT_FREE for i in range(512)):
            rcx, rdx = mod.sept_details(e, level)
            return Regs(TDX_EPT_PAGE_NOT_FREE | OPERAND_ID_RCX, rcx=rcx, rdx=rdx)
        q[ptr >> 3] = S.SEPT_FREE_ENTRY
        ptr = None
        mod.release(child)
        td.chldcnt -= 1
        return Regs(TDX_SUCCESS, rcx=child)
    finally:
        if child is not None:
            mod.pamt.unlock(child)
        if ptr is not None:
            mod.unlock_entry(ptr)
        _sept_unlock(td, True)


# -- physical pages -------------------------------------------------------------------------------------------
@leaf(TDH_PHYMEM_PAGE_RECLAIM)
def tdh_phymem_page_reclaim(mod, r, caller):
    """tdh_phymem_page_reclaim.c: operand, TDMR, PAMT lock, page type; then the outputs (RCX page
    type, RDX owner, R8 size) are set, and the alignment of a large page and the owner TD's
    lifecycle are checked with them in place."""
    hpa = r.rcx
    if hpa & 0xFFF or hpa >> mod.maxphyaddr or hpa >> mod.x86_phys_bits:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    if not mod.pamt.covers(hpa):
        return Regs(TDX_OPERAND_ADDR_RANGE_ERROR | OPERAND_ID_RCX)
    if not mod.pamt.try_lock(hpa):
        return Regs(TDX_OPERAND_BUSY | OPERAND_ID_RCX)
    try:
        pt = mod.pamt.page_type(hpa)
        if pt in (PT_NDA, PT_RSVD):
            return Regs(TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX)
        owner = mod.pamt.owner(hpa)
        size = mod.pamt.page_size(hpa)
        out = lambda status: Regs(status, rcx=pt, rdx=owner, r8=size)
        if size and hpa & ((PAGE << (9 * size)) - 1):
            return out(TDX_OPERAND_INVALID | OPERAND_ID_RCX)      # a 2M page is reclaimed at its head
        npages = 512 ** size
        if pt != PT_TDR:
            td = mod.tds.get(owner)
            if td is None or td.lifecycle != TD_TEARDOWN:
                return out(TDX_LIFECYCLE_STATE_INCORRECT)
            td.chldcnt -= npages
            if pt == PT_TDVPR:
                mod.vcpus.pop(hpa)
                td.vcpus.pop(hpa, None)
        else:
            td = mod.tds[hpa]
            if td.lifecycle != TD_TEARDOWN:
                return out(TDX_LIFECYCLE_STATE_INCORRECT)
            if td.chldcnt:
                return out(TDX_TD_ASSOCIATED_PAGES_EXIST)
            del mod.tds[hpa]
        mod.release(hpa, npages)
        return out(TDX_SUCCESS)
    finally:
        mod.pamt.unlock(hpa)


@leaf(TDH_PHYMEM_PAGE_WBINVD)
def tdh_phymem_page_wbinvd(mod, r, caller):
    """tdh_phymem_page_wbinvd.c: only the HKID bits are stripped from RCX; then the usual checks
    of a private 4K HPA (aligned, below MAX_PA, in a TDMR, PT_NDA)."""
    hkid_mask = ((1 << mod.maxphyaddr) - 1) & ~((1 << mod.x86_phys_bits) - 1)
    hpa = r.rcx & ~hkid_mask
    if hpa & 0xFFF or hpa >> mod.maxphyaddr:
        return Regs(TDX_OPERAND_INVALID | OPERAND_ID_RCX)
    if not mod.pamt.covers(hpa):
        return Regs(TDX_OPERAND_ADDR_RANGE_ERROR | OPERAND_ID_RCX)
    if mod.pamt.page_type(hpa) != PT_NDA:
        return Regs(TDX_PAGE_METADATA_INCORRECT | OPERAND_ID_RCX)
    return Regs(TDX_SUCCESS)
