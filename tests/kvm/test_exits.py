"""Port I/O, MSR and CPUID exits in a plain VM, at the level of KVM_RUN and struct kvm_run.

Each guest is a few instructions ending in HLT, with no runtime and no IDT: a #GP that KVM
injects cannot be delivered and ends the run as KVM_EXIT_SHUTDOWN with the #GP's vector, error
code and RIP, which is how the tests see it.  Expected values: SDM Vol. 3C Table 28-5 (I/O
qualification), include/uapi/linux/kvm.h (kvm_run.io, .msr, KVM_EXIT_*), arch/x86/kvm/x86.c
(kvm_fast_pio(), emulator_pio_in_out(), kvm_emulate_rdmsr/wrmsr(), kvm_set_msr_common(),
set_efer(), kvm_msr_allowed()), emulate.c (pio_in_emulated()), lapic.c (kvm_apic_set_base()),
cpuid.c (kvm_cpuid(), get_out_of_range_cpuid_entry()).
"""

import pytest

from emu.userspace.vmm import Machine
from emu.userspace.cpu import cpuid_host, ARCH_CAPABILITIES
from emu.kvm.cpuid import KvmCpuidEntry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX
from emu.kvm.kvm_host import KvmIoctlError
from emu.hw.vcpu import TSC_STEP

KVM_EXIT_IO, KVM_EXIT_HLT, KVM_EXIT_SHUTDOWN = 2, 5, 8
KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR = 29, 30
IO_IN, IO_OUT = 0, 1
REASON_INVAL, REASON_UNKNOWN, REASON_FILTER = 1, 2, 4
FILTER_READ, FILTER_WRITE = 1, 2
EFER, STAR, LSTAR, CSTAR, SFMASK, FS_BASE, KERNEL_GS, TSC_AUX = (
    0xC0000080,
    0xC0000081,
    0xC0000082,
    0xC0000083,
    0xC0000084,
    0xC0000100,
    0xC0000102,
    0xC0000103,
)
TSC, APIC_BASE, FEAT_CTL, TSC_ADJUST, UCODE_REV, ARCH_CAP, MISC_ENABLE, PAT = (
    0x10,
    0x1B,
    0x3A,
    0x3B,
    0x8B,
    0x10A,
    0x1A0,
    0x277,
)
HEAD = ".intel_syntax noprefix\n    .text\n    .globl _start\n_start:\n"


def machine(tmp_path, body, **kw):
    p = tmp_path / "g.S"
    p.write_text(HEAD + body)
    return Machine(str(p), **kw)


def sym(m, name):
    return m.image.symbol(name)


def until(v, reason):
    """KVM_RUN until an exit of this reason (a plain VM's first entries fault pages in)."""
    for _ in range(100):
        run = v.run()
        if run.exit_reason == reason:
            return run
        assert run.exit_reason == KVM_EXIT_IO or reason != KVM_EXIT_IO, run
    raise AssertionError("no such exit")


# ==================================================================================================
# Port I/O: kvm_fast_pio() and KVM_EXIT_IO
# ==================================================================================================
IO_FORMS = [
    # (instruction, size, in)
    ("in al, 0x61", 1, True),
    ("in ax, 0x61", 2, True),
    ("in eax, 0x61", 4, True),
    ("in al, dx", 1, True),
    ("in ax, dx", 2, True),
    ("in eax, dx", 4, True),
    ("out 0x61, al", 1, False),
    ("out 0x61, ax", 2, False),
    ("out 0x61, eax", 4, False),
    ("out dx, al", 1, False),
    ("out dx, ax", 2, False),
    ("out dx, eax", 4, False),
]


