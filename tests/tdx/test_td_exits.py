"""Port I/O, HLT, CPUID and MSRs in a TD: what the TDX module answers itself, what it makes a #VE
(with SEPT_VE_DISABLE or without: these #VEs do not depend on it), what the guest runtime's #VE
handler asks the VMM with TDG.VP.VMCALL, and how KVM answers (tdx_emulate_io, tdx_emulate_cpuid,
kvm_emulate_rdmsr/wrmsr with tdx_get_msr/tdx_set_msr).

Sources: tdx-module tdx_1.5 src/td_dispatcher/tdx_td_dispatcher.c (td_generic_ve_exit() for I/O
and HLT), vm_exits/td_cpuid.c with include/auto_gen/cpuid_configurations.c, vm_exits/
td_msr_access.c with include/auto_gen/msr_config_lookup.c, vm_exits/td_other_exits.c
(tdx_inject_ve(): VE_INFO with the exit's qualification and instruction length); Linux 6.16
arch/x86/coco/tdx/tdx.c (handle_io, handle_cpuid, read_msr, write_msr, ve_raise_fault) and
arch/x86/kvm/vmx/tdx.c.
"""

import pytest

from emu.userspace.vmm import Machine
from emu.userspace.cpu import cpuid_host
from tdxmod import abi as A

BOTH = [
    pytest.param(A.TD_ATTR_SEPT_VE_DISABLE | A.TD_ATTR_DEBUG, id="sept_ve_disable"),
    pytest.param(A.TD_ATTR_DEBUG, id="sept_ve_enabled"),
]
HEAD = '.intel_syntax noprefix\n.include "emu.inc"\n    .text\n    .globl _start\n_start:\n'
INVALID_OPERAND = 0x8000000000000000


def td(tmp_path, body, attrs, name="g", **kw):
    p = tmp_path / f"{name}.S"
    p.write_text(HEAD + body)
    return Machine(str(p), vm="tdx", td_attributes=attrs, **kw)


def reports(res):
    assert res.ok, res.error
    return [v for _, v in res.reports]


@pytest.mark.parametrize("attrs", [None] + [p.values[0] for p in BOTH])
def test_exits_guest_is_the_same_in_a_td(attrs):
    """guest/exits.S: console output, an unassigned port, the console's readback, KVM's CPUID leaf,
    the MSR the VMM answers, PAT, and two #GPs: the same in a plain VM and in a TD either way."""
    plain = Machine("exits").run()
    res = Machine("exits", vm="tdx", td_attributes=attrs).run() if attrs else plain
    want = [0xFF, 0xE9E9E9E9, 0x4B4D564B, 0x10001, 0x0007040600070406, 2]
    assert reports(plain) == reports(res) == want
    assert res.console == plain.console == "exits\n"
    assert res.stats["io_exits"] == plain.stats["io_exits"] == 9


# A #VE handler of the test's own: it logs VE_INFO (exit reason, qualification, instruction length)
# and skips the instruction; the guest then reports the log.
VE_LOG = """\
    call emu_idt_init
    mov edi, 20
    lea rsi, [rip + ve_handler]
    call emu_idt_set
    mov dx, 0x3f8
    in al, 0x60
    out dx, ax
    lea rdi, [rip + buf]
    mov ecx, 2
    rep insb
    mov eax, 0x40000000
    cpuid
    mov eax, 6
    cpuid
    mov ecx, 0x35
    rdmsr
    mov ecx, 0x10
    wrmsr
    hlt
    mov rbx, qword ptr [rip + count]
    lea r12, [rip + log]
1:  REPORT qword ptr [r12]
    add r12, 8
    dec rbx
    jnz 1b
    EXIT

ve_handler:
    push rax
    push rcx
    push rdx
    push r8
    push r9
    push r10
    push r11
    mov eax, TDG_VP_VEINFO_GET
    TDCALL
    mov rax, qword ptr [rip + count]
    lea r11, [rip + log]
    lea r11, [r11 + rax * 8]
    mov qword ptr [r11], rcx
    mov qword ptr [r11 + 8], rdx
    mov qword ptr [r11 + 16], r10
    add qword ptr [rip + count], 3
    mov eax, r10d
    add qword ptr [rsp + 7 * 8], rax
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdx
    pop rcx
    pop rax
    iretq

    .data
count: .quad 0
log: .zero 8 * 3 * 16
buf: .zero 16
"""


