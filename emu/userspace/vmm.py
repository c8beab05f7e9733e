"""The userspace VMM (what QEMU or a KVM selftest is to KVM): build a VM for a guest and run it.

    m = Machine("hello", vm="default", mem=64 << 20, vcpus=1)
    result = m.run()        # Result: exit, reports, stats, vcpus

It creates the VM, backs guest memory with host memory, loads the guest ELF
(emu.userspace.loader), creates the vCPUs with the boot registers, the CPUID table
(emu.userspace.cpu) and the boot MSRs, and runs them, answering the exits KVM hands to
userspace: the guest runtime's report and fail hypercalls, port I/O (the device table
``pio_handlers``: port -> handler), the MSRs it filters, HLT (the vCPU is done), and
errors (the run ends).

A run can be stopped, as QEMU stops its vCPUs: ``stop()`` (a signal, a watchdog: see
emu.userspace.watchdog) signals every vCPU, KVM_RUN returns KVM_EXIT_INTR, and no vCPU
enters again.  Its limits: ``max_insns`` (blocks of guest code, all vCPUs together,
counted deterministically: emu.hw.slice.BlockLimit) and ``timeout`` (seconds of wall
clock); a run past either ends with exit "hang", one interrupted by ``signals`` (the
CLI's emu.userspace.watchdog.Signals) with "interrupted".  Either error line names, for
every vCPU still running, its RIP, instruction and symbol and the loop it spins in.
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import TYPE_CHECKING, Any, Sequence

from . import guestabi, guests, loader
from ..host import Host, MiB
from ..hw.memory import OutOfHostMemory
from ..kvm.kvm import (
    Kvm,
    KvmIoctlError,
    KVM_X86_DEFAULT_VM,
    KVM_X86_TDX_VM,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_HLT,
    KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_MEMORY_FAULT,
    KVM_EXIT_INTR,
    EXIT_NAMES,
)
from ..kvm.kvm_host import EINVAL, EFAULT
from ..kvm.uapi import (
    KVM_X86_SW_PROTECTED_VM,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
)
from ..kvm.uapi import (
    KVM_EXIT_IO,
    KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR,
    KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_FILTER_READ,
    KVM_MSR_FILTER_WRITE,
    KVM_MSR_FILTER_DEFAULT_ALLOW,
)
from ..kvm.x86_msr import MSR_IA32_APICBASE_BSP, MSR_IA32_APICBASE_ENABLE, APIC_DEFAULT_PHYS_BASE
from ..hw.msr import MSR_IA32_APICBASE, MSR_IA32_ARCH_CAPABILITIES
from . import cpu as cpu_model
from .devices import VmmDevices
from .ucall_common import UcallHost, is_scheduler_control, describe_exception
from ..kvm.spte import PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G
from ..hw.exits import VECTOR_NAMES
from ..trace import NULL_TRACER

if TYPE_CHECKING:
    from ..trace import Tracer

HUGE_2M = 2 * MiB
VM_TYPES = {"default": KVM_X86_DEFAULT_VM, "sw-protected": KVM_X86_SW_PROTECTED_VM, "tdx": KVM_X86_TDX_VM}
# What a TD's #VE stood for (VE_INFO's exit reason), for the error line of a TD with no handler.
VE_CAUSES = {
    10: "a CPUID leaf the TDX module does not virtualize (td_cpuid_exit())",
    12: "HLT (the TDX module's td_generic_ve_exit())",
    30: "port I/O (the TDX module's td_generic_ve_exit())",
    31: "an RDMSR the TDX module does not handle (td_rdmsr_exit())",
    32: "a WRMSR the TDX module does not handle (td_wrmsr_exit())",
    48: "an EPT violation",
}
HUGEPAGES = {None: PG_LEVEL_4K, "4k": PG_LEVEL_4K, "2m": PG_LEVEL_2M, "1g": PG_LEVEL_1G}
# The ids of the VMM's own memslots for guest memory: 0 for the piece at GPA 0, these for the
# pieces a memslot host event needs of its own (emu.userspace.hostevents: delete, move).
VMM_SLOT_BASE = 0x7F00


class MachineError(Exception):
    """Bad input to a machine (guest, memory size, vCPU count): one line for the user."""


class Result:
    def __init__(self):
        self.exit = None  # the name of the exit that ended the run ("hlt" when all vCPUs halted)
        self.error = None  # a one-line description when the run ended in an error
        self.errno = None  # KVM_RUN's errno when it failed (14: -EFAULT with KVM_EXIT_MEMORY_FAULT)
        self.memory_fault = None  # kvm_run.memory_fault of the run's KVM_EXIT_MEMORY_FAULT: flags, gpa, size
        self.reports = []  # (vcpu, value) in the order the guest made them
        self.syncs = []  # (vcpu, stage, *args) of GUEST_SYNC / GUEST_SYNC_ARGS, in order
        self.printfs = []  # (vcpu, text) of GUEST_PRINTF, in order
        self.guest_assert = None  # a failed GUEST_ASSERT: vcpu, file, line, expr, kind, a, b, message
        self.host_exception = None  # the exception a host callback or thread raised (exit "host_assert")
        self.accepted = False  # a host check (GuestVM.check) accepted the run's exit as expected
        self.vcpu_exits = []  # per vCPU: the exit name that ended it
        self.stats = {}
        self.vcpus = []  # final registers per vCPU
        self.shared_bit = None  # a TD's shared-GPA bit
        self.console = ""  # what the guest wrote to the debug console port

    @property
    def ok(self):
        return self.error is None

    def as_json(self):
        return {
            "exit": self.exit,
            "error": self.error,
            "errno": self.errno,
            "memory_fault": self.memory_fault,
            "shared_bit": self.shared_bit,
            "reports": [v for _, v in self.reports],
            "report_vcpus": [c for c, _ in self.reports],
            "vcpu_exits": self.vcpu_exits,
            "syncs": [list(s) for s in self.syncs],
            "printfs": [list(p) for p in self.printfs],
            "console": self.console,
            "stats": self.stats,
            "vcpus": self.vcpus,
        }


class MemRegion:
    """A memslot of the VMM's (a KVM selftest's struct userspace_mem_region): its GPA range, the
    host memory behind it (``hva``) and, with ``guest_memfd``, its range of a guest_memfd
    (``gmem``, the private pages)."""

    def __init__(self, slot, gpa, size, guest_memfd=False, hva=None, gmem=None, backing_level=PG_LEVEL_4K):
        self.slot, self.gpa, self.size, self.guest_memfd = slot, gpa, size, guest_memfd
        self.hva, self.gmem, self.backing_level = hva, gmem, backing_level

    @property
    def end(self):
        return self.gpa + self.size

    def __repr__(self):
        return f"MemRegion(slot {self.slot}, gpa {self.gpa:#x}+{self.size:#x}{', guest_memfd' if self.guest_memfd else ''})"


def parse_size(text):
    """'64M' -> 67108864.  A number with an optional K/M/G suffix."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "KMG" and t else t
    try:
        n = int(num, 0)
    except ValueError:
        raise MachineError(f"bad size {text!r}: use a number with an optional K, M or G suffix") from None
    if n <= 0:
        raise MachineError(f"bad size {text!r}: must be positive")
    return n * mult


