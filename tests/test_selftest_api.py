"""The selftest API (emu.selftest, issue 23): the host side of a ucall (on_ucall on the vCPU's task,
uc.cmd/stage/args/text), host threads (spawn, wait_for), host operations by GPA (read, write,
memory attributes, guest_memfd fallocate, memslots, guest globals), checks after the run,
KVM_EXIT_MEMORY_FAULT as upstream, KVM_X86_SW_PROTECTED_VM, emu.h's new macros (GUEST_SYNC_ARGS,
GUEST_PRINTF with upstream's formats, GUEST_FAIL, __GUEST_ASSERT, GUEST_ASSERT_NE/LT/LE/GT/GE,
kvm_hypercall) and explore(factory).
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from emu.selftest import (
    GuestVM,
    KvmIoctlError,
    UCALL_SYNC,
    UCALL_ABORT,
    UCALL_PRINTF,
    UCALL_DONE,
    UCALL_NONE,
    explore,
    run_guest,
)
from emu.userspace import guests
from emu.userspace.vmm import MachineError
from emu.kvm.uapi import KVM_MEMORY_EXIT_FLAG_PRIVATE

REPO = guests.REPO
ALL = ("default", "sw-protected", "tdx")
pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("clang") is None, reason="no C compiler (gcc or clang)"
)


def write_guest(directory, name, body):
    path = directory / f"{name}.c"
    path.write_text('#include "emu.h"\n\n' + body.lstrip("\n"))
    return path


def line_of(path, marker):
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if marker in text:
            return n
    raise AssertionError(marker)


def emu_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "emu", *map(str, args)], cwd=REPO, capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def gdir(tmp_path_factory):
    return tmp_path_factory.mktemp("selftest_api")


# ---------------------------------------------------------------------------
# ucalls: what the host sees
# ---------------------------------------------------------------------------

SYNCS = """
u64 base = 7;