@pytest.mark.parametrize("insn,size,is_in", IO_FORMS)
def test_in_out_kvm_run_io_and_completion(tmp_path, insn, size, is_in):
    """kvm_run.io: direction, size, port, count 1, data_offset = KVM_PIO_PAGE_OFFSET * 4096; OUT's
    data is RAX's low bytes; IN completes on the next KVM_RUN (complete_fast_pio_in()): below 4
    bytes the value merges into RAX, 4 bytes zero-extend; RIP moves past the instruction only
    then (it is on the instruction while userspace has the exit)."""
    port = 0x61
    m = machine(tmp_path, f"mov dx, {port}\nmov rax, 0x1122334455667788\n.globl io\nio:\n{insn}\nhlt\n")
    v = m.vcpus[0]
    run = until(v, KVM_EXIT_IO)
    assert (run.direction, run.size, run.port, run.count, run.data_offset) == (
        IO_IN if is_in else IO_OUT,
        size,
        port,
        1,
        4096,
    )
    assert v.hw.reg("rip") == sym(m, "io") and v.stat["io_exits"] == 1
    if is_in:
        assert bytes(run.data) == bytes(size)
        run.data[:size] = bytes(range(0xA1, 0xA1 + size))
    else:
        assert bytes(run.data) == (0x1122334455667788).to_bytes(8, "little")[:size]
    assert v.run().exit_reason == KVM_EXIT_HLT
    value = int.from_bytes(bytes(range(0xA1, 0xA1 + size)), "little")
    want = (
        {1: 0x1122334455667700 | value, 2: 0x1122334455660000 | value, 4: value}[size] if is_in else 0x1122334455667788
    )
    assert v.hw.reg("rax") == want


def test_in_completion_is_dropped_when_userspace_moved_rip(tmp_path):
    """complete_fast_pio_in(): RIP is no longer the IN's (kvm_is_linear_rip() fails): nothing is
    written, the instruction is not skipped."""
    m = machine(tmp_path, "mov rax, 7\n.globl io\nio:\nin al, 0x60\nhlt\n.globl there\nthere:\nhlt\n")
    v = m.vcpus[0]
    until(v, KVM_EXIT_IO)
    v.set_regs({"rip": sym(m, "there")})
    assert v.run().exit_reason == KVM_EXIT_HLT
    assert (v.hw.reg("rax"), v.hw.reg("rip")) == (7, sym(m, "there") + 1)


def test_out_0x7e_moves_rip_before_the_exit(tmp_path):
    """KVM_X86_QUIRK_OUT_7E_INC_RIP: for OUT to port 0x7e RIP is past it when userspace sees the exit."""
    m = machine(tmp_path, ".globl io\nio:\nout 0x7e, al\n.globl after\nafter:\nhlt\n")
    v = m.vcpus[0]
    run = until(v, KVM_EXIT_IO)
    assert run.port == 0x7E and v.hw.reg("rip") == sym(m, "after")


def test_rep_ins_read_ahead_and_completion(tmp_path):
    """INS goes to the emulator: pio_in_emulated() reads ahead min(bytes to the page's end, 1024 /
    size, RCX) elements in one KVM_EXIT_IO, written to ES:RDI by the completion; RDI and RCX
    advance; with RCX left RIP stays on the instruction and the guest exits again."""
    m = machine(tmp_path, "mov dx, 0x70\nmov rdi, 0x1000ffa\nmov ecx, 10\n.globl io\nio:\nrep insw\nhlt\n")
    v = m.vcpus[0]
    run = until(v, KVM_EXIT_IO)
    assert (run.direction, run.size, run.port, run.count) == (IO_IN, 2, 0x70, 6)  # in_page 6 (bytes!)
    run.data[:12] = bytes(range(1, 13))
    run = v.run()  # completes, re-enters the INS, exits again
    assert (run.exit_reason, run.count) == (KVM_EXIT_IO, 4)
    assert (v.hw.reg("rdi"), v.hw.reg("rcx"), v.hw.reg("rip")) == (0x1000FFA + 12, 4, sym(m, "io"))
    run.data[:8] = bytes(range(13, 21))
    assert v.run().exit_reason == KVM_EXIT_HLT
    assert (v.hw.reg("rdi"), v.hw.reg("rcx")) == (0x1000FFA + 20, 0)
    assert m.read_gpa(0x1000FFA, 20) == bytes(range(1, 21))


