"""Register-level tests of the simulated TDX module: one SEAMCALL at a time.

Expected values come from REFERENCE.md section 3 and the TDX fact sheet
(``docs/tdx_facts.md``).
Where neither document says what the real module returns, the test pins the
model's behaviour and says so in its docstring ("model-defined").
"""

import pytest

from emu.hw.memory import HostAccessError
from tdxmod import abi as A
from tdxmod.module import MD_TDVPS_GPR_BASE, MD_TDVPS_RIP, GPR_ORDER

from tdxhelpers import (  # noqa: F401  (the spec constants)
    PAGE,
    MiB,
    M2,
    U64,
    SUCCESS,
    OPERAND_BUSY,
    PREVIOUS_TLB_EPOCH_BUSY,
    OPERAND_INVALID,
    OPERAND_ADDR_RANGE_ERROR,
    PAGE_METADATA_INCORRECT,
    TD_ASSOCIATED_PAGES_EXIST,
    TD_FATAL,
    LIFECYCLE_STATE_INCORRECT,
    OP_STATE_INCORRECT,
    TD_KEYS_NOT_CONFIGURED,
    KEY_CONFIGURED,
    WBCACHE_NOT_COMPLETE,
    FLUSHVP_NOT_DONE,
    EPT_WALK_FAILED,
    GPA_RANGE_NOT_BLOCKED,
    GPA_RANGE_ALREADY_BLOCKED,
    TLB_TRACKING_NOT_DONE,
    EPT_ENTRY_STATE_INCORRECT,
    EPT_PAGE_NOT_FREE,
    VCPU_STATE_INCORRECT,
    MAX_VCPUS_EXCEEDED,
    X2APIC_ID_NOT_UNIQUE,
    STATUS_MASK,
    TDCS_NOT_ALLOCATED,
    NO_VCPUS,
    TDCX_NUM_INCORRECT,
    HKID_NOT_FREE,
    EPT_ENTRY_NOT_PRESENT,
    OP_RAX,
    OP_RCX,
    OP_RDX,
    OP_R8,
    OP_R9,
    OP_ATTRIBUTES,
    OP_EXEC_CONTROLS,
    OP_EPTP_CONTROLS,
    OP_SEPT_TREE,
    OP_TD_EPOCH,
    OP_OP_STATE,
    PT_NDA,
    PT_REG,
    PT_TDR,
    PT_TDCX,
    PT_TDVPR,
    PT_EPT,
    SVE,
    TDB,
    TDP,
    TDEL,
    TDHP,
    FREE_ENTRY,
    FREE,
    NL_MAPPED,
    NL_BLOCKED,
    MAPPED,
    BLOCKED,
    PENDING,
    PENDING_BLOCKED,
    entry_value,
    decode_state,
    arch_entry,
    info,
    align,
    TdEnv,
    RaceSched,
)

G = 0x4000_0000  # a private GPA: PML4E 0, PDPTE 1, PDE 0, PTE 0
G_OTHER = 0x4060_0000  # same PDPT, another PDE
SHARED_BIT = 1 << 47  # GPAW 0

TD_HKID_ASSIGNED, TD_KEYS_CONFIGURED, TD_BLOCKED, TD_TEARDOWN = 0, 1, 2, 3
OP_UNINIT, OP_INITIALIZED, OP_RUNNABLE = 0, 1, 2


def status(out):
    return out.rax & STATUS_MASK


def host_accessible(env, hpa):
    try:
        env.mem.host_read(hpa, 8)
        return True
    except HostAccessError:
        return False


# ==================================================================================================
# TDH.MNG.CREATE / TDH.MNG.KEY.CONFIG / TDH.MNG.ADDCX / TDH.MNG.INIT
# ==================================================================================================
def test_mng_create_success(env):
    tdr = env.kpage()
    env.mem.host_write(tdr, b"\xaa" * PAGE)
    out = env.call(A.TDH_MNG_CREATE, rcx=tdr, rdx=5)
    assert out.rax == SUCCESS
    assert env.pamt.page_type(tdr) == PT_TDR and env.pamt.owner(tdr) == 0  # tdh_mng_create: owner 0
    td = env.mod.tds[tdr]
    assert (td.lifecycle, td.op_state, td.hkid, td.chldcnt) == (TD_HKID_ASSIGNED, OP_UNINIT, 5, 0)
    assert 5 in env.mod.hkids
    assert env.mem.read(tdr, PAGE) == bytes(PAGE)  # the module initialises the TDR
    assert not host_accessible(env, tdr)


@pytest.mark.parametrize("case", ["misaligned", "hkid_bits", "outside_tdmr", "not_nda"])
def test_mng_create_bad_tdr(env, case):
    tdr = env.kpage()
    rcx, expect = {
        "misaligned": (tdr + 8, OPERAND_INVALID | OP_RCX),
        "hkid_bits": (tdr | (1 << env.hkid_shift), OPERAND_INVALID | OP_RCX),
        "outside_tdmr": (env.pamt.base, OPERAND_ADDR_RANGE_ERROR | OP_RCX),
        "not_nda": (None, PAGE_METADATA_INCORRECT | OP_RCX),
    }[case]
    if case == "not_nda":
        env.ok(env.call(A.TDH_MNG_CREATE, rcx=tdr, rdx=1))
        rcx = tdr
    out = env.call(A.TDH_MNG_CREATE, rcx=rcx, rdx=2)
    assert out.rax == expect
    assert 2 not in env.mod.hkids


@pytest.mark.parametrize("hkid", [0, 64, 1 << 16 | 3])
def test_mng_create_bad_hkid(env, hkid):
    """tdh_mng_create(): an HKID outside the private range (or reserved bits 63:16 set) is
    OPERAND_INVALID|RDX (this model's private HKIDs are 1..63)."""
    tdr = env.kpage()
    out = env.call(A.TDH_MNG_CREATE, rcx=tdr, rdx=hkid)
    assert out.rax == OPERAND_INVALID | OP_RDX
    assert env.pamt.page_type(tdr) == PT_NDA and host_accessible(env, tdr)


def test_mng_create_hkid_in_use(env):
    """tdh_mng_create(): an HKID whose KOT entry is not HKID_FREE -> TDX_HKID_NOT_FREE (0xC000082000000000),
    checked after the TDR page."""
    env.create(hkid=3)
    tdr = env.kpage()
    out = env.call(A.TDH_MNG_CREATE, rcx=tdr, rdx=3)
    assert (out.rax, out.rcx, out.rdx) == (HKID_NOT_FREE, 0, 0)
    assert out.rax == 0xC000082000000000
    assert env.pamt.page_type(tdr) == PT_NDA and host_accessible(env, tdr)
    assert len(env.mod.tds) == 1


def test_mng_create_checks_hkid_before_tdr(env):
    """tdh_mng_create(): the HKID operand is checked before the TDR page: a bad HKID with a bad TDR
    is OPERAND_INVALID|RDX; an HKID in use with a bad TDR is the TDR's error (the KOT comes last)."""
    env.create(hkid=3)
    assert env.call(A.TDH_MNG_CREATE, rcx=env.tdr, rdx=0).rax == OPERAND_INVALID | OP_RDX
    assert env.call(A.TDH_MNG_CREATE, rcx=env.tdr, rdx=3).rax == PAGE_METADATA_INCORRECT | OP_RCX


def test_key_config(td_created):
    """tdh_mng_key_config(): on this one-package platform the first call configures the key on
    every package (lifecycle KEYS_CONFIGURED); a second call finds the lifecycle no longer
    HKID_ASSIGNED -> LIFECYCLE_STATE_INCORRECT (KEY_CONFIGURED is only for a package configured
    while others are not)."""
    env = td_created
    assert env.call(A.TDH_MNG_KEY_CONFIG, rcx=env.tdr).rax == SUCCESS
    assert env.td.lifecycle == TD_KEYS_CONFIGURED
    out = env.call(A.TDH_MNG_KEY_CONFIG, rcx=env.tdr)
    assert (out.rax, out.rcx, out.rdx) == (LIFECYCLE_STATE_INCORRECT, 0, 0)
    assert env.td.lifecycle == TD_KEYS_CONFIGURED


@pytest.mark.parametrize("case", ["not_tdr", "misaligned"])
def test_key_config_bad_operand(td_created, case):
    env = td_created
    rcx, expect = {
        "not_tdr": (env.kpage(), PAGE_METADATA_INCORRECT | OP_RCX),
        "misaligned": (env.tdr + 0x10, OPERAND_INVALID | OP_RCX),
    }[case]
    assert env.call(A.TDH_MNG_KEY_CONFIG, rcx=rcx).rax == expect
    assert env.td.lifecycle == TD_HKID_ASSIGNED


def test_key_config_after_vpflushdone(td_init):
    env = td_init
    env.ok(env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr))
    assert env.call(A.TDH_MNG_KEY_CONFIG, rcx=env.tdr).rax == LIFECYCLE_STATE_INCORRECT
    assert env.td.lifecycle == TD_BLOCKED


def test_mng_addcx_success(td_created):
    env = td_created.key_config()
    env.addcx()
    for i, page in enumerate(env.tdcs):
        assert env.pamt.page_type(page) == PT_TDCX and env.pamt.owner(page) == env.tdr
        assert not host_accessible(env, page)
    assert env.td.chldcnt == 4
    assert env.td.tdcx == env.tdcs


def test_mng_addcx_before_key_config(td_created):
    env = td_created
    page = env.kpage()
    assert env.call(A.TDH_MNG_ADDCX, rcx=page, rdx=env.tdr).rax == TD_KEYS_NOT_CONFIGURED
    assert env.pamt.page_type(page) == PT_NDA and env.td.chldcnt == 0


@pytest.mark.parametrize("case", ["rdx_not_tdr", "rcx_not_nda", "rcx_misaligned", "rcx_outside"])
def test_mng_addcx_bad_operands(td_created, case):
    env = td_created.key_config()
    page = env.kpage()
    rcx, rdx, expect = {
        "rdx_not_tdr": (page, env.kpage(), PAGE_METADATA_INCORRECT | OP_RDX),
        # the TDR itself: this call holds its PAMT entry exclusively, so the new page's lock
        # (pamt_walk()) is BUSY before its page type is looked at
        "rcx_not_nda": (env.tdr, env.tdr, OPERAND_BUSY | OP_RCX),
        "rcx_misaligned": (page + 0x800, env.tdr, OPERAND_INVALID | OP_RCX),
        "rcx_outside": (env.pamt.base, env.tdr, OPERAND_ADDR_RANGE_ERROR | OP_RCX),
    }[case]
    assert env.call(A.TDH_MNG_ADDCX, rcx=rcx, rdx=rdx).rax == expect
    assert env.td.chldcnt == 0 and env.pamt.page_type(page) == PT_NDA


def test_mng_addcx_too_many_pages(td_keyed):
    """tdh_mng_add_cx(): num_tdcx > MAX_NUM_TDCS_PAGES - 1 -> TDX_TDCX_NUM_INCORRECT (before the page operand)."""
    env = td_keyed
    page = env.kpage()
    assert env.call(A.TDH_MNG_ADDCX, rcx=page, rdx=env.tdr).rax == TDCX_NUM_INCORRECT
    assert env.call(A.TDH_MNG_ADDCX, rcx=page + 8, rdx=env.tdr).rax == TDCX_NUM_INCORRECT
    assert env.pamt.page_type(page) == PT_NDA and env.td.chldcnt == 4


def test_mng_init_success(td_keyed):
    env = td_keyed
    params = env.td_params(max_vcpus=3)
    out = env.call(A.TDH_MNG_INIT, rcx=env.tdr, rdx=params)
    assert out.rax == SUCCESS
    td = env.td
    assert td.op_state == OP_INITIALIZED
    assert (td.pwl, td.gpaw, td.shared_bit, td.max_vcpus) == (4, 0, 1 << 47, 3)
    assert td.attributes == A.TD_ATTR_SEPT_VE_DISABLE | A.TD_ATTR_DEBUG
    # The S-EPT root is a TD-owned page, every entry FREE with SVE
    assert td.sept_root == env.tdcs[-1]
    assert all(env.mem.read64(td.sept_root + 8 * i) == FREE_ENTRY for i in range(512))


def test_mng_init_5level_gpaw(td_keyed):
    env = td_keyed
    out = env.call(A.TDH_MNG_INIT, rcx=env.tdr, rdx=env.td_params(eptp_controls=0x26, config_flags=1))
    assert out.rax == SUCCESS
    assert (env.td.pwl, env.td.gpaw, env.td.shared_bit) == (5, 1, 1 << 51)


def test_mng_init_5level_without_gpaw(td_keyed):
    env = td_keyed
    env.ok(env.call(A.TDH_MNG_INIT, rcx=env.tdr, rdx=env.td_params(eptp_controls=0x26)))
    assert (env.td.pwl, env.td.gpaw, env.td.shared_bit) == (5, 0, 1 << 47)


