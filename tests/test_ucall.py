"""The ucall transport as upstream's selftests make it (lib/x86/ucall.c; the TDX selftests' ucall):
a plain VM's guest does `in al, dx` from UCALL_PIO_PORT with RDI = the struct ucall's address and
the host reads RDI (KVM_GET_REGS) on KVM_EXIT_IO; a TD's guest writes the address (8 bytes,
TDG.VP.VMCALL<#VE.RequestMMIO>) to UCALL_MMIO_GPA | the shared bit and the host takes it from
KVM_EXIT_MMIO's data.  guest/lib/runtime.S ucall_arch_do_ucall and
emu.userspace.guestabi.ucall_arch_get_ucall are the two ends.
"""

import shutil
import subprocess
import sys

import pytest

from emu.kvm.kvm import KvmVcpu
from emu.selftest import GuestVM, KvmIoctlError
from emu.trace import ListSink, Tracer
from emu.userspace import guestabi
from emu.userspace.ucall_common import UCALL_SIZE, UCALL_HEADER_UCALLS

pytestmark = pytest.mark.skipif(
    shutil.which("gcc") is None and shutil.which("clang") is None, reason="no C compiler (gcc or clang)"
)

PLAIN = ("default", "sw-protected")
EVENTS = ["kvm_exit", "kvm_pio", "kvm_mmio", "kvm_userspace_exit", "guest_sync", "guest_printf"]

THREE = """
void guest_main(void)
{
	GUEST_SYNC(1);
	GUEST_SYNC_ARGS(2, 3, 4, 5, 6);
	GUEST_PRINTF("x%d\\n", 7);
}
"""


def write_guest(directory, name, body):
    path = directory / f"{name}.c"
    path.write_text('#include "emu.h"\n\n' + body.lstrip("\n"))
    return path


@pytest.fixture(scope="module")
def gdir(tmp_path_factory):
    return tmp_path_factory.mktemp("ucall")


@pytest.fixture
def get_regs_calls(monkeypatch):
    """Every KVM_GET_REGS of ucall_arch_get_ucall(), as (vcpu id, rdi) (the VMM reads the
    registers once more at the end of a run, for its report)."""
    calls = []
    real = KvmVcpu.get_regs

    def spy(self):
        regs = real(self)
        if sys._getframe(1).f_code is guestabi.ucall_arch_get_ucall.__code__:
            calls.append((self.vcpu_id, regs["rdi"]))
        return regs

    monkeypatch.setattr(KvmVcpu, "get_regs", spy)
    return calls


def traced(src, vm, **kw):
    sink = ListSink()
    gvm = GuestVM(src, vm=vm, tracer=Tracer([sink], EVENTS), **kw)
    return gvm, gvm.run(), [e for e in sink.events if e.fields.get("reason") != "EPT_VIOLATION"]


def pool_structs(gvm):
    base = gvm.machine.ucall_pool_gpa + UCALL_HEADER_UCALLS
    return {base + i * UCALL_SIZE for i in range(64)}


