"""MMIO in a TD through #VE, end to end:

- the CPU: a TD's "EPT-violation #VE" control is 1 (the module's PROCBASED_CTLS2_INIT), so an
  EPT violation whose deciding entry has suppress-#VE clear is a #VE with the VE information
  the exit would have saved (SDM Vol. 3C "Convertible EPT Violations"), unless the area's valid
  word is set; the S-EPT and KVM's non-present SPTEs (SHADOW_NONPRESENT_VALUE) suppress it;
- KVM (Linux 6.16.1): a TD's MMIO SPTE value is 0 (tdx_vm_init(): kvm_mmu_set_mmio_spte_value(kvm,
  0)); the first access is an ordinary EPT violation that installs it and retries the access
  (RET_PF_EMULATE, vt_check_emulate_instruction() = X86EMUL_RETRY_INSTR); the retry is a #VE;
  TDG.VP.VMCALL<#VE.RequestMMIO> is tdx_emulate_mmio() (KVM_EXIT_MMIO, tdx_complete_mmio_read());
- the guest runtime's #VE handler: Linux's handle_mmio() for MOV of 1, 2, 4, 8 bytes;
- the VMM's device at guestabi.EMU_MMIO_GPA.
"""

import pytest

import tdxmod.abi as A
from emu.userspace import guestabi as G
from emu.checkers.check import check_vm, check_destroyed
from emu.kvm.kvm import KvmRun, KVM_EXIT_MMIO
from emu.kvm.spte import make_mmio_spte, SPTE_MMU_PRESENT_MASK
from emu.trace import Tracer, ListSink
from emu.userspace.vmm import Machine, MachineError
from tdxmod import td_dispatch
from tdxmod.module import Regs

SHARED = 1 << 47
DEV = G.EMU_MMIO_GPA
WINDOW = 0x600000000000  # the mmio guest's GVA of the device page
REPORTS = [G.EMU_MMIO_ID, 0x11223344, 0xFFFFFFFFFFFF7788, 0x7700, 0x33443344556677AB, 4, 0x45]


def test_mmio_guest_in_a_td_and_a_plain_vm():
    """The shipped guest: in a TD the reads return the device's registers, with the CPU's
    semantics for each size (a 4-byte load zero-extends, 2 and 1 bytes keep the rest, AH);
    SEPT_VE_DISABLE does not matter (it is about PENDING pages: the MMIO #VE is the CPU's).
    In a plain VM it does no MMIO (no instruction emulator in the model) and reports nothing."""
    for attrs in (None, A.TD_ATTR_DEBUG):
        m = Machine("mmio", vm="tdx", td_attributes=attrs)
        res = m.run()
        assert res.ok, res.error
        assert [v for _, v in res.reports] == REPORTS
        assert res.vcpu_exits == ["hlt"]
        # one EPT violation (the first access, before the MMIO SPTE), emulated by a retry
        assert (res.stats["ept_violations"], res.stats["pf_emulate"]) == (1, 1)
        assert (bytes(m.mmio_scratch), m.mmio_writes) == (bytes.fromhex("ab776655443344 33".replace(" ", "")), 4)
        assert check_vm(m.kvm) == []
        m.destroy()
        assert check_destroyed(m.kvm) == []
    m = Machine("mmio", vm="default")
    res = m.run()
    assert res.ok and res.reports == [] and m.mmio_writes == 0


def test_td_mmio_spte_is_0_with_suppress_ve_clear():
    """tdx_vm_init(): kvm_mmu_set_mmio_spte_value(kvm, 0): the SPTE KVM installs for the device's
    shared GFN has RWX = 0, bit 63 clear, no MMU-present bit (make_mmio_spte(): value | GFN |
    generation); a plain VM's is the W|X misconfig value."""
    m = Machine("mmio", vm="tdx")
    assert m.kvm.shadow_mmio_value == 0
    assert m.run().ok
    spte = m.kvm.get_leaf_spte(m.vcpus[0], DEV | SHARED)
    assert spte == make_mmio_spte((DEV | SHARED) >> 12, m.kvm.memslots_generation, 0)
    assert spte & 7 == 0 and not spte & (1 << 63) and not spte & SPTE_MMU_PRESENT_MASK
    assert Machine("hello").kvm.shadow_mmio_value == 0b110