BAD_TD_PARAMS = {
    # name: (td_params kwargs, spec status, spec line)
    "attributes_unknown_bit": (
        dict(attributes=1 << 1),
        OPERAND_INVALID | OP_ATTRIBUTES,
        "facts 7 operand IDs: ATTRIBUTES 64 (facts 5: only DEBUG/SEPT_VE_DISABLE are used)",
    ),
    "eptp_mt_uc": (
        dict(eptp_controls=0x18),
        OPERAND_INVALID | OP_EPTP_CONTROLS,
        "facts 5: eptp_controls MT must be WB, otherwise OPERAND_INVALID|67",
    ),
    "eptp_pwl3": (
        dict(eptp_controls=0x16),
        OPERAND_INVALID | OP_EPTP_CONTROLS,
        "facts 5: PWL-1 must be 3 or 4, otherwise OPERAND_INVALID|67",
    ),
    "eptp_pwl6": (
        dict(eptp_controls=0x2E),
        OPERAND_INVALID | OP_EPTP_CONTROLS,
        "facts 5: PWL-1 must be 3 or 4, otherwise OPERAND_INVALID|67",
    ),
    "eptp_ad_bit": (
        dict(eptp_controls=0x5E),
        OPERAND_INVALID | OP_EPTP_CONTROLS,
        "facts 5: A/D (bit 6) must be 0, otherwise OPERAND_INVALID|67",
    ),
    "eptp_sss_bit": (
        dict(eptp_controls=0x9E),
        OPERAND_INVALID | OP_EPTP_CONTROLS,
        "facts 5: SSS (bit 7) must be 0, otherwise OPERAND_INVALID|67",
    ),
    "eptp_base_pa": (
        dict(eptp_controls=0x1E | 0x1000),
        OPERAND_INVALID | OP_EPTP_CONTROLS,
        "facts 5: reserved bits and base_pa must be 0, otherwise OPERAND_INVALID|67",
    ),
    "gpaw_4level": (
        dict(eptp_controls=0x1E, config_flags=1),
        OPERAND_INVALID | OP_EXEC_CONTROLS,
        "facts 5: config_flags errors are OPERAND_INVALID|66; 52-bit GPAW needs 5-level EPT",
    ),
}
_MODULE_ACCEPTS = ("eptp_ad_bit", "eptp_sss_bit", "eptp_base_pa")


@pytest.mark.parametrize("case", [pytest.param(c) if c in _MODULE_ACCEPTS else c for c in BAD_TD_PARAMS])
def test_mng_init_bad_td_params_refused(td_keyed, case):
    """The class of the status (OPERAND_INVALID) and no state change."""
    env = td_keyed
    kw, _, _ = BAD_TD_PARAMS[case]
    out = env.call(A.TDH_MNG_INIT, rcx=env.tdr, rdx=env.td_params(**kw))
    assert status(out) == OPERAND_INVALID
    assert env.td.op_state == OP_UNINIT and env.td.sept_root is None


@pytest.mark.parametrize("case", [pytest.param(c) for c in BAD_TD_PARAMS])
def test_mng_init_bad_td_params_operand_id(td_keyed, case):
    env = td_keyed
    kw, expect, _ = BAD_TD_PARAMS[case]
    out = env.call(A.TDH_MNG_INIT, rcx=env.tdr, rdx=env.td_params(**kw))
    assert out.rax == expect


def test_mng_init_params_misaligned(td_keyed):
    """TD_PARAMS must be 1024-aligned (facts 5); the operand is RDX."""
    env = td_keyed
    out = env.call(A.TDH_MNG_INIT, rcx=env.tdr, rdx=env.td_params() + 0x200)
    assert out.rax == OPERAND_INVALID | OP_RDX
    assert env.td.op_state == OP_UNINIT


def test_mng_init_missing_tdcs(td_created):
    """check_td_in_correct_build_state() (from tdh_mng_init()): num_tdcx < MIN_NUM_TDCS_PAGES ->
    TDX_TDCS_NOT_ALLOCATED, before the op_state check."""
    env = td_created.key_config().addcx(3)
    out = env.call(A.TDH_MNG_INIT, rcx=env.tdr, rdx=env.td_params())
    assert (out.rax, out.rcx, out.rdx) == (TDCS_NOT_ALLOCATED, 0, 0)
    assert env.td.op_state == OP_UNINIT


@pytest.mark.parametrize("leaf", ["VP.CREATE", "MR.FINALIZE", "TRACK", "SEPT.ADD"])
def test_tdcs_not_allocated(td_created, leaf):
    """check_td_in_correct_build_state(): every leaf that maps the TDCS (check_state_map_tdcs_and_lock)
    returns TDX_TDCS_NOT_ALLOCATED while fewer than MIN_NUM_TDCS_PAGES are added; ADDCX itself does not."""
    env = td_created.key_config().addcx(2)
    call = {
        "VP.CREATE": lambda: env.call(A.TDH_VP_CREATE, rcx=env.kpage(), rdx=env.tdr),
        "MR.FINALIZE": lambda: env.call(A.TDH_MR_FINALIZE, rcx=env.tdr),
        "TRACK": lambda: env.call(A.TDH_MEM_TRACK, rcx=env.tdr),
        "SEPT.ADD": lambda: env.call(A.TDH_MEM_SEPT_ADD, rcx=G | 1, rdx=env.tdr, r8=env.kpage()),
    }[leaf]
    assert call().rax == TDCS_NOT_ALLOCATED
    assert env.call(A.TDH_MNG_ADDCX, rcx=env.kpage(), rdx=env.tdr).rax == SUCCESS


def test_mng_init_before_key_config(td_created):
    env = td_created
    assert env.call(A.TDH_MNG_INIT, rcx=env.tdr, rdx=env.td_params()).rax == TD_KEYS_NOT_CONFIGURED


# ==================================================================================================
# op_state gating (REFERENCE 3.6; facts 6 op_state table)
# ==================================================================================================
def _opcase_mng_init(env):
    return env.call(A.TDH_MNG_INIT, rcx=env.tdr, rdx=env.td_params())


def _opcase_vp_create(env):
    return env.call(A.TDH_VP_CREATE, rcx=env.kpage(), rdx=env.tdr)


def _opcase_sept_add(env):
    return env.call(A.TDH_MEM_SEPT_ADD, rcx=0 | 3, rdx=env.tdr, r8=env.kpage())


def _opcase_aug(env):
    return env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=env.upage())


def _opcase_page_add(env):
    return env.call(A.TDH_MEM_PAGE_ADD, rcx=G, rdx=env.tdr, r8=env.upage(), r9=env.source())


def _opcase_mr_extend(env):
    return env.call(A.TDH_MR_EXTEND, rcx=G, rdx=env.tdr)


def _opcase_mr_finalize(env):
    return env.call(A.TDH_MR_FINALIZE, rcx=env.tdr)


def _opcase_vp_enter(env):
    return env.call(A.TDH_VP_ENTER, rcx=env.vcpus[0][0])


OP_STATE_CASES = {
    # name: (stage, call)
    "MNG.INIT@INITIALIZED": ("initialized", _opcase_mng_init),
    "VP.CREATE@UNINIT": ("keyed", _opcase_vp_create),
    "SEPT.ADD@UNINIT": ("keyed", _opcase_sept_add),
    "AUG@UNINIT": ("keyed", _opcase_aug),
    "PAGE.ADD@UNINIT": ("keyed", _opcase_page_add),
    "PAGE.ADD@RUNNABLE": ("runnable", _opcase_page_add),
    "MR.EXTEND@RUNNABLE": ("runnable", _opcase_mr_extend),
    "MR.FINALIZE@UNINIT": ("keyed", _opcase_mr_finalize),
    "MR.FINALIZE@RUNNABLE": ("runnable", _opcase_mr_finalize),
    "VP.ENTER@INITIALIZED": ("vcpu", _opcase_vp_enter),
}


@pytest.mark.parametrize("case", list(OP_STATE_CASES))
def test_op_state_incorrect(make_td, case):
    stage, fn = OP_STATE_CASES[case]
    env = make_td(stage)
    before = (env.td.op_state, env.td.chldcnt, env.td.epoch, len(env.pamt.owned_pages()))
    out = fn(env)
    assert status(out) == OP_STATE_INCORRECT
    assert (env.td.op_state, env.td.chldcnt, env.td.epoch, len(env.pamt.owned_pages())) == before


@pytest.mark.parametrize("case", list(OP_STATE_CASES))
def test_op_state_incorrect_exact(make_td, case):
    stage, fn = OP_STATE_CASES[case]
    assert fn(make_td(stage)).rax == OP_STATE_INCORRECT


SPEC_ONLY_OP_STATE = {
    # REFERENCE 3.6: BLOCK, REMOVE, SEPT.REMOVE, UNBLOCK, TRACK need INITIALIZED/RUNNABLE/...: not UNINIT
    "BLOCK@UNINIT": ("keyed", lambda env: env.call(A.TDH_MEM_RANGE_BLOCK, rcx=G | 1, rdx=env.tdr)),
    "UNBLOCK@UNINIT": ("keyed", lambda env: env.call(A.TDH_MEM_RANGE_UNBLOCK, rcx=G | 1, rdx=env.tdr)),
    "REMOVE@UNINIT": ("keyed", lambda env: env.call(A.TDH_MEM_PAGE_REMOVE, rcx=G, rdx=env.tdr)),
    "SEPT.REMOVE@UNINIT": ("keyed", lambda env: env.call(A.TDH_MEM_SEPT_REMOVE, rcx=G | 1, rdx=env.tdr)),
    "TRACK@UNINIT": ("keyed", lambda env: env.call(A.TDH_MEM_TRACK, rcx=env.tdr)),
}


@pytest.mark.parametrize("case", list(SPEC_ONLY_OP_STATE))
def test_op_state_uninit_memory_leaves(make_td, case):
    stage, fn = SPEC_ONLY_OP_STATE[case]
    env = make_td(stage)
    epoch = env.td.epoch
    out = fn(env)
    assert out.rax == OP_STATE_INCORRECT
    assert env.td.epoch == epoch


# ==================================================================================================
# vCPUs: TDH.VP.CREATE / VP.ADDCX / VP.INIT / VP.RD / VP.WR
# ==================================================================================================
def test_vp_create_success(td_init):
    env = td_init
    tdvpr = env.kpage()
    assert env.call(A.TDH_VP_CREATE, rcx=tdvpr, rdx=env.tdr).rax == SUCCESS
    assert env.pamt.page_type(tdvpr) == PT_TDVPR and env.pamt.owner(tdvpr) == env.tdr
    assert env.td.chldcnt == 5 and not host_accessible(env, tdvpr)


@pytest.mark.parametrize("case", ["rdx_not_tdr", "rcx_not_nda", "rcx_misaligned"])
def test_vp_create_bad_operands(td_init, case):
    env = td_init
    page = env.kpage()
    rcx, rdx, expect = {
        "rdx_not_tdr": (page, env.kpage(), PAGE_METADATA_INCORRECT | OP_RDX),
        "rcx_not_nda": (env.tdcs[0], env.tdr, PAGE_METADATA_INCORRECT | OP_RCX),
        "rcx_misaligned": (page + 0x40, env.tdr, OPERAND_INVALID | OP_RCX),
    }[case]
    assert env.call(A.TDH_VP_CREATE, rcx=rcx, rdx=rdx).rax == expect
    assert env.td.chldcnt == 4 and not env.td.vcpus


def test_vp_create_after_finalize(td_run):
    env = td_run
    page = env.kpage()
    assert env.call(A.TDH_VP_CREATE, rcx=page, rdx=env.tdr).rax == OP_STATE_INCORRECT
    assert env.pamt.page_type(page) == PT_NDA


def test_max_vcpus_exceeded(make_td):
    """tdh_vp_init(): the vCPU count (num_vcpus) is enforced at VP.INIT (MAX_VCPUS_EXCEEDED), not at
    VP.CREATE, which has no such check; the refused vCPU stays uninitialized and the count unchanged."""
    env = make_td("initialized", max_vcpus=1)
    env.add_vcpu()
    tdvpr = env.vp_create()  # VP.CREATE succeeds beyond max_vcpus
    env.vp_addcx(tdvpr)
    out = env.vp_init(tdvpr, x2apic=1)
    assert (out.rax, out.rcx, out.rdx) == (MAX_VCPUS_EXCEEDED, 0, 0)
    assert not env.mod.vcpus[tdvpr].initialized and env.td.num_vcpus == 1
    assert env.call(A.TDH_VP_INIT, rcx=tdvpr, rdx=0).rax == MAX_VCPUS_EXCEEDED  # version 0 too


def test_vp_addcx_success(td_init):
    env = td_init
    tdvpr = env.vp_create()
    page = env.kpage()
    assert env.call(A.TDH_VP_ADDCX, rcx=page, rdx=tdvpr).rax == SUCCESS
    assert env.pamt.page_type(page) == PT_TDCX and env.pamt.owner(page) == env.tdr
    assert env.td.chldcnt == 6 and not host_accessible(env, page)