void guest_main(void)
{
	u64 id = emu_vcpu_id();

	GUEST_SYNC(0x10 + id);
	GUEST_SYNC_ARGS(0x20, id, base, 0xffffffffffffffffUL, -1);
	GUEST_SYNC1(0x30);
	GUEST_SYNC3(0x31, 1, 2);
	GUEST_SYNC6(0x32, 1, 2, 3, 4, 5);
	GUEST_UCALL_NONE();
	GUEST_PRINTF("vcpu %d done\\n", (int)id);
}
"""


@pytest.mark.parametrize("vm", ALL)
def test_on_ucall_sees_every_ucall_on_its_vcpus_task(gdir, vm):
    src = write_guest(gdir, "syncs", SYNCS)
    gvm = GuestVM(src, vm=vm, vcpus=2)
    seen = []

    @gvm.on_ucall
    def host(vcpu, uc):
        task = gvm.machine.kvm.sched.current
        seen.append((vcpu, task.index, uc.cmd, uc.stage, uc.args, uc.text))

    run = gvm.run()
    run.assert_ok()
    for v in (0, 1):
        mine = [s[2:] for s in seen if s[0] == v]
        assert mine == [
            (UCALL_SYNC, 0x10 + v, (), None),
            (UCALL_SYNC, 0x20, (v, 7, 2**64 - 1, 2**64 - 1), None),
            (UCALL_SYNC, 0x30, (), None),
            (UCALL_SYNC, 0x31, (1, 2), None),
            (UCALL_SYNC, 0x32, (1, 2, 3, 4, 5), None),
            (UCALL_NONE, None, (), None),
            (UCALL_PRINTF, None, (), f"vcpu {v} done\n"),
            (UCALL_DONE, None, (), None),
        ]
        assert {s[1] for s in seen if s[0] == v} == {v}  # the vCPU's own task runs it
    # the run keeps every argument of each sync, (vcpu, stage) for GUEST_SYNC as before
    assert run.syncs_of(1) == [0x11, 0x20, 0x30, 0x31, 0x32]
    assert [s for s in run.syncs if s[0] == 1] == [
        (1, 0x11),
        (1, 0x20, 1, 7, 2**64 - 1, 2**64 - 1),
        (1, 0x30),
        (1, 0x31, 1, 2),
        (1, 0x32, 1, 2, 3, 4, 5),
    ]
    assert sorted(run.printfs) == [(0, "vcpu 0 done\n"), (1, "vcpu 1 done\n")]
    assert run.exit == "hlt" and run.result.vcpu_exits == ["hlt", "hlt"]


def test_syncs_with_arguments_in_json_and_text(gdir):
    src = write_guest(gdir, "syncs", SYNCS)
    res = emu_cli("run", src, "--vm", "sw-protected", "--json")
    assert res.returncode == 0, res.stderr
    obj = json.loads(res.stdout)
    assert obj["syncs"] == [
        [0, 0x10],
        [0, 0x20, 0, 7, 2**64 - 1, 2**64 - 1],
        [0, 0x30],
        [0, 0x31, 1, 2],
        [0, 0x32, 1, 2, 3, 4, 5],
    ]
    assert obj["printfs"] == [[0, "vcpu 0 done\n"]]
    assert obj["errno"] is None and obj["memory_fault"] is None
    res = emu_cli("run", src, "--vm", "sw-protected")
    assert "  sync    vcpu 0: 0x20 (32) args 0x0, 0x7, 0xffffffffffffffff, 0xffffffffffffffff\n" in res.stdout
    assert "  printf  vcpu 0: vcpu 0 done\n" in res.stdout
    assert "on a sw-protected VM" in res.stdout


# ---------------------------------------------------------------------------
# GUEST_PRINTF: upstream's formats, formatted in the guest
# ---------------------------------------------------------------------------

FORMATS = [
    ('"%d|%i|%u"', "-5, -6, 7", "-5|-6|7"),
    (
        '"%x|%X|%lx|%llx"',
        "0xabcU, 0xabcU, 0x1234567890abUL, 0xffffffffffffffffULL",
        "abc|ABC|1234567890ab|ffffffffffffffff",
    ),
    (
        '"%lu|%ld|%llu"',
        "18446744073709551615UL, -9223372036854775807L - 1, 42ULL",
        "18446744073709551615|-9223372036854775808|42",
    ),
    ('"%u|%x"', "-1, -1", "4294967295|ffffffff"),  # no qualifier: 32 bits
    ('"[%5d][%-5d][%05d][%+d][% d]"', "42, 42, 42, 42, 42", "[   42][42   ][00042][+42][ 42]"),
    (
        '"[%#x][%#lx][%#o][%#x][%08x][%#010x]"',
        "255, 0x10UL, 8, 0, 0xbeef, 0xbeef",
        "[0xff][0x10][010][0x0][0000beef][0x0000beef]",
    ),
    (
        '"[%s][%8s][%-8s][%.3s][%c%c]"',
        '"emu", "emu", "emu", "selftest", \'o\', \'k\'',
        "[emu][     emu][emu     ][sel][ok]",
    ),
    ('"[%p][%p]"', "(void *)0x1000, (void *)0", "[0x00000000001000][0x00000000000000]"),
    ('"%%|%hd|%hhu|%zu"', "(short)-2, 258, (size_t)9", "%|-2|2|9"),
    ('"%*d|%.*s|%.5d"', '6, 7, 2, "abc", 42', "     7|ab|00042"),
]


@pytest.mark.parametrize("fmt, args, want", FORMATS)
def test_guest_printf_formats_as_upstream(gdir, fmt, args, want):
    src = write_guest(
        gdir, f"printf{abs(hash(fmt)) % 10**8}", f"void guest_main(void) {{ GUEST_PRINTF({fmt}, {args}); }}\n"
    )
    run = run_guest(src, vm="default")
    run.assert_ok()
    assert run.printfs == [(0, want)]


def test_guest_printf_cuts_what_does_not_fit(gdir):
    src = write_guest(
        gdir,
        "longprintf",
        """
void guest_main(void)
{
	static char big[2000];

	memset(big, 'x', sizeof(big) - 1);
	GUEST_PRINTF("%s!", big);
}
""",
    )
    run = run_guest(src)
    run.assert_ok()
    assert run.printfs == [(0, "x" * 1023)]  # UCALL_BUFFER_LEN - 1 characters, then the NUL


# ---------------------------------------------------------------------------
# The asserts
# ---------------------------------------------------------------------------

ASSERTS = """
volatile u64 which;
volatile s64 neg = -3;

