"""Port I/O, the half of arch/x86/kvm/x86.c (and of the emulator, emulate.c) that handles IN, OUT,
INS and OUTS: kvm_fast_pio() for IN/OUT, the emulator's string I/O for INS/OUTS, and the exit to
userspace with KVM_EXIT_IO (emulator_pio_in_out()).

The model has no in-kernel device on KVM_PIO_BUS (no in-kernel PIC, PIT or local APIC), so every
port goes to userspace.  kvm_run.io: direction (KVM_EXIT_IO_IN 0, KVM_EXIT_IO_OUT 1), size,
port, count, data_offset (KVM_PIO_PAGE_OFFSET * PAGE_SIZE: the page after kvm_run); the data is
``run.data``, size * count bytes (userspace fills it for IN).  IN completes on the next KVM_RUN
(complete_userspace_io), as upstream.
"""

from .uapi import KVM_EXIT_IO, KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, KVM_PIO_PAGE_OFFSET

PAGE_SIZE = 4096
READ_CACHE_SIZE = 1024  # sizeof(struct read_cache.data): the emulator's INS read-ahead
X86_EFLAGS_DF = 1 << 10
_U64 = (1 << 64) - 1


class KvmPio:
    """struct kvm_pio_request (vcpu->arch.pio) and the pio_data page."""

    def __init__(self):
        self.port = self.size = self.count = 0
        self.in_ = False
        self.data = b""  # the pio_data page's first size * count bytes