@pytest.mark.parametrize("case", ["rdx_not_tdvpr", "rdx_misaligned", "rcx_not_nda"])
def test_vp_addcx_bad_operands(td_init, case):
    env = td_init
    tdvpr = env.vp_create()
    page = env.kpage()
    rcx, rdx, expect = {
        "rdx_not_tdvpr": (page, env.tdr, PAGE_METADATA_INCORRECT | OP_RDX),
        "rdx_misaligned": (page, tdvpr + 8, OPERAND_INVALID | OP_RDX),
        "rcx_not_nda": (env.tdcs[1], tdvpr, PAGE_METADATA_INCORRECT | OP_RCX),
    }[case]
    assert env.call(A.TDH_VP_ADDCX, rcx=rcx, rdx=rdx).rax == expect
    assert env.pamt.page_type(page) == PT_NDA and env.td.chldcnt == 5


def test_vp_addcx_after_init(td_vcpu):
    """After VP.INIT the vCPU takes no more TDCX pages: VCPU_STATE_INCORRECT."""
    env = td_vcpu
    page = env.kpage()
    assert env.call(A.TDH_VP_ADDCX, rcx=page, rdx=env.vcpus[0][0]).rax == VCPU_STATE_INCORRECT
    assert env.pamt.page_type(page) == PT_NDA


def test_vp_addcx_too_many(td_init):
    """tdh_vp_addcx(): num_tdvps_pages >= MAX_TDVPS_PAGES -> TDX_TDCX_NUM_INCORRECT (the model's TDVPS
    is the TDVPR and one TDVPX page)."""
    env = td_init
    tdvpr = env.vp_create()
    env.vp_addcx(tdvpr)
    page = env.kpage()
    assert env.call(A.TDH_VP_ADDCX, rcx=page, rdx=tdvpr).rax == TDCX_NUM_INCORRECT
    assert env.pamt.page_type(page) == PT_NDA


def test_vp_addcx_after_finalize(td_vcpu):
    env = td_vcpu
    tdvpr = env.vp_create()
    env.finalize()
    page = env.kpage()
    assert env.call(A.TDH_VP_ADDCX, rcx=page, rdx=tdvpr).rax == OP_STATE_INCORRECT
    assert env.pamt.page_type(page) == PT_NDA


def _vp_rd(env, tdvpr, field):
    out = env.call(A.TDH_VP_RD, rcx=tdvpr, rdx=field)
    assert out.rax == SUCCESS, A.status_name(out.rax)
    return out.r8


def test_vp_init_success_and_initial_gprs(td_init):
    """VP.INIT v1: RCX = R8 = the initial RCX (RDX), RSI = vCPU index in VP.INIT order, RBX = 48 (GPAW 0)."""
    env = td_init
    a = env.add_vcpu(rcx=0x1234)
    b = env.add_vcpu(rcx=0x5678)
    gpr = {name: MD_TDVPS_GPR_BASE + i for i, name in enumerate(GPR_ORDER)}
    for tdvpr, rcx, index in ((a, 0x1234, 0), (b, 0x5678, 1)):
        assert _vp_rd(env, tdvpr, gpr["rcx"]) == rcx
        assert _vp_rd(env, tdvpr, gpr["r8"]) == rcx
        assert _vp_rd(env, tdvpr, gpr["rsi"]) == index
        assert _vp_rd(env, tdvpr, gpr["rbx"]) == 48
    assert env.mod.vcpus[a].initialized and env.mod.vcpus[b].initialized


def test_vp_init_twice(td_vcpu):
    env = td_vcpu
    assert env.vp_init(env.vcpus[0][0], x2apic=7).rax == VCPU_STATE_INCORRECT


def test_vp_init_without_tdvpx(td_init):
    """tdh_vp_init(): map_tdvps() fails while the TDVPS pages are not all added -> TDX_TDCX_NUM_INCORRECT
    (checked before the vCPU state)."""
    env = td_init
    tdvpr = env.vp_create()
    assert env.vp_init(tdvpr).rax == TDCX_NUM_INCORRECT
    assert not env.mod.vcpus[tdvpr].initialized and env.td.num_vcpus == 0


def test_vp_init_version_2(td_init):
    """facts 6: version > 1 -> OPERAND_INVALID|RAX (operand id 0)."""
    env = td_init
    tdvpr = env.vp_create()
    env.vp_addcx(tdvpr)
    out = env.call(A.TDH_VP_INIT | (2 << 16), rcx=tdvpr, rdx=0, r8=0)
    assert out.rax == OPERAND_INVALID | OP_RAX
    assert not env.mod.vcpus[tdvpr].initialized


def test_vp_init_version_0(td_init):
    """tdh_vp_init() in 1.5.01 is version 0 (RCX = TDVPR, RDX = initial RCX; R8 not an operand): it
    succeeds, RSI = the vCPU index, and R8 is ignored (no x2APIC id)."""
    env = td_init
    tdvpr = env.vp_create()
    env.vp_addcx(tdvpr)
    out = env.call(A.TDH_VP_INIT, rcx=tdvpr, rdx=0x77, r8=1 << 40)
    assert (out.rax, out.rcx, out.rdx) == (SUCCESS, 0, 0)
    v = env.mod.vcpus[tdvpr]
    assert v.initialized and v.x2apic_id is None and env.td.num_vcpus == 1
    gpr = {name: MD_TDVPS_GPR_BASE + i for i, name in enumerate(GPR_ORDER)}
    assert (_vp_rd(env, tdvpr, gpr["rcx"]), _vp_rd(env, tdvpr, gpr["rsi"])) == (0x77, 0)


def test_vp_init_not_tdvpr(td_init):
    env = td_init
    assert env.vp_init(env.tdr).rax == PAGE_METADATA_INCORRECT | OP_RCX


def test_vp_init_x2apic_too_wide(td_init):
    env = td_init
    tdvpr = env.vp_create()
    env.vp_addcx(tdvpr)
    assert env.vp_init(tdvpr, x2apic=1 << 32).rax == OPERAND_INVALID | OP_R8
    assert not env.mod.vcpus[tdvpr].initialized


def test_vp_init_x2apic_duplicate(td_init):
    env = td_init
    a = env.vp_create()
    env.vp_addcx(a)
    env.ok(env.vp_init(a, x2apic=5))
    b = env.vp_create()
    env.vp_addcx(b)
    assert env.vp_init(b, x2apic=5).rax == X2APIC_ID_NOT_UNIQUE | 5
    assert not env.mod.vcpus[b].initialized


def test_vp_init_after_finalize(td_vcpu):
    env = td_vcpu
    tdvpr = env.vp_create()
    env.vp_addcx(tdvpr)
    env.finalize()
    assert env.vp_init(tdvpr).rax == OP_STATE_INCORRECT
    assert not env.mod.vcpus[tdvpr].initialized


def test_vp_wr_shared_eptp_keeps_bits_51_12(td_vcpu):
    """The field's write mask is bits 51:12 (td_vmcs_fields_lookup.c); the value must then pass
    shared_hpa_check() (md_vp_handle_field_attribute_on_wr()): bits 51:48 are above MAX_PA (48)."""
    env = td_vcpu
    tdvpr = env.vcpus[0][0]
    assert _vp_rd(env, tdvpr, 0x203C) == 0
    out = env.call(A.TDH_VP_WR, rcx=tdvpr, rdx=0x203C, r8=0xFFF0_0000_0000_7FFF, r9=U64)
    assert out.rax == SUCCESS
    assert out.r8 == 0  # the previous value
    assert _vp_rd(env, tdvpr, 0x203C) == 0x7000  # bits 11:0 and 63:52 dropped
    out = env.call(A.TDH_VP_WR, rcx=tdvpr, rdx=0x203C, r8=0xABC0_0000_9ABC_D01E, r9=U64)
    assert out.rax == SUCCESS and out.r8 == 0x7000
    assert _vp_rd(env, tdvpr, 0x203C) == 0x0000_9ABC_D000
    # bits 51:48 (above MAX_PA) or 47:42 (a private HKID): TDX_METADATA_FIELD_VALUE_NOT_VALID,
    # nothing written
    for bad in (0x000F_0000_0000_1000, 0x0000_0400_0000_1000):
        out = env.call(A.TDH_VP_WR, rcx=tdvpr, rdx=0x203C, r8=bad, r9=U64)
        assert (out.rax, out.r8) == (0xC0000C0300000000, 0)
        assert _vp_rd(env, tdvpr, 0x203C) == 0x0000_9ABC_D000


def test_vp_wr_shared_eptp_partial_mask(td_vcpu):
    """Only the bits in R9 are written."""
    env = td_vcpu
    tdvpr = env.vcpus[0][0]
    env.ok(env.call(A.TDH_VP_WR, rcx=tdvpr, rdx=0x203C, r8=0x0000_03FF_FFFF_F000, r9=U64))
    env.ok(env.call(A.TDH_VP_WR, rcx=tdvpr, rdx=0x203C, r8=0, r9=0x00000000FFFFF000))
    assert _vp_rd(env, tdvpr, 0x203C) == 0x0000_03FF_0000_0000


def test_vp_wr_zero_mask_writes_nothing(td_vcpu):
    env = td_vcpu
    tdvpr = env.vcpus[0][0]
    env.ok(env.call(A.TDH_VP_WR, rcx=tdvpr, rdx=0x203C, r8=0x5000, r9=U64))
    env.ok(env.call(A.TDH_VP_WR, rcx=tdvpr, rdx=0x203C, r8=0x7000, r9=0))
    assert _vp_rd(env, tdvpr, 0x203C) == 0x5000


def test_vp_rd_wr_debug_gpr(td_vcpu):
    env = td_vcpu
    tdvpr = env.vcpus[0][0]
    env.ok(env.call(A.TDH_VP_WR, rcx=tdvpr, rdx=MD_TDVPS_RIP, r8=0xFFF0, r9=U64))
    assert _vp_rd(env, tdvpr, MD_TDVPS_RIP) == 0xFFF0
    env.ok(env.call(A.TDH_VP_WR, rcx=tdvpr, rdx=MD_TDVPS_GPR_BASE + 13, r8=0xABCD, r9=U64))
    assert _vp_rd(env, tdvpr, MD_TDVPS_GPR_BASE + 13) == 0xABCD


def test_vp_rd_gpr_non_debug_td(make_td):
    """Model-defined: GPR fields of a non-debug TD are not readable (OPERAND_INVALID|RDX)."""
    env = make_td("vcpu", attributes=A.TD_ATTR_SEPT_VE_DISABLE)
    out = env.call(A.TDH_VP_RD, rcx=env.vcpus[0][0], rdx=MD_TDVPS_GPR_BASE + 1)
    assert out.rax == OPERAND_INVALID | OP_RDX
    # the shared EPTP is still readable
    assert _vp_rd(env, env.vcpus[0][0], 0x203C) == 0


@pytest.mark.parametrize("leaf", [A.TDH_VP_RD, A.TDH_VP_WR])
def test_vp_rd_wr_unknown_field(td_vcpu, leaf):
    """Model-defined: an unknown field id -> OPERAND_INVALID|RDX."""
    env = td_vcpu
    assert env.call(leaf, rcx=env.vcpus[0][0], rdx=0x7777, r8=1, r9=U64).rax == OPERAND_INVALID | OP_RDX


@pytest.mark.parametrize("leaf", [A.TDH_VP_RD, A.TDH_VP_WR, A.TDH_VP_FLUSH])
@pytest.mark.parametrize("case", ["not_tdvpr", "misaligned"])
def test_vp_operand_errors(td_vcpu, leaf, case):
    env = td_vcpu
    rcx, expect = {
        "not_tdvpr": (env.tdr, PAGE_METADATA_INCORRECT | OP_RCX),
        "misaligned": (env.vcpus[0][0] + 8, OPERAND_INVALID | OP_RCX),
    }[case]
    assert env.call(leaf, rcx=rcx, rdx=0x203C, r8=0, r9=U64).rax == expect


def test_vp_operand_outside_tdmr(td_vcpu):
    env = td_vcpu
    assert env.call(A.TDH_VP_RD, rcx=env.pamt.base, rdx=0x203C).rax == OPERAND_ADDR_RANGE_ERROR | OP_RCX


# ==================================================================================================
# VP.ENTER gating at register level (running guests is test_td_e2e.py's job)
# ==================================================================================================
def test_vp_enter_vcpu_not_initialized(td_vcpu):
    """facts 6 / tdh_vp_enter(): VP.ENTER on a vCPU not VP.INITed -> TDX_VCPU_STATE_INCORRECT; one
    whose TDVPS pages are not all added fails mapping the TDVPS first -> TDX_TDCX_NUM_INCORRECT."""
    env = td_vcpu
    tdvpr = env.vp_create()
    env.vp_addcx(tdvpr)
    bare = env.vp_create()
    env.finalize()
    assert env.call(A.TDH_VP_ENTER, rcx=tdvpr).rax == VCPU_STATE_INCORRECT
    assert env.call(A.TDH_VP_ENTER, rcx=bare).rax == TDCX_NUM_INCORRECT