void guest_main(void)
{
	switch (which) {
	case 0: GUEST_ASSERT_NE(neg, -3); break;                       /* NE */
	case 1: GUEST_ASSERT_LT(neg, -4); break;                       /* LT */
	case 2: GUEST_ASSERT_LE(5, 4); break;                          /* LE */
	case 3: GUEST_ASSERT_GT(neg, 0); break;                        /* GT */
	case 4: GUEST_ASSERT_GE(1, 2); break;                          /* GE */
	case 5: __GUEST_ASSERT(which == 0, "which is %lu, want %d", which, 0); break;   /* FMT */
	case 6: GUEST_FAIL("gave up at %s with %#x", "stage", 0x2a); break;             /* FAIL */
	case 7: GUEST_ASSERT_EQ(neg, 3); break;                        /* EQ */
	}
	GUEST_SYNC(0xbad);
}
"""

EXPECTED = [
    (
        "NE",
        "ne",
        "GUEST_ASSERT_NE failed at {f}:{l}: neg != -3 (0xfffffffffffffffd == 0xfffffffffffffffd)",
        "0xfffffffffffffffd == 0xfffffffffffffffd (neg == -3)",
    ),
    (
        "LT",
        "lt",
        "GUEST_ASSERT_LT failed at {f}:{l}: neg < -4 (0xfffffffffffffffd >= 0xfffffffffffffffc)",
        "0xfffffffffffffffd >= 0xfffffffffffffffc (neg >= -4)",
    ),
    ("LE", "le", "GUEST_ASSERT_LE failed at {f}:{l}: 5 <= 4 (0x5 > 0x4)", "0x5 > 0x4 (5 > 4)"),
    (
        "GT",
        "gt",
        "GUEST_ASSERT_GT failed at {f}:{l}: neg > 0 (0xfffffffffffffffd <= 0x0)",
        "0xfffffffffffffffd <= 0x0 (neg <= 0)",
    ),
    ("GE", "ge", "GUEST_ASSERT_GE failed at {f}:{l}: 1 >= 2 (0x1 < 0x2)", "0x1 < 0x2 (1 < 2)"),
    ("FMT", "assert", "GUEST_ASSERT failed at {f}:{l}: which == 0: which is 5, want 0", "which is 5, want 0"),
    ("FAIL", "fail", "GUEST_FAIL at {f}:{l}: gave up at stage with 0x2a", "gave up at stage with 0x2a"),
    (
        "EQ",
        "eq",
        "GUEST_ASSERT_EQ failed at {f}:{l}: neg == 3 (0xfffffffffffffffd != 0x3)",
        "0xfffffffffffffffd != 0x3 (neg != 3)",
    ),
]


@pytest.mark.parametrize("which", range(len(EXPECTED)))
@pytest.mark.parametrize("vm", ALL)
def test_asserts_name_file_line_values_and_message(gdir, vm, which):
    src = write_guest(gdir, "asserts", ASSERTS)
    marker, kind, message, text = EXPECTED[which]
    line = line_of(src, f"/* {marker} */")
    message = message.format(f=src, l=line)
    gvm = GuestVM(src, vm=vm)
    gvm.sync_global_to_guest("which", which)
    seen = []
    gvm.on_ucall(lambda v, uc: seen.append(uc))
    run = gvm.run()
    assert run.exit == "fail" and run.error == f"vCPU 0: {message}"
    ga = run.guest_assert
    assert (ga.vcpu, ga.file, ga.line, ga.kind, ga.message) == (0, str(src), line, kind, message)
    abort = [uc for uc in seen if uc.cmd == UCALL_ABORT]
    assert len(abort) == 1 and abort[0].text == text
    assert run.syncs == [] and run.result.vcpu_exits == ["fail"]
    with pytest.raises(AssertionError, match=re.escape(message)):
        run.assert_ok()


def test_assert_comparisons_keep_their_values(gdir):
    src = write_guest(gdir, "asserts", ASSERTS)
    gvm = GuestVM(src)
    gvm.sync_global_to_guest("which", 1)
    ga = gvm.run().guest_assert
    assert (ga.expr, ga.a, ga.b) == ("neg < -4", 2**64 - 3, 2**64 - 4)


# ---------------------------------------------------------------------------
# The host side's failures, checks, threads
# ---------------------------------------------------------------------------

STAGES = """
volatile u64 flag;

void guest_main(void)
{
	GUEST_SYNC(1);
	while (!READ_ONCE(flag))
		cpu_relax();
	GUEST_SYNC(2);
}
"""


@pytest.mark.parametrize("vm", ["default", "tdx"])
def test_an_exception_in_on_ucall_is_a_host_assert(gdir, vm):
    src = write_guest(gdir, "stages", STAGES)
    gvm = GuestVM(src, vm=vm)

    @gvm.on_ucall
    def host(vcpu, uc):
        if uc.cmd == UCALL_SYNC:
            assert uc.stage == 2, f"stage {uc.stage}"  # HOSTLINE

    run = gvm.run()
    assert run.exit == "host_assert" and not run.ok
    line = line_of(__import__("pathlib").Path(__file__), "# HOSTLINE")
    assert run.error == (f"vCPU 0: on_ucall(UCALL_SYNC): AssertionError: stage 1 (at test_selftest_api.py:{line})")
    assert isinstance(run.host_exception, AssertionError)
    assert run.syncs == [(0, 1)] and run.result.vcpu_exits == ["host_assert"]
    with pytest.raises(AssertionError) as ei:
        run.assert_ok()
    assert ei.value.__cause__ is run.host_exception


@pytest.mark.parametrize("vm", ALL)
def test_host_thread_waits_for_the_guest_and_writes_its_memory(gdir, vm):
    """A host thread (pthread_create) beside the vCPU: it waits for the first sync, then sets
    the guest's flag through its mapping; the guest, spinning on it, goes on.  In a TD the flag is
    private, so the guest spins on a shared page instead."""
    src = write_guest(
        gdir,
        "hostthread",
        """