def test_rep_outs_one_element_per_exit(tmp_path):
    """OUTS: one element per KVM_EXIT_IO (count 1), read at DS:RSI; RSI and RCX advance each time."""
    m = machine(tmp_path, 'mov dx, 0xe9\nlea rsi, [rip + msg]\nmov ecx, 3\nrep outsb\nhlt\nmsg: .ascii "abc"\n')
    v = m.vcpus[0]
    seen = []
    run = until(v, KVM_EXIT_IO)
    while run.exit_reason == KVM_EXIT_IO:
        assert (run.direction, run.size, run.count) == (IO_OUT, 1, 1)
        seen.append((bytes(run.data), v.hw.reg("rcx")))
        run = v.run()
    assert seen == [(b"a", 2), (b"b", 1), (b"c", 0)] and run.exit_reason == KVM_EXIT_HLT


def test_vmm_devices(tmp_path):
    """The VMM's table: 0xe9 collects console bytes and reads 0xe9; 0x80 and an unassigned port
    read all ones; --json's stats count the I/O exits."""
    m = machine(
        tmp_path,
        "mov al, 'x'\nout 0xe9, al\nin al, 0xe9\nmov bl, al\nin al, 0x80\nmov cl, al\nmov dx, 0x1234\nin ax, dx\nhlt\n",
    )
    res = m.run()
    assert res.ok and res.console == "x" and res.stats["io_exits"] == 4
    r = res.vcpus[0]
    assert (r["rbx"] & 0xFF, r["rcx"] & 0xFF, r["rax"] & 0xFFFF) == (0xE9, 0xFF, 0xFFFF)
    assert res.as_json()["console"] == "x"


# ==================================================================================================
# MSRs: kvm_emulate_rdmsr/wrmsr()
# ==================================================================================================
def wrmsr(tmp_path, index, value, then_read=True):
    """Run WRMSR(index, value) (then RDMSR into RDX:RAX); the final KvmRun and the Machine."""
    body = (
        f"mov ecx, {index:#x}\nmov eax, {value & 0xFFFFFFFF:#x}\nmov edx, {value >> 32:#x}\n"
        f".globl w\nw:\nwrmsr\n" + ("xor eax, eax\nxor edx, edx\nrdmsr\n" if then_read else "") + "hlt\n"
    )
    m = machine(tmp_path, body)
    res = m.run()
    return m, res


def read_back(res):
    r = res.vcpus[0]
    return (r["rdx"] & 0xFFFFFFFF) << 32 | r["rax"] & 0xFFFFFFFF


def is_gp_at(m, res, label):
    return res.exit == "shutdown" and "#GP error code 0x0" in res.error and f"rip {sym(m, label):#x}" in res.error


LEGAL = [
    (EFER, 0xD01, 0xD01),  # SCE may change
    (EFER, 0x901, 0xD01),  # LMA is the CPU's: kept
    (PAT, 0x0007040600070406, 0x0007040600070406),
    (PAT, 0x0606060606060606, 0x0606060606060606),
    (STAR, 0x0023001000000000, 0x0023001000000000),
    (LSTAR, 0xFFFF800000001000, 0xFFFF800000001000),
    (CSTAR, 0x7FFFFFFFF000, 0x7FFFFFFFF000),
    (SFMASK, 0x47700, 0x47700),
    (SFMASK, 1 << 40, 1 << 40),  # EFER.SCE off: not loaded into the CPU, not checked
    (FS_BASE, 0x7000, 0x7000),  # passed through: the CPU itself
    (KERNEL_GS, 0xFFFF888000000000, 0xFFFF888000000000),
    (TSC_AUX, 5, 5),
    (MISC_ENABLE, 0x1800 | 1 << 7, 0x1800),  # EMON: ignored, no #GP
    (UCODE_REV, 0x1234, 0x100000000),  # a guest's write is dropped
    (APIC_BASE, 0xFEE00800, 0xFEE00800),  # BSP cleared, still enabled
    (APIC_BASE, 0, 0),  # disabled
    (FEAT_CTL, 1, 1),  # lock it
]