# ==================================================================================================
# TDH.MEM.SEPT.ADD
# ==================================================================================================
def test_sept_add_each_level(td_init):
    env = td_init
    td = env.td
    parent_table = td.sept_root
    for n, level in enumerate((3, 2, 1)):
        page = env.kpage()
        env.mem.host_write(page, b"\x55" * PAGE)
        out = env.sept_add(align(G, level), level, page)
        assert out.rax == SUCCESS
        pa = parent_table + (((G >> (12 + 9 * level)) & 511) << 3)
        assert env.mem.read64(pa) == entry_value(NL_MAPPED, page)
        assert all(env.mem.read64(page + 8 * i) == FREE_ENTRY for i in range(512))
        assert env.pamt.page_type(page) == PT_EPT and env.pamt.owner(page) == env.tdr
        assert td.chldcnt == 4 + n + 1
        assert not host_accessible(env, page)
        parent_table = page


def test_sept_add_5level_top(make_td):
    env = make_td("initialized", eptp_controls=0x26, config_flags=1)
    gpa = 1 << 47  # private under GPAW 1 (shared bit 51): PML5E 0, PML4E 256
    for level in (4, 3, 2, 1):
        assert env.sept_add(align(gpa, level), level).rax == SUCCESS
    assert env.entry(gpa, 4) == entry_value(NL_MAPPED, env.sept_pages[0])
    assert env.call(A.TDH_MEM_SEPT_ADD, rcx=0 | 5, rdx=env.tdr, r8=env.kpage()).rax == OPERAND_INVALID | OP_RCX
    assert env.call(A.TDH_MEM_SEPT_ADD, rcx=(1 << 51) | 3, rdx=env.tdr, r8=env.kpage()).rax == OPERAND_INVALID | OP_RCX


BAD_PAGE_INFO = {
    "level0": G | 0,
    "level4_in_4level": 4,
    "level7": G | 7,
    "misaligned_2m": (G + PAGE) | 1,
    "misaligned_1g": (G + M2) | 2,
    "reserved_11_3": G | 1 | 0x8,
    "reserved_63_52": G | 1 | (1 << 52),
    "shared_bit": G | SHARED_BIT | 1,
    "above_gpaw": G | (1 << 48) | 1,
}


@pytest.mark.parametrize("case", list(BAD_PAGE_INFO))
def test_sept_add_bad_page_info(td_init, case):
    env = td_init
    page = env.kpage()
    out = env.call(A.TDH_MEM_SEPT_ADD, rcx=BAD_PAGE_INFO[case], rdx=env.tdr, r8=page)
    assert out.rax == OPERAND_INVALID | OP_RCX
    assert env.pamt.page_type(page) == PT_NDA
    assert env.mem.read64(env.td.sept_root) == FREE_ENTRY


def test_sept_add_rdx_reserved_bits(td_init):
    env = td_init
    out = env.call(A.TDH_MEM_SEPT_ADD, rcx=0 | 3, rdx=env.tdr | 0x2, r8=env.kpage())
    assert out.rax == OPERAND_INVALID | OP_RDX


def test_sept_add_allow_existing(td_init):
    env = td_init
    env.ensure_path(G, 1)
    before = env.entry(G, 2)
    chld = env.td.chldcnt
    page = env.kpage()
    out = env.sept_add(G, 2, page, allow_existing=True)
    assert out.rax == SUCCESS
    assert env.entry(G, 2) == before and env.td.chldcnt == chld
    assert env.pamt.page_type(page) == PT_NDA and host_accessible(env, page)


def test_sept_add_allow_existing_nl_blocked(td_init):
    env = td_init
    child = env.make_state(G, 1, NL_BLOCKED)
    out = env.sept_add(G, 1, env.kpage(), allow_existing=True)
    assert out.rax == EPT_ENTRY_STATE_INCORRECT | OP_RCX
    assert (out.rcx, out.rdx) == (arch_entry(NL_BLOCKED, child), info(NL_BLOCKED, 1))


@pytest.mark.parametrize("case", ["reg_page", "tdr_page", "sept_page", "tdcs_page"])
def test_sept_add_page_not_nda(td_init, case):
    env = td_init
    env.ensure_path(G, 1)
    if case == "reg_page":
        env.ensure_path(G_OTHER, 0)
        env.ok(env.aug(G_OTHER)[0])
        page = env.leaves[G_OTHER][1]
    else:
        page = {"tdr_page": env.tdr, "sept_page": env.sept_pages[0], "tdcs_page": env.tdcs[0]}[case]
    pt, owner = env.pamt.page_type(page), env.pamt.owner(page)
    chld = env.td.chldcnt
    out = env.call(A.TDH_MEM_SEPT_ADD, rcx=G | 1, rdx=env.tdr, r8=page)
    # The TDR: this call holds its PAMT entry shared, so the new page's exclusive lock is BUSY
    # (pamt_walk() comes before the page type check).
    assert out.rax == (OPERAND_BUSY if case == "tdr_page" else PAGE_METADATA_INCORRECT) | OP_R8
    assert env.entry(G, 1) == FREE_ENTRY
    assert (env.pamt.page_type(page), env.pamt.owner(page), env.td.chldcnt) == (pt, owner, chld)


@pytest.mark.parametrize("case", ["misaligned", "outside_tdmr", "hkid_bits"])
def test_sept_add_page_bad_address(td_init, case):
    env = td_init
    page = env.kpage()
    r8, expect = {
        "misaligned": (page + 0x100, OPERAND_INVALID | OP_R8),
        "outside_tdmr": (env.pamt.base, OPERAND_ADDR_RANGE_ERROR | OP_R8),
        "hkid_bits": (page | (1 << env.hkid_shift), OPERAND_INVALID | OP_R8),
    }[case]
    assert env.call(A.TDH_MEM_SEPT_ADD, rcx=0 | 3, rdx=env.tdr, r8=r8).rax == expect
    assert env.mem.read64(env.td.sept_root) == FREE_ENTRY


def test_sept_add_null_page_v0(td_init):
    env = td_init
    assert env.call(A.TDH_MEM_SEPT_ADD, rcx=0 | 3, rdx=env.tdr, r8=0).rax == OPERAND_INVALID | OP_R8
    assert env.mem.read64(env.td.sept_root) == FREE_ENTRY


def test_sept_add_null_page_checked_after_the_entry(td_init):
    """tdh_mem_sept_add() -> process_l1_page(): R8 = NULL (version 0) is refused only after the walk, the
    entry lock and the state check: a walk that fails is EPT_WALK_FAILED|RCX, an entry in a state SEPT.ADD
    does not allow is EPT_ENTRY_STATE_INCORRECT|RCX, whatever R8 is."""
    env = td_init
    out = env.call(A.TDH_MEM_SEPT_ADD, rcx=G | 1, rdx=env.tdr, r8=0)
    assert (out.rax, out.rcx, out.rdx) == (EPT_WALK_FAILED | OP_RCX, arch_entry(FREE), info(FREE, 3))
    hpa = env.make_state(G, 1, NL_BLOCKED)
    out = env.call(A.TDH_MEM_SEPT_ADD, rcx=G | 1, rdx=env.tdr, r8=0)
    assert (out.rax, out.rcx, out.rdx) == (
        EPT_ENTRY_STATE_INCORRECT | OP_RCX,
        arch_entry(NL_BLOCKED, hpa),
        info(NL_BLOCKED, 1),
    )
    assert env.entry(G, 1) == entry_value(NL_BLOCKED, hpa)


@pytest.mark.parametrize("case", ["not_tdr", "tdr_misaligned"])
def test_sept_add_bad_tdr(td_init, case):
    env = td_init
    rdx, expect = {
        "not_tdr": (env.tdcs[0], PAGE_METADATA_INCORRECT | OP_RDX),
        "tdr_misaligned": (env.tdr | (1 << env.hkid_shift), OPERAND_INVALID | OP_RDX),
    }[case]
    assert env.call(A.TDH_MEM_SEPT_ADD, rcx=0 | 3, rdx=rdx, r8=env.kpage()).rax == expect


def test_sept_add_keys_not_configured(td_created):
    env = td_created
    assert env.call(A.TDH_MEM_SEPT_ADD, rcx=0 | 3, rdx=env.tdr, r8=env.kpage()).rax == TD_KEYS_NOT_CONFIGURED


def test_sept_add_walk_failed_example(td_init):
    """SEPT.ADD(1) with the PML4E present but the PDPTE FREE: the walk stops at level 2."""
    env = td_init
    env.ok(env.sept_add(0, 3))
    page = env.kpage()
    out = env.call(A.TDH_MEM_SEPT_ADD, rcx=G | 1, rdx=env.tdr, r8=page)
    assert (out.rax, out.rcx, out.rdx) == (EPT_WALK_FAILED | OP_RCX, 0x8000000000000000, 0x2)
    assert env.pamt.page_type(page) == PT_NDA


# ==================================================================================================
# TDH.MEM.PAGE.AUG
# ==================================================================================================
@pytest.mark.parametrize("stage", ["initialized", "runnable"])
def test_aug_4k(make_td, stage):
    env = make_td(stage)
    env.ensure_path(G, 0)
    chld = env.td.chldcnt
    page = env.upage()
    out = env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=page)
    assert out.rax == SUCCESS
    assert env.entry(G, 0) == entry_value(PENDING, page)
    assert env.pamt.page_type(page) == PT_REG and env.pamt.owner(page) == env.tdr
    assert env.td.chldcnt == chld + 1
    assert not host_accessible(env, page)


def test_aug_2m(td_run):
    env = td_run
    env.ensure_path(G, 1)
    chld = env.td.chldcnt
    page = env.upage(M2, align=M2)
    out = env.call(A.TDH_MEM_PAGE_AUG, rcx=G | 1, rdx=env.tdr, r8=page)
    assert out.rax == SUCCESS
    assert env.entry(G, 1) == entry_value(PENDING, page)
    assert env.pamt.page_type(page) == PT_REG and env.pamt.owner(page) == env.tdr
    assert env.td.chldcnt == chld + 512
    assert not host_accessible(env, page) and not host_accessible(env, page + M2 - PAGE)


def test_aug_walk_failed_reference_example(td_run):
    """REFERENCE 3.5: AUG at level 0 under a FREE PDE -> 0xC0000B0000000001, RCX 0x8000000000000000, RDX 0x1."""
    env = td_run
    env.ensure_path(G, 1)
    page = env.upage()
    out = env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=page)
    assert (out.rax, out.rcx, out.rdx) == (0xC0000B0000000001, 0x8000000000000000, 0x1)
    assert env.pamt.page_type(page) == PT_NDA and host_accessible(env, page)


@pytest.mark.parametrize("case", ["reg_page", "tdcs_page", "sept_page"])
def test_aug_page_already_owned(td_run, case):
    env = td_run
    env.ensure_path(G, 0)
    env.ensure_path(G_OTHER, 0)
    if case == "reg_page":
        env.ok(env.aug(G_OTHER)[0])
        page = env.leaves[G_OTHER][1]
    else:
        page = {"tdcs_page": env.tdcs[1], "sept_page": env.sept_pages[-1]}[case]
    chld = env.td.chldcnt
    out = env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=page)
    assert out.rax == PAGE_METADATA_INCORRECT | OP_R8
    assert env.entry(G, 0) == FREE_ENTRY and env.td.chldcnt == chld


@pytest.mark.parametrize("rcx", [G | 2, G | 0x10, G | SHARED_BIT, (G + PAGE) | 1])
def test_aug_bad_page_info(td_run, rcx):
    env = td_run
    env.ensure_path(G, 0)
    assert env.call(A.TDH_MEM_PAGE_AUG, rcx=rcx, rdx=env.tdr, r8=env.upage()).rax == OPERAND_INVALID | OP_RCX


def test_aug_2m_misaligned_page(td_run):
    env = td_run
    env.ensure_path(G, 1)
    page = env.upage(2 * M2, align=M2) + PAGE
    assert env.call(A.TDH_MEM_PAGE_AUG, rcx=G | 1, rdx=env.tdr, r8=page).rax == OPERAND_INVALID | OP_R8
    assert env.entry(G, 1) == FREE_ENTRY


def test_aug_4k_inside_2m_page(td_run):
    env = td_run
    env.ensure_path(G, 1)
    out, big = env.aug(G, 1)
    env.ok(out)
    env.ensure_path(G_OTHER, 0)
    out = env.call(A.TDH_MEM_PAGE_AUG, rcx=G_OTHER, rdx=env.tdr, r8=big + 5 * PAGE)
    assert out.rax == PAGE_METADATA_INCORRECT | OP_R8


# ==================================================================================================
# TDH.MEM.PAGE.ADD / TDH.MR.EXTEND / TDH.MR.FINALIZE
# ==================================================================================================
def test_page_add_success(td_init):
    env = td_init
    env.ensure_path(G, 0)
    data = bytes(range(256)) * 16
    src = env.source(data)
    target = env.upage()
    chld = env.td.chldcnt
    mrtd = env.td.mrtd.hexdigest()
    out = env.call(A.TDH_MEM_PAGE_ADD, rcx=G, rdx=env.tdr, r8=target, r9=src)
    assert out.rax == SUCCESS
    assert env.entry(G, 0) == entry_value(MAPPED, target)
    assert env.mem.read(target, PAGE) == data
    assert env.pamt.page_type(target) == PT_REG and env.pamt.owner(target) == env.tdr
    assert env.td.chldcnt == chld + 1
    assert env.td.mrtd.hexdigest() != mrtd
    assert not host_accessible(env, target) and host_accessible(env, src)