void guest_main(void)
{
	volatile u64 *flag = emu_shared_ptr(0x2000000);

	if (emu_is_td())
		GUEST_ASSERT_EQ(emu_map_gpa(0x2000000 | emu_shared_bit(), 4096), 0);
	GUEST_SYNC(1);
	while (!READ_ONCE(*flag))
		cpu_relax();
	GUEST_SYNC(*flag);
}
""",
    )
    gvm = GuestVM(src, vm=vm)
    stages = []
    gvm.on_ucall(lambda v, uc: stages.append(uc.stage) if uc.cmd == UCALL_SYNC else None)
    order = []

    def thread():
        order.append("thread starts")
        gvm.wait_for(lambda: stages == [1])
        order.append("thread writes")
        gvm.write(0x2000000, (0x77).to_bytes(8, "little"))

    gvm.spawn(thread, name="setter")
    run = gvm.run()
    run.assert_ok()
    assert order == ["thread starts", "thread writes"] and run.syncs == [(0, 1), (0, 0x77)]
    assert gvm.read(0x2000000, 8) == (0x77).to_bytes(8, "little")


def test_host_thread_exception_and_a_wait_that_never_ends(gdir):
    src = write_guest(gdir, "stages", STAGES)
    gvm = GuestVM(src)

    def thread():
        raise ValueError("no such thing")

    gvm.spawn(thread, name="broken")
    run = gvm.run()
    assert run.exit == "host_assert" and run.error.startswith("host thread broken: ValueError: no such thing (at ")
    gvm = GuestVM(src)
    gvm.spawn(lambda: gvm.wait_for(lambda: False), name="forever")
    gvm.on_ucall(lambda v, uc: gvm.wait_for(lambda: False) if uc.stage == 1 else None)
    run = gvm.run()
    assert run.exit == "timeout" and "every vCPU is waiting" in run.error
    with pytest.raises(RuntimeError, match="outside a host thread"):
        GuestVM(src).wait_for(lambda: False)


def test_check_accepts_an_expected_ending_and_fails_a_wrong_one(gdir):
    src = write_guest(gdir, "stages", STAGES)
    gvm = GuestVM(src)
    gvm.on_ucall(lambda v, uc: 1 / 0 if uc.stage == 1 else None)

    @gvm.check
    def expected(run):
        assert run.exit == "host_assert" and isinstance(run.host_exception, ZeroDivisionError)

    run = gvm.run()
    assert run.exit == "host_assert" and run.result.accepted
    gvm = GuestVM("hello")

    @gvm.check
    def wanted(run):
        assert run.reports == [], "wanted no reports"

    run = gvm.run()
    assert run.exit == "host_assert" and run.error.startswith("host check: AssertionError: wanted no reports (at ")
    assert not run.result.accepted and isinstance(run.host_exception, AssertionError)


# ---------------------------------------------------------------------------
# Host operations: globals, memory, attributes, guest_memfd, memslots
# ---------------------------------------------------------------------------

GLOBALS = """
u64 word = 1;
u32 half;
u8 bytes[5];
static volatile u64 hidden = 9;

void guest_main(void)
{
	GUEST_SYNC_ARGS(word, half, bytes[0], bytes[4], hidden);
}
"""


@pytest.mark.parametrize("vm", ALL)
def test_sync_global_to_guest(gdir, vm):
    src = write_guest(gdir, "globals", GLOBALS)
    gvm = GuestVM(src, vm=vm)
    gvm.sync_global_to_guest("word", 0x1122334455667788)
    gvm.sync_global_to_guest("half", 0xDEADBEEF)
    gvm.sync_global_to_guest("bytes", b"\x01\x02\x03\x04\x05")
    gvm.sync_global_to_guest("hidden", 3)
    with pytest.raises(MachineError, match="no global 'nope'"):
        gvm.sync_global_to_guest("nope", 1)
    with pytest.raises(MachineError, match="does not fit"):
        gvm.sync_global_to_guest("half", 1 << 32)
    with pytest.raises(MachineError, match="do not fit"):
        gvm.sync_global_to_guest("bytes", b"123456")
    gvm.machine  # built: a TD's image is measured now
    if vm == "tdx":
        with pytest.raises(MachineError, match="measured already"):
            gvm.sync_global_to_guest("word", 2)
    run = gvm.run()
    run.assert_ok()
    assert run.syncs == [(0, 0x1122334455667788, 0xDEADBEEF, 1, 5, 3)]


@pytest.mark.parametrize("vm", ALL)
def test_read_and_write_through_the_host_mapping(gdir, vm):
    src = write_guest(
        gdir,
        "rw",
        """