def test_ve_info_tdvmcall_registers_and_kvm_exit_mmio(monkeypatch):
    """Register level, for the first two accesses (mov rax, [rbx]; mov [rbx + 8], rcx):
    - VE_INFO by TDG.VP.VEINFO.GET: RCX = 48, RDX = the qualification the exit would have had
      (0x181 read / 0x182 write: GLA valid, final translation; nothing present), R8 = the GLA,
      R9 = the GPA with its offset and the shared bit, R10 = 0 (the CPU does not write the
      module's instruction length);
    - the TD exit of TDG.VP.VMCALL<#VE.RequestMMIO>: RAX = 77 (TDCALL), RCX = 0xFC00, R10 = 0,
      R11 = 48, R12 = size, R13 = direction, R14 = GPA, R15 = the value (0 for a read);
    - KVM_EXIT_MMIO (tdx_emulate_mmio()): phys_addr without the shared bit, len, is_write, data;
      the read's completion (tdx_complete_mmio_read()) puts the device's value in R11."""
    ve, vmcalls, mmio, r11 = [], [], [], []
    real_get = td_dispatch.tdg_vp_veinfo_get

    def veinfo_get(v, hw):
        st = real_get(v, hw)
        ve.append((st, hw.reg("rcx"), hw.reg("rdx"), hw.reg("r8"), hw.reg("r9"), hw.reg("r10")))
        return st

    monkeypatch.setattr(td_dispatch, "tdg_vp_veinfo_get", veinfo_get)
    m = Machine("mmio", vm="tdx")
    ops = m.kvm.x86_ops
    real_vmcall, real_mmio, real_complete = ops.handle_vmcall, m._mmio, ops.complete_mmio_read

    def handle_vmcall(vcpu, out):
        if out.r11 == 48 and out.r10 == 0:
            vmcalls.append(tuple(getattr(out, r) for r in ("rax", "rcx", "r10", "r11", "r12", "r13", "r14", "r15")))
        return real_vmcall(vcpu, out)

    def dev(run):
        why = real_mmio(run)
        mmio.append((run.phys_addr, run.len, run.is_write, bytes(run.data)))
        return why

    def complete(vcpu, run):
        r = real_complete(vcpu, run)
        r11.append(vcpu.arch.vp_enter_args["r11"])
        return r

    monkeypatch.setattr(ops, "handle_vmcall", handle_vmcall)
    monkeypatch.setattr(ops, "complete_mmio_read", complete)
    monkeypatch.setattr(m, "_mmio", dev)
    res = m.run()
    assert res.ok, res.error
    assert ve[:2] == [
        (A.TDX_SUCCESS, 48, 0x181, WINDOW, DEV | SHARED, 0),
        (A.TDX_SUCCESS, 48, 0x182, WINDOW + 8, DEV | SHARED | 8, 0),
    ]
    assert len(ve) == 11  # one #VE per MMIO access
    assert vmcalls[:2] == [
        (77, 0xFC00, 0, 48, 8, 0, DEV | SHARED, 0),
        (77, 0xFC00, 0, 48, 8, 1, DEV | SHARED | 8, 0x1122334455667788),
    ]
    assert [(v[4], v[5]) for v in vmcalls] == [
        (8, 0),
        (8, 1),
        (4, 0),
        (2, 0),
        (1, 0),
        (1, 1),
        (2, 1),
        (8, 0),
        (4, 1),
        (8, 0),
        (1, 0),
    ]
    assert mmio[:2] == [
        (DEV, 8, False, G.EMU_MMIO_ID.to_bytes(8, "little")),
        (DEV + 8, 8, True, bytes.fromhex("8877665544332211")),
    ]
    assert r11[:4] == [G.EMU_MMIO_ID, 0x11223344, 0x7788, 0x77]