@pytest.mark.parametrize("case", ["source_misaligned", "source_private", "target_owned", "level1", "shared_gpa"])
def test_page_add_bad_operands(td_init, case):
    env = td_init
    env.ensure_path(G, 0)
    env.ensure_path(G_OTHER, 0)
    env.ok(env.page_add(G_OTHER, b"other")[0])
    owned = env.leaves[G_OTHER][1]
    target, src = env.upage(), env.source(b"x")
    rcx, r8, r9, expect = {
        "source_misaligned": (G, target, src + 0x10, OPERAND_INVALID | OP_R9),
        "source_private": (G, target, owned, OPERAND_INVALID | OP_R9),  # model-defined: must be shared memory
        "target_owned": (G, owned, src, PAGE_METADATA_INCORRECT | OP_R8),
        "level1": (G | 1, target, src, OPERAND_INVALID | OP_RCX),
        "shared_gpa": (G | SHARED_BIT, target, src, OPERAND_INVALID | OP_RCX),
    }[case]
    chld = env.td.chldcnt
    out = env.call(A.TDH_MEM_PAGE_ADD, rcx=rcx, rdx=env.tdr, r8=r8, r9=r9)
    assert out.rax == expect
    assert env.entry(G, 0) == FREE_ENTRY and env.td.chldcnt == chld
    assert env.pamt.page_type(target) == PT_NDA


def test_mr_extend(td_init):
    env = td_init
    env.ensure_path(G, 0)
    env.ok(env.page_add(G, b"A" * 4096)[0])
    entry = env.entry(G, 0)
    mrtd = env.td.mrtd.hexdigest()
    for chunk in range(0, PAGE, 256):
        assert env.call(A.TDH_MR_EXTEND, rcx=G + chunk, rdx=env.tdr).rax == SUCCESS
    assert env.td.mrtd.hexdigest() != mrtd
    assert env.entry(G, 0) == entry


@pytest.mark.parametrize("rcx", [G + 0x80, G | SHARED_BIT])
def test_mr_extend_bad_gpa(td_init, rcx):
    env = td_init
    env.ensure_path(G, 0)
    env.ok(env.page_add(G)[0])
    assert env.call(A.TDH_MR_EXTEND, rcx=rcx, rdx=env.tdr).rax == OPERAND_INVALID | OP_RCX


def test_measurement_depends_on_extend_content_only(env):
    """Two TDs on one module: PAGE.ADD measures the GPA (not the data); MR.EXTEND measures the data."""
    tds = []
    for hkid, data in ((1, b"one"), (2, b"two")):
        e = TdEnv(host=env.host)
        e.create(hkid).key_config().addcx().init()
        e.ensure_path(G, 0)
        e.ok(e.page_add(G, data)[0])
        tds.append(e)
    assert tds[0].td.mrtd.hexdigest() == tds[1].td.mrtd.hexdigest()
    for e in tds:
        e.ok(e.call(A.TDH_MR_EXTEND, rcx=G, rdx=e.tdr))
        e.add_vcpu()
        e.finalize()
    assert tds[0].td.finalized_mrtd != tds[1].td.finalized_mrtd


def test_mr_finalize_no_vcpus(td_init):
    """tdh_mr_finalize(): num_vcpus == 0 (no vCPU initialized; a created one does not count) ->
    TDX_NO_VCPUS (0xC000060900000000); the TD stays INITIALIZED."""
    env = td_init
    tdvpr = env.vp_create()
    env.vp_addcx(tdvpr)
    out = env.call(A.TDH_MR_FINALIZE, rcx=env.tdr)
    assert (out.rax, out.rcx, out.rdx) == (NO_VCPUS, 0, 0) and out.rax == 0xC000060900000000
    assert env.td.op_state == OP_INITIALIZED and env.td.finalized_mrtd is None
    env.ok(env.vp_init(tdvpr))
    env.ok(env.call(A.TDH_MR_FINALIZE, rcx=env.tdr))


def test_mr_extend_walk_failed_is_not_present(td_init):
    """tdh_mr_extend(): check_and_walk_private_gpa_to_leaf() fails (the walk stops at the FREE PDE) ->
    TDX_EPT_ENTRY_NOT_PRESENT|RCX with the stopping entry's details in RCX/RDX."""
    env = td_init
    env.ensure_path(G, 1)
    out = env.call(A.TDH_MR_EXTEND, rcx=G, rdx=env.tdr)
    assert (out.rax, out.rcx, out.rdx) == (EPT_ENTRY_NOT_PRESENT | OP_RCX, arch_entry(FREE), info(FREE, 1))
    assert out.rax == 0xC0000B0300000001


def test_mr_extend_leaf_not_mapped(td_init):
    """tdh_mr_extend(): a walk that ends at a leaf with RWX set whose state MR.EXTEND does not allow
    -> TDX_EPT_ENTRY_NOT_PRESENT with no operand id and RCX = RDX = 0.  Every such state is a migration
    state (BLOCKEDW, EXPORTED_*), which the model does not have, so the test forges one: a BLOCKED
    encoding with RWX set."""
    env = td_init
    hpa = env.make_state(G, 0, MAPPED)
    pa = env.entry_pa(G, 0)
    env.mem.write64(pa, entry_value(BLOCKED, hpa) | 7)
    mrtd = env.td.mrtd.hexdigest()
    out = env.call(A.TDH_MR_EXTEND, rcx=G, rdx=env.tdr)
    assert (out.rax, out.rcx, out.rdx) == (EPT_ENTRY_NOT_PRESENT, 0, 0)
    assert env.td.mrtd.hexdigest() == mrtd


def test_mr_extend_2m_leaf(td_init):
    """tdh_mr_extend(): the walk to a leaf stops at a 2M MAPPED leaf, which is measured:
    leaf_ept_entry_to_hpa() adds the GPA's offset within the 2M page."""
    env = td_init
    env.ensure_path(G, 1)
    page = env.upage(M2, align=M2)
    env.mem.host_write(page + 0x12300, b"X" * 256)
    out, hpa = env.aug(G, 1, page)
    env.ok(out)
    # A 2M MAPPED leaf (what a 2M ACCEPT leaves): PAGE.ADD is 4K only, so set the state by hand.
    env.mem.write64(env.entry_pa(G, 1), entry_value(MAPPED, hpa))
    expect = env.td.mrtd.copy()
    expect.update(b"MR.EXTEND" + (G + 0x12300).to_bytes(8, "little") + b"X" * 256)
    out = env.call(A.TDH_MR_EXTEND, rcx=G + 0x12300, rdx=env.tdr)
    assert (out.rax, out.rcx, out.rdx) == (SUCCESS, 0, 0)
    assert env.td.mrtd.hexdigest() == expect.hexdigest()


def test_mr_finalize(td_vcpu):
    env = td_vcpu
    digest = env.td.mrtd.hexdigest()
    assert env.call(A.TDH_MR_FINALIZE, rcx=env.tdr).rax == SUCCESS
    assert env.td.op_state == OP_RUNNABLE
    assert env.td.finalized_mrtd == digest
    env.ensure_path(G, 0)
    out = env.call(A.TDH_MEM_PAGE_ADD, rcx=G, rdx=env.tdr, r8=env.upage(), r9=env.source())
    assert status(out) == OP_STATE_INCORRECT
    assert env.entry(G, 0) == FREE_ENTRY


# ==================================================================================================
# REFERENCE 3.5 legal starting states: one leaf against one entry state
# ==================================================================================================
X, AB, SAME = "STATE_INCORRECT", "ALREADY_BLOCKED", "SUCCESS_UNCHANGED"
MATRIX = {
    0: {
        "AUG": {FREE: PENDING, MAPPED: X, BLOCKED: X, PENDING: X, PENDING_BLOCKED: X},
        "PAGE.ADD": {FREE: MAPPED, MAPPED: X, BLOCKED: X, PENDING: X, PENDING_BLOCKED: X},
        "BLOCK": {FREE: X, MAPPED: BLOCKED, BLOCKED: AB, PENDING: PENDING_BLOCKED, PENDING_BLOCKED: AB},
        "UNBLOCK": {FREE: X, MAPPED: X, BLOCKED: MAPPED, PENDING: X, PENDING_BLOCKED: PENDING},
        "REMOVE": {FREE: X, MAPPED: FREE, BLOCKED: FREE, PENDING: FREE, PENDING_BLOCKED: FREE},
        "MR.EXTEND": {FREE: X, MAPPED: SAME, BLOCKED: X, PENDING: X, PENDING_BLOCKED: X},
    },
    1: {
        "SEPT.ADD": {FREE: NL_MAPPED, NL_MAPPED: X, NL_BLOCKED: X, PENDING: X, PENDING_BLOCKED: X},
        "AUG": {FREE: PENDING, NL_MAPPED: X, NL_BLOCKED: X, PENDING: X, PENDING_BLOCKED: X},
        "BLOCK": {FREE: X, NL_MAPPED: NL_BLOCKED, NL_BLOCKED: AB, PENDING: PENDING_BLOCKED, PENDING_BLOCKED: AB},
        "UNBLOCK": {FREE: X, NL_MAPPED: X, NL_BLOCKED: NL_MAPPED, PENDING: X, PENDING_BLOCKED: PENDING},
        "REMOVE": {FREE: X, NL_MAPPED: X, NL_BLOCKED: X, PENDING: FREE, PENDING_BLOCKED: FREE},
        "SEPT.REMOVE": {FREE: X, NL_MAPPED: FREE, NL_BLOCKED: FREE, PENDING: X, PENDING_BLOCKED: X},
    },
}
CHLD_DELTA = {"AUG": 1, "PAGE.ADD": 1, "SEPT.ADD": 1, "REMOVE": -1, "SEPT.REMOVE": -1}


def run_leaf(env, leaf, gpa, level):
    """(out, the page operand or None)"""
    if leaf == "SEPT.ADD":
        page = env.kpage()
        return env.sept_add(gpa, level, page), page
    if leaf == "AUG":
        return env.aug(gpa, level)
    if leaf == "PAGE.ADD":
        return env.page_add(gpa, b"new page")
    if leaf == "BLOCK":
        return env.block(gpa, level), None
    if leaf == "UNBLOCK":
        env.ok(env.track(), "TRACK")  # UNBLOCK needs tracking done (REFERENCE 3.5)
        return env.unblock(gpa, level), None
    if leaf == "REMOVE":
        return env.remove(gpa, level), None
    if leaf == "SEPT.REMOVE":
        return env.sept_remove(gpa, level), None
    if leaf == "MR.EXTEND":
        return env.call(A.TDH_MR_EXTEND, rcx=gpa, rdx=env.tdr), None
    raise ValueError(leaf)


MATRIX_CASES = [
    (level, leaf, state) for level, leaves in MATRIX.items() for leaf, states in leaves.items() for state in states
]


@pytest.mark.parametrize("level,leaf,state", MATRIX_CASES, ids=[f"L{lv}-{lf}-{st}" for lv, lf, st in MATRIX_CASES])
def test_legal_starting_states(td_init, level, leaf, state):
    env = td_init
    hpa = env.make_state(G, level, state)
    pa = env.entry_pa(G, level)
    before = env.mem.read64(pa)
    chld = env.td.chldcnt
    expect = MATRIX[level][leaf][state]
    out, page = run_leaf(env, leaf, G, level)
    if expect == X:
        # MR.EXTEND walks to a leaf with RWX set, else EPT_ENTRY_NOT_PRESENT|RCX (tdh_mr_extend()).
        err = EPT_ENTRY_NOT_PRESENT if leaf == "MR.EXTEND" else EPT_ENTRY_STATE_INCORRECT
        assert (out.rax, out.rcx, out.rdx) == (err | OP_RCX, arch_entry(state, hpa), info(state, level))
        assert env.mem.read64(pa) == before and env.td.chldcnt == chld
        if page is not None:
            assert env.pamt.page_type(page) == PT_NDA
    elif expect == AB:
        assert out.rax == GPA_RANGE_ALREADY_BLOCKED | OP_RCX
        assert env.mem.read64(pa) == before
    elif expect == SAME:
        assert out.rax == SUCCESS and env.mem.read64(pa) == before
    else:
        assert out.rax == SUCCESS
        sign = CHLD_DELTA.get(leaf, 0)
        size = 1 if leaf in ("SEPT.ADD", "SEPT.REMOVE", "PAGE.ADD") else 512**level
        assert env.td.chldcnt == chld + sign * size
        if expect == FREE:
            assert env.mem.read64(pa) == FREE_ENTRY
            assert out.rcx == hpa  # REMOVE / SEPT.REMOVE: RCX = HPA of the removed page
            assert env.pamt.page_type(hpa) == PT_NDA and host_accessible(env, hpa)
        elif state == FREE:  # a page was added
            assert env.mem.read64(pa) == entry_value(expect, page)
            assert env.pamt.page_type(page) == (PT_EPT if leaf == "SEPT.ADD" else PT_REG)
            assert env.pamt.owner(page) == env.tdr
        else:
            assert env.mem.read64(pa) == entry_value(expect, hpa)
            if leaf == "BLOCK":  # PAMT.BEPOCH = TD_EPOCH
                assert env.pamt.bepoch(hpa) == env.td.epoch


