"""Selftests written the way KVM selftests are: a C guest (guest/include/emu.h) and its host side in
Python.  The public name is ``emu.selftest``.

    from emu.selftest import GuestVM, UCALL_SYNC, UCALL_DONE, explore

    vm = GuestVM("tests/guests/conv.c", vm="sw-protected", vcpus=2)
    vm.mem_region_add(10, 1 << 32, 4 << 20, guest_memfd=True)   # vm_mem_add(): host memory + memslot
    vm.sync_global_to_guest("base_gpa", 1 << 32)                # before the run (a TD: before measuring)

    @vm.on_ucall                                   # each vCPU's thread: vcpu_run() + get_ucall()
    def host(vcpu, uc):
        if uc.cmd == UCALL_SYNC and uc.stage == 1:
            gpa, size, pattern = uc.args[:3]
            assert vm.read(gpa, size) == bytes([pattern]) * size   # TEST_ASSERT is a plain assert
            vm.mem_set_private(gpa, size)

    def deleter():                                 # a host thread (pthread_create())
        vm.wait_for(lambda: seen_stage_2)          # yields to the vCPUs until it holds
        vm.mem_region_delete(10)
    vm.spawn(deleter)

    run = vm.run()                                 # GuestRun
    run.assert_ok()                                # REPORT_GUEST_ASSERT / TEST_ASSERT failures raise
    run.exit, run.errno, run.memory_fault          # "memory_fault", 14, {"flags", "gpa", "size"}

    result = explore(lambda: make_vm(), random=200, seed=1)   # the same scenario, interleaved
    assert not result.failures, result.failures[0].error

The guest is a .c (compiled, see emu.userspace.guests), a .S, an ELF or a name from guest/.
A guest that does not build raises emu.userspace.vmm.MachineError with the compiler's output.

The VM is built at the first run(), read() or ``.machine`` (a KVM selftest's
vm_create_with_vcpus() plus what was configured before: memslots, globals, attributes).  Host
operations refused as upstream refuses them raise emu.kvm.kvm.KvmIoctlError with upstream's
errno.  ``on_ucall`` callbacks run on the vCPU's own scheduler task, host threads are tasks
beside the vCPUs, and a run with either is scheduled (even with one vCPU), so ``explore``
interleaves them.  docs/selftests.md is the guide.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from . import guestabi, guests, loader
from .ucall_common import (
    UCALL_NONE,
    UCALL_SYNC,
    UCALL_ABORT,
    UCALL_PRINTF,
    UCALL_DONE,  # noqa: F401
    UCALL_UNHANDLED,
    UCALL_MAX_ARGS,
    Ucall,
)
from .vmm import Machine, MachineError, MemRegion, parse_size, VM_TYPES as _MACHINE_VM_TYPES
from ..kvm.kvm_host import KvmIoctlError, EINVAL, EEXIST
from ..kvm.uapi import KVM_USER_MEM_SLOTS, KVM_MEMORY_ATTRIBUTE_PRIVATE  # noqa: F401

VM_TYPES = ("default", "tdx")
# The VM types with private memory (memory attributes, guest_memfd).
PRIVATE_VM_TYPES = ("sw-protected", "tdx")
ALL_VM_TYPES = ("default", "sw-protected", "tdx")
HOST_RESERVE = 64 << 20  # host memory kept for memslots added during the run


@dataclasses.dataclass(frozen=True)
class GuestAssert:
    """A GUEST_ASSERT (or _EQ, _NE, ..., __GUEST_ASSERT, GUEST_FAIL) that failed: where, what, and
    for a comparison the two values."""

    vcpu: int
    file: str
    line: int
    expr: str
    kind: str  # "assert", "eq", "ne", "lt", "le", "gt", "ge" or "fail"
    a: int
    b: int
    message: str  # 'GUEST_ASSERT_EQ failed at x.c:42: a == b (0x3 != 0x4)'


class GuestRun:
    """The outcome of one run of a guest."""

    def __init__(self, machine: Machine, result: Any) -> None:
        self.machine = machine
        self.result = result  # emu.userspace.vmm.Result: exit, error, stats, vcpus, ...
        self.syncs = list(result.syncs)  # [(vcpu, stage, *args)] of GUEST_SYNC(_ARGS), in order
        self.reports = list(result.reports)  # [(vcpu, value)] of emu_report, in order
        self.printfs = list(result.printfs)  # [(vcpu, text)] of GUEST_PRINTF, in order
        ga = result.guest_assert
        self.guest_assert = GuestAssert(**ga) if ga is not None else None

    @property
    def exit(self) -> str:
        """ "hlt" when every vCPU finished (GUEST_DONE or returned from guest_main), else the
        exit that ended the run: "fail" for a failed GUEST_ASSERT, "host_assert" for an
        exception in the host side (on_ucall, a host thread, a check), "memory_fault" for
        KVM_EXIT_MEMORY_FAULT, ..."""
        return self.result.exit

    @property
    def error(self) -> str | None:
        """One line when the run ended in an error, else None."""
        return self.result.error

    @property
    def errno(self) -> int | None:
        """KVM_RUN's errno when it failed (14, EFAULT, for KVM_EXIT_MEMORY_FAULT), else None."""
        return self.result.errno

    @property
    def memory_fault(self) -> dict[str, int] | None:
        """kvm_run.memory_fault of the run's KVM_EXIT_MEMORY_FAULT: {"flags", "gpa", "size"}
        (flags bit 3 = KVM_MEMORY_EXIT_FLAG_PRIVATE), else None."""
        return self.result.memory_fault

    @property
    def host_exception(self) -> BaseException | None:
        """The exception the host side raised (exit "host_assert"), else None."""
        return self.result.host_exception

    @property
    def ok(self) -> bool:
        return self.result.error is None

    def syncs_of(self, vcpu: int) -> list[int]:
        """The stages vCPU ``vcpu`` passed to GUEST_SYNC (and GUEST_SYNC_ARGS), in order."""
        return [s[1] for s in self.syncs if s[0] == vcpu]

    def reports_of(self, vcpu: int) -> list[int]:
        """The values vCPU ``vcpu`` reported, in order."""
        return [v for c, v in self.reports if c == vcpu]

    def assert_ok(self) -> GuestRun:
        """Raise AssertionError with the guest's message when a GUEST_ASSERT failed, with the host
        side's exception (chained) when it raised, or when the run ended in any other error
        (what REPORT_GUEST_ASSERT and TEST_ASSERT do in a KVM selftest)."""
        if self.error is not None:
            raise AssertionError(f"guest run failed ({self.exit}): {self.error}") from self.host_exception
        return self

    def __repr__(self):
        return f"GuestRun(exit={self.exit!r}, error={self.error!r}, syncs={self.syncs!r}, reports={self.reports!r})"