void guest_main(void)
{
	u64 *region = emu_shared_ptr(0x40000000);

	if (emu_is_td())
		GUEST_ASSERT_EQ(emu_map_gpa(0x40000000 | emu_shared_bit(), 4096), 0);
	GUEST_SYNC(region[0]);
	region[1] = 0x5555;
}
""",
    )
    gvm = GuestVM(src, vm=vm)
    gvm.mem_region_add(5, 0x40000000, 0x200000, guest_memfd=vm != "default")
    if vm == "tdx":
        gvm.mem_set_private(0x40000000, 0x200000)
    gvm.write(0x40000000, (0x4242).to_bytes(8, "little"))  # before the run: once built
    run = gvm.run()
    run.assert_ok()
    assert run.syncs == [(0, 0x4242)]
    assert gvm.read(0x40000008, 8) == (0x5555).to_bytes(8, "little")
    with pytest.raises(KvmIoctlError) as e:
        gvm.read(0x50000000, 8)  # no memslot there
    assert e.value.errno == 14


def test_memory_attributes_as_upstream():
    gvm = GuestVM("hello", vm="default")
    with pytest.raises(KvmIoctlError) as e:
        gvm.mem_set_private(0x100000, 4096)  # a default VM has no private memory
    assert e.value.errno == 22
    gvm.mem_set_shared(0x100000, 4096)  # shared (0) is allowed
    gvm.machine
    with pytest.raises(KvmIoctlError) as e:
        gvm.set_memory_attributes(0x100000, 4096, True)
    assert e.value.errno == 22
    gvm = GuestVM("hello", vm="sw-protected")
    for gpa, size in ((0x100800, 4096), (0x100000, 0), (0x100000, 100)):
        with pytest.raises(KvmIoctlError) as e:
            gvm.set_memory_attributes(gpa, size, True)
        assert e.value.errno == 22
    gvm.mem_set_private(0x200000, 0x2000)
    kvm = gvm.machine.kvm
    assert kvm.mem_is_private(0x200) and kvm.mem_is_private(0x201) and not kvm.mem_is_private(0x202)
    gvm.mem_set_shared(0x200000, 0x1000)
    assert not kvm.mem_is_private(0x200) and kvm.mem_is_private(0x201)
    with pytest.raises(KvmIoctlError) as e:
        kvm.kvm_vm_ioctl_set_mem_attributes(0x200000, 0x1000, 1 << 3, flags=1)
    assert e.value.errno == 22


@pytest.mark.parametrize("vm", ["default", "sw-protected", "tdx"])
def test_memslot_refusals_carry_upstreams_errno(vm):
    gvm = GuestVM("hello", vm=vm)
    gmem = vm != "default"

    def errno(fn, *a, **kw):
        with pytest.raises(KvmIoctlError) as e:
            fn(*a, **kw)
        return e.value.errno

    assert errno(gvm.mem_region_add, 10, 0x1000000, 4096, guest_memfd=gmem) == 17  # overlaps guest memory
    assert errno(gvm.mem_region_add, 10, 0x40000800, 4096, guest_memfd=gmem) == 22  # not page aligned
    assert errno(gvm.mem_region_add, 40000, 0x40000000, 4096, guest_memfd=gmem) == 22  # slot id
    if vm == "default":
        assert errno(gvm.mem_region_add, 10, 0x40000000, 4096, guest_memfd=True) == 22
    gvm.mem_region_add(10, 0x40000000, 0x4000, guest_memfd=gmem)
    assert errno(gvm.mem_region_add, 11, 0x40002000, 4096, guest_memfd=gmem) == 17  # overlaps slot 10
    assert errno(gvm.mem_region_delete, 12) == 22  # no such slot
    if gmem:
        assert errno(gvm.mem_region_move, 10, 0x50000000) == 22  # private: immutable
    m = gvm.machine  # the same, built
    assert [s.id for s in m.kvm.memslots] == [0, 10]
    assert errno(gvm.mem_region_add, 11, 0x40002000, 4096, guest_memfd=gmem) == 17
    assert errno(gvm.mem_region_delete, 12) == 22
    if gmem:
        assert errno(gvm.mem_region_move, 10, 0x50000000) == 22
    else:
        gvm.mem_region_move(10, 0x50000000)
        assert m.kvm.gfn_to_memslot(0x50000).id == 10 and m.kvm.gfn_to_memslot(0x40000) is None
    gvm.mem_region_delete(10)
    assert [s.id for s in m.kvm.memslots] == [0]


def test_memslot_move_and_delete_under_a_running_guest(gdir):
    """A default VM: the host moves the guest's data memslot from a callback; the guest then
    finds its data at the new GPA (mapped beforehand with virt_map), and the old GPA is MMIO."""
    src = write_guest(
        gdir,
        "move",
        """
