"""emu: an EPT-walk emulator with KVM's TDP MMU (and its mirror) and a simulated TDX module.

hw/         the CPU: memory, walkers, TLB, the Unicorn vCPU
kvm/        KVM's MMU and VM/vCPU API; host/ the host kernel (page allocator, VMM page tables)
userspace/  the VMM, the loader, guests, host events
checkers/   the scheduler, explorer, DPOR, campaigns, invariants
trace, dump, disasm, cli
"""

import importlib
import importlib.abc
import importlib.util
import sys

# Version 0.1 had these modules at the top level; scripts import them by those names
# (``from emu.vmm import Machine``).  The old name is the same module object as the new one.
MOVED = {
    "emu.sched": "emu.checkers.sched",
    "emu.explore": "emu.checkers.explore",
    "emu.dpor": "emu.checkers.dpor",
    "emu.campaign": "emu.checkers.campaign",
    "emu.check": "emu.checkers.check",
    "emu.inject": "emu.checkers.inject",
    "emu.distributed": "emu.checkers.distributed",
    "emu.vmm": "emu.userspace.vmm",
    "emu.loader": "emu.userspace.loader",
    "emu.guests": "emu.userspace.guests",
    "emu.guestabi": "emu.userspace.guestabi",
    "emu.hostevents": "emu.userspace.hostevents",
    "emu.selftest": "emu.userspace.selftest",
    "emu.hostmm": "emu.host.mm",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(MOVED[spec.name])
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module):
        pass  # already executed under its new name


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
