"""C guests (issue 15): guest/include/emu.h, building .c guests, the sync and assert
hypercalls, the shipped C guests, and the selftest helper (emu.userspace.selftest).

Every macro and call of emu.h runs on both VM types with exact results; a failing
GUEST_ASSERT / GUEST_ASSERT_EQ is checked to the character (file:line, the
expression, both values), from Python and through the CLI (exit status 1), as are
a compile error (the compiler's own output, exit 2) and a missing compiler (one
line naming the package, exit 2).
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time

import pytest

from emu.userspace import guestabi, guests, loader
from emu.userspace.selftest import GuestAssert, GuestVM, VM_TYPES, run_guest
from emu.userspace.vmm import Machine, MachineError
from tdxmod import abi as A

REPO = guests.REPO
pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("clang") is None, reason="no C compiler (gcc or clang)"
)


def write_guest(directory, name, body):
    """Write directory/name.c: emu.h included, then body.  Returns the path."""
    path = directory / f"{name}.c"
    path.write_text('#include "emu.h"\n\n' + body.lstrip("\n"))
    return path


def line_of(path, marker):
    """The 1-based line of path that contains marker (a comment in the guest)."""
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if marker in text:
            return n
    raise AssertionError(f"{marker} not in {path}")


def emu_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "emu", *map(str, args)], cwd=REPO, capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def gdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cguests")


# ---------------------------------------------------------------------------
# Identity, reports and syncs
# ---------------------------------------------------------------------------

SYNC_GUEST = """
void guest_main(void)
{
	u64 id = emu_vcpu_id();

	GUEST_SYNC(0x100 + id);
	emu_report(id * 10 + emu_nr_vcpus());
	GUEST_SYNC(emu_is_td());
	GUEST_SYNC(0xffffffffffffffffUL - id);
}
"""


@pytest.mark.parametrize("vm", VM_TYPES)
def test_sync_report_vcpu_id_nr_vcpus_is_td(gdir, vm):
    src = write_guest(gdir, "sync", SYNC_GUEST)
    run = run_guest(src, vm=vm, vcpus=3)
    run.assert_ok()
    td = int(vm == "tdx")
    # the vCPUs interleave under the scheduler: each vCPU's own syncs come in its order
    assert [run.syncs_of(i) for i in range(3)] == [
        [0x100, td, 2**64 - 1],
        [0x101, td, 2**64 - 2],
        [0x102, td, 2**64 - 3],
    ]
    assert sorted(run.reports) == [(0, 3), (1, 13), (2, 23)]
    assert run.syncs_of(1) == [0x101, td, 2**64 - 2] and run.reports_of(2) == [23]
    assert run.exit == "hlt" and run.result.vcpu_exits == ["hlt"] * 3
    assert run.guest_assert is None


@pytest.mark.parametrize("vm", VM_TYPES)
def test_syncs_in_json_text_and_trace(gdir, vm, tmp_path):
    src = write_guest(gdir, "sync", SYNC_GUEST)
    res = emu_cli("run", src, "--vm", vm, "--vcpus", "2", "--json")
    assert res.returncode == 0, res.stderr
    obj = json.loads(res.stdout)
    td = int(vm == "tdx")
    # each vCPU's syncs in its order (the vCPUs interleave under the scheduler)
    assert [[v for c, v in obj["syncs"] if c == i] for i in (0, 1)] == [[0x100, td, 2**64 - 1], [0x101, td, 2**64 - 2]]
    assert sorted(zip(obj["report_vcpus"], obj["reports"])) == [(0, 2), (1, 12)]
    res = emu_cli(
        "run",
        src,
        "--vm",
        vm,
        "--vcpus",
        "2",
        "--trace",
        "--trace-events",
        "guest_sync,guest_report",
        "--trace-file",
        tmp_path / "t.txt",
    )
    assert res.returncode == 0, res.stderr
    assert "  sync    vcpu 1: 0x101 (257)\n" in res.stdout
    events = [
        (m.group(1), m.group(2))
        for m in re.finditer(r"(guest_sync|guest_report):\s+value (0x[0-9a-f]+)", (tmp_path / "t.txt").read_text())
    ]
    assert sorted(events) == sorted(
        [
            ("guest_sync", "0x100"),
            ("guest_sync", "0x101"),
            ("guest_report", "0x2"),
            ("guest_report", "0xc"),
            ("guest_sync", hex(td)),
            ("guest_sync", hex(td)),
            ("guest_sync", hex(2**64 - 1)),
            ("guest_sync", hex(2**64 - 2)),
        ]
    )
    res = emu_cli(
        "run", src, "--vm", vm, "--trace", "jsonl", "--trace-events", "guest_sync", "--trace-file", tmp_path / "t.jsonl"
    )
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [(e["vcpu"], e["event"] if "event" in e else e.get("name")) for e in lines] == [(0, "guest_sync")] * 3


# ---------------------------------------------------------------------------
# GUEST_ASSERT, GUEST_ASSERT_EQ, GUEST_DONE
# ---------------------------------------------------------------------------

ASSERT_GUEST = """
static volatile u64 four = 4;