@pytest.mark.parametrize("index,value,want", LEGAL, ids=[f"{i:#x}={v:#x}" for i, v, _ in LEGAL])
def test_legal_msr_writes(tmp_path, index, value, want):
    m, res = wrmsr(tmp_path, index, value)
    assert res.ok, res.error
    assert read_back(res) == want


ILLEGAL = [
    (EFER, 0xD02),  # a reserved bit
    (EFER, 0x0),  # LME cleared with paging on (also NX: fine alone)
    (EFER, 0xC00),  # LME alone cleared
    (PAT, 0x0007040600070402),  # memory type 2
    (PAT, 0x0007040600070408),  # memory type 8
    (LSTAR, 0x0000800000000000),  # not canonical
    (CSTAR, 0x8000000000000000),
    (FS_BASE, 0x0000800000000000),  # the CPU's #GP (passed through)
    (KERNEL_GS, 0x1000000000000000),
    (TSC_AUX, 1 << 32),  # bits 63:32 reserved (Intel)
    (MISC_ENABLE, 0x1000),  # BTS_UNAVAIL is read-only
    (APIC_BASE, 0xFEE00900 | 1),  # reserved bit 0
    (APIC_BASE, 0xFEE00900 | 1 << 10),  # x2APIC: not in this VM's CPUID
    (APIC_BASE, 1 << 48 | 0x900),  # above MAXPHYADDR
    (ARCH_CAP, 0),  # read-only to the guest
    (0xDEADBEEF, 0),  # no such MSR
    (0x802, 0),  # x2APIC register: no in-kernel local APIC
    (FEAT_CTL, 1 << 2),  # VMX outside SMX: not this guest's
]


@pytest.mark.parametrize("index,value", ILLEGAL, ids=[f"{i:#x}={v:#x}" for i, v in ILLEGAL])
def test_illegal_msr_writes_are_gp(tmp_path, index, value):
    m, res = wrmsr(tmp_path, index, value, then_read=False)
    assert is_gp_at(m, res, "w"), res.error


def test_sfmask_reserved_bits_with_syscall_enabled(tmp_path):
    """SYSCALL_MASK is loaded into the CPU once EFER.SCE is set in long mode (vmx_setup_uret_msrs()),
    and the CPU's WRMSR refuses bits 63:32."""
    m = machine(
        tmp_path,
        f"mov ecx, {EFER:#x}\nrdmsr\nor eax, 1\nwrmsr\nmov ecx, {SFMASK:#x}\nxor eax, eax\n"
        f"mov edx, 1\n.globl w\nw:\nwrmsr\nhlt\n",
    )
    res = m.run()
    assert is_gp_at(m, res, "w"), res.error


def test_feature_control_locked(tmp_path):
    m = machine(tmp_path, f"mov ecx, {FEAT_CTL:#x}\nmov eax, 1\nxor edx, edx\nwrmsr\n.globl w\nw:\nwrmsr\nhlt\n")
    res = m.run()
    assert is_gp_at(m, res, "w"), res.error


def test_unknown_msr_read_is_gp(tmp_path):
    m = machine(tmp_path, "mov ecx, 0xdeadbeef\n.globl r\nr:\nrdmsr\nhlt\n")
    assert is_gp_at(m, m.run(), "r")


def test_reads_of_emulated_msrs(tmp_path):
    m = machine(
        tmp_path,
        "".join(
            f"mov ecx, {i:#x}\nrdmsr\nmov r{8 + k}, rax\nshl rdx, 32\nor r{8 + k}, rdx\n"
            for k, i in enumerate((APIC_BASE, ARCH_CAP, UCODE_REV, MISC_ENABLE, PAT, 0x17, EFER))
        )
        + "hlt\n",
        vcpus=2,
    )
    res = m.run()
    assert res.ok, res.error
    r = res.vcpus[0]
    assert [r[f"r{8 + k}"] for k in range(7)] == [
        0xFEE00900,
        ARCH_CAPABILITIES,
        0x100000000,
        0x1800,
        0x0007040600070406,
        0,
        0xD00,
    ]
    assert res.vcpus[1]["r8"] == 0xFEE00800  # not the BSP