@pytest.mark.parametrize("attrs", BOTH)
def test_ve_info_of_each_instruction(tmp_path, attrs):
    """VE_INFO: exit reason, exit qualification (I/O: the VMX layout), instruction length (the
    module's copy of the VMCS field): IN imm8 30/0x600048/2, OUT DX (16-bit) 30/0x3f80001/2, REP INSB
    30/0x3f80038/2, CPUID of the hypervisor range and the faulting leaf 6 10/0/2, RDMSR of an MSR
    the module does not list 31/0/2, WRMSR of the TSC (write: VE) 32/0/2, HLT 12/0/1."""
    res = td(tmp_path, VE_LOG, attrs).run()
    got = reports(res)
    assert [tuple(got[i : i + 3]) for i in range(0, len(got), 3)] == [
        (30, 0x600048, 2),
        (30, 0x3F80001, 2),
        (30, 0x3F80038, 2),
        (10, 0, 2),
        (10, 0, 2),
        (31, 0, 2),
        (32, 0, 2),
        (12, 0, 1),
    ]


CPUID_BODY = """\
    call emu_idt_init
    xor esi, esi
    lea rdi, [rip + leaves]
1:  mov eax, dword ptr [rdi + rsi * 8]
    mov ecx, dword ptr [rdi + rsi * 8 + 4]
    cpuid
    REPORT rax
    REPORT rbx
    REPORT rcx
    REPORT rdx
    inc esi
    cmp esi, NLEAVES
    jb 1b
    EXIT
    .data
leaves:
"""


def cpuid_td(tmp_path, attrs, leaves, vm="tdx", vcpus=1):
    body = CPUID_BODY + "".join(f"    .long {leaf:#x}, {sub:#x}\n" for leaf, sub in leaves)
    p = tmp_path / "cpuid.S"
    p.write_text(f".equ NLEAVES, {len(leaves)}\n" + HEAD + body)  # defined before use: an immediate
    res = Machine(str(p), vm=vm, td_attributes=attrs if vm == "tdx" else None, vcpus=vcpus).run()
    got = reports(res)
    return [tuple(got[i : i + 4]) for i in range(0, len(got), 4)]


@pytest.mark.parametrize("attrs", BOTH)
def test_cpuid_in_a_td(tmp_path, attrs):
    """The module answers its table's leaves: 0 (max basic leaf 0x23), 1 (HYPERVISOR set, its
    fixed-1 bit), 0x21 ("IntelTDX    "), 0x80000008 (the platform's widths), and 0x30 reads as
    0x23 (zeros here); the hypervisor range is a #VE the runtime asks the VMM about (KVM's
    signature and features from the VMM's table); a faulting leaf (6) or one outside the table
    (0xB, the brand string 0x80000002) is a #VE that Linux's handler, and so the runtime's,
    answers with zeros without asking."""
    host = {(e.function, e.index): e.regs() for e in cpuid_host(0, 1, td=True)}
    got = cpuid_td(
        tmp_path,
        attrs,
        [
            (0, 0),
            (1, 0),
            (0x21, 0),
            (0x80000008, 0),
            (0x30, 0),
            (0x40000000, 0),
            (0x40000001, 0),
            (6, 0),
            (0xB, 0),
            (0x80000002, 0),
        ],
    )
    assert got[0] == (0x23, 0x756E6547, 0x6C65746E, 0x49656E69)
    assert got[1][2] >> 31 & 1 and got[1][0] == 0x806F8
    assert got[2] == (0, 0x65746E49, 0x20202020, 0x5844546C)  # "Inte", "    ", "lTDX"
    assert got[3][0] == 0x3030
    assert got[4] == (0, 0, 0, 0)
    assert got[5] == host[(0x40000000, 0)] and got[6] == host[(0x40000001, 0)]
    assert got[7:] == [(0, 0, 0, 0)] * 3


def test_cpuid_initial_apic_id_is_the_vcpu_index(tmp_path):
    """td_cpuid_exit(): CPUID.1:EBX[31:24] is the vCPU's index (the order of TDH.VP.INIT)."""
    p = tmp_path / "apic.S"
    p.write_text(HEAD + "mov eax, 1\ncpuid\nshr ebx, 24\nREPORT rbx\nEXIT\n")
    res = Machine(str(p), vm="tdx", vcpus=3).run()
    assert res.ok, res.error
    assert sorted(res.reports) == [(0, 0), (1, 1), (2, 2)]