WALK_STOPS = [FREE, NL_BLOCKED, PENDING, PENDING_BLOCKED]
WALK_LEAVES = ["AUG", "PAGE.ADD", "BLOCK", "UNBLOCK", "REMOVE", "MR.EXTEND"]


@pytest.mark.parametrize("leaf", WALK_LEAVES)
@pytest.mark.parametrize("stop", WALK_STOPS)
def test_walk_failed_at_pde(td_init, leaf, stop):
    """A level-0 operation whose PDE is not NL_MAPPED: the walk stops at level 1 (REFERENCE 3.5 walk rule).
    MR.EXTEND reports its failed walk as EPT_ENTRY_NOT_PRESENT|RCX (tdh_mr_extend())."""
    env = td_init
    hpa = env.make_state(G, 1, stop)
    pde = env.entry(G, 1)
    out, page = run_leaf(env, leaf, G, 0)
    err = EPT_ENTRY_NOT_PRESENT if leaf == "MR.EXTEND" else EPT_WALK_FAILED
    assert (out.rax, out.rcx, out.rdx) == (err | OP_RCX, arch_entry(stop, hpa), info(stop, 1))
    assert env.entry(G, 1) == pde
    if page is not None:
        assert env.pamt.page_type(page) == PT_NDA


@pytest.mark.parametrize("leaf,level", [("AUG", 0), ("BLOCK", 1), ("SEPT.ADD", 1), ("REMOVE", 0)])
@pytest.mark.parametrize("stop", [FREE, NL_BLOCKED])
def test_walk_failed_at_pdpte(td_init, leaf, level, stop):
    env = td_init
    hpa = env.make_state(G, 2, stop)
    out, page = run_leaf(env, leaf, G, level)
    assert (out.rax, out.rcx, out.rdx) == (EPT_WALK_FAILED | OP_RCX, arch_entry(stop, hpa), info(stop, 2))


# ==================================================================================================
# TDH.MEM.RANGE.BLOCK / UNBLOCK / TRACK
# ==================================================================================================
def test_block_free_exact(td_run):
    env = td_run
    env.ensure_path(G, 0)
    out = env.block(G, 0)
    assert (out.rax, out.rcx, out.rdx) == (0xC0000B0D00000001, 0x8000000000000000, 0x0)
    assert env.entry(G, 0) == FREE_ENTRY


@pytest.mark.parametrize("level,gpa", [(2, G), (3, 0)])
def test_block_upper_levels(td_init, level, gpa):
    env = td_init
    child = env.make_state(gpa, level, NL_MAPPED)
    assert env.block(gpa, level).rax == SUCCESS
    assert env.entry(gpa, level) == entry_value(NL_BLOCKED, child)
    assert env.pamt.bepoch(child) == env.td.epoch
    assert env.block(gpa, level).rax == GPA_RANGE_ALREADY_BLOCKED | OP_RCX
    env.ok(env.track())
    assert env.unblock(gpa, level).rax == SUCCESS
    assert env.entry(gpa, level) == entry_value(NL_MAPPED, child)


def test_block_level_out_of_range(td_init):
    env = td_init
    assert env.block(0, 4).rax == OPERAND_INVALID | OP_RCX


def test_already_blocked_is_informational(td_run):
    env = td_run
    env.make_state(G, 0, PENDING)
    env.ok(env.block(G))
    out = env.block(G)
    assert out.rax == 0x00000B0700000001 and not out.rax >> 63


def test_unblock_runnable_needs_tracking(td_run):
    """tdh_mem_range_unblock(): not tracked yet -> TDX_TLB_TRACKING_NOT_DONE with operand id
    OPERAND_ID_SEPT_TREE (0x92), not RCX as PAGE.REMOVE has it."""
    env = td_run
    hpa = env.make_state(G, 0, PENDING_BLOCKED)
    out = env.unblock(G)
    assert (out.rax, out.rcx, out.rdx) == (TLB_TRACKING_NOT_DONE | OP_SEPT_TREE, 0, 0)
    assert out.rax == 0xC0000B0800000092
    assert env.entry(G, 0) == entry_value(PENDING_BLOCKED, hpa)
    env.ok(env.track())
    assert env.unblock(G).rax == SUCCESS
    assert env.entry(G, 0) == entry_value(PENDING, hpa)


def test_track_increments_epoch(td_run):
    env = td_run
    assert env.td.epoch == 1
    for n in (2, 3, 4):
        assert env.track().rax == SUCCESS
        assert env.td.epoch == n


def test_track_previous_epoch_busy(td_run):
    env = td_run
    td = env.td
    epoch = td.epoch
    td.refcount[1 - (epoch & 1)] = 1  # a vCPU still in the previous epoch
    assert env.track().rax == PREVIOUS_TLB_EPOCH_BUSY
    assert td.epoch == epoch
    td.refcount[1 - (epoch & 1)] = 0
    td.refcount[epoch & 1] = 1  # a vCPU in the current epoch does not stop TRACK
    assert env.track().rax == SUCCESS and td.epoch == epoch + 1
    assert env.track().rax == PREVIOUS_TLB_EPOCH_BUSY  # ... but it is the previous epoch now
    td.refcount[epoch & 1] = 0


def test_track_epoch_lock_busy(td_run):
    env = td_run
    env.td.epoch_locked = True  # another TRACK holds the epoch lock
    try:
        assert env.track().rax == OPERAND_BUSY | OP_TD_EPOCH
        assert env.td.epoch == 1
    finally:
        env.td.epoch_locked = False


@pytest.mark.parametrize("leaf", [A.TDH_MEM_TRACK, A.TDH_MR_FINALIZE])
def test_tdr_in_rcx_not_tdr(td_init, leaf):
    env = td_init
    assert env.call(leaf, rcx=env.tdcs[0]).rax == PAGE_METADATA_INCORRECT | OP_RCX


@pytest.mark.parametrize(
    "leaf",
    [
        A.TDH_MEM_PAGE_AUG,
        A.TDH_MEM_PAGE_ADD,
        A.TDH_MEM_RANGE_BLOCK,
        A.TDH_MEM_RANGE_UNBLOCK,
        A.TDH_MEM_PAGE_REMOVE,
        A.TDH_MEM_SEPT_REMOVE,
        A.TDH_MR_EXTEND,
    ],
)
def test_tdr_in_rdx_not_tdr(td_init, leaf):
    env = td_init
    env.make_state(G, 0, MAPPED)
    out = env.call(leaf, rcx=G, rdx=env.tdcs[0], r8=env.upage(), r9=env.source())
    assert out.rax == PAGE_METADATA_INCORRECT | OP_RDX


# ==================================================================================================
# TDH.MEM.PAGE.REMOVE / TDH.MEM.SEPT.REMOVE with TLB tracking (RUNNABLE)
# ==================================================================================================
@pytest.fixture
def td_run_mapped(make_td):
    """RUNNABLE TD with G MAPPED (PAGE.ADD before MR.FINALIZE)."""
    env = make_td("vcpu")
    env.make_state(G, 0, MAPPED)
    return env.finalize()


@pytest.mark.parametrize("state", [MAPPED, PENDING])
def test_remove_runnable_not_blocked(td_run_mapped, state):
    env = td_run_mapped
    gpa = G if state == MAPPED else G + PAGE
    if state == PENDING:
        env.make_state(gpa, 0, PENDING)
    before = env.entry(gpa, 0)
    out = env.remove(gpa)
    assert out.rax == GPA_RANGE_NOT_BLOCKED | OP_RCX
    assert env.entry(gpa, 0) == before


def test_remove_runnable_blocked_not_tracked(td_run_mapped):
    env = td_run_mapped
    env.ok(env.block(G))
    before = env.entry(G, 0)
    assert env.remove(G).rax == TLB_TRACKING_NOT_DONE | OP_RCX
    assert env.entry(G, 0) == before


@pytest.mark.parametrize("state", [BLOCKED, PENDING_BLOCKED])
def test_remove_runnable_blocked_tracked(td_run_mapped, state):
    env = td_run_mapped
    gpa, hpa = G, env.leaves[G][1]
    if state == PENDING_BLOCKED:
        gpa = G + PAGE
        hpa = env.make_state(gpa, 0, PENDING)
    env.ok(env.block(gpa))
    env.ok(env.track())
    chld = env.td.chldcnt
    out = env.remove(gpa)
    assert (out.rax, out.rcx) == (SUCCESS, hpa)
    assert env.entry(gpa, 0) == FREE_ENTRY
    assert env.pamt.page_type(hpa) == PT_NDA and env.pamt.owner(hpa) == 0
    assert env.td.chldcnt == chld - 1 and host_accessible(env, hpa)


def test_remove_tracking_waits_for_vcpus_of_the_block_epoch(td_run_mapped):
    """is_tlb_tracked: bepoch == epoch-1 needs refcount[bepoch & 1] == 0; bepoch < epoch-1 is always tracked."""
    env = td_run_mapped
    td = env.td
    env.ok(env.block(G))
    bepoch = env.pamt.bepoch(env.leaves[G][1])
    assert bepoch == td.epoch
    env.ok(env.track())
    td.refcount[bepoch & 1] = 1  # a vCPU entered in the blocking epoch is still in the TD
    try:
        assert env.remove(G).rax == TLB_TRACKING_NOT_DONE | OP_RCX
    finally:
        td.refcount[bepoch & 1] = 0
    assert env.remove(G).rax == SUCCESS


def test_remove_before_finalize_needs_no_block(td_init):
    env = td_init
    hpa = env.make_state(G, 0, MAPPED)
    out = env.remove(G)
    assert (out.rax, out.rcx) == (SUCCESS, hpa)
    assert env.entry(G, 0) == FREE_ENTRY and env.pamt.page_type(hpa) == PT_NDA


def test_remove_2m(td_run):
    env = td_run
    hpa = env.make_state(G, 1, PENDING)
    env.ok(env.block(G, 1))
    env.ok(env.track())
    chld = env.td.chldcnt
    out = env.remove(G, 1)
    assert (out.rax, out.rcx) == (SUCCESS, hpa)
    assert env.entry(G, 1) == FREE_ENTRY and env.td.chldcnt == chld - 512
    assert host_accessible(env, hpa) and host_accessible(env, hpa + M2 - PAGE)


def test_remove_level_out_of_range(td_init):
    env = td_init
    assert env.remove(0, 3).rax == OPERAND_INVALID | OP_RCX


def test_sept_remove_runnable(td_run):
    env = td_run
    child = env.make_state(G, 1, NL_MAPPED)
    assert env.sept_remove(G, 1).rax == GPA_RANGE_NOT_BLOCKED | OP_RCX
    env.ok(env.block(G, 1))
    assert env.sept_remove(G, 1).rax == TLB_TRACKING_NOT_DONE | OP_RCX
    assert env.entry(G, 1) == entry_value(NL_BLOCKED, child)
    env.ok(env.track())
    chld = env.td.chldcnt
    out = env.sept_remove(G, 1)
    assert (out.rax, out.rcx) == (SUCCESS, child)
    assert env.entry(G, 1) == FREE_ENTRY
    assert env.pamt.page_type(child) == PT_NDA and host_accessible(env, child)
    assert env.td.chldcnt == chld - 1


def test_sept_remove_page_not_free(td_run):
    env = td_run
    child = env.make_state(G, 1, NL_MAPPED)
    env.make_state(G + 7 * PAGE, 0, PENDING)
    env.ok(env.block(G, 1))
    env.ok(env.track())
    out = env.sept_remove(G, 1)
    assert out.rax == EPT_PAGE_NOT_FREE | OP_RCX
    assert env.entry(G, 1) == entry_value(NL_BLOCKED, child)
    assert env.pamt.page_type(child) == PT_EPT


def test_sept_remove_before_finalize_page_not_free(td_init):
    env = td_init
    env.make_state(G, 0, PENDING)
    assert env.sept_remove(G, 1).rax == EPT_PAGE_NOT_FREE | OP_RCX


def test_sept_remove_level0_invalid(td_init):
    env = td_init
    env.make_state(G, 0, FREE)
    assert env.sept_remove(G, 0).rax == OPERAND_INVALID | OP_RCX


# ==================================================================================================
# Lifecycle: KEYS_NOT_CONFIGURED, TD_FATAL; VP.FLUSH, VPFLUSHDONE, CACHE.WB, KEY.FREEID
# ==================================================================================================
MEM_LEAF_CALLS = {
    "SEPT.ADD": lambda env: env.call(A.TDH_MEM_SEPT_ADD, rcx=G_OTHER | 1, rdx=env.tdr, r8=env.kpage()),
    "AUG": lambda env: env.call(A.TDH_MEM_PAGE_AUG, rcx=G + PAGE, rdx=env.tdr, r8=env.upage()),
    "PAGE.ADD": lambda env: env.call(A.TDH_MEM_PAGE_ADD, rcx=G + PAGE, rdx=env.tdr, r8=env.upage(), r9=env.source()),
    "BLOCK": lambda env: env.block(G),
    "UNBLOCK": lambda env: env.unblock(G),
    "REMOVE": lambda env: env.remove(G),
    "SEPT.REMOVE": lambda env: env.sept_remove(G_OTHER, 1),
    "TRACK": lambda env: env.track(),
    "MR.EXTEND": lambda env: env.call(A.TDH_MR_EXTEND, rcx=G, rdx=env.tdr),
    "MR.FINALIZE": lambda env: env.call(A.TDH_MR_FINALIZE, rcx=env.tdr),
}