void guest_main(void)
{
	GUEST_ASSERT(four == 4);
	GUEST_ASSERT_EQ(four, 4);
	GUEST_SYNC(1);
	emu_report(0x77);
	GUEST_ASSERT(four == 3 && emu_vcpu_id() == 0);   /* FAILS */
	GUEST_SYNC(2);
}
"""

ASSERT_EQ_GUEST = """
static volatile u64 three = 3;
static u64 calls;

static u64 four(void)
{
	calls++;
	return 4;
}

void guest_main(void)
{
	if (emu_vcpu_id() == 0) {
		GUEST_SYNC(0x10);
		return;
	}
	GUEST_ASSERT_EQ(four(), 4);
	GUEST_SYNC(calls);
	emu_report(0x88);
	GUEST_ASSERT_EQ(three, four()); /* FAILS */
	GUEST_SYNC(0xbad);
}
"""


@pytest.mark.parametrize("vm", VM_TYPES)
def test_guest_assert_failure_names_file_line_and_expression(gdir, vm):
    src = write_guest(gdir, "assert", ASSERT_GUEST)
    line = line_of(src, "FAILS")
    run = run_guest(src, vm=vm)
    assert run.exit == "fail" and not run.ok
    assert run.error == f"vCPU 0: GUEST_ASSERT failed at {src}:{line}: four == 3 && emu_vcpu_id() == 0"
    assert run.guest_assert == GuestAssert(
        vcpu=0,
        file=str(src),
        line=line,
        expr="four == 3 && emu_vcpu_id() == 0",
        kind="assert",
        a=0,
        b=0,
        message=run.error.removeprefix("vCPU 0: "),
    )
    # what the guest said before the failure is kept; nothing after it ran
    assert run.syncs == [(0, 1)] and run.reports == [(0, 0x77)]
    assert run.result.vcpu_exits == ["fail"]
    with pytest.raises(AssertionError, match=re.escape(f"GUEST_ASSERT failed at {src}:{line}: four == 3")):
        run.assert_ok()


@pytest.mark.parametrize("vm", VM_TYPES)
def test_guest_assert_eq_failure_names_both_values(gdir, vm):
    src = write_guest(gdir, "assert_eq", ASSERT_EQ_GUEST)
    line = line_of(src, "FAILS")
    run = run_guest(src, vm=vm, vcpus=2)
    assert run.exit == "fail"
    assert run.error == f"vCPU 1: GUEST_ASSERT_EQ failed at {src}:{line}: three == four() (0x3 != 0x4)"
    ga = run.guest_assert
    assert (ga.vcpu, ga.file, ga.line, ga.expr, ga.kind, ga.a, ga.b) == (
        1,
        str(src),
        line,
        "three == four()",
        "eq",
        3,
        4,
    )
    # each argument evaluated once: four() ran once for the passing assert
    assert run.syncs == [(0, 0x10), (1, 1)] and run.reports == [(1, 0x88)]
    assert run.result.vcpu_exits == ["hlt", "fail"]


@pytest.mark.parametrize("vm", VM_TYPES)
def test_cli_exit_1_on_a_failed_assert(gdir, vm):
    src = write_guest(gdir, "assert_eq", ASSERT_EQ_GUEST)
    line = line_of(src, "FAILS")
    res = emu_cli("run", src, "--vm", vm, "--vcpus", "2")
    assert res.returncode == 1
    assert f"exit: fail: vCPU 1: GUEST_ASSERT_EQ failed at {src}:{line}: three == four() (0x3 != 0x4)\n" in res.stdout
    assert "  report  vcpu 1: 0x88 (136)\n" in res.stdout
    res = emu_cli("run", src, "--vm", vm, "--vcpus", "2", "--json")
    assert res.returncode == 1
    obj = json.loads(res.stdout)
    assert obj["exit"] == "fail" and obj["syncs"] == [[0, 0x10], [1, 1]] and obj["reports"] == [0x88]
    assert obj["error"] == f"vCPU 1: GUEST_ASSERT_EQ failed at {src}:{line}: three == four() (0x3 != 0x4)"


@pytest.mark.parametrize("vm", VM_TYPES)
def test_assert_in_a_repo_guest_names_its_path_in_the_repo(vm):
    """Guests under the repository say their path relative to it (tests/guests/x.c)."""
    run = run_guest(REPO / "tests" / "guests" / "assert_eq.c", vm=vm)
    assert run.error == (
        "vCPU 0: GUEST_ASSERT_EQ failed at tests/guests/assert_eq.c:7: emu_vcpu_id() == 5 (0x0 != 0x5)"
    )
    assert run.syncs == [(0, 1)]


@pytest.mark.parametrize("vm", VM_TYPES)
def test_guest_done_and_returning_from_guest_main(gdir, vm):
    src = write_guest(
        gdir,
        "done",
        """