def test_trace_of_the_first_access():
    """The first access: a TD exit (EPT violation, qualification bits 7-8 cleared by the module),
    KVM's fault ends in EMULATE, the retry is the CPU's #VE; then the handler's TDVMCALL, and
    the kvm_mmio events of tdx_emulate_mmio() and tdx_complete_mmio_read()."""
    sink = ListSink()
    m = Machine("mmio", vm="tdx", tracer=Tracer([sink]))
    assert m.run().ok
    first = m.image.symbol("mmio_first")
    evs = [
        e
        for e in sink.events
        if e.name in ("tdx_exit", "kvm_tdp_page_fault_done", "hw_event", "kvm_mmio", "kvm_userspace_exit")
        and not (e.name == "kvm_tdp_page_fault_done" and e.fields["root"] == "mirror")
    ]
    start = next(i for i, e in enumerate(evs) if e.name == "tdx_exit" and e.fields["rip"] == first)
    got = [
        (e.name, {k: e.fields[k] for k in keys if k in e.fields})
        for e, keys in zip(evs[start : start + 8], [("reason", "qualification", "gpa")] * 8)
    ]
    names = [e.name for e in evs[start : start + 8]]
    assert names == [
        "tdx_exit",
        "kvm_tdp_page_fault_done",
        "hw_event",
        "hw_event",
        "tdx_exit",
        "kvm_mmio",
        "kvm_userspace_exit",
        "kvm_mmio",
    ]
    assert got[0][1] == {"reason": "EPT_VIOLATION", "qualification": 1, "gpa": DEV | SHARED}
    assert evs[start + 1].fields["ret"] == "EMULATE" and evs[start + 1].fields["root"] == "direct"
    assert evs[start + 2].fields["msg"] == (
        f"#VE: convertible EPT violation at rip {first:#x} gpa {DEV | SHARED:#x} "
        f"gla {WINDOW:#x} qualification 0x181 [read,gla-valid,final-translation]"
    )
    assert evs[start + 3].fields["msg"].startswith("#VE delivered through the IDT")
    assert evs[start + 4].fields["reason"] == "TDCALL"
    assert {k: evs[start + 5].fields[k] for k in ("type", "len", "gpa", "val")} == {
        "type": "read_unsatisfied",
        "len": 8,
        "gpa": DEV,
        "val": 0,
    }
    assert {k: evs[start + 7].fields[k] for k in ("type", "len", "gpa", "val")} == {
        "type": "read",
        "len": 8,
        "gpa": DEV,
        "val": G.EMU_MMIO_ID,
    }


NO_IDT = """
.intel_syntax noprefix
.include "emu.inc"
    .text
    .globl _start
_start:
    test rdi, rdi
    jnz 1f
    call emu_shared_bit
    mov rdx, EMU_MMIO_GPA | 0x83
    or rdx, rax
    mov qword ptr [rip + pd], rdx
    lea rdx, [rip + pd]
    or rdx, 3
    mov qword ptr [rip + pdpt], rdx
    mov rax, cr3
    and rax, -4096
    lea rdx, [rip + pdpt]
    or rdx, 3
    mov qword ptr [rax + 192 * 8], rdx
    mov rax, cr3
    mov cr3, rax
    mov rbx, 0x600000000000
    .globl access
access:
    mov rax, qword ptr [rbx]
1:  EXIT
    .section .bss
    .balign 4096
pdpt: .zero 4096
pd: .zero 4096
"""