@pytest.mark.parametrize("leaf", list(MEM_LEAF_CALLS))
def test_memory_leaves_need_keys_configured(td_init, leaf):
    """REFERENCE 3.6: the TDR must be in lifecycle KEYS_CONFIGURED, else TD_KEYS_NOT_CONFIGURED."""
    env = td_init
    env.make_state(G, 0, MAPPED)
    env.ensure_path(G_OTHER, 2)
    env.ok(env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr))
    entry, epoch, op_state = env.entry(G, 0), env.td.epoch, env.td.op_state
    assert MEM_LEAF_CALLS[leaf](env).rax == TD_KEYS_NOT_CONFIGURED
    assert (env.entry(G, 0), env.td.epoch, env.td.op_state) == (entry, epoch, op_state)


@pytest.mark.parametrize("leaf", ["SEPT.ADD", "AUG", "BLOCK", "TRACK"])
def test_memory_leaves_td_fatal(td_run, leaf):
    env = td_run
    env.make_state(G, 0, PENDING)
    env.ensure_path(G_OTHER, 2)
    env.td.fatal = True  # as after a fatal TD error
    assert MEM_LEAF_CALLS[leaf](env).rax == TD_FATAL


def test_teardown_lifecycle_sequence(td_vcpu):
    env = td_vcpu
    tdvpr = env.vcpus[0][0]
    assert env.call(A.TDH_VP_FLUSH, rcx=tdvpr).rax == SUCCESS
    assert env.call(A.TDH_MNG_KEY_FREEID, rcx=env.tdr).rax == LIFECYCLE_STATE_INCORRECT
    assert env.td.lifecycle == TD_KEYS_CONFIGURED
    assert env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr).rax == SUCCESS
    assert env.td.lifecycle == TD_BLOCKED
    assert env.call(A.TDH_PHYMEM_CACHE_WB, rcx=0).rax == SUCCESS
    assert env.call(A.TDH_MNG_KEY_FREEID, rcx=env.tdr).rax == SUCCESS
    assert env.td.lifecycle == TD_TEARDOWN
    assert env.hkid not in env.mod.hkids
    assert env.call(A.TDH_MNG_KEY_FREEID, rcx=env.tdr).rax == LIFECYCLE_STATE_INCORRECT
    # the HKID can be used again
    tdr2 = env.kpage()
    assert env.call(A.TDH_MNG_CREATE, rcx=tdr2, rdx=env.hkid).rax == SUCCESS


def test_vpflushdone_with_associated_vcpu(td_vcpu):
    env = td_vcpu
    tdvpr = env.vcpus[0][0]
    assert env.mod.vcpus[tdvpr].associated  # TDH.VP.INIT associated it with this LP
    assert env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr).rax == FLUSHVP_NOT_DONE
    assert env.td.lifecycle == TD_KEYS_CONFIGURED
    env.ok(env.call(A.TDH_VP_FLUSH, rcx=tdvpr))
    assert not env.mod.vcpus[tdvpr].associated
    assert env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr).rax == SUCCESS


def test_vp_init_associates_vcpu(td_vcpu):
    env = td_vcpu
    assert env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr).rax == FLUSHVP_NOT_DONE


def test_vpflushdone_twice(td_init):
    env = td_init
    env.ok(env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr))
    assert env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr).rax == LIFECYCLE_STATE_INCORRECT


def test_vpflushdone_hkid_assigned(td_created):
    env = td_created
    assert env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr).rax == SUCCESS
    assert env.td.lifecycle == TD_BLOCKED


def test_freeid_without_cache_wb(td_init):
    env = td_init
    env.ok(env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr))
    assert env.call(A.TDH_MNG_KEY_FREEID, rcx=env.tdr).rax == WBCACHE_NOT_COMPLETE
    assert env.td.lifecycle == TD_BLOCKED


def test_vp_flush_after_hkid_release(td_vcpu):
    """Model-defined: vCPU leaves need the TD's keys configured (VP.FLUSH after VPFLUSHDONE)."""
    env = td_vcpu
    env.ok(env.call(A.TDH_VP_FLUSH, rcx=env.vcpus[0][0]))  # VP.INIT associated the vCPU
    env.ok(env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr))
    assert env.call(A.TDH_VP_FLUSH, rcx=env.vcpus[0][0]).rax == TD_KEYS_NOT_CONFIGURED


def release_hkid(env):
    for tdvpr, _ in env.vcpus:
        env.ok(env.call(A.TDH_VP_FLUSH, rcx=tdvpr))
    env.ok(env.call(A.TDH_MNG_VPFLUSHDONE, rcx=env.tdr))
    env.ok(env.call(A.TDH_PHYMEM_CACHE_WB, rcx=0))
    env.ok(env.call(A.TDH_MNG_KEY_FREEID, rcx=env.tdr))


# ==================================================================================================
# TDH.PHYMEM.PAGE.RECLAIM / TDH.PHYMEM.PAGE.WBINVD
# ==================================================================================================
@pytest.mark.parametrize("which", ["tdcs", "tdr", "sept"])
def test_reclaim_before_teardown(td_init, which):
    env = td_init
    env.ensure_path(G, 2)
    page = {"tdcs": env.tdcs[0], "tdr": env.tdr, "sept": env.sept_pages[0]}[which]
    out = env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=page)
    assert out.rax == LIFECYCLE_STATE_INCORRECT
    assert env.pamt.page_type(page) != PT_NDA and not host_accessible(env, page)


@pytest.mark.parametrize("which,pt", [("tdcs", PT_TDCX), ("tdr", PT_TDR), ("sept", PT_EPT)])
def test_reclaim_before_teardown_outputs(td_init, which, pt):
    env = td_init
    env.ensure_path(G, 2)
    page = {"tdcs": env.tdcs[0], "tdr": env.tdr, "sept": env.sept_pages[0]}[which]
    out = env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=page)
    owner = 0 if pt == PT_TDR else env.tdr  # the TDR's PAMT owner is 0 (tdh_mng_create)
    assert (out.rax, out.rcx, out.rdx, out.r8) == (LIFECYCLE_STATE_INCORRECT, pt, owner, 0)


def test_reclaim_tdr_with_children(td_init):
    env = td_init
    release_hkid(env)
    out = env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=env.tdr)
    assert out.rax == TD_ASSOCIATED_PAGES_EXIST
    assert env.pamt.page_type(env.tdr) == PT_TDR


def test_reclaim_tdr_with_children_outputs(td_init):
    env = td_init
    release_hkid(env)
    out = env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=env.tdr)
    assert (out.rax, out.rcx, out.rdx, out.r8) == (TD_ASSOCIATED_PAGES_EXIST, PT_TDR, 0, 0)


@pytest.mark.parametrize("case", ["nda", "misaligned", "hkid_bits", "outside_tdmr"])
def test_reclaim_bad_operand(td_init, case):
    env = td_init
    page = env.kpage()
    rcx, expect = {
        "nda": (page, PAGE_METADATA_INCORRECT | OP_RCX),
        "misaligned": (env.tdcs[0] + 0x10, OPERAND_INVALID | OP_RCX),
        "hkid_bits": (env.tdcs[0] | (env.hkid << env.hkid_shift), OPERAND_INVALID | OP_RCX),
        "outside_tdmr": (env.pamt.base, OPERAND_ADDR_RANGE_ERROR | OP_RCX),
    }[case]
    assert env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=rcx).rax == expect


def test_reclaim_leftover_private_page(td_run):
    """A PT_REG page still mapped when the HKID is freed is reclaimed like a control page."""
    env = td_run
    hpa = env.make_state(G, 0, PENDING)
    release_hkid(env)
    chld = env.td.chldcnt
    out = env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=hpa)
    assert (out.rax, out.rcx, out.rdx, out.r8) == (SUCCESS, PT_REG, env.tdr, 0)
    assert env.pamt.page_type(hpa) == PT_NDA and host_accessible(env, hpa)
    assert env.td.chldcnt == chld - 1


def test_reclaim_2m_private_page(td_run):
    env = td_run
    hpa = env.make_state(G, 1, PENDING)
    release_hkid(env)
    chld = env.td.chldcnt
    out = env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=hpa)
    assert (out.rax, out.rcx, out.rdx, out.r8) == (SUCCESS, PT_REG, env.tdr, 1)
    assert env.td.chldcnt == chld - 512
    assert host_accessible(env, hpa + M2 - PAGE)


def test_wbinvd(td_run):
    env = td_run
    hpa = env.make_state(G, 0, PENDING)
    keyed = hpa | (env.hkid << env.hkid_shift)
    assert env.call(A.TDH_PHYMEM_PAGE_WBINVD, rcx=keyed).rax == PAGE_METADATA_INCORRECT | OP_RCX
    env.ok(env.block(G))
    env.ok(env.track())
    env.ok(env.remove(G))
    assert env.call(A.TDH_PHYMEM_PAGE_WBINVD, rcx=keyed).rax == SUCCESS


@pytest.mark.parametrize("case", ["misaligned", "outside_tdmr", "tdcs_page"])
def test_wbinvd_bad_operand(td_init, case):
    env = td_init
    rcx, expect = {
        "misaligned": (env.kpage() + 0x40, OPERAND_INVALID | OP_RCX),
        "outside_tdmr": (env.pamt.base, OPERAND_ADDR_RANGE_ERROR | OP_RCX),
        "tdcs_page": (env.tdcs[0], PAGE_METADATA_INCORRECT | OP_RCX),
    }[case]
    assert env.call(A.TDH_PHYMEM_PAGE_WBINVD, rcx=rcx).rax == expect


def test_wbinvd_masks_only_hkid_bits(td_run):
    """tdh_phymem_page_wbinvd(): only the HKID bits (x86_phys_bits..MAX_PA-1) are stripped from RCX;
    a bit at or above MAX_PA stays and the HPA check refuses it (OPERAND_INVALID|RCX)."""
    env = td_run
    hpa = env.make_state(G, 0, PENDING)
    env.ok(env.block(G))
    env.ok(env.track())
    env.ok(env.remove(G))
    maxpa = env.mod.maxphyaddr
    keyed = hpa | (env.hkid << env.hkid_shift)
    assert env.call(A.TDH_PHYMEM_PAGE_WBINVD, rcx=keyed | (1 << maxpa)).rax == OPERAND_INVALID | OP_RCX
    assert env.call(A.TDH_PHYMEM_PAGE_WBINVD, rcx=keyed | (1 << 63)).rax == OPERAND_INVALID | OP_RCX
    assert env.call(A.TDH_PHYMEM_PAGE_WBINVD, rcx=hpa | (63 << env.hkid_shift)).rax == SUCCESS


def test_reclaim_check_order(td_run):
    """tdh_phymem_page_reclaim(): operand, TDMR, the PAMT entry lock (BUSY|RCX), page type; then
    RCX/RDX/R8 are set and the large-page alignment and the lifecycle are checked with them in
    place (a misaligned 4K of a 2M page is OPERAND_INVALID|RCX with the outputs)."""
    env = td_run
    hpa = env.make_state(G, 1, PENDING)
    # before teardown: the 2M alignment is checked before the lifecycle
    out = env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=hpa + PAGE)
    assert (out.rax, out.rcx, out.rdx, out.r8) == (OPERAND_INVALID | OP_RCX, PT_REG, env.tdr, 1)
    out = env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=hpa)
    assert (out.rax, out.rcx, out.rdx, out.r8) == (LIFECYCLE_STATE_INCORRECT, PT_REG, env.tdr, 1)
    # a held PAMT entry lock
    assert env.pamt.try_lock(hpa, 1)  # the 2M page's entry
    try:
        out = env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=hpa)
        assert (out.rax, out.rcx, out.rdx, out.r8) == (OPERAND_BUSY | OP_RCX, 0, 0, 0)
    finally:
        env.pamt.unlock(hpa, 1)
    # the NDA check comes after the lock, before any output
    nda = env.kpage()
    out = env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=nda)
    assert (out.rax, out.rcx, out.rdx, out.r8) == (PAGE_METADATA_INCORRECT | OP_RCX, 0, 0, 0)
    assert env.pamt.page_type(hpa) == PT_REG and env.td.chldcnt > 0