void guest_main(void)
{
	GUEST_SYNC(*(volatile u64 *)0x40000000);
	GUEST_SYNC(*(volatile u64 *)0x80000000);
}
""",
    )
    gvm = GuestVM(src, vm="default")
    gvm.mem_region_add(7, 0x40000000, 0x200000, guest_memfd=False)
    gvm.virt_map(0x80000000, 0x200000)
    gvm.write(0x40000000, (0x99).to_bytes(8, "little"))
    gvm.on_ucall(lambda v, uc: gvm.mem_region_move(7, 0x80000000) if uc.stage == 0x99 else None)
    run = gvm.run()
    run.assert_ok()
    assert run.syncs == [(0, 0x99), (0, 0x99)]
    kvm = gvm.machine.kvm
    assert kvm.srcu.grace_periods >= 2 and kvm.memslots[-1].base_gfn == 0x80000


@pytest.mark.parametrize("vm", PRIVATE := ["sw-protected", "tdx"])
def test_guest_mem_fallocate_punches_private_memory(gdir, vm):
    """The guest writes a private page; the host punches its hole from on_ucall; the guest reads
    zeros (a TD accepts the page again first).  A range without guest_memfd is refused."""
    src = write_guest(
        gdir,
        "punch",
        """
void guest_main(void)
{
	volatile u64 *p = emu_gpa_ptr(0x40000000);

	GUEST_ASSERT_EQ(emu_accept(0x40000000, 4096), 0);
	*p = 0x1234;
	GUEST_SYNC(*p);
	GUEST_ASSERT_EQ(emu_accept(0x40000000, 4096), 0);
	GUEST_SYNC(*p);
}
""",
    )
    gvm = GuestVM(src, vm=vm)
    gvm.mem_region_add(10, 0x40000000, 0x200000, guest_memfd=True)
    gvm.mem_set_private(0x40000000, 0x200000)
    gvm.guest_mem_fallocate(0x40000000, 0x200000, punch_hole=False)  # allocation: nothing changes

    @gvm.on_ucall
    def host(v, uc):
        if uc.stage == 0x1234:
            assert gvm.read(0x40000000, 8) == bytes(8)  # private: not in the host's view
            gvm.guest_mem_fallocate(0x40000000, 4096, punch_hole=True)

    run = gvm.run()
    run.assert_ok()
    assert run.syncs == [(0, 0x1234), (0, 0)]
    with pytest.raises(KvmIoctlError) as e:
        gvm.guest_mem_fallocate(0x1000000, 4096, punch_hole=True)  # main memory of a TD has one
        gvm.guest_mem_fallocate(0x90000000, 4096, punch_hole=True)
    assert e.value.errno == 22
    with pytest.raises(KvmIoctlError):
        gvm.guest_mem_fallocate(0x40000800, 4096, punch_hole=True)


# ---------------------------------------------------------------------------
# KVM_X86_SW_PROTECTED_VM and KVM_HC_MAP_GPA_RANGE
# ---------------------------------------------------------------------------


def test_sw_protected_private_memory_is_guest_memfd_in_the_direct_root(gdir):
    src = write_guest(
        gdir,
        "swprot",
        """