@pytest.mark.parametrize("vm", PLAIN)
def test_a_plain_vms_ucall_is_an_in_from_the_ucall_port_with_rdi(gdir, vm, get_regs_calls):
    gvm, run, evs = traced(write_guest(gdir, "three", THREE), vm)
    run.assert_ok()
    assert run.syncs == [(0, 1), (0, 2, 3, 4, 5, 6)] and run.printfs == [(0, "x7\n")]
    stats = run.result.stats
    # 2 syncs, a printf, GUEST_DONE: four I/O exits, no hypercall, nothing at the port's device
    assert stats["io_exits"] == 4 and stats["hypercalls"] == 0
    assert gvm.machine.pio_counts == {guestabi.UCALL_PIO_PORT: 4}
    # KVM_GET_REGS once per ucall, RDI a struct ucall of the pool
    assert len(get_regs_calls) == 4 and {v for v, _ in get_regs_calls} == {0}
    assert {rdi for _, rdi in get_regs_calls} <= pool_structs(gvm)
    names = [e.name for e in evs]
    assert "kvm_mmio" not in names
    # each ucall: the I/O exit (IN, 1 byte, DX, port 0x1000), KVM_EXIT_IO, the VMM's event, then
    # on the next KVM_RUN KVM completes the IN with the zeroed pio_data (complete_fast_pio_in())
    io = [i for i, e in enumerate(evs) if e.name == "kvm_exit" and e.fields["reason"] == "IO_INSTRUCTION"]
    assert len(io) == 4
    for i, follow in zip(io, (["guest_sync"], ["guest_sync"], ["guest_printf"], [])):
        e = evs[i].fields
        assert e["port"] == 0x1000 and e["insn"] == "in al, dx" and e["where"].startswith("ucall_arch_do_ucall+")
        # exit qualification: size 1 (0), IN (bit 3), DX (bit 6 clear), port in 31:16
        assert e["info1"] == 0x1000 << 16 | 8
        assert (evs[i + 1].name, evs[i + 1].fields) == ("kvm_userspace_exit", {"reason": "io", "port": 0x1000})
        got = [ev.name for ev in evs[i + 2 : i + 2 + len(follow)]]
        assert got == follow
        pio = evs[i + 2 + len(follow)]
        assert (
            pio.name == "kvm_pio"
            and pio.fields["rw"] == "read"
            and pio.fields["port"] == 0x1000
            and pio.fields["size"] == 1
            and pio.fields["val"] == 0
        )


def test_a_tds_ucall_is_an_mmio_write_of_the_address_to_the_ucall_gpa(gdir, get_regs_calls):
    gvm, run, evs = traced(write_guest(gdir, "three", THREE), "tdx")
    run.assert_ok()
    assert run.syncs == [(0, 1), (0, 2, 3, 4, 5, 6)] and run.printfs == [(0, "x7\n")]
    m = gvm.machine
    stats = run.result.stats
    assert stats["io_exits"] == 0 and stats["hypercalls"] == 0 and m.pio_counts == {}
    assert get_regs_calls == []  # a TD's registers are not the host's to read
    mmio = [e.fields for e in evs if e.name == "kvm_mmio"]
    assert len(mmio) == 4
    for f in mmio:
        # the guest wrote to the shared alias (else INVALID_OPERAND, no exit) and KVM stripped
        # the shared bit; the value is a struct ucall of the (shared) pool
        assert f["type"] == "write" and f["len"] == 8 and f["gpa"] == guestabi.UCALL_MMIO_GPA
        assert f["val"] in pool_structs(gvm)
    ue = [e.fields for e in evs if e.name == "kvm_userspace_exit"]
    assert ue == [{"reason": "mmio"}] * 4 + [{"reason": "hlt"}]
    # the request went straight to the module (TDG.VP.VMCALL with R10-R15 exposed), no #VE first
    tdcalls = [e.fields for e in evs if e.name == "kvm_exit" and e.fields["reason"] == "TDCALL"]
    assert [f["info1"] for f in tdcalls] == [guestabi.TDVMCALL_EXPOSE_REGS_MMIO] * 4 + [guestabi.TDVMCALL_EXPOSE_REGS]
    assert not [e for e in evs if e.name == "kvm_exit" and e.fields["reason"] == "EXCEPTION_NMI"]


OWN = """
/* upstream's sync_regs_test does its ucall by hand: `in` with RDI = a struct of its own */
static struct ucall mine = { .cmd = UCALL_SYNC, .args = { 0x1234, 0x5678 }, .nargs = 2 };

void guest_main(void)
{
	u64 rax = 0x11223355;

	emu_idt_init();         /* (a TD: the runtime's #VE handler) */

	asm volatile("in %%dx, %%al" : "+a"(rax) : "d"(0x1000), "D"(&mine) : "memory");
	GUEST_SYNC1(rax);
}
"""