void guest_main(void)
{
	GUEST_SYNC(emu_vcpu_id());
	if (emu_vcpu_id() == 1)
		return;                 /* returning is GUEST_DONE */
	GUEST_DONE();
	GUEST_SYNC(0xbad);              /* never */
}
""",
    )
    run = run_guest(src, vm=vm, vcpus=2)
    run.assert_ok()
    assert run.syncs == [(0, 0), (1, 1)] and run.exit == "hlt"
    assert run.result.vcpu_exits == ["hlt", "hlt"]


# ---------------------------------------------------------------------------
# Memory: emu_accept, emu_map_gpa, emu_shared_bit, the shared window; cpu_relax
# ---------------------------------------------------------------------------

MEMORY_GUEST = """
#define AREA 0x1000000UL

void guest_main(void)
{
	u64 bit = emu_shared_bit();
	volatile u64 *priv = emu_gpa_ptr(AREA);
	volatile u64 *shared = emu_shared_ptr(AREA + EMU_PAGE_SIZE);

	GUEST_SYNC(bit);
	GUEST_SYNC((u64)shared);
	GUEST_SYNC(emu_accept(AREA, EMU_PAGE_SIZE));                    /* accepts */
	GUEST_SYNC(emu_accept(AREA, EMU_PAGE_SIZE));                    /* already accepted: 0 */
	GUEST_SYNC(emu_accept(bit | (AREA + EMU_PAGE_SIZE), EMU_PAGE_SIZE));   /* a shared GPA */
	GUEST_SYNC(emu_map_gpa(AREA + 1, EMU_PAGE_SIZE));               /* not page-aligned */
	*priv = 0x1111;
	GUEST_ASSERT_EQ(emu_map_gpa(bit | (AREA + EMU_PAGE_SIZE), EMU_PAGE_SIZE), 0);
	*shared = 0x5a5a5a5a;                                           /* the host sees it */
	GUEST_ASSERT_EQ(*shared, 0x5a5a5a5a);
	GUEST_ASSERT_EQ(*priv, 0x1111);
}
"""


@pytest.mark.parametrize("vm", VM_TYPES)
def test_accept_map_gpa_shared_bit_and_shared_window(gdir, vm):
    src = write_guest(gdir, "memory", MEMORY_GUEST)
    run = run_guest(src, vm=vm)
    run.assert_ok()
    if vm == "tdx":
        bit = 1 << 47
        assert run.syncs_of(0) == [
            bit,
            guestabi.TD_SHARED_WINDOW_GVA + 0x1001000,
            0,
            0,
            A.TDX_OPERAND_INVALID | 1,
            A.TDVMCALL_STATUS_INVALID_OPERAND,
        ]
        assert run.machine.kvm.mem_is_private(0x1000) and not run.machine.kvm.mem_is_private(0x1001)
    else:
        assert run.syncs_of(0) == [0, 0x1001000, 0, 0, 0, 0]
    # the shared page, written through the shared alias, is in the VMM's (shared) memory
    assert struct.unpack("<Q", run.machine.read_gpa(0x1001000, 8))[0] == 0x5A5A5A5A


@pytest.mark.parametrize("vm", VM_TYPES)
def test_cpu_relax_read_once_write_once(gdir, vm):
    src = write_guest(
        gdir,
        "relax",
        """
