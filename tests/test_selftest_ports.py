"""Upstream's private-memory selftests, ported: the C guests are in guest/, their host sides here,
written with emu.selftest as the C host sides are written with kvm_util.

    private_mem_conversions_test.c   guest/private_mem_conversions.c   conversions_vm()
    private_mem_kvm_exits_test.c     guest/private_mem_kvm_exits.c     kvm_exits_vm()
    tdx_upm_test.c (intel/tdx)       guest/tdx_upm.c                   upm_vm()

Each runs as upstream runs it (1 and 4 vCPUs, 1 and 2 memslots, on a software-protected VM and
on a TD) and under explore.  The suite runs the whole conversion test on 1 vCPU, a part of it on
4 and in explorations, and a few explored schedules each (EMU_SELFTEST_SCHEDULES, default 8); set
EMU_LONG_TESTS=1 to run all of it on 4 vCPUs and EMU_SELFTEST_SCHEDULES=300 for the full
explorations (minutes; see docs/selftests.md).
"""

import os
import shutil

import pytest

from emu.selftest import GuestVM, UCALL_SYNC, UCALL_DONE, explore

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("clang") is None, reason="no C compiler (gcc or clang)"
)

LONG = bool(os.environ.get("EMU_LONG_TESTS"))
SCHEDULES = int(os.environ.get("EMU_SELFTEST_SCHEDULES", "8"))
SZ_2M = 2 << 20
PAGE_SIZE = 4096


# ---------------------------------------------------------------------------
# private_mem_conversions_test
# ---------------------------------------------------------------------------

BASE_DATA_SLOT = 10
BASE_DATA_GPA = 1 << 32
PER_CPU_DATA_SIZE = SZ_2M + PAGE_SIZE
SYNC_SHARED, SYNC_PRIVATE = 0, 1
ALL_VARIANTS, ALL_RANGES = 0xF, 0x1F