@pytest.mark.parametrize("vm", PLAIN)
def test_the_host_reads_the_struct_rdi_points_at_and_al_is_what_kvm_leaves(gdir, vm, get_regs_calls):
    src = write_guest(gdir, "own", OWN)
    gvm = GuestVM(src, vm=vm)
    run = gvm.run()
    run.assert_ok()
    mine = [a for a, _, n in gvm.machine.image.symbols if n == "mine"][0]
    assert get_regs_calls[0] == (0, mine)
    # the hand-made struct's sync, then AL: KVM zeroed pio_data for the IN, the rest of RAX kept
    assert run.syncs == [(0, 0x1234, 0x5678), (0, 0x11223300)]


def test_a_tds_in_from_the_ucall_port_is_no_ucall(gdir):
    """In a TD the ucall is MMIO (upstream's TDX get_ucall looks at nothing else): port 0x1000 is
    an unassigned port there, read through the runtime's #VE handler as all ones."""
    gvm = GuestVM(write_guest(gdir, "own", OWN), vm="tdx")
    run = gvm.run()
    run.assert_ok()
    assert run.syncs == [(0, 0x112233FF)] and gvm.machine.pio_counts == {0x1000: 1}


BAD = """
void guest_main(void)
{
	GUEST_SYNC(1);
	ucall_arch_do_ucall(0x7000000000UL);
	GUEST_SYNC(2);
}
"""


@pytest.mark.parametrize("vm", PLAIN + ("tdx",))
def test_a_ucall_at_a_bad_address_fails_the_run_cleanly(gdir, vm):
    run = GuestVM(write_guest(gdir, "bad", BAD), vm=vm).run()
    assert run.exit == "fail" and run.syncs == [(0, 1)]
    assert run.error == "vCPU 0: a ucall at 0x7000000000, outside the VMM's memory"
    assert run.result.vcpu_exits == ["fail"]


def test_a_ucall_at_a_bad_address_on_the_cli_is_one_line(gdir):
    src = write_guest(gdir, "bad", BAD)
    p = subprocess.run(
        [sys.executable, "-m", "emu", "run", str(src)],
        cwd=guestabi.__file__.rsplit("/emu/", 1)[0],
        capture_output=True,
        text=True,
    )
    assert p.returncode != 0 and "Traceback" not in p.stdout + p.stderr
    assert "exit: fail: vCPU 0: a ucall at 0x7000000000, outside the VMM's memory" in p.stdout


@pytest.mark.parametrize("vm", PLAIN + ("tdx",))
def test_the_ucall_port_has_no_device_footprint(gdir, vm, monkeypatch):
    """A ucall is no device access: it announces no ("pio", port) or MMIO device write to
    emu.checkers.dpor (which would order every vCPU's ucalls against each other)."""
    gvm = GuestVM(write_guest(gdir, "three", THREE), vm=vm, vcpus=2)
    kvm = gvm.machine.kvm
    keys = []
    real = kvm.touch

    def touch(key, write=True):
        keys.append(key)
        return real(key, write)

    monkeypatch.setattr(kvm, "touch", touch)
    gvm.run().assert_ok()
    assert not [k for k in keys if isinstance(k, tuple) and k[0] in ("pio", "mmio_device")]


def test_no_memslot_may_cover_the_ucall_gpa(gdir):
    gvm = GuestVM(write_guest(gdir, "three", THREE))
    for gpa, size in (
        (guestabi.UCALL_MMIO_GPA, 0x1000),
        (guestabi.EMU_MMIO_GPA - 0x1000, 0x2000),
        (guestabi.UCALL_MMIO_GPA - 0x10000, 0x20000),
    ):
        with pytest.raises(KvmIoctlError) as e:
            gvm.mem_region_add(10, gpa, size, guest_memfd=False)
        assert e.value.errno == 17 and "MMIO" in str(e.value)
    gvm.mem_region_add(10, guestabi.UCALL_MMIO_GPA + 0x1000, 0x1000, guest_memfd=False)  # the page after: fine
    gvm.run().assert_ok()
