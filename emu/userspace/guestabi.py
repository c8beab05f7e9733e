"""The guest ABI as the host sees it: the constants it shares with guest/lib/.

guest/lib/emu.inc and guest/lib/runtime.S are the guest's copy of these facts;
keep the two in step (tests/test_guests_loader.py compares them).

Boot state (emu.userspace.loader builds it):
    Every vCPU starts at the ELF entry in 64-bit mode with paging on
    (CR3 = an identity map of all guest memory in 2M pages), RDI = its index,
    RSI = the number of vCPUs, RSP = the top of its own STACK_SIZE stack.
    The loader's page tables and the stacks live in the top LOADER_REGION
    bytes of guest memory; everything below is the guest's.  Guests built by
    emu.userspace.guests are linked at GUEST_LOAD_BASE.

Hypercalls (the runtime picks the flavour at run time with CPUID leaf 0x21):
    Plain VM, VMCALL (0f 01 c1):
        report:  RAX = EMU_HC_REPORT, RBX = value
        fail:    RAX = EMU_HC_FAIL,   RBX = error code
        sync:    RAX = EMU_HC_SYNC,   RBX = value (an assembler guest's sync)
        assert:  RAX = EMU_HC_ASSERT, RBX = address of the assert site, RCX = a, RDX = b
    TD, TDCALL (66 0f 01 cc) leaf TDG_VP_VMCALL (RAX = 0) with
    RCX = TDVMCALL_EXPOSE_REGS (R10, R11 and R12 passed to the VMM):
        report:  R10 = EMU_HC_REPORT (non-zero: vendor-specific per the GHCI; KVM
                 runs it as hypercall number R10 with argument R11), R11 = value
        sync:    R10 = EMU_HC_SYNC, R11 = value (vendor-specific, as report)
        assert:  RCX = TDVMCALL_EXPOSE_REGS_4 (R10-R13), R10 = EMU_HC_ASSERT,
                 R11 = address of the assert site, R12 = a, R13 = b
        fail:    R10 = 0 (GHCI standard), R11 = GHCI_REPORT_FATAL_ERROR,
                 R12 = error code
        halt:    R10 = 0, R11 = GHCI_INSTRUCTION_HLT (a TD does not execute HLT;
                 EXIT calls emu_halt, which picks HLT or this)
    The runtime preserves every register across a report; the host need not
    write any register back (a TD's RAX = 0 and R10 = 0 mean success).
    After a fail the vCPU executes HLT in a loop.

The ucall (C guests' GUEST_*, ucall_arch_do_ucall in guest/lib/runtime.S), as
upstream's selftests (lib/x86/ucall.c) make it:
    Plain VM: `in al, dx` with DX = UCALL_PIO_PORT, RDI = the struct ucall's
        address; KVM_EXIT_IO, and the host reads RDI (KVM_GET_REGS).
    TD: TDG.VP.VMCALL<#VE.RequestMMIO> (R11 = 48), an 8-byte write (R12 = 8,
        R13 = 1) of the address (R15) to UCALL_MMIO_GPA | the shared bit (R14:
        the guest's ucall_mmio_gpa, which the host sets); KVM_EXIT_MMIO at
        UCALL_MMIO_GPA, and the host takes the address from the data.

The assert site is a constant in the image's .rodata (ASSERT_SITE_FORMAT): the
addresses of the source file name and of the asserted expression (NUL-terminated
strings, also in .rodata), the line and the kind (ASSERT_KIND_*).  The host reads
it, and the strings, from the loaded ELF image, not from guest memory: a TD's
memory is private, and the image is what was loaded there.  After an assert the
vCPU is stopped; the run ends with exit "fail".

MMIO: every GPA outside guest memory has no memslot, so an access to it is MMIO.
The VMM serves one device there, a page of 8-byte registers at EMU_MMIO_GPA
(EMU_MMIO_REG_*: ID reads EMU_MMIO_ID; SCRATCH reads back what was written,
byte by byte; WRITES counts the writes the device took; ID and WRITES ignore
writes).  An access must stay inside one register; any other MMIO access ends
the run.  No mapping is made for it: a guest maps the page itself (a TD at
EMU_MMIO_GPA | the shared bit).  In a TD an access is a #VE that the runtime's
handler turns into TDG.VP.VMCALL<#VE.RequestMMIO> (R11 = 48, R12 = size, R13 =
0 read / 1 write, R14 = GPA, R15 = the value written; the value read comes
back in R11).  In a plain VM KVM would emulate the instruction; this model has
no instruction emulator, so there the access ends the run.

Port I/O (the VMM's device table, Machine.pio_handlers, port -> handler):
    EMU_DEBUGCON_PORT (0xe9, QEMU's isa-debugcon): each byte written is console
        output (the run's text and --json "console"); a read returns 0xe9.
    IO_DELAY_PORT (0x80, QEMU's ioport80): writes are dropped, reads return 0xff.
    Any other port is unassigned: a write is dropped, a read returns all ones
    (as QEMU's unassigned I/O).
    UCALL_PIO_PORT (0x1000) is no device: in a plain VM an I/O exit there is a
    ucall (above), taken before the device table.
MSRs: the VMM filters MSR_CORE_THREAD_COUNT (0x35) and answers it itself, as
QEMU does (KVM_X86_SET_MSR_FILTER, KVM_EXIT_X86_RDMSR): cores in 31:16,
threads in 15:0.

A vCPU ends with HLT.  A guest that does not use the runtime still works; it
just reports nothing.
"""