MSR_BODY = """\
    call emu_idt_init
    mov edi, 13
    lea rsi, [rip + gp_handler]
    call emu_idt_set
    mov ecx, 0x1a0                          # MISC_ENABLE: the module's value
    rdmsr
    REPORT rax
    mov ecx, 0x10a                          # ARCH_CAPABILITIES: the module's (TDCS) value
    rdmsr
    REPORT rax
    mov ecx, 0xbd                           # XAPIC_DISABLE_STATUS: LEGACY_XAPIC_DISABLED
    rdmsr
    REPORT rax
    mov ecx, 0x9e                           # SMBASE: #GP by the module itself
    rdmsr
    mov ecx, 0xc0000080                     # EFER: SCE may change (the module)
    rdmsr
    or eax, 1
    wrmsr
    rdmsr
    REPORT rax
    and eax, ~(1 << 11)                     # NX may not: #VE, KVM refuses (read-only): #GP
    wrmsr
    mov ecx, 0x10                           # TSC write: #VE, KVM does not emulate it: #GP
    wrmsr
    mov ecx, 0x277                          # PAT: the TD's own (passed through)
    rdmsr
    shl rdx, 32
    or rax, rdx
    REPORT rax
    mov ecx, 0x1b                           # APIC_BASE: #VE, KVM's (x2APIC, BSP)
    rdmsr
    REPORT rax
    REPORT qword ptr [rip + gp_count]
    EXIT
gp_handler:
    add rsp, 8
    inc qword ptr [rip + gp_count]
    add qword ptr [rsp], 2
    iretq
    .data
gp_count: .quad 0
"""


@pytest.mark.parametrize("attrs", BOTH)
def test_msrs_in_a_td(tmp_path, attrs):
    res = td(tmp_path, MSR_BODY, attrs).run()
    assert reports(res) == [0x1000, 0x16B, 1, 0xD01, 0x0007040600070406, 0xFEE00D00, 3]


NO_HANDLER = [
    ("in al, 0x60", "port I/O (the TDX module's td_generic_ve_exit())"),
    ("mov eax, 0x40000000\ncpuid", "a CPUID leaf the TDX module does not virtualize (td_cpuid_exit())"),
    ("mov ecx, 0x35\nrdmsr", "an RDMSR the TDX module does not handle (td_rdmsr_exit())"),
    ("mov ecx, 0x10\nwrmsr", "a WRMSR the TDX module does not handle (td_wrmsr_exit())"),
]


@pytest.mark.parametrize("attrs", BOTH)
@pytest.mark.parametrize("insn,cause", NO_HANDLER, ids=["in", "cpuid", "rdmsr", "wrmsr"])
def test_no_ve_handler(tmp_path, attrs, insn, cause):
    """A TD that loads no IDT: the #VE cannot be delivered; the TD exit is the triple fault and KVM
    says KVM_EXIT_SHUTDOWN; the error line names both and what the #VE stood for.  CPUID 0x21, which
    the module answers itself, needs no handler."""
    res = td(tmp_path, f"mov eax, 0x21\ncpuid\n.globl at\nat:\n{insn}\nEXIT\n", attrs).run()
    m_at = res.error.split(" at rip ")[0] if res.error else ""
    assert res.exit == "shutdown" and m_at == f"vCPU 0: unhandled guest exception #VE (for {cause})"
    assert res.error.endswith("(no IDT: triple fault); the module: TD exit TRIPLE_FAULT; KVM: KVM_EXIT_SHUTDOWN")


@pytest.mark.parametrize("attrs", BOTH)
def test_bare_hlt_without_an_idt_ends_the_vcpu(tmp_path, attrs):
    """A guest that loaded no IDT runs on the TD firmware's #VE handler, which makes a HLT's #VE a
    TDG.VP.VMCALL<Instruction.HLT> (the model takes the bare HLT as that request): the vCPU ends
    with HLT as the guest ABI says, whatever SEPT_VE_DISABLE."""
    res = td(tmp_path, "REPORT 7\nhlt\n", attrs).run()
    assert res.ok and res.exit == "hlt" and reports(res) == [7]