void guest_main(void)
{
	volatile u64 *p = (volatile u64 *)0x1000000;

	*p = 0xaaaa;                                    /* shared */
	GUEST_SYNC(1);
	kvm_hypercall_map_gpa_range(0x1000000, 4096, KVM_MAP_GPA_RANGE_ENCRYPTED);
	GUEST_SYNC(*p);                                 /* private: guest_memfd's page, zeros */
	*p = 0xbbbb;
	kvm_hypercall_map_gpa_range(0x1000000, 4096, KVM_MAP_GPA_RANGE_DECRYPTED);
	GUEST_SYNC(*p);                                 /* shared again: the host's page */
}
""",
    )
    gvm = GuestVM(src, vm="sw-protected")
    roots = []

    @gvm.on_ucall
    def host(v, uc):
        if uc.cmd == UCALL_SYNC:
            kvm = gvm.machine.kvm
            tdp = kvm.tdp_mmu
            leaves = {g: s for r in tdp.roots if not r.invalid for g, l, s in tdp.leaves(r)}
            roots.append((uc.stage, kvm.mem_is_private(0x1000), leaves.get(0x1000)))

    run = gvm.run()
    run.assert_ok()
    assert run.syncs == [(0, 1), (0, 0), (0, 0xAAAA)]
    m = gvm.machine
    shared_pfn = m.host.mm.lookup(m.hva + 0x1000000)
    private_pfn = (m.gmem + 0x1000000) >> 12
    assert [(s, p) for s, p, _ in roots] == [(1, False), (0, True), (0xAAAA, False)]
    from emu.kvm.spte import spte_to_pfn

    assert spte_to_pfn(roots[0][2]) == shared_pfn and spte_to_pfn(roots[1][2]) == private_pfn
    assert all(not r.is_mirror for r in m.kvm.tdp_mmu.roots)  # no mirror, no module
    assert m.host.tdx_module is None


def test_kvm_hypercall_results(gdir):
    src = write_guest(
        gdir,
        "hcall",
        """
void guest_main(void)
{
	GUEST_SYNC(kvm_hypercall(99, 1, 2, 3, 4));                      /* unknown */
	GUEST_SYNC(__kvm_hypercall_map_gpa_range(0x1000800, 4096, 0));   /* not page aligned */
	GUEST_SYNC(__kvm_hypercall_map_gpa_range(0x1000000, 0, 0));      /* no pages */
	GUEST_SYNC(__kvm_hypercall_map_gpa_range(0x1000000, 4096, KVM_MAP_GPA_RANGE_ENCRYPTED));
}
""",
    )
    enosys, einval = 2**64 - 1000, 2**64 - 22
    for vm, last in (("default", enosys), ("sw-protected", 0), ("tdx", 0)):
        run = run_guest(src, vm=vm)
        run.assert_ok()
        if vm == "default":  # KVM_CAP_EXIT_HYPERCALL is not enabled: -KVM_ENOSYS first
            assert run.syncs_of(0) == [enosys, enosys, enosys, last]
        else:
            assert run.syncs_of(0) == [enosys, einval, einval, last]
            assert run.machine.kvm.mem_is_private(0x1000)


@pytest.mark.parametrize("vm", PRIVATE)
def test_map_gpa_range_with_the_selftests_flags(gdir, vm):
    """MAP_GPA_SET_ATTRIBUTES / MAP_GPA_SHARED / MAP_GPA_DO_FALLOCATE as the selftest's handler:
    fallocate only (PUNCH_HOLE when shared), attributes only when asked; a refusal is the
    hypercall's result (-errno)."""
    src = write_guest(
        gdir,
        "mapflags",
        """
void guest_main(void)
{
	volatile u64 *p = emu_gpa_ptr(0x40000000);

	kvm_hypercall_map_gpa_range(0x40000000, 4096, MAP_GPA_SET_ATTRIBUTES);
	GUEST_ASSERT_EQ(emu_accept(0x40000000, 4096), 0);
	*p = 0x77;
	GUEST_SYNC(1);
	kvm_hypercall_map_gpa_range(0x40000000, 4096, MAP_GPA_SHARED | MAP_GPA_DO_FALLOCATE);
	GUEST_SYNC(2);                                                  /* punched, still private */
	GUEST_ASSERT_EQ(emu_accept(0x40000000, 4096), 0);
	GUEST_SYNC(*p);
	GUEST_SYNC(__kvm_hypercall_map_gpa_range(0x1000000 + 0x7ff0000000UL, 4096,
						 MAP_GPA_DO_FALLOCATE));      /* no guest_memfd there */
}
""",
    )
    gvm = GuestVM(src, vm=vm)
    gvm.mem_region_add(10, 0x40000000, 0x200000, guest_memfd=True)
    state = []
    gvm.on_ucall(lambda v, uc: state.append(gvm.machine.kvm.mem_is_private(0x40000)) if uc.cmd == UCALL_SYNC else None)
    run = gvm.run()
    run.assert_ok()
    assert run.syncs_of(0) == [1, 2, 0, 2**64 - 22]
    assert state[:3] == [True, True, True]


# ---------------------------------------------------------------------------
# KVM_EXIT_MEMORY_FAULT
# ---------------------------------------------------------------------------


