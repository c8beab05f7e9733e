"""Exceptions delivered through the guest's 64-bit IDT (Intel SDM Vol. 3A 6.12-6.15: 16-byte
gates of type 0xE/0xF, the error code of vectors 8, 10-14, 17, 21 with EXT and IDT bits,
CR2, the double-fault rules of Table 6-5, shutdown when #DF cannot be delivered), and #VE
in a TD where the TDX module 1.5 injects it (tdx_inject_ve(): td_ept_violation_exit() for a
PENDING page, td_generic_ve_exit() for HLT and VMCALL; TDG.VP.VEINFO.GET)."""

import pytest

import tdxmod.abi as A
from emu.checkers.check import check_vm, check_destroyed
from emu.userspace.vmm import Machine

VMS = ("default", "tdx")

PROLOGUE = """
.intel_syntax noprefix
.include "emu.inc"
.equ UNMAPPED, 0x40000000
    .text
    .globl _start
_start:
    call emu_idt_init
"""

HANDLERS = """
gp_handler:                                 # error code, RIP
    REPORT 13
    REPORT qword ptr [rsp + 8]
    REPORT qword ptr [rsp + 16]
    EXIT
df_handler:
    REPORT 8
    REPORT qword ptr [rsp + 8]
    REPORT qword ptr [rsp + 16]
    EXIT
ud_handler:
    REPORT 6
    EXIT
pf_handler:
    REPORT 14
    EXIT
"""


def _set(vector, handler):
    return f"    mov edi, {vector}\n    lea rsi, [rip + {handler}]\n    call emu_idt_set\n"


def guest(tmp_path, name, body, handlers=()):
    src = PROLOGUE + "".join(_set(v, h) for v, h in handlers) + body + HANDLERS
    p = tmp_path / f"{name}.S"
    p.write_text(src)
    return str(p)


def run(path, vm, **kw):
    m = Machine(path, vm=vm, **kw)
    return m, m.run()


@pytest.mark.parametrize("vm", VMS)
def test_idt_guest(vm):
    """The shipped guest: #UD (pushed RIP = the UD2, RF set in the pushed RFLAGS: a fault), #PF
    (error codes 0 and 2 = W, CR2 the exact address), INT 0x80 (pushed RIP = the next
    instruction: a trap); each handler returns with IRETQ.  Same on both VM types."""
    m, res = run("idt", vm)
    assert res.ok, res.error
    sym = m.image.symbol
    assert [v for _, v in res.reports] == [
        sym("ud_site"),
        0x10000,
        0,
        0x40000000,
        2,
        0x40000000,
        sym("int_next"),
        0x1D7,
    ]
    assert check_vm(m.kvm) == []
    m.destroy()
    assert check_destroyed(m.kvm) == []


@pytest.mark.parametrize("vm", VMS)
def test_bad_gate_selector_is_gp_with_ext(tmp_path, vm):
    """A #UD whose gate names selector 0x18, beyond the GDT's limit (0x17): #GP with error code
    0x18 | EXT (1), delivered after the benign #UD (serially), RIP still the UD2."""
    body = (
        _set(6, "ud_handler")
        + """
    lea rax, [rip + emu_idt]
    mov word ptr [rax + 6 * 16 + 2], 0x18
    .globl site
site:
    ud2
"""
    )
    p = guest(tmp_path, "badsel", body, [(13, "gp_handler")])
    m, res = run(p, vm)
    assert res.ok, res.error
    assert [v for _, v in res.reports] == [13, 0x19, m.image.symbol("site")]


@pytest.mark.parametrize("vm", VMS)
def test_pf_with_gate_not_present_is_a_double_fault(tmp_path, vm):
    """#PF, and the #PF gate (an interrupt gate) not present: #NP(14 * 8 + IDT + EXT = 0x73) while
    delivering a page fault is a double fault: #DF with error code 0, pushed RIP the faulting
    instruction."""
    body = (
        _set(14, "pf_handler")
        + """
    lea rax, [rip + emu_idt]
    and byte ptr [rax + 14 * 16 + 5], 0x7f
    mov ebx, UNMAPPED
    .globl site
site:
    mov rax, qword ptr [rbx]
"""
    )
    p = guest(tmp_path, "df", body, [(8, "df_handler")])
    m, res = run(p, vm)
    assert res.ok, res.error
    assert [v for _, v in res.reports] == [8, 0, m.image.symbol("site")]


@pytest.mark.parametrize("vm", VMS)
def test_double_fault_that_cannot_be_delivered_is_a_triple_fault(tmp_path, vm):
    """No #PF and no #DF gate (all-zero: type 0, checked before present, SDM "INT n"): #PF ->
    #GP(0x73) -> #DF -> #GP(0x43): shutdown.  KVM_EXIT_SHUTDOWN; the report names the guest's
    #PF (error code, CR2, RIP) and, in a plain VM, the chain."""
    body = """
    mov ebx, UNMAPPED
    .globl site
site:
    mov rax, qword ptr [rbx]
"""
    p = guest(tmp_path, "tf", body)
    m, res = run(p, vm)
    site = m.image.symbol("site")
    assert res.exit == "shutdown"
    run_ = m.vcpus[0].kvm_run
    assert (run_.vector, run_.error_code, run_.cr2, run_.rip) == (14, 0, 0x40000000, site)
    if vm == "default":
        assert res.error == (
            f"vCPU 0: unhandled guest exception #PF error code 0x0 cr2 0x40000000 at rip "
            f"{site:#x} site+0x0: mov rax, qword ptr [rbx] (triple fault: #GP(0x73) IDT[14] "
            f"type 0x0 is not a 64-bit interrupt or trap gate; #GP(0x43) IDT[8] type 0x0 is "
            f"not a 64-bit interrupt or trap gate)"
        )
    else:
        assert res.error.endswith("(triple fault: delivery through the TD's IDT failed)")


