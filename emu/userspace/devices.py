"""The VMM's devices (QEMU's hw/ for what a guest of emu touches): port I/O (the POST port 0x80,
QEMU's ioport80; the debug console on 0xe9, QEMU's isa-debugcon), the MSRs the VMM answers itself
(target/i386/kvm's MSR filter handlers), and the MMIO test device at guestabi.EMU_MMIO_GPA.  A part
of emu.userspace.vmm.Machine, which routes KVM_EXIT_IO, KVM_EXIT_X86_RDMSR/WRMSR and
KVM_EXIT_MMIO here."""

from . import guestabi
from ..kvm.uapi import KVM_EXIT_IO_OUT, KVM_EXIT_X86_WRMSR


class VmmDevices:
    """Port I/O, MSR and MMIO handling of the VMM (mixed into Machine)."""

    # -- port I/O -----------------------------------------------------------------------------------------
    def _pio(self, v, run):
        """KVM_EXIT_IO: each of run.count elements to the port's handler (QEMU's kvm_handle_io()
        loops over them on its I/O address space); an IN leaves the data in run.data."""
        is_write = run.direction == KVM_EXIT_IO_OUT
        size, port = run.size, run.port
        self.pio_counts[port] = self.pio_counts.get(port, 0) + 1
        handler = self.pio_handlers.get(port)
        self.kvm.touch(("pio", port), True)  # (emu.checkers.dpor) the device is every vCPU's
        for i in range(run.count):
            chunk = run.data[i * size : (i + 1) * size]
            if handler is None:
                out = None if is_write else b"\xff" * size
            else:
                out = handler(v.vcpu_id, is_write, size, bytes(chunk))
            if not is_write:
                run.data[i * size : (i + 1) * size] = bytes(out if out is not None else b"\xff" * size)[:size]

    def _pio_delay(self, vcpu, is_write, size, data):
        """Port 0x80 (QEMU's ioport80): a sink; reads return 0xff."""
        return None if is_write else b"\xff" * size

    def _pio_debugcon(self, vcpu, is_write, size, data):
        """Port 0xe9 (QEMU's isa-debugcon): written bytes are console output (the low byte of
        each access, as the device takes 8 bits); a read returns the readback value 0xe9."""
        if not is_write:
            return bytes([guestabi.DEBUGCON_READBACK]) * size
        self.console.append(data[0])
        if self.tracer.enabled:
            self.tracer.emit("guest_console", vcpu, msg=f"{data[0]:#04x} {chr(data[0])!r}")
        return None

    # -- MSRs the VMM answers -----------------------------------------------------------------------------
    def _msr_exit(self, v, run):
        """KVM_EXIT_X86_RDMSR/WRMSR: the handler's answer, or run.msr.error = 1 (KVM injects #GP)."""
        handler = self.msr_handlers.get(run.index)
        is_write = run.exit_reason == KVM_EXIT_X86_WRMSR
        ok, data = handler(v, is_write, run.data) if handler is not None else (False, 0)
        run.error = 0 if ok else 1
        if not is_write and ok:
            run.data = data

    def _msr_core_thread_count(self, v, is_write, data):
        """kvm_rdmsr_core_thread_count(): threads (15:0) and cores (31:16) of the package; a write
        is refused (#GP)."""
        if is_write:
            return False, 0
        return True, self.nvcpus | self.nvcpus << 16

    def _mmio(self, run):
        """KVM_EXIT_MMIO with the access decoded (phys_addr, len, is_write, data): the device's
        registers (guestabi.EMU_MMIO_*).  A read leaves the value in ``run.data`` (KVM's
        completion hands it to the guest).  None when served, else why not (one line)."""
        off = run.phys_addr - guestabi.EMU_MMIO_GPA
        n = run.len
        if not 0 <= off < 0x1000:
            return "no device at this GPA"
        if off + n > guestabi.EMU_MMIO_REGS or off >> 3 != (off + n - 1) >> 3:
            return f"the device has no register at offset {off:#x} for {n} bytes"
        # (emu.checkers.dpor) the device is shared by every vCPU
        self.kvm.touch(("mmio_device",), run.is_write)
        reg, at = off & ~7, off & 7
        if run.is_write:
            self.mmio_writes += 1
            if reg == guestabi.EMU_MMIO_REG_SCRATCH:
                self.mmio_scratch[at : at + n] = bytes(run.data[:n])
            return None  # ID and WRITES ignore writes
        if reg == guestabi.EMU_MMIO_REG_ID:
            value = guestabi.EMU_MMIO_ID.to_bytes(8, "little")
        elif reg == guestabi.EMU_MMIO_REG_SCRATCH:
            value = bytes(self.mmio_scratch)
        else:
            value = self.mmio_writes.to_bytes(8, "little")
        run.data = value[at : at + n]
        return None