def test_without_a_ve_handler(tmp_path):
    """A TD guest without an IDT that touches the device: the #VE cannot be delivered, a triple
    fault (KVM_EXIT_SHUTDOWN with #VE); the same access in a plain VM is KVM_EXIT_MMIO, which
    the VMM cannot serve (the model's KVM has no instruction emulator): one clear line."""
    p = tmp_path / "noidt.S"
    p.write_text(NO_IDT)
    m = Machine(str(p), vm="tdx")
    res = m.run()
    access = m.image.symbol("access")
    assert res.exit == "shutdown" and res.error == (
        f"vCPU 0: unhandled guest exception #VE (for an EPT violation) "
        f"at rip {access:#x} access+0x0: mov rax, qword ptr [rbx] (no IDT: triple fault); the "
        f"module: TD exit TRIPLE_FAULT; KVM: KVM_EXIT_SHUTDOWN"
    )
    m = Machine(str(p), vm="default")
    res = m.run()
    assert res.exit == "mmio" and res.error == (
        f"vCPU 0: read of GPA {DEV:#x} (no memslot, the MMIO device, which this model serves only to a TD: "
        f"KVM has no instruction emulator) at rip {access:#x} access+0x0: mov rax, qword ptr [rbx]"
    )


def test_a_busy_ve_info_area_makes_it_an_exit():
    """VE_INFO still valid (the guest never read it): the violation is not converted but exits
    (the area's offset 4 is not 0); KVM finds its MMIO SPTE, retries the access, and so on: the
    guest cannot progress, which the VMM's watchdog ends."""
    m = Machine("mmio", vm="tdx")
    m.vcpus[0].hw.ve_info.valid = 0xFFFFFFFF
    res = m.run()
    assert res.exit == "timeout" and "fixed nothing" in res.error
    assert res.stats["ept_violations"] > 1000 and res.reports == []


def test_tdx_emulate_mmio_refuses_bad_operands():
    """tdx_emulate_mmio(): size not 1/2/4/8, direction not 0/1, or a private GPA:
    R10 = TDVMCALL_STATUS_INVALID_OPERAND, back to the guest (1), no userspace exit."""
    m = Machine("mmio", vm="tdx")
    ops, v = m.kvm.x86_ops, m.vcpus[0]
    for r12, r13, r14 in ((3, 0, DEV | SHARED), (8, 2, DEV | SHARED), (8, 0, DEV), (16, 1, DEV | SHARED)):
        v.arch.ret_r10 = 0
        v.kvm_run = None
        assert ops.emulate_mmio(v, Regs(77, r10=0, r11=48, r12=r12, r13=r13, r14=r14)) == 1
        assert v.arch.ret_r10 == A.TDVMCALL_STATUS_INVALID_OPERAND and v.kvm_run is None


def test_device_registers_and_errors():
    """The VMM's device: one register per access; a register it does not have, or a GPA past
    its page, is one line (the run ends with exit mmio)."""
    m = Machine("mmio", vm="tdx")
    run = KvmRun(KVM_EXIT_MMIO, phys_addr=DEV + 0x11, len=2, is_write=False, data=bytes(2))
    assert m._mmio(run) is None and run.data == bytes(2)  # WRITES, bytes 1-2: 0
    run = KvmRun(KVM_EXIT_MMIO, phys_addr=DEV + 0x18, len=8, is_write=False, data=bytes(8))
    assert m._mmio(run) == "the device has no register at offset 0x18 for 8 bytes"
    run = KvmRun(KVM_EXIT_MMIO, phys_addr=DEV + 4, len=8, is_write=True, data=bytes(8))
    assert m._mmio(run) == "the device has no register at offset 0x4 for 8 bytes"
    run = KvmRun(KVM_EXIT_MMIO, phys_addr=DEV + 0x1000, len=4, is_write=False, data=bytes(4))
    assert m._mmio(run) == "no device at this GPA"
    assert m.mmio_writes == 0
    with pytest.raises(MachineError, match="would reach the MMIO device"):
        Machine("hello", mem=DEV + (2 << 20))


def test_explore_dpor_with_mmio():
    """Partial-order reduction over a run with #VE conversions and device accesses (vCPU 1 only
    halts): every schedule ends like the plain run."""
    from emu.checkers.explore import Explorer

    ex = Explorer(lambda: Machine("mmio", vm="tdx", vcpus=2))
    res = ex.dpor()
    assert res.failures == 0 and res.complete and res.runs >= 2