@pytest.mark.parametrize("vm", VMS)
def test_stack_push_faults_end_in_a_triple_fault(tmp_path, vm):
    """RSP on an unmapped page: pushing the #UD frame faults (#PF, W), delivered serially; its
    push faults too (#PF during #PF: #DF), and so does #DF's: shutdown.  CR2 is the last
    push's address (the top qword of the frame below the 16-byte-aligned RSP)."""
    body = """
    mov rsp, UNMAPPED + 0x1000
    .globl site
site:
    ud2
"""
    p = guest(tmp_path, "stack", body, [(6, "ud_handler"), (14, "pf_handler"), (8, "df_handler")])
    m, res = run(p, vm)
    assert res.exit == "shutdown"
    r = m.vcpus[0].kvm_run
    assert (r.vector, r.error_code, r.rip) == (6, None, m.image.symbol("site"))
    if vm == "default":
        assert m.vcpus[0].get_regs()["cr2"] == 0x40000FF8
        assert r.why == ("#PF(0x2) #PF at 0x40000ff8; #PF(0x2) #PF at 0x40000ff8; #PF(0x2) #PF at 0x40000ff8")


def test_no_idt_is_still_the_old_shutdown():
    """A guest that loads no IDT (IDTR limit 0): the report is unchanged, '(no IDT: triple fault)'."""
    m, res = run("tests/kvm/guests/ud.S", "default")
    assert res.exit == "shutdown" and res.error.endswith("_start+0x1: ud2 (no IDT: triple fault)")


# ----------------------------------------------------------------------------------------------
# #VE in a TD
# ----------------------------------------------------------------------------------------------

VECHECK = open(__file__.replace("test_idt.py", "guests/vecheck.S")).read()


def test_ve_info_for_a_pending_page_hlt_and_double_fault(tmp_path):
    """A TD without SEPT_VE_DISABLE.  An access to a PENDING page: #VE, VE_INFO = exit reason 48,
    the violation's qualification as the CPU gave it (0x182: write, GLA valid, translated),
    GLA and GPA with their offset, R10 0 (td_ept_violation_exit()).  A bare HLT: #VE, exit
    reason 12, no qualification, R10 = instruction length 1 (td_generic_ve_exit()).  A #VE
    while VE_INFO is unread: #DF(0) instead (tdx_inject_ve()); the handler then reads the
    unread HLT VE_INFO; once more: TDX_NO_VALID_VE_INFO with RCX zeroed (tdg_vp_veinfo_get())."""
    p = tmp_path / "vecheck.S"
    p.write_text(VECHECK)
    m = Machine(str(p), vm="tdx", td_attributes=A.TD_ATTR_DEBUG)
    res = m.run()
    assert res.ok, res.error
    hlt3 = m.image.symbol("hlt3")
    assert [v for _, v in res.reports] == [
        0,
        48,
        0x182,
        0x1000018,
        0x1000018,
        0,  # the PENDING page (then accepted)
        0,
        12,
        0,
        0,
        0,
        1,  # hlt1
        0x20,  # hlt2: VE_INFO left unread
        8,
        0,
        hlt3,  # hlt3: #DF, error code 0, RIP the HLT
        0,
        12,
        1,  # VEINFO.GET: hlt2's
        A.TDX_NO_VALID_VE_INFO,
        0,
    ]
    assert check_vm(m.kvm) == []
    m.destroy()
    assert check_destroyed(m.kvm) == []


def test_lazyaccept_through_ve():
    """The shipped guest: without SEPT_VE_DISABLE every page is accepted by the runtime's #VE
    handler (VEINFO.GET, then ACCEPT), and the final bare HLT is a #VE too; with it (the
    default TD) the guest accepts up front; in a plain VM nothing is accepted.  Same reports."""
    expect = [8, 0x8000000000000024]
    for vm, attrs in (("default", None), ("tdx", None), ("tdx", A.TD_ATTR_DEBUG)):
        m = Machine("lazyaccept", vm=vm, td_attributes=attrs)
        res = m.run()
        assert res.ok, res.error
        assert [v for _, v in res.reports] == expect
        assert res.vcpu_exits == ["hlt"]
        if vm == "tdx":
            assert res.stats["seamcalls"]["TDH_MEM_PAGE_AUG"] == 8
        assert check_vm(m.kvm) == []
        m.destroy()
        assert check_destroyed(m.kvm) == []


def test_lazyaccept_cli():
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "emu", "run", "lazyaccept", "--vm", "tdx", "--sept-ve-disable", "off", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["exit"] == "hlt" and obj["reports"] == [8, 0x8000000000000024]
    r = subprocess.run(
        [sys.executable, "-m", "emu", "run", "hello", "--sept-ve-disable", "maybe"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