class KvmVcpuPio:
    """Port I/O of struct kvm_vcpu."""

    def emulator_pio_in_out(self, size, port, data, count, in_):
        """emulator_pio_in_out(): no device on KVM_PIO_BUS, so userspace does it: KVM_EXIT_IO."""
        pio = self.pio
        pio.port, pio.in_, pio.count, pio.size = port, in_, count, size
        n = size * count
        pio.data = bytes(n) if in_ else bytes(data[:n])
        self.exit_to_user(
            KVM_EXIT_IO,
            direction=KVM_EXIT_IO_IN if in_ else KVM_EXIT_IO_OUT,
            size=size,
            port=port,
            count=count,
            data_offset=KVM_PIO_PAGE_OFFSET * PAGE_SIZE,
            data=bytearray(pio.data),
        )
        return 0

    def trace_pio(self, write, port, size, count, data):
        val = int.from_bytes(bytes(data[:size]), "little")
        self.kvm.trace_emit(
            "kvm_pio",
            self.vcpu_id,
            rw="write" if write else "read",
            port=port,
            size=size,
            count=count,
            val=val,
            more=" (...)" if count > 1 else "",
        )

    def emulator_pio_in(self, size, port, count):
        return self.emulator_pio_in_out(size, port, None, count, True)

    def emulator_pio_out(self, size, port, data, count):
        self.trace_pio(True, port, size, count, data)
        return self.emulator_pio_in_out(size, port, data, count, False)

    def complete_emulator_pio_in(self, run):
        """The data userspace left in the kvm_run page (run.data), as KVM reads pio_data."""
        pio = self.pio
        n = pio.size * pio.count
        data = bytes(bytearray(run.data)[:n]).ljust(n, b"\0")
        self.trace_pio(False, pio.port, pio.size, pio.count, data)
        pio.count = 0
        return data

    # -- IN/OUT: kvm_fast_pio() ------------------------------------------------------------------------------
    def kvm_fast_pio(self, exit, size, port, in_):
        self.emulated_exit = exit
        self.cui_linear_rip = exit.rip
        if in_:
            return self.kvm_fast_pio_in(size, port)
        return self.kvm_fast_pio_out(exit, size, port)

    def kvm_fast_pio_out(self, exit, size, port):
        val = self.hw.reg("rax")
        self.emulator_pio_out(size, port, val.to_bytes(8, "little"), 1)
        if port == 0x7E:
            # KVM_X86_QUIRK_OUT_7E_INC_RIP (on by default): old userspace expected RIP past the
            # OUT 0x7e when it saw the exit.
            self.complete_userspace_io = _complete_fast_pio_out_port_0x7e
            self.skip_emulated_instruction(exit)
        else:
            self.complete_userspace_io = _complete_fast_pio_out
        return 0

    def kvm_fast_pio_in(self, size, port):
        self.emulator_pio_in(size, port, 1)
        self.complete_userspace_io = _complete_fast_pio_in
        return 0

    # -- INS/OUTS: the emulator (x86_emulate_insn() on em_in/em_out with String) ----------------------------
    def emulate_string_io(self, exit):
        """kvm_emulate_instruction() for INS/OUTS, as emulate.c does them.  OUTS: one element,
        read at DS:RSI (or its segment override), to userspace; RSI and (REP) RCX advance; RIP
        stays on the instruction while RCX is not 0, so the guest runs it again (another exit).
        INS: pio_in_emulated()'s read-ahead: min(bytes to the page's end, 1024 / size, RCX)
        elements in one KVM_EXIT_IO (1 without REP), written to ES:RDI when the VMM completes
        it (complete_emulated_pio())."""
        hw = self.hw
        q = exit.qualification
        size, in_, rep = (q & 7) + 1, bool(q & 8), bool(q & 32)
        port = q >> 16
        d = hw._decode_io(exit.rip)
        addr32 = d is not None and d[6]
        mask = 0xFFFFFFFF if addr32 else _U64
        df = bool(hw.reg("rflags") & X86_EFLAGS_DF)
        self.emulated_exit = exit
        if not in_:
            data = self.read_guest_virt(exit.gla, size)
            if len(data) < size:
                return self._string_io_fault(exit.gla, False)
            self.emulator_pio_out(size, port, data, 1)
            self._string_io_writeback(exit, size, 1, rep, df, "rsi", mask)
            self.complete_userspace_io = _complete_pio_out
            return 0
        rdi = hw.reg("rdi") & mask
        count = (hw.reg("rcx") & mask) if rep else 1
        in_page = (rdi & 0xFFF) if df else PAGE_SIZE - (rdi & 0xFFF)
        n = min(in_page, READ_CACHE_SIZE // size, count) or 1
        self.emulator_pio_in(size, port, n)
        self.complete_userspace_io = _complete_emulated_pio_ins
        return 0

    def _string_io_writeback(self, exit, size, n, rep, df, reg, mask):
        hw = self.hw
        step = -size * n if df else size * n
        v = hw.reg(reg)
        hw.set_reg(reg, (v & ~mask) | ((v + step) & mask))
        if rep:
            rcx = (hw.reg("rcx") & mask) - n
            hw.set_reg("rcx", (hw.reg("rcx") & ~mask) | (rcx & mask))
            if rcx & mask:
                hw.set_reg("rip", exit.rip)  # not done: the guest runs the instruction again
                return
        self.skip_emulated_instruction(exit)

    def _string_io_fault(self, gla, write):
        """The emulator's memory access failed (the guest's page tables do not map it): #PF."""
        self.hw.set_reg("cr2", gla)
        self.hw.inject_event(14, 2 if write else 0)
        return 1

    def write_guest_virt(self, gva, data):
        """kvm_write_guest_virt_system(): walk the guest's page tables in software and write
        through the memslots; False if some page is not mapped."""
        from ..hw.paging import probe

        mem = self.kvm.mem
        cr3 = self.hw.reg("cr3")
        while data:
            gpa = probe(mem.q, self.gpa_to_hva, cr3, gva)
            hva = None if gpa is None else self.gpa_to_hva(gpa)
            if hva is None:
                return False
            chunk = min(len(data), 0x1000 - (gva & 0xFFF))
            mem.host_write(hva, data[:chunk])
            gva, data = gva + chunk, data[chunk:]
        return True


def _complete_fast_pio_out_port_0x7e(vcpu, run):
    vcpu.pio.count = 0
    return 1


def _complete_fast_pio_out(vcpu, run):
    """complete_fast_pio_out(): skip the OUT, unless userspace moved RIP meanwhile."""
    vcpu.pio.count = 0
    if vcpu.hw.reg("rip") != vcpu.cui_linear_rip:
        return 1
    vcpu.skip_emulated_instruction(vcpu.emulated_exit)
    return 1


def _complete_fast_pio_in(vcpu, run):
    """complete_fast_pio_in(): below 4 bytes the value merges into RAX, 4 bytes zero-extend."""
    if vcpu.hw.reg("rip") != vcpu.cui_linear_rip:
        vcpu.pio.count = 0
        return 1
    size = vcpu.pio.size
    val = vcpu.hw.reg("rax") if size < 4 else 0
    data = vcpu.complete_emulator_pio_in(run)
    mask = (1 << (8 * size)) - 1
    val = (val & ~mask) | int.from_bytes(data[:size], "little")
    vcpu.hw.set_reg("rax", val & _U64)
    vcpu.skip_emulated_instruction(vcpu.emulated_exit)
    return 1


def _complete_pio_out(vcpu, run):
    vcpu.pio.count = 0
    return 1


def _complete_emulated_pio_ins(vcpu, run):
    """complete_emulated_pio() for INS: the read-ahead buffer to ES:RDI.  With REP and DF = 0
    all of it at once (OP_MEM_STR); else element by element, the emulator restarting the
    instruction without entering the guest until the buffer is used up."""
    hw = vcpu.hw
    exit = vcpu.emulated_exit
    data = vcpu.complete_emulator_pio_in(run)
    q = exit.qualification
    size, rep = (q & 7) + 1, bool(q & 32)
    d = hw._decode_io(exit.rip)
    mask = 0xFFFFFFFF if d is not None and d[6] else _U64
    df = bool(hw.reg("rflags") & X86_EFLAGS_DF)
    n = len(data) // size
    if rep and not df:
        if not vcpu.write_guest_virt(hw.reg("rdi") & mask, data):
            return vcpu._string_io_fault(hw.reg("rdi") & mask, True)
        vcpu._string_io_writeback(exit, size, n, rep, df, "rdi", mask)
        return 1
    for i in range(n):
        rdi = hw.reg("rdi") & mask
        if not vcpu.write_guest_virt(rdi, data[i * size : (i + 1) * size]):
            return vcpu._string_io_fault(rdi, True)
        vcpu._string_io_writeback(exit, size, 1, rep, df, "rdi", mask)
        if not rep or not hw.reg("rcx") & mask:
            break
    return 1
