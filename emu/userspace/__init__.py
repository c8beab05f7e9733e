"""Userspace: the VMM and what it runs.

vmm         the VMM (QEMU's part): builds the VM from a guest, runs its vCPUs, answers exits
loader      loads a guest ELF, builds its page tables; guests builds the guests in guest/
guestabi    the guest ABI (reports, failures, hypercalls, the ucall transport); hostevents the host's
            events on a VM
ucall_common the host side of a ucall (struct ucall, the pool)
selftest    selftests from pytest (the KVM-selftest shape; public as emu.selftest)
"""