def test_tsc_write_moves_the_offset_and_tsc_adjust(tmp_path):
    """WRMSR(IA32_TSC): the L1 offset moves so that the TSC reads the value; IA32_TSC_ADJUST
    moves by as much.  WRMSR(IA32_TSC_ADJUST) moves the TSC by the difference.  RDTSC and
    RDMSR(IA32_TSC) read the same clock (each read advances the host TSC by TSC_STEP)."""
    m = machine(
        tmp_path,
        f"mov ecx, {TSC}\nxor edx, edx\nmov eax, 0x100000\nwrmsr\nrdtsc\nmov r8, rax\n"
        f"mov ecx, {TSC_ADJUST}\nrdmsr\nmov r9, rax\n"
        f"mov ecx, {TSC_ADJUST}\nadd eax, 0x1000\nwrmsr\nrdtsc\nmov r10, rax\nhlt\n",
    )
    res = m.run()
    assert res.ok, res.error
    r = res.vcpus[0]
    assert r["r8"] == 0x100000 + TSC_STEP
    assert r["r9"] == 0x100000 - 0  # the adjustment the write made
    assert r["r10"] == 0x100000 + 0x1000 + 2 * TSC_STEP


# -- KVM_X86_SET_MSR_FILTER and KVM_EXIT_X86_RDMSR/WRMSR -------------------------------------------
def test_filter_exits_to_userspace_and_completion(tmp_path):
    """A read the filter denies (a 0 bit) with KVM_MSR_EXIT_REASON_FILTER: KVM_EXIT_X86_RDMSR with
    index, reason, data 0; userspace's data is EDX:EAX (complete_fast_rdmsr()), its error a
    #GP.  A write: KVM_EXIT_X86_WRMSR with the data."""
    m = machine(
        tmp_path,
        "mov ecx, 0x1234\nrdmsr\nmov r8, rax\nmov r9, rdx\nmov eax, 5\nmov edx, 6\nwrmsr\n.globl r\nr:\nrdmsr\nhlt\n",
    )
    kvm, v = m.kvm, m.vcpus[0]
    kvm.set_msr_filter(0, [(FILTER_READ | FILTER_WRITE, 0x1230, 8, bytes([0b11101111]))])
    run = until(v, KVM_EXIT_X86_RDMSR)
    assert (run.index, run.reason, run.data, run.error) == (0x1234, REASON_FILTER, 0, 0)
    run.data = 0xAABBCCDD11223344
    run = v.run()
    assert (run.exit_reason, run.index, run.data) == (KVM_EXIT_X86_WRMSR, 0x1234, 0x600000005)
    assert (v.hw.reg("r8"), v.hw.reg("r9")) == (0x11223344, 0xAABBCCDD)
    run = v.run()  # write done; the second read: refuse it
    assert run.exit_reason == KVM_EXIT_X86_RDMSR
    run.error = 1
    run = v.run()
    assert run.exit_reason == KVM_EXIT_SHUTDOWN and (run.vector, run.rip) == (13, sym(m, "r"))


def test_filter_defaults_and_ranges(tmp_path):
    m = machine(tmp_path, "hlt\n")
    kvm, v = m.kvm, m.vcpus[0]
    kvm.set_msr_filter(1, [(FILTER_WRITE, 0xC0000080, 2, bytes([0b01]))])  # deny by default
    assert v.kvm_msr_allowed(0xC0000080, FILTER_WRITE) and not v.kvm_msr_allowed(0xC0000081, FILTER_WRITE)
    assert not v.kvm_msr_allowed(0xC0000080, FILTER_READ)  # the range is writes only
    assert v.kvm_msr_allowed(0x830, FILTER_READ)  # x2APIC: never filtered
    with pytest.raises(KvmIoctlError):
        kvm.set_msr_filter(1, [])  # deny-all with no range
    with pytest.raises(KvmIoctlError):
        kvm.set_msr_filter(0, [(4, 0, 8, bytes(8))])  # bad range flags