MiB = 1 << 20
KiB = 1 << 10

# Hypercall numbers ("EM" in the high half).
EMU_HC_REPORT = 0x454D0001
EMU_HC_FAIL = 0x454D0002
EMU_HC_SYNC = 0x454D0003  # GUEST_SYNC(value)
EMU_HC_ASSERT = 0x454D0004  # GUEST_ASSERT / GUEST_ASSERT_EQ failed (the assembler-level call)
# The hypercalls KVM hands to userspace as KVM_EXIT_HYPERCALL (every VM type).
EMU_USERSPACE_HCS = (EMU_HC_REPORT, EMU_HC_FAIL, EMU_HC_SYNC, EMU_HC_ASSERT)

# The ucall transport (the one place the host decodes it; guest/lib/runtime.S's
# ucall_arch_do_ucall is the one place the guest makes it), as upstream's lib/x86/ucall.c and
# the TDX selftests' ucall: a plain VM's guest does `in %dx, %al` on port UCALL_PIO_PORT with
# RDI = the address; a TD's guest, whose registers the host cannot read, writes the address
# (8 bytes, TDG.VP.VMCALL<#VE.RequestMMIO>) to UCALL_MMIO_GPA | the shared bit.  Upstream puts
# that GPA just past memslot 0; here it is the page after the VMM's MMIO device (EMU_MMIO_GPA),
# where no memslot may go, so a selftest's own memslots cannot cover it.
UCALL_PIO_PORT = 0x1000
UCALL_MMIO_GPA = 0x7F0000001000
UCALL_MMIO_GPA_SYMBOL = "ucall_mmio_gpa"  # the guest's copy (with the shared bit in a TD)


def ucall_arch_get_ucall(vcpu, run, td):
    """ucall_arch_get_ucall(): the address of the struct ucall this KVM_RUN exit hands the host,
    or None if it is no ucall.  A plain VM: KVM_EXIT_IO at UCALL_PIO_PORT (upstream looks at the
    port only), the address in RDI (vcpu_regs_get(): KVM_GET_REGS).  A TD: KVM_EXIT_MMIO, an
    8-byte write at UCALL_MMIO_GPA (KVM has stripped the shared bit), the address its data."""
    from ..kvm.uapi import KVM_EXIT_IO, KVM_EXIT_MMIO

    if td:
        if (
            run.exit_reason == KVM_EXIT_MMIO
            and run.phys_addr == UCALL_MMIO_GPA
            and getattr(run, "len", None) == 8
            and run.is_write
        ):
            return int.from_bytes(bytes(run.data[:8]), "little")
        return None
    if run.exit_reason == KVM_EXIT_IO and run.port == UCALL_PIO_PORT:
        return vcpu.get_regs()["rdi"]
    return None


# The ucall pool (emu.userspace.ucall_common) lives at this distance below the top of guest
# memory, inside the loader's region, above its page tables and below the vCPU stacks; the VMM
# points the guest library's ``ucall_pool`` at it (in a TD: at its shared alias, the pool's
# pages being shared).
UCALL_POOL_OFFSET = 2 * 1024 * 1024
UCALL_POOL_SYMBOL = "ucall_pool"