class GuestVM:
    """A VM built for a guest: ``GuestVM("my.c", vm="tdx", vcpus=2).run()``.

    ``vm`` is "default", "sw-protected" (KVM_X86_SW_PROTECTED_VM) or "tdx"; ``mem`` is bytes or a
    size such as "64M"; ``host_reserve`` the host memory kept for memslots added while the guest
    runs; the other keywords go to emu.userspace.vmm.Machine (``hugepages``, ``tracer``,
    ``inject``, ``seed``, ``bugs``, ``host_events``, ...)."""

    def __init__(
        self,
        guest: str | os.PathLike[str],
        vm: str = "default",
        vcpus: int = 1,
        mem: int | str = "64M",
        host_reserve: int | str = HOST_RESERVE,
        **machine_kwargs: Any,
    ) -> None:
        if vm not in _MACHINE_VM_TYPES:
            raise MachineError(f"unknown VM type {vm!r} ({', '.join(_MACHINE_VM_TYPES)})")
        self.guest = str(guest)
        self.vm = vm
        self.vcpus = vcpus
        self.mem = parse_size(mem) if isinstance(mem, str) else mem
        self.host_reserve = parse_size(host_reserve) if isinstance(host_reserve, str) else host_reserve
        self.machine_kwargs = machine_kwargs
        self.private_mem = vm in PRIVATE_VM_TYPES
        try:
            self.image = loader.load_elf(guests.resolve(self.guest))
        except (guests.GuestError, loader.LoadError) as e:
            raise MachineError(str(e)) from None
        self._machine: Machine | None = None
        self._regions: dict[int, MemRegion] = {}  # slot -> MemRegion, until the VM is built
        self._globals: dict[str, int | bytes] = {}
        self._virt_maps: list[tuple[int, int]] = []
        self._deferred: list = []  # host operations to make once the VM is built, in order
        self._on_ucall: Callable[[int, Ucall], None] | None = None
        self._threads: list[tuple[Callable[[], None], str]] = []
        self._checks: list[Callable[[GuestRun], None]] = []
        self._ran = False

    # -- the VM ---------------------------------------------------------------------------------------
    @property
    def machine(self) -> Machine:
        """The emu.userspace.vmm.Machine (built now if it was not)."""
        if self._machine is None:
            self._build()
        assert self._machine is not None
        return self._machine

    @property
    def built(self) -> bool:
        return self._machine is not None

    def _build(self):
        m = Machine(
            self.guest,
            vm=self.vm,
            mem=self.mem,
            vcpus=self.vcpus,
            regions=list(self._regions.values()),
            guest_globals=self._globals,
            virt_maps=self._virt_maps,
            host_reserve=self.host_reserve,
            **self.machine_kwargs,
        )
        self._machine = m
        self._install_hooks()
        for op in self._deferred:
            op(m)
        self._deferred = []

    def _install_hooks(self):
        m = self._machine
        m.on_ucall = self._on_ucall
        m.host_threads = list(self._threads)
        if self._checks:
            checks = list(self._checks)
            m.result_check = lambda res: [fn(GuestRun(m, res)) for fn in checks]
        else:
            m.result_check = None

    def run(self) -> GuestRun:
        """Run every vCPU until it finishes (or the run fails); return a GuestRun.  A VM runs once."""
        if self._ran:
            raise RuntimeError("this GuestVM has run: build a new one for another run")
        m = self.machine
        self._install_hooks()
        self._ran = True
        m.check_at_end = True
        return GuestRun(m, m.run())

    # -- the host side ----------------------------------------------------------------------------------
    def on_ucall(self, fn: Callable[[int, Ucall], None]) -> Callable[[int, Ucall], None]:
        """``fn(vcpu_id, uc)`` for every ucall of every vCPU, on that vCPU's own task (a selftest's
        vCPU thread after vcpu_run() and get_ucall()); the vCPU resumes when it returns.  ``uc``:
        emu.userspace.ucall_common.Ucall (cmd, stage, args, text).  An exception ends the run
        (exit "host_assert").  The VMM records syncs and printfs, and a UCALL_ABORT ends the run,
        whether or not there is a callback.  Returns ``fn`` (a decorator)."""
        self._on_ucall = fn
        if self._machine is not None:
            self._machine.on_ucall = fn
        return fn

    def spawn(self, fn: Callable[[], None], name: str | None = None) -> Callable[[], None]:
        """A host thread (pthread_create()): ``fn()`` runs on a task of the scheduler beside the
        vCPUs from the start of the run, so explore interleaves it with them.  An exception ends
        the run (exit "host_assert").  Threads are spawned before the run."""
        if self._ran:
            raise RuntimeError("spawn() a host thread before the run")
        self._threads.append((fn, name or f"thread{len(self._threads)}"))
        if self._machine is not None:
            self._machine.host_threads = list(self._threads)
        return fn

    def check(self, fn: Callable[[GuestRun], None]) -> Callable[[GuestRun], None]:
        """``fn(run)`` after the run (and after every explored schedule) with the GuestRun: the
        selftest's assertions after pthread_join().  An exception fails the run (exit
        "host_assert"); when it returns, the run's ending is accepted as expected (explore counts
        a run with an error exit that every check accepted as passing).  Returns ``fn``."""
        self._checks.append(fn)
        return fn

    def wait_for(self, pred: Callable[[], object]) -> None:
        """Yield until ``pred()`` holds (inside a host thread or an on_ucall callback): the other
        tasks run meanwhile.  If no task could ever make it true, the run ends ("timeout")."""
        sched = self._machine.kvm.sched if self._machine is not None else None
        if sched is None or sched.current is None:
            if pred():
                return
            raise RuntimeError(
                "wait_for() outside a host thread or an on_ucall callback: nothing would make the condition true"
            )
        sched.wait_until(pred, what="host_wait")

    # -- guest memory ---------------------------------------------------------------------------------
    def read(self, gpa: int, size: int) -> bytes:
        """``size`` bytes of guest memory at ``gpa`` through the host's mapping (addr_gpa2hva():
        shared memory; a private page's contents are not there)."""
        return self.machine.read_guest(gpa, size)

    def write(self, gpa: int, data: bytes) -> None:
        """Write guest memory at ``gpa`` through the host's mapping (before the run: once built)."""
        data = bytes(data)
        if self._machine is None:
            self._check_in_memory(gpa, len(data))
            self._deferred.append(lambda m: m.write_guest(gpa, data))
        else:
            self._machine.write_guest(gpa, data)

    def sync_global_to_guest(self, symbol: str, value: int | bytes) -> None:
        """Set the guest's global ``symbol`` to ``value`` (an int, in the symbol's size, or bytes)
        before the run (in a TD, before the image is measured)."""
        if self._machine is not None:
            if self._machine.td:
                raise MachineError(
                    f"sync_global_to_guest({symbol!r}): the TD's image is measured already: "
                    f"set globals before the VM is built (before run(), read(), .machine)"
                )
            addr, data = self._machine.global_bytes(symbol, value)
            self._machine.write_gpa(addr, data)
            return
        probe = Machine.global_bytes.__get__(_ImageOnly(self.image))
        probe(symbol, value)  # the same checks now, the write at build
        self._globals[symbol] = value

    def virt_map(self, gpa: int, size: int) -> None:
        """Map [gpa, gpa + size) in the guest's page tables (identity, 2M pages; in a TD also in
        the shared window) though no memslot is there yet: for memslots added, or moved there,
        while the guest runs.  Before the VM is built."""
        if self._machine is not None:
            raise MachineError("virt_map(): the guest's page tables are built with the VM: map before the run")
        self._virt_maps.append((gpa, size))

    # -- memslots (vm_mem_add, vm_mem_region_delete, vm_mem_region_move) ------------------------------------
    def mem_region_add(self, slot: int, gpa: int, size: int, guest_memfd: bool = True) -> None:
        """A memslot at [gpa, gpa + size) with host memory behind it (and a guest_memfd for its
        private pages, in a TD too).  Before the run it is also mapped in the guest's page tables
        (identity; in a TD also at the shared window)."""
        if self._machine is not None:
            self._machine.add_region(slot, gpa, size, guest_memfd)
            return
        self._check_region(slot, gpa, size, guest_memfd)
        self._regions[slot] = MemRegion(slot, gpa, size, bool(guest_memfd))

    def mem_region_delete(self, slot: int) -> None:
        """KVM_SET_USER_MEMORY_REGION with size 0: delete memslot ``slot``."""
        if self._machine is not None:
            self._machine.delete_region(slot)
            return
        if slot not in self._regions:
            raise KvmIoctlError(EINVAL, f"no memslot {slot}")
        del self._regions[slot]

    def mem_region_move(self, slot: int, new_gpa: int) -> None:
        """Move memslot ``slot`` (same size and host memory) to ``new_gpa``.  KVM refuses to move a
        memslot with a guest_memfd (EINVAL: private memslots are immutable)."""
        if self._machine is not None:
            self._machine.move_region(slot, new_gpa)
            return
        r = self._regions.get(slot)
        if r is None:
            raise KvmIoctlError(EINVAL, f"no memslot {slot}")
        if r.guest_memfd:
            raise KvmIoctlError(EINVAL, f"memslot {slot} has a guest_memfd: it cannot be moved, only deleted")
        if new_gpa % 4096:
            raise KvmIoctlError(EINVAL, "memory region not page aligned")
        self._check_overlap(slot, new_gpa, r.size)
        r.gpa = new_gpa

    # -- memory attributes and guest_memfd ------------------------------------------------------------------
    def set_memory_attributes(self, gpa: int, size: int, private: bool) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES: [gpa, gpa + size) private (``private`` true, or
        KVM_MEMORY_ATTRIBUTE_PRIVATE) or shared.  A default VM refuses private with EINVAL."""
        private = bool(private)
        if self._machine is not None:
            self._machine.set_memory_attributes(gpa, size, private)
            return
        if private and not self.private_mem:
            raise KvmIoctlError(
                EINVAL,
                "KVM_SET_MEMORY_ATTRIBUTES: attributes 0x8 not supported by this VM type "
                "(a default VM has no private memory)",
            )
        if size == 0 or (gpa | size) & 0xFFF or gpa + size > 1 << 52:
            raise KvmIoctlError(
                EINVAL, f"KVM_SET_MEMORY_ATTRIBUTES: bad range {gpa:#x}+{size:#x} (page-aligned, non-empty)"
            )
        self._deferred.append(lambda m: m.set_memory_attributes(gpa, size, private))

    def mem_set_private(self, gpa: int, size: int) -> None:
        """vm_mem_set_private()"""
        self.set_memory_attributes(gpa, size, True)

    def mem_set_shared(self, gpa: int, size: int) -> None:
        """vm_mem_set_shared()"""
        self.set_memory_attributes(gpa, size, False)

    def guest_mem_fallocate(self, gpa: int, size: int, punch_hole: bool) -> None:
        """vm_guest_mem_fallocate(): fallocate() on the guest_memfd behind [gpa, gpa + size);
        ``punch_hole`` drops the pages (KVM unmaps them first), else they are allocated."""
        if self._machine is not None:
            self._machine.guest_mem_fallocate(gpa, size, punch_hole)
            return
        self._deferred.append(lambda m: m.guest_mem_fallocate(gpa, size, punch_hole))

    # -- the checks KVM will make, made now (the VM is built at the run) ----------------------------------
    def _check_region(self, slot, gpa, size, guest_memfd):
        if gpa % 4096 or size % 4096 or size <= 0:
            raise KvmIoctlError(EINVAL, "memory region not page aligned")
        if not 0 <= slot < KVM_USER_MEM_SLOTS:
            raise KvmIoctlError(EINVAL, f"memslot id {slot} out of range (0 to {KVM_USER_MEM_SLOTS - 1})")
        if guest_memfd and not self.private_mem:
            raise KvmIoctlError(
                EINVAL,
                "memslot flags 0x4 not supported by this VM type (KVM_MEM_GUEST_MEMFD needs a VM with private memory)",
            )
        if self.vm == "tdx" and not guest_memfd:
            raise KvmIoctlError(EINVAL, "a TD's memslot needs guest_memfd backing for its private pages")
        if slot == 0 or slot in self._regions:
            raise KvmIoctlError(EINVAL, f"memslot {slot} exists with another size, host address or kind")
        self._check_overlap(slot, gpa, size)

    def _check_overlap(self, slot, gpa, size):
        if gpa < self.mem:
            raise KvmIoctlError(EEXIST, "memslot overlaps slot 0 (the guest's memory)")
        if gpa < guestabi.UCALL_MMIO_GPA + 0x1000 and guestabi.EMU_MMIO_GPA < gpa + size:
            # (KVM would take it; the VMM's MMIO device and the TD's ucall GPA would be gone)
            raise KvmIoctlError(
                EEXIST,
                f"memslot overlaps the VMM's MMIO pages ({guestabi.EMU_MMIO_GPA:#x}: "
                f"the MMIO device and the ucall GPA)",
            )
        for r in self._regions.values():
            if r.slot != slot and gpa < r.end and r.gpa < gpa + size:
                raise KvmIoctlError(EEXIST, f"memslot overlaps slot {r.slot}")

    def _check_in_memory(self, gpa, n):
        if gpa + n <= self.mem:
            return
        if not any(r.gpa <= gpa and gpa + n <= r.end for r in self._regions.values()):
            raise KvmIoctlError(14, f"no memslot of the VMM's covers GPA {gpa:#x}+{n:#x}")


class _ImageOnly:
    """What Machine.global_bytes needs before there is a Machine: the image."""

    def __init__(self, image):
        self.image = image


def run_guest(
    guest: str | os.PathLike[str], vm: str = "default", vcpus: int = 1, mem: int | str = "64M", **machine_kwargs: Any
) -> GuestRun:
    """Build a VM for ``guest``, run it, and return a GuestRun."""
    return GuestVM(guest, vm=vm, vcpus=vcpus, mem=mem, **machine_kwargs).run()


# -- exploring a selftest's scenario ---------------------------------------------------------------------


@dataclasses.dataclass
class Failure:
    """A failing schedule: replay it with ``explore(factory, replay=schedule)``."""

    schedule: str
    error: str
    minimized: str | None = None  # (the first failure) the schedule with every needless deviation dropped
    trace: list[str] | None = None  # (the first failure) the trace of the minimized schedule


class Exploration:
    """What ``explore`` found: ``schedules`` run, ``failures`` (a list of Failure, the first
    minimized and traced), ``complete`` (the bounded space was covered, or every run made)."""

    def __init__(self, result: Any, failures: list[Failure]) -> None:
        self.result = result  # emu.checkers.explore.ExploreResult
        self.schedules = result.runs
        self.failures = failures
        self.complete = result.complete
        self.seconds = result.seconds

    def __repr__(self):
        return f"Exploration(schedules={self.schedules}, failures={len(self.failures)}, complete={self.complete})"


def explore(
    factory: Callable[[], GuestVM],
    random: int | None = None,
    seed: int = 0,
    bound: int | None = None,
    dpor: bool = False,
    depth: int = 3,
    max_runs: int | None = None,
    stop_at_first: bool = True,
    replay: str | None = None,
    check_steps: bool = False,
) -> Exploration:
    """Explore the interleavings of a selftest's scenario: ``factory()`` returns a GuestVM, its
    memslots, globals, callbacks and host threads set up, not run.  It is built once; every run
    starts from that snapshot (in a forked process: the callbacks' state starts afresh each time).

    ``random=N``: N PCT schedules (``seed`` names them, ``depth`` the PCT depth); ``dpor=True``:
    every schedule up to equivalence (within ``bound`` preemptions if given); else bounded
    exhaustive search with ``bound`` preemptions (default 2).  ``max_runs`` caps the runs;
    ``stop_at_first`` stops at the first failure; ``replay="emu-sched/1:..."`` runs one schedule.

    A run fails when the run ends in an error (a failed GUEST_ASSERT, an exception of the host
    side, KVM_EXIT_MEMORY_FAULT, ...) that no ``GuestVM.check`` accepted, when KVM hits a
    KVM_BUG_ON, when an invariant of emu.checkers.check breaks, or when a vCPU's reports differ
    from the non-preemptive run's."""
    from ..checkers.explore import Explorer, Failure as _Failure

    class SelftestExplorer(Explorer):
        def __init__(self):
            self.found = []
            super().__init__(_machine_of(factory), check_steps=check_steps)
            self.inplace = False  # the host side's Python state: every run forks

        def _account(self, res, outcome, trace_strategy):
            first = res.first_failure is None
            super()._account(res, outcome, trace_strategy)
            if outcome.error is None:
                return
            f = res.first_failure if first else None
            if isinstance(f, _Failure):
                self.found.append(Failure(f.schedule, f.error, f.minimized, f.trace))
            else:
                self.found.append(Failure(outcome.schedule, outcome.error))

    ex = SelftestExplorer()
    if replay is not None:
        out = ex.replay(replay)
        from ..checkers.explore import ExploreResult

        res = ExploreResult()
        res.runs, res.complete = 1, True
        found = [] if out.error is None else [Failure(replay, out.error, replay, out.trace)]
        res.failures = len(found)
        return Exploration(res, found)
    if random is not None:
        res = ex.random(random, seed=seed, depth=depth, stop_at_first=stop_at_first)
    elif dpor:
        res = ex.dpor(bound=bound, max_runs=max_runs, stop_at_first=stop_at_first)
    else:
        res = ex.dfs(bound=2 if bound is None else bound, max_runs=max_runs, stop_at_first=stop_at_first)
    return Exploration(res, ex.found)


def _machine_of(factory):
    def build():
        vm = factory()
        if not isinstance(vm, GuestVM):
            raise TypeError(f"explore(factory): the factory must return a GuestVM, not {type(vm).__name__}")
        m = vm.machine
        vm._install_hooks()
        return m

    return build


__all__ = [
    "GuestVM",
    "GuestRun",
    "GuestAssert",
    "Ucall",
    "run_guest",
    "explore",
    "Exploration",
    "Failure",
    "KvmIoctlError",
    "UCALL_NONE",
    "UCALL_SYNC",
    "UCALL_ABORT",
    "UCALL_PRINTF",
    "UCALL_DONE",
    "UCALL_UNHANDLED",
    "UCALL_MAX_ARGS",
    "VM_TYPES",
    "PRIVATE_VM_TYPES",
    "ALL_VM_TYPES",
]