def test_memory_fault_as_upstream_and_in_json():
    gvm = GuestVM("private_mem_kvm_exits", vm="sw-protected")
    gvm.mem_region_add(10, 0xC0000000, 4096, guest_memfd=False)
    gvm.mem_set_private(0xC0000000, 4096)
    run = gvm.run()
    assert run.exit == "memory_fault" and run.errno == 14
    assert run.memory_fault == {"flags": KVM_MEMORY_EXIT_FLAG_PRIVATE, "gpa": 0xC0000000, "size": 4096}
    assert "which has no guest_memfd" in run.error
    # KVM_RUN itself fails with -EFAULT, kvm_run filled in
    m = GuestVM("private_mem_kvm_exits", vm="sw-protected")
    m.mem_region_add(10, 0xC0000000, 4096, guest_memfd=False)
    m.mem_set_private(0xC0000000, 4096)
    v = m.machine.vcpus[0]
    with pytest.raises(KvmIoctlError) as e:
        for _ in range(100):
            v.run()
    assert e.value.errno == 14 and e.value.run.memory_fault.as_dict() == run.memory_fault
    assert e.value.run is v.kvm_run


def test_memory_fault_in_cli_json(gdir):
    src = write_guest(
        gdir,
        "mismatch",
        """
void guest_main(void)
{
	GUEST_SYNC(*(volatile u64 *)0x3000000);
}
""",
    )
    res = emu_cli("run", src, "--vm", "sw-protected", "--host", "private 0x3000000-0x3001000", "--json")
    obj = json.loads(res.stdout)
    # The host event converted the page under the guest: the VMM converts it back (QEMU's answer)
    assert res.returncode == 0 and obj["exit"] == "hlt", obj
    res = emu_cli("run", "private_mem_kvm_exits", "--vm", "tdx", "--json")
    obj = json.loads(res.stdout)
    assert res.returncode == 1 and obj["exit"] == "memory_fault" and obj["errno"] == 14
    assert obj["memory_fault"] == {"flags": 8, "gpa": 0xC0000000, "size": 4096}


# ---------------------------------------------------------------------------
# Building out-of-tree guests into the cache directory
# ---------------------------------------------------------------------------


def test_out_of_tree_guests_build_into_emu_cache_dir(tmp_path):
    src = write_guest(tmp_path, "cached", "void guest_main(void) { GUEST_SYNC(3); }\n")
    env = dict(os.environ, EMU_CACHE_DIR=str(tmp_path / "cache"))
    res = emu_cli("run", src, "--json", env=env)
    assert res.returncode == 0 and json.loads(res.stdout)["syncs"] == [[0, 3]]
    built = sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*.elf"))
    assert len(built) == 1 and built[0] == f"guest/{guests.checkout_key()}/{Path(built[0]).name}"
    assert re.fullmatch(r"ext-cached-[0-9a-f]{8}\.elf", Path(built[0]).name)
    assert {p.name for p in (tmp_path / "cache" / "guest" / guests.checkout_key() / "lib").iterdir()} >= {
        "runtime.o",
        "cstart.o",
        "ucall_common.o",
        "guest_sprintf.o",
    }
    assert not list(guests.BUILD_DIR.glob("ext-cached-*"))


# ---------------------------------------------------------------------------
# explore(factory)
# ---------------------------------------------------------------------------


def test_explore_a_selftest_scenario_and_its_failures(gdir):
    """Two vCPUs each sync once; the host checks in on_ucall that vCPU 1's sync never comes
    before vCPU 0's: some schedules break it, and explore says which, with the error."""
    src = write_guest(gdir, "order", "void guest_main(void) { GUEST_SYNC(emu_vcpu_id()); }\n")

    def factory():
        vm = GuestVM(src, vm="default", vcpus=2)
        seen = []

        @vm.on_ucall
        def host(v, uc):
            if uc.cmd == UCALL_SYNC:
                seen.append(uc.stage)
                assert seen[0] == 0, f"vCPU {uc.stage} synced first"

        return vm

    res = explore(factory, random=30, seed=1, stop_at_first=False)
    assert res.complete and res.schedules == 30 and 0 < len(res.failures) < 30
    assert all("on_ucall(UCALL_SYNC): AssertionError: vCPU 1 synced first" in f.error for f in res.failures)
    first = res.failures[0]
    assert first.minimized.startswith("emu-sched/1:") and first.trace
    again = explore(factory, replay=first.minimized)
    assert again.schedules == 1 and again.failures and again.failures[0].error == first.error
    clean = explore(lambda: GuestVM(src, vcpus=2), random=10, seed=3)
    assert clean.schedules == 10 and clean.failures == []
    with pytest.raises(TypeError, match="must return a GuestVM"):
        explore(lambda: "x", random=1)