static u64 flag;

void guest_main(void)
{
	u64 i, spins = 0;

	WRITE_ONCE(flag, 3);
	for (i = 0; i < 10; i++) {
		cpu_relax();
		spins++;
	}
	barrier();
	GUEST_SYNC(spins + READ_ONCE(flag));
}
""",
    )
    run = run_guest(src, vm=vm)
    run.assert_ok()
    assert run.syncs == [(0, 13)]
    image = run.machine.image
    lo = image.symbol("guest_main")
    code = image.read(lo, 0x80)
    assert b"\xf3\x90" in code  # PAUSE


@pytest.mark.parametrize("vm", VM_TYPES)
def test_vectorized_and_floating_point_code_runs(gdir, vm):
    src = write_guest(
        gdir,
        "sse",
        """
static u64 words[64];
static double halves[8];

void guest_main(void)
{
	u64 i, sum = 0;

	for (i = 0; i < 64; i++)                /* -O2 vectorizes these loops */
		words[i] = words[i] * 3 + i;
	for (i = 0; i < 64; i++)
		sum += words[i];
	halves[emu_vcpu_id()] = 1.5 * (double)sum;
	GUEST_SYNC(sum);
	GUEST_SYNC((u64)halves[emu_vcpu_id()]);
}
""",
    )
    run = run_guest(src, vm=vm)
    run.assert_ok()
    assert run.syncs == [(0, 2016), (0, 3024)]


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def test_c_guest_build_flags_and_layout(gdir):
    src = write_guest(
        gdir,
        "layout",
        """
static u64 bss_word;
static u64 data_word = 7;
static const char rodata[] = "emu";
static volatile u64 table[4];