TDVMCALL_BODY = """\
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS_MMIO
    xor r10d, r10d
    mov r11d, 30                            # Instruction.IO, size 3: refused
    mov r12d, 3
    xor r13d, r13d
    mov r14d, 0x60
    TDCALL
    REPORT r10
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS_MMIO
    xor r10d, r10d
    mov r11d, 30                            # IN 4 bytes from 0xe9
    mov r12d, 4
    xor r13d, r13d
    mov r14d, 0xe9
    TDCALL
    REPORT r10
    REPORT r11
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS_MMIO
    xor r10d, r10d
    mov r11d, 30                            # OUT 'Z' to 0xe9
    mov r12d, 1
    mov r13d, 1
    mov r14d, 0xe9
    mov r15d, 0x5a
    TDCALL
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS_MMIO
    xor r10d, r10d
    mov r11d, 31                            # RDMSR 0xdeadbeef: refused
    mov r12d, 0xdeadbeef
    TDCALL
    REPORT r10
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS_MMIO
    xor r10d, r10d
    mov r11d, 32                            # WRMSR PAT = 6 (KVM emulates PAT for a TD)
    mov r12d, 0x277
    mov r13d, 6
    TDCALL
    REPORT r10
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS_MMIO
    xor r10d, r10d
    mov r11d, 10                            # CPUID 0x40000000
    mov r12d, 0x40000000
    xor r13d, r13d
    TDCALL
    REPORT r12
    REPORT r13
    EXIT
"""


def test_tdvmcall_register_level(tmp_path):
    """tdx_emulate_io(): size 3 is TDVMCALL_STATUS_INVALID_OPERAND; an IN returns the VMM's data in
    R11 (tdx_complete_pio_in()), an OUT reaches the device; kvm_emulate_rdmsr() of an MSR
    tdx_has_emulated_msr() does not list is INVALID_OPERAND (tdx_complete_emulated_msr()); a WRMSR
    of one it lists succeeds; tdx_emulate_cpuid(): EAX, EBX in R12, R13."""
    res = td(tmp_path, TDVMCALL_BODY, BOTH[0].values[0]).run()
    assert reports(res) == [INVALID_OPERAND, 0, 0xE9E9E9E9, INVALID_OPERAND, 0, 0x40000001, 0x4B4D564B]
    assert res.console == "Z" and res.stats["io_exits"] == 3  # counted before the checks


def test_kvm_run_io_of_a_td(tmp_path):
    """A TD's I/O reaches userspace as any VM's: kvm_run.io with the port, size, direction, count 1."""
    m = td(tmp_path, "call emu_idt_init\nmov dx, 0x3f8\nmov eax, 0x41\nout dx, ax\nEXIT\n", BOTH[0].values[0])
    v = m.vcpus[0]
    for _ in range(50):
        run = v.run()
        if run.exit_reason == 2:
            break
    assert (run.direction, run.size, run.port, run.count, bytes(run.data)) == (1, 2, 0x3F8, 1, b"A\0")


C_GUEST = """\
#include "emu.h"

void guest_main(void)
{
	u32 a, b, c, d;

	if (emu_vcpu_id())
		return;
	emu_idt_init();
	emu_console_puts("c!\\n");
	GUEST_SYNC(inb(0x60));
	GUEST_SYNC(inl(EMU_DEBUGCON_PORT));
	cpuid_count(0x40000000, 0, &a, &b, &c, &d);
	GUEST_SYNC(b);
	GUEST_SYNC(rdmsr(0x35));
	wrmsr(0x277, 0x0006060606060606UL);
	GUEST_SYNC(rdmsr(0x277));
}
"""


@pytest.mark.parametrize("attrs", [None] + [p.values[0] for p in BOTH])
def test_c_guest_helpers(tmp_path, attrs):
    """emu.h's inb/inl/cpuid_count/rdmsr/wrmsr/emu_console_puts, in a plain VM and in a TD either way."""
    import re
    from emu.userspace import guestabi, guests

    text = (guests.INCLUDE_DIR / "emu.h").read_text()
    assert int(re.search(r"#define EMU_DEBUGCON_PORT\s+(0x\w+)", text).group(1), 16) == guestabi.EMU_DEBUGCON_PORT
    assert int(re.search(r"#define EMU_IO_DELAY_PORT\s+(0x\w+)", text).group(1), 16) == guestabi.IO_DELAY_PORT
    p = tmp_path / "helpers.c"
    p.write_text(C_GUEST)
    res = Machine(str(p), vm="tdx" if attrs else "default", td_attributes=attrs).run()
    assert res.ok, res.error
    assert res.syncs == [(0, 0xFF), (0, 0xE9E9E9E9), (0, 0x4B4D564B), (0, 0x10001), (0, 0x0006060606060606)]
    assert res.console == "c!\n"