class Machine(VmmDevices, UcallHost):
    def __init__(
        self,
        guest: str | os.PathLike[str],
        vm: str = "default",
        mem: int = 64 * MiB,
        vcpus: int = 1,
        tracer: Tracer | None = None,
        hugepages: str | None = None,
        td_attributes: int | None = None,
        no_freeze: bool = False,
        inject: Sequence[Any] = (),
        seed: int = 0,
        host_events: Sequence[Any] = (),
        bugs: Sequence[str] = (),
        nx_huge_pages: bool = False,
        mirror_hooks: str | None = None,
        tdx_huge_pages: bool = False,
        demote_interruptible: bool = False,
        regions: Sequence[MemRegion] = (),
        guest_globals: dict[str, int | bytes] | None = None,
        virt_maps: Sequence[tuple[int, int]] = (),
        host_reserve: int = 0,
    ) -> None:
        """``regions``: MemRegion (slot, gpa, size, guest_memfd) memslots besides guest memory,
        made at build time and mapped in the guest's page tables (identity; in a TD also at the
        shared window); ``virt_maps``: (gpa, size) ranges mapped likewise with no memslot (yet);
        ``guest_globals``: {symbol: value} written into the image before it is loaded (in a TD
        before it is measured); ``host_reserve``: host memory kept for memslots added later."""
        if vm not in VM_TYPES:
            raise MachineError(f"unknown VM type {vm!r} ({', '.join(VM_TYPES)})")
        if hugepages not in HUGEPAGES:
            raise MachineError(f"unknown huge page size {hugepages!r} (4k, 2m, 1g)")
        if not isinstance(vcpus, int) or not 1 <= vcpus <= 64:
            raise MachineError(f"bad vCPU count {vcpus!r}: 1 to 64")
        if mem % guestabi.MEM_ALIGN or mem < guestabi.MIN_MEM_SIZE:
            raise MachineError(
                f"guest memory must be a multiple of 2 MiB and at least "
                f"{guestabi.MIN_MEM_SIZE >> 20} MiB (got {mem:#x})"
            )
        if mem > guestabi.EMU_MMIO_GPA:
            raise MachineError(
                f"guest memory of {mem:#x} bytes would reach the MMIO device at GPA {guestabi.EMU_MMIO_GPA:#x}"
            )
        from ..kvm.tdp_mmu import MIRROR_HOOKS, MIRROR_HOOKS_616, MIRROR_HOOKS_72

        if mirror_hooks is not None and mirror_hooks not in MIRROR_HOOKS:
            raise MachineError(f"unknown mirror hooks {mirror_hooks!r} ({', '.join(MIRROR_HOOKS)})")
        if tdx_huge_pages:
            # kvm_intel.tdx_huge_page: private 2M mappings, built on the 7.2 mirror hooks, with
            # guest_memfd backed by huge folios.
            if vm != "tdx":
                raise MachineError("--tdx-huge-pages is about a TD's private memory: it needs --vm tdx")
            if HUGEPAGES[hugepages] < PG_LEVEL_2M:
                raise MachineError("--tdx-huge-pages needs guest_memfd backed by 2M folios: --hugepages 2m")
            if mirror_hooks == MIRROR_HOOKS_616:
                raise MachineError("--tdx-huge-pages builds on the 7.2 mirror hooks: not with --mirror-hooks 6.16")
        if demote_interruptible and vm != "tdx":
            raise MachineError("--demote-interruptible is about the TDX module: it needs --vm tdx")
        self.mirror_hooks = mirror_hooks or (MIRROR_HOOKS_72 if tdx_huge_pages else MIRROR_HOOKS_616)
        self.tdx_huge_pages = bool(tdx_huge_pages)
        self.demote_interruptible = bool(demote_interruptible)
        try:
            self.elf = guests.resolve(guest)
            self.image = loader.load_elf(self.elf)
        except (guests.GuestError, loader.LoadError) as e:
            raise MachineError(str(e)) from None
        self.vm_type = VM_TYPES[vm]
        self.vm_name = vm
        # The run's limits and its stop (see the module's docstring): set before run().
        self.max_insns = None
        self.timeout = None
        self.signals = None
        self.progress = None  # a callable(text) drawing the status line (a terminal)
        self.stop_reason = None  # "interrupted" or "hang" once the VMM stops every vCPU
        self.stop_why = None
        self.guest_blocks = None  # blocks of guest code the last run ran (when counted)
        if td_attributes is None:
            from tdxmod.abi import TD_ATTR_SEPT_VE_DISABLE, TD_ATTR_DEBUG

            td_attributes = TD_ATTR_SEPT_VE_DISABLE | TD_ATTR_DEBUG
        self.mem_size = mem
        self.nvcpus = vcpus
        # The MMIO device's state (guestabi.EMU_MMIO_*): the scratch register, the writes taken.
        self.mmio_scratch = bytearray(8)
        self.mmio_writes = 0
        # The port I/O devices: port -> handler(vcpu_id, is_write, size, data) -> the bytes read (IN)
        # or None.  A port with no handler reads all ones and drops writes (QEMU's unassigned I/O).
        self.console = bytearray()
        self.pio_handlers = {guestabi.IO_DELAY_PORT: self._pio_delay, guestabi.EMU_DEBUGCON_PORT: self._pio_debugcon}
        self.pio_counts: dict[int, int] = {}  # port -> I/O exits userspace took for it
        # MSRs the VMM filters and answers (index -> handler(vcpu, is_write, data) -> (ok, data)).
        self.msr_handlers = {guestabi.MSR_CORE_THREAD_COUNT: self._msr_core_thread_count}
        self.tracer = tracer or NULL_TRACER
        if self.tracer.enabled:
            self.tracer.symbolize = self.image.symbolize
        self.backing_level = HUGEPAGES[hugepages]
        align = 1 << (12 + 9 * (self.backing_level - 1))
        self.td = self.vm_type == KVM_X86_TDX_VM
        self.private_mem = self.vm_type in (KVM_X86_SW_PROTECTED_VM, KVM_X86_TDX_VM)
        self.no_freeze = no_freeze
        self.nx_huge_pages = bool(nx_huge_pages)
        # The host side of a selftest (emu.selftest): the vCPUs' ucall callback, host threads,
        # and the check of a finished run.
        self.on_ucall: Any = None
        self.host_threads: list = []  # (fn, name)
        self.result_check = None
        # Check the quiescence invariants (emu.checkers.check.check_vm) when a run ends well: `run`
        # and GuestVM.run() do (explore and campaign check every run themselves).
        self.check_at_end = False
        self.regions: dict[int, MemRegion] = {}  # slot -> MemRegion: every memslot of the VMM's
        self.removed_ranges: list[tuple[int, int]] = []  # GPA ranges host events deleted or moved away
        self.arriving_ranges: list[tuple[int, int]] = []  # GPA ranges a memslot moves to (no memslot before)
        self.host_reserve = host_reserve
        self.guest_globals = dict(guest_globals or {})
        self.virt_maps = list(virt_maps)
        self.ucall_pool_gpa = None
        from .hostevents import parse_host_event, check_event, HostEventError

        try:
            self.host_events = [e if not isinstance(e, str) else parse_host_event(e) for e in host_events]
            for event in self.host_events:
                check_event(event, self)
        except HostEventError as e:
            raise MachineError(str(e)) from None
        # The guest's page tables map where a memslot moves to.
        self.virt_maps += [(e.to, e.end - e.start) for e in self.host_events if e.kind == "move"]
        self.arriving_ranges = [(e.to, e.to + e.end - e.start) for e in self.host_events if e.kind == "move"]
        from ..checkers.inject import Plan, PlanError

        try:
            self.plan = Plan(inject, seed=seed, tracer=self.tracer) if inject else None
        except PlanError as e:
            raise MachineError(str(e)) from None
        try:
            self._build(mem, vcpus, align, td_attributes, list(regions))
        except (OSError, OutOfHostMemory) as e:
            raise MachineError(f"cannot back {mem >> 20} MiB of guest memory on this host: {e}") from None
        # Faults are injected into the run, not into building the VM (a failed build is no run).
        self.set_plan(self.plan)
        from ..kvm.bugs import Bugs

        try:
            self.kvm.nx_huge_pages = self.nx_huge_pages  # the module parameter kvm.nx_huge_pages
            self.kvm.bugs = Bugs(bugs)
            self.kvm.rcu.no_grace_period = self.kvm.bugs.free_without_grace_period
        except ValueError as e:
            raise MachineError(str(e)) from None

    @property
    def user_code(self):
        """The run calls Python code of a selftest's host side (callbacks, host threads)."""
        return self.on_ucall is not None or bool(self.host_threads) or self.result_check is not None

    def set_plan(self, plan):
        """Make ``plan`` (an emu.checkers.inject.Plan, or None) the active fault-injection plan."""
        self.plan = plan
        self.kvm.inject = plan
        if self.td:
            self.host.tdx_module.inject = plan

    # -- building -------------------------------------------------------------------------------------------
    def _main_slots(self):
        """The memslots of guest memory [0, mem_size): one, unless a memslot host event needs its
        range in a memslot of its own (then the pieces between).  [(slot id, start, end)]."""
        cuts = {0, self.mem_size}
        for e in self.host_events:
            if e.kind in ("delete", "move"):
                cuts |= {e.start, e.end}
        cuts = sorted(cuts)
        pieces = []
        for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
            pieces.append((0 if a == 0 else VMM_SLOT_BASE + i, a, b))
        for e in self.host_events:
            if e.kind in ("delete", "move"):
                e.slot = next(sid for sid, a, b in pieces if a == e.start)
        return pieces

    def _host_size(self, mem, align, regions):
        """Host memory for guest memory (twice with guest_memfd), the regions, and the reserve."""
        per = 2 if self.private_mem else 1
        size = per * (mem + align)
        for r in regions:
            size += (2 if r.guest_memfd else 1) * (r.size + HUGE_2M)
        return size + self.host_reserve

    def _build(self, mem, vcpus, align, td_attributes, regions):
        if self.td:
            return self._build_td(mem, vcpus, align, td_attributes, regions)
        self.host = Host(self._host_size(mem, align, regions))
        self.kvm = self._create_vm(Kvm(self.host, self.vm_type, tracer=self.tracer))
        self.hva = self.host.mmap(mem, align)
        # A software-protected VM's memory has a guest_memfd too, so the guest may convert any of it.
        self.gmem = self.host.mmap(mem, align) if self.private_mem else None
        self._add_main_slots()
        for r in regions:
            self.add_region(r.slot, r.gpa, r.size, r.guest_memfd)
        self.boot = self._load(self.write_gpa, self._extra_maps(regions))
        self._init_ucall_pool()
        self.vcpus = []
        for i in range(vcpus):
            v = self.kvm.create_vcpu(i)
            self._init_vcpu(v, i, vcpus)
            v.set_regs(self.boot.regs(i))
            self.vcpus.append(v)

    def _add_main_slots(self):
        for sid, a, b in self._main_slots():
            self.kvm.set_user_memory_region(
                sid,
                0,
                a,
                b - a,
                self.hva + a,
                backing_level=self.backing_level,
                gmem_addr=None if self.gmem is None else self.gmem + a,
            )
            self.regions[sid] = MemRegion(
                sid,
                a,
                b - a,
                self.gmem is not None,
                self.hva + a,
                None if self.gmem is None else self.gmem + a,
                self.backing_level,
            )

    def _create_vm(self, kvm):
        """KVM_CREATE_VM done: KVM_CAP_EXIT_HYPERCALL for the guest runtime's calls (and, in a VM
        with private memory, KVM_HC_MAP_GPA_RANGE, as QEMU and the selftests enable it); the MSRs
        the VMM answers itself (QEMU's kvm_arch_init(): KVM_CAP_X86_USER_SPACE_MSR with
        KVM_MSR_EXIT_REASON_FILTER, and a filter that denies them to the guest so that KVM hands
        them over); and the run-time checks armed (emu.checkers.check: the harness's, not QEMU's)."""
        from ..checkers.check import install

        kvm.hypercall_exit_enabled.update(guestabi.EMU_USERSPACE_HCS)
        if kvm.has_private_mem:
            kvm.hypercall_exit_enabled.add(KVM_HC_MAP_GPA_RANGE)
        kvm.enable_cap_user_space_msr(KVM_MSR_EXIT_REASON_FILTER)
        kvm.set_msr_filter(
            KVM_MSR_FILTER_DEFAULT_ALLOW,
            [(KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE, index, 1, bytes(8)) for index in sorted(self.msr_handlers)],
        )
        return install(kvm)

    def _init_vcpu(self, v, index, nvcpus):
        """KVM_SET_CPUID2 (the -cpu host table, emu.userspace.cpu) and the boot MSRs (KVM_SET_MSRS,
        host-initiated): IA32_ARCH_CAPABILITIES, and in a plain VM the local APIC's base, enabled,
        BSP on vCPU 0 (a TD's is KVM's: x2APIC mode, set by KVM_TDX_INIT_VCPU)."""
        v.set_cpuid2(cpu_model.cpuid_host(index, nvcpus, td=self.td))
        msrs = {MSR_IA32_ARCH_CAPABILITIES: cpu_model.ARCH_CAPABILITIES}
        if not self.td:
            msrs[MSR_IA32_APICBASE] = (
                APIC_DEFAULT_PHYS_BASE | MSR_IA32_APICBASE_ENABLE | (MSR_IA32_APICBASE_BSP if index == 0 else 0)
            )
        v.set_msrs(msrs)

    def _extra_maps(self, regions):
        """The guest page-table mappings besides the identity map of guest memory: the regions
        and virt_maps (identity, 2M pages), and in a TD their shared aliases in the shared window."""
        frames = set()
        for gpa, size in [(r.gpa, r.size) for r in regions] + self.virt_maps:
            for f in range(gpa & -HUGE_2M, gpa + size, HUGE_2M):
                if f >= self.mem_size:
                    frames.add(f)
        maps = []
        for f in sorted(frames):
            if maps and maps[-1][0] + maps[-1][2] == f:
                maps[-1][2] += HUGE_2M
            else:
                maps.append([f, f, HUGE_2M])
        out = [tuple(m) for m in maps]
        if self.td:
            out += [(guestabi.TD_SHARED_WINDOW_GVA + gva, gpa | self.shared_bit, size) for gva, gpa, size in maps]
        return out

    def _load(self, write_gpa, extra_maps=()):
        try:
            boot = loader.build_boot(self.image, self.mem_size, self.nvcpus, write_gpa, extra_maps)
        except loader.LoadError as e:
            raise MachineError(str(e)) from None
        # Globals the host sets before the guest runs (sync_global_to_guest(); the ucall pool).
        values = dict(self.guest_globals)
        if self._has_symbol(guestabi.UCALL_POOL_SYMBOL):
            self.ucall_pool_gpa = self.mem_size - guestabi.UCALL_POOL_OFFSET
            if boot.page_table_gpas[-1] >= self.ucall_pool_gpa:
                raise MachineError("the guest's page tables reach the ucall pool: too many extra mappings")
            values[guestabi.UCALL_POOL_SYMBOL] = self.ucall_pool_gpa + (guestabi.TD_SHARED_WINDOW_GVA if self.td else 0)
        if self._has_symbol(guestabi.UCALL_MMIO_GPA_SYMBOL):
            # ucall_arch_init(): a TD's ucall goes to the shared alias of UCALL_MMIO_GPA
            values[guestabi.UCALL_MMIO_GPA_SYMBOL] = guestabi.UCALL_MMIO_GPA | (self.shared_bit if self.td else 0)
        for name, value in values.items():
            addr, data = self.global_bytes(name, value)
            write_gpa(addr, data)
        return boot

    def _has_symbol(self, name):
        return any(n == name for _, _, n in self.image.symbols)

    def global_bytes(self, name, value):
        """(address, bytes) of the guest global ``name`` set to ``value`` (an int, stored in the
        symbol's size, little-endian; or bytes, at most that size)."""
        syms = [(a, size) for a, size, n in self.image.symbols if n == name]
        if not syms:
            raise MachineError(
                f"the guest has no global {name!r} (sync_global_to_guest needs a symbol of "
                f"the image: a global or static variable the compiler kept)"
            )
        addr, size = syms[0]
        if isinstance(value, (bytes, bytearray)):
            if size and len(value) > size:
                raise MachineError(f"{len(value)} bytes do not fit the guest's {name!r} ({size} bytes)")
            return addr, bytes(value)
        size = size if size in (1, 2, 4, 8) else 8
        try:
            return addr, int(value).to_bytes(size, "little", signed=int(value) < 0)
        except OverflowError:
            raise MachineError(f"{value!r} does not fit the guest's {name!r} ({size} bytes)") from None

    def _init_ucall_pool(self):
        """ucall_init(): the pool in memory the host reads (shared in a TD), nothing in use, each
        struct's handle its GPA (the guest's ``ucall_pool`` was pointed at it by _load())."""
        if self.ucall_pool_gpa is None:
            return
        from .ucall_common import pool_image

        self.write_gpa(self.ucall_pool_gpa, pool_image(self.ucall_pool_gpa))

    def _build_td(self, mem, vcpus, align, attributes, regions):
        """A TD as QEMU builds one: guest_memfd-backed slot, all memory private, the image
        added page by page (TDH.MEM.PAGE.ADD, measured), the vCPUs' boot state, finalize."""
        from ..kvm.tdx import TdxX86Ops

        self.host = Host(self._host_size(mem, align, regions), tdx=True)
        module = self.host.tdx_module
        module.tracer = self.tracer
        if self.demote_interruptible:
            # A module without ENHANCED_DEMOTE_INTERRUPTIBILITY (the tdx_1.5 source, which has no such bit).
            from tdxmod.abi import TDX_FEATURES0_ENHANCED_DEMOTE_INTERRUPTIBILITY

            module.features0 &= ~TDX_FEATURES0_ENHANCED_DEMOTE_INTERRUPTIBILITY
        ops = TdxX86Ops(module, attributes, tdx_huge_page=self.tdx_huge_pages)
        self.kvm = self._create_vm(Kvm(self.host, KVM_X86_TDX_VM, tracer=self.tracer, x86_ops=ops))
        # The bug switch: before the seed patch, mirror SPTEs were published, then reflected.
        self.kvm.tdp_mmu.freeze_mirror_sptes = not self.no_freeze
        self.kvm.tdp_mmu.mirror_hooks = self.mirror_hooks
        if self.kvm.vm_dead:
            raise MachineError(f"cannot create the TD: {self.kvm.bug_reason}")
        self.shared_bit = self.kvm.gfn_direct_bits << 12
        self.hva = self.host.mmap(mem, align)  # shared pages
        self.gmem = self.host.mmap(mem, align)  # guest_memfd: private pages
        self._add_main_slots()
        self.kvm.set_memory_attributes(0, mem >> 12, private=True)
        for r in regions:
            self.add_region(r.slot, r.gpa, r.size, r.guest_memfd)
        staged = {}

        def stage(gpa, data):
            while data:
                page, off = gpa & ~0xFFF, gpa & 0xFFF
                n = min(len(data), 0x1000 - off)
                buf = staged.setdefault(page, bytearray(0x1000))
                buf[off : off + n] = data[:n]
                gpa, data = gpa + n, data[n:]

        # The shared alias of all memory, mapped at TD_SHARED_WINDOW_GVA in the guest's tables.
        self.boot = self._load(
            stage, [(guestabi.TD_SHARED_WINDOW_GVA, self.shared_bit, mem)] + self._extra_maps(regions)
        )
        if self.ucall_pool_gpa is not None:
            # The pool is shared memory (upstream: vm_vaddr_alloc_shared()); never PAGE.ADDed.
            from .ucall_common import UCALL_POOL_SIZE

            self.kvm.set_memory_attributes(
                self.ucall_pool_gpa >> 12, (self.ucall_pool_gpa + UCALL_POOL_SIZE + 0xFFF) >> 12, private=False
            )
        self._init_ucall_pool()
        self.vcpus = [self.kvm.create_vcpu(i) for i in range(vcpus)]
        if self.kvm.vm_dead:
            raise MachineError(f"cannot create the TD's vCPUs: {self.kvm.bug_reason}")
        for i, v in enumerate(self.vcpus):
            self._init_vcpu(v, i, vcpus)
        source = self.host.mmap(0x1000)  # the VMM's source page for PAGE.ADD
        v0 = self.vcpus[0]
        v0.mmu_load()
        for gpa in self.boot.pages:
            self.host.mem.host_write(source, bytes(staged.get(gpa, bytes(0x1000))))
            r = ops.init_mem_region(v0, gpa, source)
            if r:
                raise MachineError(f"KVM_TDX_INIT_MEM_REGION of GPA {gpa:#x} failed ({r}): {self.kvm.bug_reason or ''}")
        for i, v in enumerate(self.vcpus):
            v.set_regs(self.boot.regs(i))
        if ops.finalize(self.kvm):
            raise MachineError(f"KVM_TDX_FINALIZE_VM failed: {self.kvm.bug_reason or ''}")

    # -- memslots, memory attributes, guest_memfd (the selftests' kvm_util operations) ----------------
    def add_region(self, slot, gpa, size, guest_memfd=True):
        """vm_mem_add(): host memory for [gpa, gpa + size) (and a guest_memfd range for its
        private pages), then KVM_SET_USER_MEMORY_REGION2.  KvmIoctlError when KVM refuses."""
        level = self.backing_level
        align = 1 << (12 + 9 * (level - 1))
        if size % align or gpa % align:
            level, align = PG_LEVEL_4K, 0x1000
        try:
            hva = self.host.mmap(size, align)
            gmem = self.host.mmap(size, align) if guest_memfd else None
        except OutOfHostMemory as e:
            raise MachineError(
                f"no host memory left for memslot {slot} ({size:#x} bytes): {e} (give the VM a larger host_reserve)"
            ) from None
        self.kvm.set_user_memory_region(slot, 0, gpa, size, hva, backing_level=level, gmem_addr=gmem)
        self.regions[slot] = MemRegion(slot, gpa, size, guest_memfd, hva, gmem, level)
        return self.regions[slot]

    def delete_region(self, slot):
        """vm_mem_region_delete(): KVM_SET_USER_MEMORY_REGION with size 0."""
        self.kvm.set_user_memory_region(slot, 0, 0, 0, 0)
        self.regions.pop(slot, None)

    def move_region(self, slot, new_gpa):
        """vm_mem_region_move(): the same slot, size and host memory at another GPA."""
        r = self.regions.get(slot)
        if r is None:
            raise KvmIoctlError(EINVAL, f"no memslot {slot}")
        self.kvm.set_user_memory_region(
            slot, 0, new_gpa, r.size, r.hva, backing_level=r.backing_level, gmem_addr=r.gmem
        )
        r.gpa = new_gpa

    def region_of(self, gpa):
        for r in self.regions.values():
            if r.gpa <= gpa < r.end:
                return r
        return None

    def set_memory_attributes(self, gpa, size, private):
        """vm_set_memory_attributes(): KVM_SET_MEMORY_ATTRIBUTES."""
        self.kvm.kvm_vm_ioctl_set_mem_attributes(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)

    def guest_mem_fallocate(self, gpa, size, punch_hole):
        """vm_guest_mem_fallocate(): fallocate() on the guest_memfd of each memslot in the range:
        PUNCH_HOLE drops the pages (KVM unmaps them first), else they are allocated (here they
        always are: nothing to do)."""
        if (gpa | size) & 0xFFF or not size:
            raise KvmIoctlError(EINVAL, f"fallocate: range {gpa:#x}+{size:#x} not page aligned")
        end = gpa + size
        while gpa < end:
            r = self.region_of(gpa)
            if r is None or not r.guest_memfd:
                raise KvmIoctlError(EINVAL, f"fallocate: no guest_memfd memslot at GPA {gpa:#x}")
            n = min(end, r.end) - gpa
            if punch_hole:
                self.kvm.kvm_gmem_punch_hole(gpa >> 12, (gpa + n) >> 12)
            gpa += n

    # -- guest memory through the VMM's own mapping ---------------------------------------------------
    def write_gpa(self, gpa: int, data: bytes) -> None:
        """A write through the VMM's own mapping of guest RAM (its page tables)."""
        while data:
            n = min(len(data), 0x1000 - (gpa & 0xFFF))
            self.host.mem.host_write(self.host.mm.hva_to_hpa(self.hva + gpa), data[:n])
            gpa, data = gpa + n, data[n:]

    def read_gpa(self, gpa: int, n: int) -> bytes:
        out = bytearray()
        while n > 0:
            k = min(n, 0x1000 - (gpa & 0xFFF))
            out += self.host.mem.host_read(self.host.mm.hva_to_hpa(self.hva + gpa), k)
            gpa, n = gpa + k, n - k
        return bytes(out)

    def gpa_to_hpa(self, gpa):
        """addr_gpa2hva() and then the VMM's page tables: where the VMM reads ``gpa`` (its shared
        backing); KvmIoctlError(EFAULT) outside every memslot of the VMM's."""
        r = self.region_of(gpa)
        if r is None:
            raise KvmIoctlError(EFAULT, f"no memslot of the VMM's covers GPA {gpa:#x}")
        return self.host.mm.hva_to_hpa(r.hva + gpa - r.gpa)

    def read_guest(self, gpa, n):
        """Guest memory through the memslots' host mappings (shared memory, as the host sees it)."""
        out = bytearray()
        while n > 0:
            k = min(n, 0x1000 - (gpa & 0xFFF))
            out += self.host.mem.host_read(self.gpa_to_hpa(gpa), k)
            gpa, n = gpa + k, n - k
        return bytes(out)

    def write_guest(self, gpa, data):
        data = bytes(data)
        while data:
            n = min(len(data), 0x1000 - (gpa & 0xFFF))
            self.host.mem.host_write(self.gpa_to_hpa(gpa), data[:n])
            gpa, data = gpa + n, data[n:]

    def symbolize(self, addr):
        return self.image.symbolize(addr) or f"{addr:#x}"

    # -- running ----------------------------------------------------------------------------------------
    def run(self, max_userspace_exits: int = 1_000_000, max_steps: int = 20_000_000, scheduled: Any = None) -> Result:
        """Run every vCPU until it halts or fails.

        One vCPU with no host event runs alone, at full speed.  Otherwise the vCPUs (and the
        host tasks) run as tasks of the deterministic scheduler under its default schedule, so
        vCPUs that wait for each other through memory make progress.  ``scheduled=False``
        runs the vCPUs in turn, one KVM_RUN at a time (no vCPU is in guest mode while
        another runs host code; guests that wait for each other never finish that way)."""
        if scheduled is None:
            scheduled = self.nvcpus > 1 or bool(self.host_events) or self.user_code
        if scheduled:
            from ..checkers.sched import Scheduler, StepLimit, Deadlock

            try:
                return self.run_scheduled(Scheduler(max_steps=max_steps, tracer=self.tracer))
            except (StepLimit, Deadlock) as e:
                res = Result()
                if self.stop_reason is not None:
                    res.exit = self.stop_reason  # (a vCPU left waiting for one that stopped)
                else:
                    res.exit, res.error = "timeout", f"the scheduler stopped the run: {e}"
                return self._finish(res, {}, collect_regs=True)
        res = Result()
        live = list(self.vcpus)
        ended: dict[int, str] = {}
        exits = 0
        with self.watchdog():
            while live and res.error is None and exits < max_userspace_exits:
                for v in list(live):
                    exits += 1
                    if self._step(v, res, ended):
                        live.remove(v)
                    if res.error is not None:
                        break
        if live and res.error is None:
            res.exit, res.error = "timeout", f"the guest made more than {max_userspace_exits} userspace exits"
        return self._finish(res, ended, collect_regs=True)

    def run_scheduled(self, sched, collect_regs=True):
        """Run every vCPU as a task of the deterministic scheduler ``sched`` (emu.checkers.sched):
        the vCPUs interleave at KVM's and the TDX module's scheduling points."""
        res = Result()
        ended = {}
        self.kvm.sched = sched
        if self.td:
            self.host.tdx_module.sched = sched

        def vcpu_loop(v):
            def body():
                while res.error is None and not self.kvm.violations and not self._step(v, res, ended):
                    pass
                if res.error is not None or self.kvm.violations:
                    self.kvm.touch_all()  # (emu.checkers.dpor) every vCPU reads res.error
                    # The run is over (as QEMU stops the VM on a fatal error): signal the other
                    # vCPUs, so one spinning in guest mode on memory leaves KVM_RUN too.
                    for o in self.vcpus:
                        if o is not v:
                            o.kick_signal()

            return body

        def stop():
            # A broken invariant ends the run: the vCPUs leave KVM_RUN (a guest may read a stale
            # mapping forever, and never exit otherwise).
            for o in self.vcpus:
                o.kick_signal()

        self.kvm.on_checker_violation = stop
        for v in self.vcpus:
            sched.spawn(vcpu_loop(v))
        for k, event in enumerate(self.host_events):
            sched.spawn(self._host_task(event, f"host{k}", res), name=f"host{k}", host=True, start=event.step)
        for fn, name in self.host_threads:
            sched.spawn(self._host_thread(fn, name, res), name=name, host=True)
        try:
            with self.watchdog():
                sched.run()
        finally:
            self.kvm.on_checker_violation = None
            self.kvm.sched = None
            if self.td:
                self.host.tdx_module.sched = None
        return self._finish(res, ended, collect_regs)

    # -- stopping a run: signals and watchdogs ----------------------------------------------------------
    @contextlib.contextmanager
    def watchdog(self):
        """The run's limits armed around it: the block limit on every vCPU, and the watchdog
        thread (emu.userspace.watchdog) when there is a timeout, signals or a progress line."""
        from ..hw.slice import BlockLimit, NO_BUDGET
        from .watchdog import Watchdog

        self.stop_reason = self.stop_why = None
        limit = None
        if self.max_insns is not None or self.progress is not None:
            limit = BlockLimit(NO_BUDGET if self.max_insns is None else self.max_insns, self._limit_expired)
        for v in self.vcpus:
            v.hw.limit = limit
        thread = None
        if self.timeout is not None or self.signals is not None or self.progress is not None:
            thread = Watchdog(self, self.signals, self.timeout, self.progress)
        try:
            if thread is None:
                yield
            else:
                with thread:
                    yield
        finally:
            for v in self.vcpus:
                v.hw.limit = None
                if self.stop_reason is not None:
                    v.signal_pending = False  # the VMM has taken the signal (the thread is joined)
            self.guest_blocks = None if limit is None else limit.used

    def _limit_expired(self, hw):
        self.stop("hang", f"--max-insns {self.max_insns} reached")

    def stop(self, reason, why):
        """Stop every vCPU (safe from another thread): ``reason`` is the run's exit ("interrupted",
        "hang"), ``why`` its first words.  The first stop wins."""
        if self.stop_reason is None:
            self.stop_reason, self.stop_why = reason, why
        self.kick_all()

    def kick_all(self):
        """A signal to every vCPU: KVM_RUN returns KVM_EXIT_INTR; one running guest code leaves it."""
        for v in self.vcpus:
            v.send_signal()

    def progress_text(self, elapsed):
        """The status line of a long run: elapsed time, guest blocks, exits, pages mapped."""
        blocks = sum(v.hw.blocks_run() for v in self.vcpus)
        exits = sum(v.stat["exits"] for v in self.vcpus)
        st = self.kvm.stat
        pages = st["pages_4k"] + st["pages_2m"] + st["pages_1g"]
        return (
            f"  {elapsed:6.1f} s   {_count(blocks)} guest blocks   {_count(exits)} exits   "
            f"{pages} pages mapped   (Ctrl-C stops)"
        )

    def _stopped(self, v, res, ended):
        """The VMM stopped ``v`` (its KVM_RUN returned for the signal, or it is not run again)."""
        ended.setdefault(v.vcpu_id, self.stop_reason)
        if res.error is None:
            res.exit, res.error = self.stop_reason, self.stop_why  # completed by _finish

    def describe_vcpu(self, v):
        """'vCPU 1 at rip 0x100012 spin+0x2: jmp 0x100010, looping in 0x100010-0x100014
        (spin+0x0..spin+0x4)': where a vCPU is, and the loop it spins in when it spins in one."""
        from ..disasm import loop_range

        rip = self._rip(v)
        text = f"vCPU {v.vcpu_id} at rip {rip:#x} {self.symbolize(rip)}: {self.insn_text(v, rip) or '?'}"
        loop = loop_range(self._code_reader(v), rip)
        if loop is not None:
            lo, hi = loop
            text += f", looping in {lo:#x}-{hi:#x} ({self.symbolize(lo)}..{self.symbolize(hi - 1)})"
        return text

    def insn_text(self, v, rip):
        """The instruction at ``rip``, disassembled (None if it cannot be read or decoded)."""
        from ..disasm import disassemble_one

        return disassemble_one(self._code_reader(v)(rip, 15), rip)

    def _code_reader(self, v):
        """read(gva, n): the guest's code bytes.  A TD's private memory is not the host's to read:
        its code is read from the image the TD was built from (what its memory holds there)."""
        if self.td:
            return lambda gva, n: self.image.read(gva, n) or b""
        return v.read_guest_virt

    def _host_task(self, event, who, res):
        from .hostevents import run_event
        from ..kvm.kvm import KvmIoctlError

        def body():
            try:
                run_event(event, self, who)
            except KvmIoctlError as e:
                if res.error is None:
                    res.exit, res.error = "ioctl_error", f"{who}: {event.text}: {e}"

        return body

    def _host_thread(self, fn, name, res):
        """A selftest's host thread (pthread_create()): ``fn()`` on a host task of the scheduler.
        An exception it raises ends the run as a failed host assertion."""

        def body():
            try:
                fn()
            except Exception as e:
                if is_scheduler_control(e):
                    raise
                self._host_failed(res, e, f"host thread {name}")

        return body

    def _host_failed(self, res, e, who):
        """A selftest's host code raised ``e`` (its TEST_ASSERT): the run ends with exit
        "host_assert"; the other vCPUs are stopped as after any error."""
        self.kvm.touch_all()
        if res.error is None:
            res.exit, res.error = "host_assert", f"{who}: {describe_exception(e)}"
            res.host_exception = e
        for o in self.vcpus:
            o.kick_signal()

    def migrate(self, start, end):
        """Page migration of the host pages behind guest [start, end) (migrate_pages()): the
        mmu_notifier invalidation, migration entries, the contents moved, the new PTEs, and the
        old pages poisoned and freed."""
        kvm, mm = self.kvm, self.host.mm
        hva_start, hva_end = self.hva + start, self.hva + end
        kvm.mmu_notifier_invalidate_range_start(hva_start, hva_end)
        old = mm.set_migration_entries(hva_start, hva_end)
        kvm.mmu_notifier_invalidate_range_end()
        if kvm.sched is not None:
            kvm.sched.point(None, "migrate_copy")
        new = mm.move_and_map(old)
        if self.tracer.enabled:
            self.tracer.emit("host_migrate", msg=" ".join(f"{old[h]:#x}->{new[h]:#x}" for h in sorted(old)))
        for pfn in old.values():
            kvm.check_page_freed(pfn, "page migration")
        mm.free_old(old)

    def _host_converted(self, gpa):
        return any(e.kind in ("shared", "private") and e.start <= gpa < e.end for e in self.host_events)

    def gmem_punch_hole(self, start, end):
        """What QEMU does after converting to shared: punch the range out of guest_memfd."""
        self.kvm.kvm_gmem_punch_hole(start >> 12, end >> 12)

    def _step(self, v, res, ended):
        """One KVM_RUN of ``v`` and its userspace exit; True when the vCPU is done."""
        if self.stop_reason is not None:
            self._stopped(v, res, ended)  # the VM is stopped: no vCPU enters again
            return True
        try:
            run = v.run()
        except KvmIoctlError as e:
            if e.run is not None and e.run.exit_reason == KVM_EXIT_MEMORY_FAULT:
                # -EFAULT with kvm_run.memory_fault filled in: userspace decides (QEMU converts).
                run = e.run
                run.errno = e.errno
            else:
                # KVM_RUN returned an error: -ENOMEM, -EFAULT, or -EIO once the VM is dead
                # (kvm_vcpu_ioctl() checks kvm->vm_dead, vcpu_enter_guest() KVM_REQ_VM_DEAD).
                ended[v.vcpu_id] = "ioctl_error"
                if res.error is None:
                    res.exit, res.error = "ioctl_error", f"vCPU {v.vcpu_id}: KVM_RUN failed: {e}"
                    res.errno = e.errno
                return True
        if run.exit_reason == KVM_EXIT_INTR and self.stop_reason is not None:
            self._stopped(v, res, ended)  # a signal, a watchdog
            return True
        if (res.error is not None or self.kvm.violations) and run.exit_reason == KVM_EXIT_INTR:
            ended[v.vcpu_id] = "stopped"  # stopped by the VMM after another vCPU's error
            return True
        outcome = self._userspace_exit(v, run, res)
        if outcome is not None:
            ended[v.vcpu_id] = outcome
            return True
        return False

    def _finish(self, res, ended, collect_regs):
        if self.stop_reason is not None and res.exit == self.stop_reason:
            # Stopped: every vCPU still running, where it is (its last KVM_RUN has returned).
            running = [v for v in self.vcpus if ended.get(v.vcpu_id, self.stop_reason) in (self.stop_reason, "stopped")]
            for v in running:
                ended[v.vcpu_id] = self.stop_reason
            where = [self.describe_vcpu(v) for v in running] or ["no vCPU was running"]
            if self.stop_reason == "interrupted":
                # Interrupted: where every vCPU is, those that had ended too.
                where += [
                    f"vCPU {v.vcpu_id} ended ({ended[v.vcpu_id]}) at rip {rip:#x} {self.symbolize(rip)}: "
                    f"{self.insn_text(v, rip) or '?'}"
                    for v in self.vcpus
                    if v not in running
                    for rip in [self._rip(v)]
                ]
            res.error = f"{self.stop_why}: {'; '.join(where)}"
        if res.error is None and self.kvm.violations:
            res.exit, res.error = "checker", f"checker: {self.kvm.violations[0]}"
        if res.error is None and self.check_at_end and not self.kvm.vm_dead:
            from ..checkers.check import check_vm

            problems = check_vm(self.kvm)
            if problems:
                more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
                res.exit, res.error = "checker", f"checker: at the end of the run: {problems[0]}{more}"
        if res.error is None:
            res.exit = "hlt"
        res.vcpu_exits = [ended.get(v.vcpu_id, "running") for v in self.vcpus]
        res.vcpus = [v.get_regs() for v in self.vcpus] if collect_regs else []
        res.stats = self.stats()
        res.shared_bit = self.shared_bit if self.td else None
        res.console = self.console.decode("latin-1")
        if self.result_check is not None and not self.kvm.violations:
            # A selftest's checks after the run (its TEST_ASSERTs after pthread_join()): an
            # exception fails the run; passing, they accept the way it ended.
            try:
                self.result_check(res)
                res.accepted = True
            except Exception as e:
                if is_scheduler_control(e):
                    raise
                if res.error is None:  # (else the run's own error stands: the first wins)
                    res.host_exception = e
                    res.exit, res.error = "host_assert", f"host check: {describe_exception(e)}"
        return res

    def _userspace_exit(self, v, run, res):
        """Handle one KVM_RUN return; the vCPU's final exit name, or None to run it again."""
        r = run.exit_reason
        if r == KVM_EXIT_MEMORY_FAULT and self._host_converted(run.gpa):
            # A page a host event converted under the guest: convert it back to what the guest
            # accessed, as QEMU does on KVM_EXIT_MEMORY_FAULT (kvm_convert_memory), and go on.
            gfn = run.gpa >> 12
            self.kvm.set_memory_attributes(gfn, gfn + 1, private=run.private)
            if not run.private:
                self.gmem_punch_hole(gfn << 12, (gfn + 1) << 12)
            return None
        if r in (KVM_EXIT_MEMORY_FAULT, KVM_EXIT_MMIO) and self._host_removed(run):
            # The guest touched memory a host event deleted (or moved away): what the
            # scenario expects (private_mem_kvm_exits_test asserts KVM_EXIT_MEMORY_FAULT): the
            # vCPU stops there, and the run is not an error.
            if r == KVM_EXIT_MEMORY_FAULT and res.memory_fault is None:
                res.memory_fault = run.memory_fault.as_dict()
            return EXIT_NAMES[r]
        addr = guestabi.ucall_arch_get_ucall(v, run, self.td) if r in (KVM_EXIT_IO, KVM_EXIT_MMIO) else None
        if addr is not None:
            # The ucall's own port or GPA, not a device: no device footprint (emu.checkers.dpor)
            if r == KVM_EXIT_IO:
                self.pio_counts[run.port] = self.pio_counts.get(run.port, 0) + 1
            return self._ucall(v, addr, res)
        if r == KVM_EXIT_HYPERCALL and run.nr == guestabi.EMU_HC_REPORT:
            res.reports.append((v.vcpu_id, run.args[0]))
            self.tracer.emit(
                "guest_report", v.vcpu_id, msg=f"value {run.args[0]:#x} ({run.args[0]})"
            ) if self.tracer.enabled else None
            return None
        if r == KVM_EXIT_HYPERCALL and run.nr == guestabi.EMU_HC_SYNC:
            # An assembler guest's sync (no ucall pool): a UCALL_SYNC with no arguments.
            from .ucall_common import Ucall, UCALL_SYNC

            return self._ucall_done(v, Ucall(UCALL_SYNC, stage=run.args[0], vcpu=v.vcpu_id), res)
        if r == KVM_EXIT_HLT:
            return "hlt"
        if r == KVM_EXIT_IO:
            self._pio(v, run)
            return None
        if r in (KVM_EXIT_X86_RDMSR, KVM_EXIT_X86_WRMSR):
            self._msr_exit(v, run)
            return None
        if r == KVM_EXIT_HYPERCALL and run.nr == KVM_HC_MAP_GPA_RANGE:
            run.ret = self._map_gpa_range(run.args[0], run.args[1] << 12, run.args[2])
            return None
        rip = self._rip(v)
        if r == KVM_EXIT_SYSTEM_EVENT:
            res.exit = "fail"
            res.error = (
                f"vCPU {v.vcpu_id}: the TD reported a fatal error (TDG.VP.VMCALL<ReportFatalError>) "
                f"with code {run.data[0]:#x}"
            )
            return "fail"
        if r == KVM_EXIT_HYPERCALL and run.nr == guestabi.EMU_HC_FAIL:
            # Let the runtime restore the guest's registers and reach its final HLT, so the
            # register dump shows the guest at its FAIL (as guest/lib/runtime.S promises).
            try:
                v.run()
            except KvmIoctlError:
                pass
            res.exit = "fail"
            res.error = f"vCPU {v.vcpu_id}: the guest failed with code {run.args[0]:#x}{self._fail_site(v)}"
            return "fail"
        if r == KVM_EXIT_HYPERCALL and run.nr == guestabi.EMU_HC_ASSERT:
            res.exit = "fail"
            res.guest_assert = self._assert_site(v.vcpu_id, *run.args[:3])
            res.error = f"vCPU {v.vcpu_id}: {res.guest_assert['message']}"
            self.tracer.emit("guest_assert", v.vcpu_id, msg=res.error) if self.tracer.enabled else None
            return "fail"
        name = EXIT_NAMES.get(r, str(r))
        if r == KVM_EXIT_MMIO and getattr(run, "len", None) is not None:
            # An access KVM decoded for us (a TD's TDG.VP.VMCALL<#VE.RequestMMIO>): the device's.
            why = self._mmio(run)
            if why is None:
                return None
            msg = (
                f"{'write to' if run.is_write else 'read of'} {run.len} bytes at GPA {run.phys_addr:#x} "
                f"(MMIO: {why}) at rip {rip:#x} {self.symbolize(rip)}"
            )
        elif r == KVM_EXIT_MMIO:
            insn = v.disassemble(rip)
            s = self.kvm.gfn_to_memslot(run.phys_addr >> 12)
            slot = "no memslot" if s is None else ("a read-only memslot" if s.readonly else f"memslot {s.id}")
            device = "MMIO with no device"
            if s is None and run.phys_addr >> 12 == guestabi.EMU_MMIO_GPA >> 12:
                # KVM would emulate the instruction (x86_emulate_instruction()); the model has no
                # emulator, so it cannot say what the access is: only a TD's device accesses,
                # which the guest decodes itself, reach the device.
                device = "the MMIO device, which this model serves only to a TD: KVM has no instruction emulator"
            msg = (
                f"{'write to' if run.is_write else 'read of'} GPA {run.phys_addr:#x} ({slot}, {device}) "
                f"at rip {rip:#x} {self.symbolize(rip)}: {insn}"
            )
        elif r == KVM_EXIT_SHUTDOWN:
            vec = VECTOR_NAMES.get(run.vector, f"vector {run.vector}")
            detail = ""
            if run.error_code is not None:
                detail += f" error code {run.error_code:#x}"
            if run.cr2 is not None:
                detail += f" cr2 {run.cr2:#x}"
            insn = run.insn or (self.insn_text(v, run.rip) if self.td else None)  # (a TD's: from its image)
            insn = f": {insn}" if insn else ""
            why = getattr(run, "why", None)
            how = "(no IDT: triple fault)" if getattr(run, "no_idt", True) or not why else f"(triple fault: {why})"
            ve = getattr(run, "ve_exit_reason", None)
            if ve is not None:
                # a TD: say what the #VE stood for, and who reacted how
                vec += f" (for {VE_CAUSES.get(ve, f'exit reason {ve}')})"
                how += "; the module: TD exit TRIPLE_FAULT; KVM: KVM_EXIT_SHUTDOWN"
            msg = f"unhandled guest exception {vec}{detail} at rip {run.rip:#x} {self.symbolize(run.rip)}{insn} {how}"
        elif r == KVM_EXIT_INTR:
            name = "timeout"
            msg = f"watchdog: the vCPU made no progress ({run.reason}) at rip {rip:#x} {self.symbolize(rip)}"
        elif r == KVM_EXIT_MEMORY_FAULT:
            gfn = run.gpa >> 12
            attr = "private" if self.kvm.mem_is_private(gfn) else "shared"
            slot = self.kvm.gfn_to_memslot(gfn)
            if slot is None:
                why = "outside every memslot"
            elif run.private and not slot.can_be_private:
                why = f"{attr}, in memslot {slot.id}, which has no guest_memfd"
            else:
                why = f"{attr} (the guest did not convert it)"
            msg = (
                f"KVM_EXIT_MEMORY_FAULT (KVM_RUN: -EFAULT): {'private' if run.private else 'shared'} access "
                f"to GPA {run.gpa:#x}, which is {why}, at rip {rip:#x} {self.symbolize(rip)}"
            )
            res.errno = getattr(run, "errno", 14)
            res.memory_fault = run.memory_fault.as_dict()
        elif r == KVM_EXIT_INTERNAL_ERROR:
            msg = f"internal error: {run.reason}"
        else:
            msg = f"unexpected exit {name}"
        res.exit = name
        res.error = f"vCPU {v.vcpu_id}: {msg}"
        return name

    def _map_gpa_range(self, gpa, size, attrs):
        """KVM_HC_MAP_GPA_RANGE (KVM_EXIT_HYPERCALL): convert, as the private-memory selftests'
        handle_exit_hypercall() does with their flags (guestabi.MAP_GPA_*: fallocate() first,
        PUNCH_HOLE when going shared, then the attributes), or as QEMU does with KVM's ABI
        (KVM_MAP_GPA_RANGE_ENCRYPTED: private; 0: shared).  Returns kvm_run.hypercall.ret."""
        discard = False
        if attrs & KVM_MAP_GPA_RANGE_ENCRYPTED:
            set_attributes, private, fallocate = True, True, False
        elif attrs & guestabi.MAP_GPA_SELFTEST_FLAGS:
            set_attributes = bool(attrs & guestabi.MAP_GPA_SET_ATTRIBUTES)
            private = not attrs & guestabi.MAP_GPA_SHARED
            fallocate = bool(attrs & guestabi.MAP_GPA_DO_FALLOCATE)
        else:
            # QEMU's kvm_convert_memory(): memory made shared is then discarded from guest_memfd
            # (ram_block_discard_guest_memfd_range(): PUNCH_HOLE), its pages back to the host.
            set_attributes, private, fallocate, discard = True, False, False, True
        try:
            if fallocate:
                self.guest_mem_fallocate(gpa, size, punch_hole=not private)
            if set_attributes:
                self.set_memory_attributes(gpa, size, private)
            if discard:
                self.guest_mem_fallocate(gpa, size, punch_hole=True)
        except KvmIoctlError as e:
            if self.tracer.enabled:
                self.tracer.emit("host_event", "vmm", msg=f"KVM_HC_MAP_GPA_RANGE {gpa:#x}+{size:#x}: {e}")
            return (-e.errno) & ((1 << 64) - 1)
        return 0

    def _host_removed(self, run):
        gpa = run.gpa if run.exit_reason == KVM_EXIT_MEMORY_FAULT else run.phys_addr
        return any(a <= gpa < b for a, b in self.removed_ranges + self.arriving_ranges)

    def _assert_site(self, vcpu, site, a, b):
        """The failed assert as a dict (vcpu, file, line, expr, kind, a, b, message), the message
        'GUEST_ASSERT_EQ failed at guest/x.c:42: a == b (0x3 != 0x4)'.  The assert site and its
        strings are constants in the image's .rodata: they are read from the loaded ELF image
        (Machine.image), which is what guest memory holds there, so the same code serves a TD,
        whose private memory the host cannot read."""
        raw = self.image.read(site, struct.calcsize(guestabi.ASSERT_SITE_FORMAT))
        if raw is None:
            return {
                "vcpu": vcpu,
                "file": None,
                "line": None,
                "expr": None,
                "kind": None,
                "a": a,
                "b": b,
                "message": f"GUEST_ASSERT failed (its site {site:#x} is not in the guest image; values {a:#x}, {b:#x})",
            }
        file_ptr, expr_ptr, line, kind = struct.unpack(guestabi.ASSERT_SITE_FORMAT, raw)
        file = self.image.read_cstring(file_ptr) or f"<file at {file_ptr:#x}>"
        expr = self.image.read_cstring(expr_ptr) or f"<expression at {expr_ptr:#x}>"
        if kind == guestabi.ASSERT_KIND_EQ:
            msg = f"GUEST_ASSERT_EQ failed at {file}:{line}: {expr} ({a:#x} != {b:#x})"
        else:
            msg = f"GUEST_ASSERT failed at {file}:{line}: {expr}"
        return {
            "vcpu": vcpu,
            "file": file,
            "line": line,
            "expr": expr,
            "kind": "eq" if kind == guestabi.ASSERT_KIND_EQ else "assert",
            "a": a,
            "b": b,
            "message": msg,
        }

    def _fail_site(self, v):
        """' (FAIL at sym+off)': where the runtime's emu_fail was called from (its return address)."""
        if self.td:
            return ""
        ret = int.from_bytes(v.hw.read_guest(v.hw.reg("rsp"), 8).ljust(8, b"\0"), "little")
        return f" (FAIL at {self.symbolize(ret - 5)})" if ret else ""

    def _rip(self, v):
        if self.td:
            from tdxmod.module import MD_TDVPS_RIP

            return self.kvm.x86_ops.vp_rd(v, MD_TDVPS_RIP) or 0
        return v.hw.reg("rip")

    def stats(self):
        kvm = self.kvm
        vs = [v.stat for v in self.vcpus]
        total = lambda k: sum(s[k] for s in vs)
        return {
            "ept_violations": total("ept_violations"),
            "ept_misconfigs": total("ept_misconfigs"),
            "exits": total("exits"),
            "pf_fixed": total("pf_fixed"),
            "pf_spurious": total("pf_spurious"),
            "pf_retry": total("pf_retry"),
            "pf_emulate": total("pf_emulate"),
            "hypercalls": total("hypercalls"),
            "io_exits": total("io_exits"),
            "tlb_flushes": total("tlb_flush"),
            "tlb_fills": sum(v.hw.stats_fills for v in self.vcpus),
            "pages_mapped": {"4k": kvm.stat["pages_4k"], "2m": kvm.stat["pages_2m"], "1g": kvm.stat["pages_1g"]},
            "page_tables": kvm.tdp_mmu.pages,
            "zaps": kvm.stat["zaps"],
            "remote_tlb_flushes": kvm.stat["remote_tlb_flush"],
            "seamcalls": dict(getattr(kvm.x86_ops, "seamcall_counts", {})),
            "kvm_bug_on": kvm.stat["kvm_bug_on"],
            "guest_blocks": self.guest_blocks,
        }

    def destroy(self):
        self.kvm.destroy()

    def prepare_snapshot(self, limited=False):
        """Ready the machine to be forked from many times (emu.explore, emu.campaign): do once
        here what every forked run would do first at the same cost.  A vCPU that can share the
        CPUs with another task, or whose runs are ``limited`` (max_insns), arms its slice budget
        (emu.hw.slice) at its first entry, which flushes Unicorn's translated code (~0.2 ms,
        most of it in memory the child must copy).  Armed now, it is the same hook with no
        budget until slicing starts, and no code was translated yet to lose."""
        if self.nvcpus > 1 or self.host_events or self.host_threads or limited:
            for v in self.vcpus:
                if v.hw is not None and v.hw._budget is None:
                    v.hw._arm_budget()


def _count(n):
    """12345678 -> '12.3 M'."""
    for scale, unit in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