void guest_main(void)
{
	bss_word += data_word + rodata[0];
	table[emu_vcpu_id()] = bss_word;        /* an indexed absolute address */
	GUEST_SYNC(table[emu_vcpu_id()]);
}
""",
    )
    elf = guests.build(src)
    # out of the tree: built into the cache directory, never into the package
    assert elf.parent == guests.cache_dir() / "guest" / guests.checkout_key() and re.fullmatch(
        r"ext-layout-[0-9a-f]{8}\.elf", elf.name
    )
    image = loader.load_elf(elf)
    assert image.entry == image.symbol("_start") == guestabi.GUEST_LOAD_BASE  # cstart's _start comes first
    for sym in ("guest_main", "emu_sync", "emu_assert_fail", "emu_report", "memset", "memcpy"):
        image.symbol(sym)
    for seg in image.segments:
        assert not (seg.flags & loader.PF_W and seg.flags & loader.PF_X)
    assert run_guest(elf).syncs == [(0, 7 + ord("e"))]
    # the kernel code model: absolute addresses are sign-extended 32-bit relocations
    obj = elf.with_suffix(".o")
    relocs = subprocess.run(["readelf", "-r", str(obj)], capture_output=True, text=True).stdout
    assert "R_X86_64_32S" in relocs and "R_X86_64_64 " not in relocs.split(".rela.rodata")[0]


def test_c_build_is_incremental_and_follows_included_headers(tmp_path):
    hdr = tmp_path / "value.h"
    hdr.write_text("#define VALUE 5\n")
    src = write_guest(tmp_path, "inc", '#include "value.h"\nvoid guest_main(void) { GUEST_SYNC(VALUE); }\n')
    elf = guests.build(src)
    first = elf.stat().st_mtime_ns
    assert guests.build(src) == elf and elf.stat().st_mtime_ns == first  # up to date
    assert run_guest(src).syncs == [(0, 5)]
    hdr.write_text("#define VALUE 6\n")
    future = time.time() + 5
    os.utime(hdr, (future, future))
    guests.build(src)
    assert elf.stat().st_mtime_ns > first
    assert run_guest(src).syncs == [(0, 6)]


def test_compile_error_shows_the_compilers_output(tmp_path):
    src = write_guest(tmp_path, "broken", "void guest_main(void)\n{\n\tint x = ;\n\tGUEST_SYNC(y);\n}\n")
    with pytest.raises(guests.CompileError) as ei:
        guests.build(src)
    first, _, output = str(ei.value).partition("\n")
    assert re.fullmatch(rf"compiling {re.escape(str(src))} failed \((gcc|clang|cc)\S* exit status 1\):", first)
    assert (
        f"{src}:5:" in output and "error:" in output and "'y' undeclared" in output.replace("‘", "'").replace("’", "'")
    )
    with pytest.raises(MachineError, match="compiling .* failed"):
        Machine(str(src))
    # the CLI: the compiler's output as it printed it, exit 2, no traceback
    res = emu_cli("run", src)
    assert res.returncode == 2
    assert res.stderr.startswith(f"emu: error: compiling {src} failed (")
    assert output in res.stderr and "Traceback" not in res.stderr


def test_missing_compiler_is_one_line_naming_the_package(tmp_path):
    src = write_guest(tmp_path, "nocc", "void guest_main(void) {}\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("as", "ld"):  # binutils but no compiler
        os.symlink(shutil.which(tool), bindir / tool)
    env = {k: v for k, v in os.environ.items() if k != "CC"}
    env["PATH"] = str(bindir)
    res = emu_cli("run", src, env=env)
    assert res.returncode == 2
    assert res.stderr == (
        "emu: error: no C compiler found (gcc or clang): C guests are compiled with one; "
        "install it: apt-get install gcc\n"
    )
    env["CC"] = "no-such-cc"
    res = emu_cli("run", src, env=env)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "CC=no-such-cc" in res.stderr and "apt-get install gcc" in res.stderr


def test_cc_chooses_the_compiler(tmp_path, monkeypatch):
    cc = shutil.which("gcc") or shutil.which("clang")
    monkeypatch.setenv("CC", f"{cc} -DVALUE=9")
    src = write_guest(tmp_path, "ccflag", "void guest_main(void) { GUEST_SYNC(VALUE); }\n")
    assert run_guest(src).syncs == [(0, 9)]


def test_header_and_runtime_constants_match_guestabi():
    text = (guests.INCLUDE_DIR / "emu.h").read_text()
    defines = {
        m.group(1): int(m.group(2).rstrip("UL"), 0)
        for m in re.finditer(r"^#define\s+(EMU_\w+)\s+(0x[0-9a-fA-F]+UL?|\d+)\b", text, re.M)
    }
    assert defines["EMU_STACK_SIZE"] == guestabi.STACK_SIZE
    assert defines["EMU_TD_SHARED_WINDOW_GVA"] == guestabi.TD_SHARED_WINDOW_GVA
    assert defines["EMU_ASSERT_KIND_ASSERT"] == guestabi.ASSERT_KIND_ASSERT
    assert defines["EMU_ASSERT_KIND_EQ"] == guestabi.ASSERT_KIND_EQ
    inc = (guests.LIB_DIR / "emu.inc").read_text()
    for name in ("EMU_HC_SYNC", "EMU_HC_ASSERT", "TDVMCALL_EXPOSE_REGS_4"):
        m = re.search(rf"^\.equ\s+{name},\s*(0x[0-9a-fA-F]+)", inc, re.M)
        assert int(m.group(1), 16) == getattr(guestabi, name), name
    # the site struct: four 8-byte fields, as ASSERT_SITE_FORMAT says
    assert struct.calcsize(guestabi.ASSERT_SITE_FORMAT) == 32
    assert re.search(
        r"struct emu_assert_site \{\s*const char \*file;\s*const char \*expr;\s*u64 line;\s*"
        r"u64 kind;\s*\};",
        text,
    )


def test_the_assembler_guests_do_not_change():
    """The runtime's new functions come after the old ones: an assembler guest's
    code is where it was (the golden trace depends on it)."""
    image = loader.load_elf(guests.resolve("hello"))
    assert image.symbol("emu_report") < image.symbol("accept_status_class") < image.symbol("emu_sync")


# ---------------------------------------------------------------------------
# The shipped C guests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("vm", VM_TYPES)
@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_spinlock_counter(vm, vcpus):
    run = run_guest("spinlock", vm=vm, vcpus=vcpus)
    run.assert_ok()
    assert sorted(run.reports) == [(i, 1000) for i in range(vcpus)]
    assert [v for _, v in run.syncs] == [1000 * vcpus]  # the last vCPU to finish checks the count


@pytest.mark.parametrize("vm", VM_TYPES)
@pytest.mark.parametrize("asm,c", [("private", "private_c"), ("convert", "convert_c"), ("race2", "race2_c")])
def test_c_ports_report_what_the_assembler_guests_report(vm, asm, c):
    for vcpus in (1, 3):
        a = Machine(asm, vm=vm, vcpus=vcpus).run()
        b = run_guest(c, vm=vm, vcpus=vcpus)
        b.assert_ok()
        assert a.error is None and b.reports == a.reports


def test_convert_c_in_a_td_sees_each_side():
    run = run_guest("convert_c", vm="tdx")
    a = sum(0xA0A0A0A000000000 + off for off in range(0, 4 * 4096, 512)) % 2**64
    b = sum(0xB0B0B0B000000000 + off for off in range(0, 4 * 4096, 512)) % 2**64
    assert run.reports == [(0, 1), (0, 0), (0, b), (0, 0), (0, a)]
    assert run.result.stats["seamcalls"].get("TDH_MEM_PAGE_REMOVE", 0) >= 4


def test_spinlock_and_race2_c_under_the_explorer():
    from emu.checkers.explore import Explorer

    res = Explorer(lambda: Machine("spinlock", vm="tdx", vcpus=2)).random(runs=20, seed=3, depth=3)
    assert res.failures == 0
    res = Explorer(lambda: Machine("race2_c", vm="tdx", vcpus=2, no_freeze=True)).random(runs=200, seed=7, depth=3)
    assert res.failures >= 1 and "TDX_EPT_WALK_FAILED" in res.first_failure.error


def test_shipped_c_guests_are_listed_and_build():
    assert {"spinlock", "private_c", "convert_c", "race2_c"} <= set(guests.names())
    for name in ("spinlock", "private_c", "convert_c", "race2_c"):
        assert guests.resolve(name) == guests.BUILD_DIR / f"{name}.elf"


# ---------------------------------------------------------------------------
# The selftest helper
# ---------------------------------------------------------------------------


def test_guest_vm_builds_then_runs(gdir):
    src = write_guest(gdir, "sync", SYNC_GUEST)
    vm = GuestVM(src, vm="tdx", vcpus=2, mem=32 << 20)
    assert vm.machine.nvcpus == 2 and vm.machine.mem_size == 32 << 20 and vm.machine.td
    run = vm.run()
    assert run.ok and run.syncs_of(0) == [0x100, 1, 2**64 - 1]
    assert "syncs=[(0, 256)" in repr(run)


def test_readme_example_runs(tmp_path):
    """The complete example tests of the README (tests/test_selftest_example.py) and of
    docs/python-api.md (tests/test_counter_example.py) must be what the pages show.  The first C guest of docs/c-guests.md runs too."""
    for page, rels in (
        ("README.md", ("tests/guests/convert.c", "tests/test_selftest_example.py")),
        ("docs/python-api.md", ("tests/guests/counter.c", "tests/test_counter_example.py")),
    ):
        text = (REPO / page).read_text()
        for rel in rels:
            body = (REPO / rel).read_text().strip()
            assert body in text, f"{page} does not show {rel} as it is"
    first = re.search(r"```c\n(.*?)```", (REPO / "docs" / "c-guests.md").read_text(), re.S).group(1)
    src = tmp_path / "readme.c"
    src.write_text(first)
    for vm in VM_TYPES:
        run = run_guest(src, vm=vm, vcpus=2)
        run.assert_ok()
        assert run.syncs == [(0, 0), (1, 1)]