def conversions_vm(vm_type, nr_vcpus=1, nr_memslots=1, variants=ALL_VARIANTS, ranges=ALL_RANGES, **kwargs):
    """test_mem_conversions(): the data memslots with a guest_memfd (memfd_size split in
    nr_memslots), each vCPU's stride, and the vCPU threads' ucall handling
    (__test_mem_conversions()); KVM_HC_MAP_GPA_RANGE is the VMM's, as handle_exit_hypercall()."""
    alignment = SZ_2M
    per_cpu_size = -(-PER_CPU_DATA_SIZE // alignment) * alignment
    memfd_size = per_cpu_size * nr_vcpus
    slot_size = memfd_size // nr_memslots
    assert slot_size * nr_memslots == memfd_size
    vm = GuestVM("private_mem_conversions", vm=vm_type, vcpus=nr_vcpus, **kwargs)
    for i in range(nr_memslots):
        vm.mem_region_add(BASE_DATA_SLOT + i, BASE_DATA_GPA + slot_size * i, slot_size, guest_memfd=True)
    vm.sync_global_to_guest("per_cpu_size", per_cpu_size)
    vm.sync_global_to_guest("test_variants", variants)
    vm.sync_global_to_guest("test_ranges_mask", ranges)
    done = set()

    @vm.on_ucall
    def test_mem_conversions(vcpu, uc):
        if uc.cmd == UCALL_DONE:
            done.add(vcpu)
            return
        if uc.cmd != UCALL_SYNC:
            return  # (UCALL_ABORT ends the run: REPORT_GUEST_ASSERT)
        assert uc.stage in (SYNC_SHARED, SYNC_PRIVATE), f"Unknown sync command '{uc.stage}'"
        gpa, size, current = uc.args[:3]
        for i in range(0, size, PAGE_SIZE):
            nr_bytes = min(PAGE_SIZE, size - i)
            hva = vm.read(gpa + i, nr_bytes)
            # In all cases, the host should observe the shared data.
            bad = next((k for k, b in enumerate(hva) if b != current), None)
            assert bad is None, f"Host expected {current:#x} at gpa {gpa + i + (bad or 0):#x}, got {hva[bad or 0]:#x}"
            # For shared, write the new pattern to guest memory.
            if uc.stage == SYNC_SHARED:
                vm.write(gpa + i, bytes([uc.args[3]]) * nr_bytes)

    @vm.check
    def joined(run):
        run.assert_ok()
        assert done == set(range(nr_vcpus)), f"vCPUs {sorted(done)} finished, of {nr_vcpus}"

    return vm


def expected_syncs(variants, ranges):
    """The syncs one vCPU makes (stage, size) in the test's order: for each explicit variant the
    initial shared check, then per range a private check (4K ranges: two) and a shared one."""
    out = []
    sizes = [PAGE_SIZE, SZ_2M, PAGE_SIZE, SZ_2M, PAGE_SIZE]
    for v in (0, 1):
        if not variants & (1 << v):
            continue
        out.append((SYNC_SHARED, PER_CPU_DATA_SIZE))
        for i, size in enumerate(sizes):
            if ranges & (1 << i):
                if size == PAGE_SIZE:
                    out += [(SYNC_PRIVATE, PAGE_SIZE), (SYNC_PRIVATE, PAGE_SIZE)]
                out.append((SYNC_SHARED, size))
    return out


@pytest.mark.parametrize("vm_type", ["sw-protected", "tdx"])
def test_private_mem_conversions_one_vcpu(vm_type):
    """The whole test: both explicit variants (with and without fallocate), both PUNCH_HOLE
    variants, every range."""
    run = conversions_vm(vm_type, hugepages="2m" if vm_type == "sw-protected" else None).run()
    run.assert_ok()
    assert [(s[1], s[3]) for s in run.syncs] == expected_syncs(ALL_VARIANTS, ALL_RANGES)
    assert all(s[2] == BASE_DATA_GPA or BASE_DATA_GPA < s[2] < BASE_DATA_GPA + PER_CPU_DATA_SIZE for s in run.syncs)
    kvm = run.machine.kvm
    # The PUNCH_HOLE variants leave the vCPU's data private.
    assert kvm.private_gfns.covers(BASE_DATA_GPA >> 12, (BASE_DATA_GPA + PER_CPU_DATA_SIZE) >> 12)
    stats = run.result.stats
    if vm_type == "tdx":
        assert stats["seamcalls"]["TDH_MEM_PAGE_AUG"] > 2 * 513 and stats["seamcalls"]["TDH_MEM_PAGE_REMOVE"] > 513


@pytest.mark.parametrize("vm_type, nr_memslots", [("sw-protected", 1), ("sw-protected", 2), ("tdx", 1)])
def test_private_mem_conversions_four_vcpus(vm_type, nr_memslots):
    """Four vCPUs, each converting its own 4 MiB while the others run (the scheduler interleaves
    them); the 4K ranges (offsets 0, 4K and 2M) and one explicit and one PUNCH_HOLE variant unless
    EMU_LONG_TESTS."""
    variants, ranges = (ALL_VARIANTS, ALL_RANGES) if LONG else (0b1010, 0b10101)
    run = conversions_vm(vm_type, nr_vcpus=4, nr_memslots=nr_memslots, variants=variants, ranges=ranges).run()
    run.assert_ok()
    for v in range(4):
        mine = [(s[1], s[3]) for s in run.syncs if s[0] == v]
        assert mine == expected_syncs(variants, ranges)
        assert all(
            BASE_DATA_GPA + v * 2 * SZ_2M <= s[2] < BASE_DATA_GPA + (v * 2 + 1) * SZ_2M + PAGE_SIZE
            for s in run.syncs
            if s[0] == v
        )
    assert [s.id for s in run.machine.kvm.memslots][-nr_memslots:] == [BASE_DATA_SLOT + i for i in range(nr_memslots)]


def test_private_mem_conversions_host_catches_a_wrong_pattern():
    """The host side checks what it sees: a host that writes the wrong pattern makes the guest's
    memcmp_g fail, with upstream's message."""
    vm = conversions_vm("sw-protected", variants=1, ranges=1)
    real = vm.write
    vm.write = lambda gpa, data: real(gpa, bytes([0x5A]) * len(data))
    run = vm.run()
    assert run.exit == "fail"
    assert run.guest_assert.kind == "assert" and run.guest_assert.expr == "__m[__i] == (u8)(init_p)"
    assert run.error.endswith(f": Guest expected 0xcc at offset 0 (gpa {BASE_DATA_GPA:#x}), got 0x5a")


@pytest.mark.parametrize("vm_type", ["sw-protected", "tdx"])
def test_private_mem_conversions_explored(vm_type):
    """Two vCPUs converting at once, under explore: every schedule passes the test's checks and
    the model's invariants."""
    res = explore(
        lambda: conversions_vm(vm_type, nr_vcpus=2, variants=0b1001 if LONG else 0b1000, ranges=0b1),
        random=SCHEDULES,
        seed=1,
    )
    assert res.failures == [] and res.schedules == SCHEDULES


# ---------------------------------------------------------------------------
# private_mem_kvm_exits_test
# ---------------------------------------------------------------------------

EXITS_TEST_GVA = 0xC0000000
EXITS_TEST_GPA = EXITS_TEST_GVA
EXITS_TEST_NPAGES = 1
EXITS_TEST_SIZE = EXITS_TEST_NPAGES * PAGE_SIZE
EXITS_TEST_SLOT = 10
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3


def expect_private_memory_fault(run):
    assert run.exit == "memory_fault" and run.errno == 14, run.error  # KVM_RUN: -EFAULT
    assert run.memory_fault == {"flags": KVM_MEMORY_EXIT_FLAG_PRIVATE, "gpa": EXITS_TEST_GPA, "size": EXITS_TEST_SIZE}


def kvm_exits_vm(vm_type, deleted=True, **kwargs):
    """test_private_access_memslot_deleted() (``deleted``): a private page whose memslot a host
    thread deletes under the vCPU; test_private_access_memslot_not_private(): a memslot without
    guest_memfd.  Either way KVM_EXIT_MEMORY_FAULT for the private access."""
    vm = GuestVM("private_mem_kvm_exits", vm=vm_type, **kwargs)
    vm.mem_region_add(EXITS_TEST_SLOT, EXITS_TEST_GPA, EXITS_TEST_SIZE, guest_memfd=deleted)
    # Request to access page privately
    vm.mem_set_private(EXITS_TEST_GPA, EXITS_TEST_SIZE)
    if deleted:
        vm.spawn(lambda: vm.mem_region_delete(EXITS_TEST_SLOT), name="delete")
    vm.check(expect_private_memory_fault)
    return vm


@pytest.mark.parametrize("vm_type", ["sw-protected", "tdx"])
def test_private_access_memslot_deleted(vm_type):
    run = kvm_exits_vm(vm_type).run()
    expect_private_memory_fault(run)
    assert run.machine.kvm.gfn_to_memslot(EXITS_TEST_GPA >> 12) is None


def test_private_access_memslot_not_private():
    run = kvm_exits_vm("sw-protected", deleted=False).run()
    expect_private_memory_fault(run)
    assert not run.machine.kvm.gfn_to_memslot(EXITS_TEST_GPA >> 12).can_be_private


@pytest.mark.parametrize("vm_type", ["sw-protected", "tdx"])
def test_private_access_memslot_deleted_explored(vm_type):
    """The deletion at every point of the vCPU's fault (before it, while it maps, after it):
    always KVM_EXIT_MEMORY_FAULT, and no mapping outlives the memslot."""
    res = explore(lambda: kvm_exits_vm(vm_type), random=max(SCHEDULES, 40), seed=2)
    assert res.failures == [] and res.schedules == max(SCHEDULES, 40)


def test_private_access_memslot_deleted_without_the_srcu_wait_is_found():
    """With kvm_swap_active_memslots() not waiting for kvm->srcu (--bug memslot-no-srcu-wait), a
    fault that looked the memslot up before the deletion maps the page after it: explore finds a
    schedule where the checker sees the mapping no memslot covers."""
    res = explore(lambda: kvm_exits_vm("tdx", bugs=["memslot-no-srcu-wait"]), random=200, seed=1)
    assert res.failures
    assert "which no memslot covers" in res.failures[0].error or "is gone, but" in res.failures[0].error


# ---------------------------------------------------------------------------
# tdx_upm_test (Intel's TDX selftests): verify_upm_test_explicit
# ---------------------------------------------------------------------------

PATTERN_CONFIDENCE_CHECK, PATTERN_HOST_FOCUS, PATTERN_GUEST_GENERAL, PATTERN_GUEST_FOCUS = 0x11, 0x22, 0x33, 0x44
TDX_UPM_TEST_AREA_GPA = 0x80000000
TDX_UPM_TEST_AREA_SIZE = SZ_2M
TDX_UPM_GENERAL_AREA_0_SIZE = 1 << 20
TDX_UPM_FOCUS_AREA_SIZE = (32 + 8) << 10
(
    SYNC_CHECK_READ_PRIVATE_MEMORY_FROM_HOST,
    SYNC_CHECK_READ_SHARED_MEMORY_FROM_HOST,
    SYNC_CHECK_READ_PRIVATE_MEMORY_FROM_HOST_AGAIN,
) = 1, 2, 3


def upm_vm(watcher=False, **kwargs):
    """verify_upm_test(): the test area (a guest_memfd memslot, private) with
    PATTERN_CONFIDENCE_CHECK in its host memory; run_selftest()'s checks at each sync.  With
    ``watcher``, a host thread also checks, between the guest's steps, that the host's view of
    the general areas never changes."""
    vm = GuestVM("tdx_upm", vm="tdx", **kwargs)
    vm.mem_region_add(3, TDX_UPM_TEST_AREA_GPA, TDX_UPM_TEST_AREA_SIZE, guest_memfd=True)
    vm.write(TDX_UPM_TEST_AREA_GPA, bytes([PATTERN_CONFIDENCE_CHECK]) * TDX_UPM_TEST_AREA_SIZE)
    vm.mem_set_private(TDX_UPM_TEST_AREA_GPA, TDX_UPM_TEST_AREA_SIZE)
    g0, focus = TDX_UPM_GENERAL_AREA_0_SIZE, TDX_UPM_FOCUS_AREA_SIZE
    stages = []

    def areas():
        area = vm.read(TDX_UPM_TEST_AREA_GPA, TDX_UPM_TEST_AREA_SIZE)
        return area[:g0] + area[g0 + focus :], area[g0 : g0 + focus]

    def same(data, pattern):
        return data == bytes([pattern]) * len(data)

    @vm.on_ucall
    def run_selftest(vcpu, uc):
        if uc.cmd != UCALL_SYNC:
            return
        stages.append(uc.stage)
        general, focus_area = areas()
        if uc.stage == SYNC_CHECK_READ_PRIVATE_MEMORY_FROM_HOST:
            assert same(general, PATTERN_CONFIDENCE_CHECK) and same(focus_area, PATTERN_CONFIDENCE_CHECK), (
                "Host should read PATTERN_CONFIDENCE_CHECK from guest's private memory."
            )
        elif uc.stage == SYNC_CHECK_READ_SHARED_MEMORY_FROM_HOST:
            assert same(focus_area, PATTERN_GUEST_FOCUS), "Host should have the same view of shared memory as guest."
            assert same(general, PATTERN_CONFIDENCE_CHECK), (
                "Host's view of private memory should still be backed by regular memory."
            )
            # Check that host can use shared memory
            vm.write(TDX_UPM_TEST_AREA_GPA + g0, bytes([PATTERN_HOST_FOCUS]) * focus)
            assert same(areas()[1], PATTERN_HOST_FOCUS), "Host should be able to use shared memory."
        else:
            assert uc.stage == SYNC_CHECK_READ_PRIVATE_MEMORY_FROM_HOST_AGAIN
            assert same(general, PATTERN_CONFIDENCE_CHECK) and same(focus_area, PATTERN_HOST_FOCUS), (
                "Host's view of private memory should be backed by regular memory."
            )

    if watcher:

        def watch():
            for stage in (1, 2, 3):
                vm.wait_for(lambda: len(stages) >= stage)
                assert same(areas()[0], PATTERN_CONFIDENCE_CHECK)

        vm.spawn(watch, name="watcher")

    @vm.check
    def passed(run):
        run.assert_ok()
        assert stages == [1, 2, 3]

    return vm


def test_tdx_upm_explicit():
    run = upm_vm().run()
    run.assert_ok()
    assert run.syncs == [(0, 1), (0, 2), (0, 3)]
    kvm = run.machine.kvm
    focus = (TDX_UPM_TEST_AREA_GPA + TDX_UPM_GENERAL_AREA_0_SIZE) >> 12
    assert kvm.mem_is_private(focus) and kvm.mem_is_private(TDX_UPM_TEST_AREA_GPA >> 12)
    assert run.result.stats["seamcalls"]["TDH_MEM_PAGE_REMOVE"] >= TDX_UPM_FOCUS_AREA_SIZE >> 12


def test_tdx_upm_explored():
    res = explore(lambda: upm_vm(watcher=True), random=SCHEDULES, seed=4)
    assert res.failures == [] and res.schedules == SCHEDULES