def test_filtered_passthrough_msr_is_intercepted_again(tmp_path):
    """FS_BASE is passed through to the CPU; denied by the filter, the MSR bitmap intercepts it
    again (vmx_msr_filter_changed()), so the read reaches userspace."""
    m = machine(tmp_path, f"mov ecx, {FS_BASE:#x}\nrdmsr\nhlt\n")
    kvm, v = m.kvm, m.vcpus[0]
    assert not v.hw.msr_bitmap.intercepted(FS_BASE, False)
    kvm.set_msr_filter(0, [(FILTER_READ, FS_BASE, 1, bytes(8))])
    assert v.hw.msr_bitmap.intercepted(FS_BASE, False) and not v.hw.msr_bitmap.intercepted(FS_BASE, True)
    run = until(v, KVM_EXIT_X86_RDMSR)
    assert run.index == FS_BASE


def test_unknown_msr_to_userspace(tmp_path):
    """KVM_CAP_X86_USER_SPACE_MSR with KVM_MSR_EXIT_REASON_UNKNOWN: an MSR KVM does not know exits
    with that reason instead of #GP."""
    m = machine(tmp_path, "mov ecx, 0x4000abcd\nrdmsr\nhlt\n")
    m.kvm.enable_cap_user_space_msr(REASON_UNKNOWN | REASON_FILTER)
    run = until(m.vcpus[0], KVM_EXIT_X86_RDMSR)
    assert (run.index, run.reason) == (0x4000ABCD, REASON_UNKNOWN)
    with pytest.raises(KvmIoctlError):
        m.kvm.enable_cap_user_space_msr(1 << 3)


def test_core_thread_count_answered_by_the_vmm(tmp_path):
    m = machine(tmp_path, "mov ecx, 0x35\nrdmsr\nhlt\n", vcpus=3)
    res = m.run()
    assert res.ok and res.vcpus[2]["rax"] == 3 | 3 << 16


# ==================================================================================================
# CPUID: kvm_cpuid() on the table KVM_SET_CPUID2 gave
# ==================================================================================================
def cpuid(tmp_path, leaf, subleaf=0, table=None, vcpus=1, setup=""):
    m = machine(tmp_path, f"{setup}mov eax, {leaf:#x}\nmov ecx, {subleaf:#x}\ncpuid\nhlt\n", vcpus=vcpus)
    if table is not None:
        for v in m.vcpus:
            v.set_cpuid2(table)
    res = m.run()
    assert res.ok, res.error
    return [(r["rax"], r["rbx"], r["rcx"], r["rdx"]) for r in res.vcpus]


def table_entry(table, leaf, sub=0):
    for e in table:
        if e.function == leaf and (not e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX or e.index == sub):
            return e.regs()
    return None


@pytest.mark.parametrize(
    "leaf,sub",
    [
        (0, 0),
        (2, 0),
        (4, 0),
        (4, 3),
        (4, 4),
        (7, 0),
        (7, 1),
        (0xD, 0),
        (0x80000000, 0),
        (0x80000001, 0),
        (0x80000002, 0),
        (0x80000004, 0),
        (0x80000007, 0),
        (0x80000008, 0),
        (0x40000000, 0),
        (0x40000001, 0),
    ],
)
def test_leaves_are_the_table(tmp_path, leaf, sub):
    got = cpuid(tmp_path, leaf, sub, vcpus=2)
    for i, regs in enumerate(got):
        assert regs == table_entry(cpuid_host(i, 2), leaf, sub)