@pytest.mark.parametrize("leaf", ["MNG.INIT", "MNG.ADDCX", "KEY.CONFIG", "VP.CREATE", "VP.INIT"])
def test_td_fatal_before_keys_configured(make_td, leaf):
    """check_td_in_correct_build_state() / tdh_mng_add_cx() / tdh_mng_key_config(): TD_FATAL is checked
    before the key state, so a fatal TD whose keys are not configured is TD_FATAL, not
    TD_KEYS_NOT_CONFIGURED."""
    stage = {"KEY.CONFIG": "created", "MNG.ADDCX": "created"}.get(leaf, "initialized")
    env = make_td(stage)
    tdvpr = None
    if leaf == "VP.INIT":
        tdvpr = env.vp_create()
        env.vp_addcx(tdvpr)
    env.td.fatal = True
    if leaf != "KEY.CONFIG":
        env.td.lifecycle = TD_HKID_ASSIGNED if stage != "created" else env.td.lifecycle
    call = {
        "MNG.INIT": lambda: env.call(A.TDH_MNG_INIT, rcx=env.tdr, rdx=env.td_params()),
        "MNG.ADDCX": lambda: env.call(A.TDH_MNG_ADDCX, rcx=env.kpage(), rdx=env.tdr),
        "KEY.CONFIG": lambda: env.call(A.TDH_MNG_KEY_CONFIG, rcx=env.tdr),
        "VP.CREATE": lambda: env.call(A.TDH_VP_CREATE, rcx=env.kpage(), rdx=env.tdr),
        "VP.INIT": lambda: env.vp_init(tdvpr),
    }[leaf]
    assert env.td.fatal and (leaf == "KEY.CONFIG" or env.td.lifecycle != TD_KEYS_CONFIGURED)
    assert call().rax == TD_FATAL


def test_full_teardown_returns_every_page(make_td):
    """KVM's order: remove private pages (BLOCK, TRACK, REMOVE, WBINVD), release the HKID, reclaim the S-EPT and
    control pages, the TDR last, then WBINVD the TDR.  Every page ends PT_NDA and host-accessible."""
    env = make_td("vcpu")
    env.make_state(G, 0, MAPPED)
    env.make_state(G + PAGE, 0, MAPPED)
    env.add_vcpu()
    env.finalize()
    env.make_state(G + 2 * PAGE, 0, PENDING)
    env.make_state(G_OTHER, 1, PENDING)  # a 2M page
    env.make_state(1 << 39, 1, NL_MAPPED)  # another PML4E subtree with an empty PT
    assert len(env.pamt.owned_pages(env.tdr)) > 0
    for gpa, (level, hpa) in list(env.leaves.items()):
        env.ok(env.block(gpa, level))
        env.ok(env.track())
        out = env.remove(gpa, level)
        assert (out.rax, out.rcx) == (SUCCESS, hpa)
        env.ok(env.call(A.TDH_PHYMEM_PAGE_WBINVD, rcx=hpa | (env.hkid << env.hkid_shift)))
        env.mem.host_zero(hpa, PAGE << (9 * level))
    release_hkid(env)
    assert env.td.lifecycle == TD_TEARDOWN
    # the TDR cannot go while children remain
    assert env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=env.tdr).rax == TD_ASSOCIATED_PAGES_EXIST
    pages = [(p, PT_EPT) for p in env.sept_pages]
    for tdvpr, tdvpx in env.vcpus:
        pages += [(p, PT_TDCX) for p in tdvpx] + [(tdvpr, PT_TDVPR)]
    pages += [(p, PT_TDCX) for p in env.tdcs] + [(env.tdr, PT_TDR)]
    for page, pt in pages:
        out = env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=page)
        owner = 0 if pt == PT_TDR else env.tdr
        assert (out.rax, out.rcx, out.rdx, out.r8) == (SUCCESS, pt, owner, 0), hex(page)
        env.mem.host_zero(page)
    assert env.call(A.TDH_PHYMEM_PAGE_WBINVD, rcx=env.tdr).rax == SUCCESS
    assert env.pamt.owned_pages() == []
    assert env.mod.tds == {} and env.mod.hkids == set() and env.mod.vcpus == {}
    # only the PAMT itself stays protected
    pamt_first = env.pamt.base >> 12
    assert all(pfn >= pamt_first for pfn in env.mem.protected)


# ==================================================================================================
# Concurrency: scheduling points inside the handlers (REFERENCE 3.7)
# ==================================================================================================
def race(env, at, first, second):
    """Run ``first``; at its scheduling point ``at`` run ``second``.  (first's out, RaceSched)."""
    sched = RaceSched(at, second)
    env.mod.sched = sched
    try:
        out = first()
    finally:
        env.mod.sched = None
    assert sched.fired, f"no scheduling point {at!r} (saw {sorted(set(sched.points))})"
    return out, sched


def test_race_aug_aug_same_entry(td_run):
    env = td_run
    env.ensure_path(G, 0)
    p1, p2 = env.upage(), env.upage()
    pa = env.entry_pa(G, 0)
    seen = {}

    def second():
        out = env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=p2)
        seen["entry"] = env.mem.read64(pa)
        return out

    out, sched = race(env, "sept_entry_locked", lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=p1), second)
    assert sched.result.rax == OPERAND_BUSY | OP_RCX
    assert seen["entry"] & TDEL and seen["entry"] & TDHP  # the loser set host priority
    assert out.rax == SUCCESS
    assert env.mem.read64(pa) == entry_value(PENDING, p1)  # lock bits cleared
    assert env.pamt.page_type(p1) == PT_REG and env.pamt.page_type(p2) == PT_NDA
    assert host_accessible(env, p2)
    assert env.td.sept_readers == 0 and not env.td.sept_writer


def test_race_sept_add_same_entry(td_run):
    env = td_run
    env.ensure_path(G, 1)
    p1, p2 = env.kpage(), env.kpage()
    out, sched = race(
        env,
        "sept_entry_locked",
        lambda: env.call(A.TDH_MEM_SEPT_ADD, rcx=G | 1, rdx=env.tdr, r8=p1),
        lambda: env.call(A.TDH_MEM_SEPT_ADD, rcx=G | 1, rdx=env.tdr, r8=p2),
    )
    assert sched.result.rax == OPERAND_BUSY | OP_RCX
    assert out.rax == SUCCESS
    assert env.entry(G, 1) == entry_value(NL_MAPPED, p1)
    assert env.pamt.page_type(p2) == PT_NDA


def test_race_remove_same_entry(td_init):
    env = td_init
    hpa = env.make_state(G, 0, MAPPED)
    out, sched = race(env, "sept_entry_locked", lambda: env.remove(G), lambda: env.remove(G))
    assert sched.result.rax == OPERAND_BUSY | OP_RCX
    assert (out.rax, out.rcx) == (SUCCESS, hpa)
    assert env.entry(G, 0) == FREE_ENTRY


def test_race_aug_same_page_two_gpas(td_run):
    """tdh_mem_page_aug(): the entry lock and the state check come before the page's PAMT check, so
    of two AUGs of one page at two GPAs, the one that reaches the PAMT first wins and the other finds
    the page no longer PT_NDA: PAGE_METADATA_INCORRECT|R8, its entry unlocked and FREE."""
    env = td_run
    env.ensure_path(G, 0)
    page = env.upage()
    out, sched = race(
        env,
        "sept_entry_locked",
        lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=page),
        lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G + PAGE, rdx=env.tdr, r8=page),
    )
    assert sched.result.rax == SUCCESS
    assert (out.rax, out.rcx, out.rdx) == (PAGE_METADATA_INCORRECT | OP_R8, 0, 0)
    assert env.entry(G, 0) == FREE_ENTRY  # the loser's entry lock was released
    assert env.entry(G + PAGE, 0) == entry_value(PENDING, page)


def test_aug_page_pamt_lock_busy(td_run):
    """check_and_lock_free_range_hpa(): the new page's PAMT entry lock held -> BUSY|R8; the entry lock
    taken before it is released."""
    env = td_run
    env.ensure_path(G, 0)
    page = env.upage()
    assert env.pamt.try_lock(page)
    try:
        out = env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=page)
    finally:
        env.pamt.unlock(page)
    assert out.rax == OPERAND_BUSY | OP_R8
    assert env.entry(G, 0) == FREE_ENTRY and env.pamt.page_type(page) == PT_NDA


def test_race_aug_aug_different_entries_share_tree_lock(td_run):
    env = td_run
    env.ensure_path(G, 0)
    p1, p2 = env.upage(), env.upage()
    out, sched = race(
        env,
        "sept_entry_locked",
        lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G, rdx=env.tdr, r8=p1),
        lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G + PAGE, rdx=env.tdr, r8=p2),
    )
    assert sched.result.rax == SUCCESS and out.rax == SUCCESS
    assert env.entry(G + PAGE, 0) == entry_value(PENDING, p2)


def test_race_sept_add_vs_block_tree_lock(td_run):
    """SEPT.ADD holds the S-EPT tree lock shared; BLOCK needs it exclusive -> BUSY|SEPT_TREE (0x92)."""
    env = td_run
    hpa = env.make_state(G_OTHER, 0, PENDING)
    env.ensure_path(G, 1)
    page = env.kpage()
    out, sched = race(
        env,
        "sept_entry_locked",
        lambda: env.call(A.TDH_MEM_SEPT_ADD, rcx=G | 1, rdx=env.tdr, r8=page),
        lambda: env.block(G_OTHER),
    )
    assert sched.result.rax == OPERAND_BUSY | OP_SEPT_TREE
    assert sched.result.rax == 0x8000020000000092
    assert out.rax == SUCCESS
    assert env.entry(G_OTHER, 0) == entry_value(PENDING, hpa)
    assert env.block(G_OTHER).rax == SUCCESS  # the retry goes through


@pytest.mark.parametrize("second", ["AUG", "SEPT.ADD", "REMOVE", "BLOCK", "SEPT.REMOVE"])
def test_race_block_holds_tree_lock_exclusive(td_run, second):
    env = td_run
    env.make_state(G, 0, PENDING)
    env.make_state(G_OTHER, 0, PENDING)
    calls = {
        "AUG": lambda: env.call(A.TDH_MEM_PAGE_AUG, rcx=G + PAGE, rdx=env.tdr, r8=env.upage()),
        "SEPT.ADD": lambda: env.call(A.TDH_MEM_SEPT_ADD, rcx=(G + M2) | 1, rdx=env.tdr, r8=env.kpage()),
        "REMOVE": lambda: env.remove(G_OTHER),
        "BLOCK": lambda: env.block(G_OTHER),
        "SEPT.REMOVE": lambda: env.sept_remove(G_OTHER, 1),
    }
    other = env.entry(G_OTHER, 0)
    out, sched = race(env, "sept_locked_exclusive", lambda: env.block(G), calls[second])
    assert sched.result.rax == OPERAND_BUSY | OP_SEPT_TREE
    assert out.rax == SUCCESS
    assert decode_state(env.entry(G, 0)) == PENDING_BLOCKED
    assert env.entry(G_OTHER, 0) == other
    assert not env.td.sept_writer and env.td.sept_readers == 0


# ==================================================================================================
# Host memory protection
# ==================================================================================================
def test_host_cannot_touch_module_and_private_pages(td_init):
    env = td_init
    tdvpr = env.add_vcpu()
    tdvpx = env.vcpus[0][1][0]
    env.ensure_path(G, 0)
    out, added = env.page_add(G, b"secret")
    env.ok(out)
    src = env.source(b"public")
    env.ok(env.aug(G + PAGE)[0])
    augged = env.leaves[G + PAGE][1]
    env.ensure_path(G_OTHER, 1)
    env.ok(env.aug(G_OTHER, 1)[0])
    big = env.leaves[G_OTHER][1]
    protected = [env.tdr, *env.tdcs, tdvpr, tdvpx, *env.sept_pages, added, augged, big, big + 511 * PAGE, env.pamt.base]
    for hpa in protected:
        with pytest.raises(HostAccessError):
            env.mem.host_read(hpa, 8)
        with pytest.raises(HostAccessError):
            env.mem.host_write(hpa, b"x")
    assert env.mem.host_read(src, 6) == b"public"
    # the module (SEAM mode) still reads them
    assert env.mem.read(added, 6) == b"secret"


def test_freed_pages_are_host_accessible(td_init):
    env = td_init
    hpa = env.make_state(G, 0, MAPPED)
    child = env.sept_pages[-1]
    env.ok(env.remove(G))
    env.mem.movdir64b(hpa)  # tdx_clear_page(): the lines are the host's again
    env.mem.host_write(hpa, b"reuse")
    env.ok(env.sept_remove(G, 1))
    env.mem.movdir64b(child)
    env.mem.host_write(child, b"reuse")
    release_hkid(env)
    tdcs0 = env.tdcs[0]
    env.ok(env.call(A.TDH_PHYMEM_PAGE_RECLAIM, rcx=tdcs0))
    env.mem.movdir64b(tdcs0)
    env.mem.host_write(tdcs0, b"reuse")
    assert env.mem.host_read(tdcs0, 5) == b"reuse"
    assert env.mem.machine_checks == []


# ==================================================================================================
# The dispatcher
# ==================================================================================================
@pytest.mark.parametrize("leaf", [A.TDH_MNG_RD, A.TDH_MEM_SEPT_RD, 99])
def test_unimplemented_leaf(td_init, leaf):
    """Model-defined: a leaf the model does not implement (TDH.MNG.RD, which Linux calls after MNG.INIT for the
    TSC fields, is one of them) returns OPERAND_INVALID with operand RAX (0)."""
    env = td_init
    assert env.call(leaf, rcx=env.tdr, rdx=(17 << 56) | 10).rax == OPERAND_INVALID | OP_RAX