# The flags of KVM_HC_MAP_GPA_RANGE as the private-memory selftests use them
# (private_mem_conversions_test.c: "Arbitrary values, KVM doesn't care about the attribute
# flags"); the VMM does what the selftest's handler does with them.  An attrs value with
# KVM_MAP_GPA_RANGE_ENCRYPTED (bit 4) set, or zero, is KVM's ABI instead: private, or shared.
MAP_GPA_SET_ATTRIBUTES = 1 << 0
MAP_GPA_SHARED = 1 << 1
MAP_GPA_DO_FALLOCATE = 1 << 2
MAP_GPA_SELFTEST_FLAGS = MAP_GPA_SET_ATTRIBUTES | MAP_GPA_SHARED | MAP_GPA_DO_FALLOCATE

# The assert site (struct emu_assert_site in guest/include/emu.h), little-endian:
# file name address, expression address, line, kind.
ASSERT_SITE_FORMAT = "<QQQQ"
ASSERT_KIND_ASSERT = 0  # GUEST_ASSERT(cond): a and b are 0
ASSERT_KIND_EQ = 1  # GUEST_ASSERT_EQ(a, b): the two values

# TDX guest side.
TDG_VP_VMCALL = 0  # TDCALL leaf
TDG_MEM_PAGE_ACCEPT = 6  # TDCALL leaf; RCX = gpa | level (0 = 4K, 1 = 2M)
TDVMCALL_EXPOSE_REGS = 0x1C00  # RCX bitmap: bits 10, 11, 12 = R10, R11, R12
TDVMCALL_EXPOSE_REGS_4 = 0x3C00  # R10 to R13
TDVMCALL_EXPOSE_REGS_5 = 0x7C00  # R10 to R14 (kvm_hypercall: nr, a0..a3)
GHCI_REPORT_FATAL_ERROR = 0x10003  # GHCI TDG.VP.VMCALL<ReportFatalError>, R11
GHCI_INSTRUCTION_HLT = 12  # GHCI TDG.VP.VMCALL<Instruction.HLT>, R11
GHCI_MAP_GPA = 0x10001  # GHCI TDG.VP.VMCALL<MapGPA>, R11; R12 = gpa, R13 = size
TDG_VP_INFO = 1  # TDCALL leaf; RCX[5:0] = GPAW (48 or 52)
TDX_CPUID_LEAF = 0x21
TDX_CPUID_VENDOR = b"IntelTDX    "  # EBX, EDX, ECX of CPUID leaf 0x21 in a TD

# A TD's shared memory: the loader maps the shared alias of every GPA (GPA | the
# VM's shared bit) at this GVA + GPA, with 2M pages.
TD_SHARED_WINDOW_GVA = 1 << 46

# The VMM's MMIO device (no memslot there).  Guest memory must end below it.
EMU_MMIO_GPA = 0x7F0000000000
EMU_MMIO_REG_ID = 0x0  # read-only: EMU_MMIO_ID
EMU_MMIO_REG_SCRATCH = 0x8  # read/write
EMU_MMIO_REG_WRITES = 0x10  # read-only: the writes the device took
EMU_MMIO_REGS = 0x18  # the registers' end
EMU_MMIO_ID = 0x4F494D4D2D554D45  # b"EMU-MMIO", little-endian
TDVMCALL_VE_REQUEST_MMIO = 48  # GHCI TDG.VP.VMCALL<#VE.RequestMMIO>, R11 (EXIT_REASON_EPT_VIOLATION)
TDVMCALL_EXPOSE_REGS_MMIO = 0xFC00  # R10 to R15

# Port I/O devices of the VMM (Machine.pio_handlers).
EMU_DEBUGCON_PORT = 0xE9  # debug console: bytes written are the run's console output
DEBUGCON_READBACK = 0xE9  # what a read of it returns (QEMU's isa-debugcon "readback")
IO_DELAY_PORT = 0x80  # POST/delay port: a sink
MSR_CORE_THREAD_COUNT = 0x35  # the MSR the VMM answers (KVM_EXIT_X86_RDMSR)

# Memory layout.
GUEST_LOAD_BASE = 0x100000  # where guest/link.ld puts the image (1 MiB)
LOADER_REGION = 4 * MiB  # top of guest memory: page tables, stacks
STACK_SIZE = 16 * KiB  # per vCPU
MIN_MEM_SIZE = 8 * MiB
MEM_ALIGN = 2 * MiB  # guest memory is mapped with 2M pages

# The instructions, for hosts that decode the invalid-opcode exit.
VMCALL_BYTES = bytes.fromhex("0f01c1")
TDCALL_BYTES = bytes.fromhex("660f01cc")