def test_identity_and_signatures(tmp_path):
    assert cpuid(tmp_path, 0)[0] == (0x20, 0x756E6547, 0x6C65746E, 0x49656E69)  # GenuineIntel
    assert cpuid(tmp_path, 0x80000008)[0][0] == 0x3030  # 48/48, the walkers'
    eax, ebx, ecx, edx = cpuid(tmp_path, 0x40000000)[0]
    assert eax == 0x40000001 and b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx)) == b"KVMKVMKVM\0\0\0"
    brand = b"".join(
        r.to_bytes(4, "little") for leaf in (0x80000002, 0x80000003, 0x80000004) for r in cpuid(tmp_path, leaf)[0]
    )
    assert brand.rstrip(b"\0") == b"Intel(R) Xeon(R) Platinum 8480+"


def test_per_vcpu_apic_id_and_topology(tmp_path):
    got = cpuid(tmp_path, 1, vcpus=3)
    assert [r[1] >> 24 for r in got] == [0, 1, 2] and all(r[1] >> 16 & 0xFF == 3 for r in got)
    assert all(r[3] >> 28 & 1 and r[2] >> 31 & 1 for r in got)  # HTT, HYPERVISOR
    assert [r[3] for r in cpuid(tmp_path, 0xB, 1, vcpus=3)] == [0, 1, 2]


def test_max_basic_leaf_rule(tmp_path):
    """Intel: a leaf above its range's maximum reads as the maximum basic leaf, with the requested
    subleaf (get_out_of_range_cpuid_entry()); the hypervisor range has its own maximum."""
    E = KvmCpuidEntry2
    table = [
        E(0, eax=0xD, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),
        E(0xD, 0, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 1, 2, 3, 4),
        E(0xD, 1, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 5),
        E(0x80000000, eax=0x80000004),
        E(0x40000000, eax=0x40000001, ebx=0x4B4D564B),
    ]
    assert cpuid(tmp_path, 0x21, table=table)[0] == (1, 2, 3, 4)  # above 0xD: 0xD.0
    assert cpuid(tmp_path, 0x21, 1, table=table)[0] == (5, 0, 0, 0)  # ... with subleaf 1
    assert cpuid(tmp_path, 0x80000005, table=table)[0] == (1, 2, 3, 4)  # above 0x80000004
    assert cpuid(tmp_path, 0x40000007, table=table)[0] == (1, 2, 3, 4)  # above 0x40000001
    assert cpuid(tmp_path, 0x3, table=table)[0] == (0, 0, 0, 0)  # in range, absent
    assert cpuid(tmp_path, 0xC0000001, table=table)[0] == (1, 2, 3, 4)  # no Centaur class


def test_dynamic_bits(tmp_path):
    """CPUID.1:EDX.APIC follows APIC_BASE.EN; CPUID.1:ECX.OSXSAVE follows CR4.OSXSAVE (on at boot)."""
    edx_on = cpuid(tmp_path, 1)[0][3]
    edx_off = cpuid(tmp_path, 1, setup=f"mov ecx, {APIC_BASE}\nxor eax, eax\nxor edx, edx\nwrmsr\n")[0][3]
    assert edx_on >> 9 & 1 and not edx_off >> 9 & 1
    ecx = cpuid(tmp_path, 1, setup="mov rax, cr4\nand eax, ~(1 << 18)\nmov cr4, rax\n")[0][2]
    assert not ecx >> 27 & 1 and cpuid(tmp_path, 1)[0][2] >> 27 & 1


def test_set_cpuid2_checks(tmp_path):
    m = machine(tmp_path, "hlt\n")
    v = m.vcpus[0]
    with pytest.raises(KvmIoctlError) as e:
        v.set_cpuid2([KvmCpuidEntry2(0x80000008, eax=0x3430)])  # 52-bit linear: no
    assert e.value.errno == 22
    m.run()
    same = v.get_cpuid2()
    v.set_cpuid2(same)  # after KVM_RUN: the same
    with pytest.raises(KvmIoctlError) as e:
        v.set_cpuid2(same[:-1])
    assert e.value.errno == 22
