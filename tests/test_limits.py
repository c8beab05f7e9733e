"""Never hang, always answer (docs/limits.md): signals, --timeout and --max-insns, a dead VM that stops
every vCPU, the limits of explore and campaign, processes that stop answering, exceptions in hooks.

The signal tests send SIGINT/SIGTERM with os.kill to a subprocess spinning in guest code, as a user's
Ctrl-C or `kill` would, once its trace shows the vCPUs entered the guest.
"""

import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emu.checkers.explore import Explorer, Outcome, _explorer_error, in_children, CleanRunHangs
from emu.checkers.pool import pct_runs
from emu.checkers.sched import Scheduler, ReplayStrategy
from emu.hw.slice import BlockLimit
from emu.disasm import loop_range
from emu.kvm.kvm import KvmIoctlError, EIO
from emu.userspace.vmm import Machine

REPO = Path(__file__).resolve().parents[1]
GUESTS = REPO / "tests" / "guests"


def emu(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "emu", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120, **kw
    )


_started = []


def start(*args):
    """emu in a process group of its own (a terminal's Ctrl-C reaches the whole group)."""
    p = subprocess.Popen(
        [sys.executable, "-m", "emu", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _started.append(p)
    return p


@pytest.fixture(autouse=True)
def _no_process_left():
    """A test that failed half-way leaves no spinning emu behind."""
    yield
    while _started:
        p = _started.pop()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


def wait_for(pred, what, seconds=60):
    deadline = time.monotonic() + seconds
    while not pred():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def running(p):
    """Wait until ``p`` (emu run) runs its vCPUs: its watchdog thread has started (the run began), and
    a moment more for them to reach the guest's loop."""
    wait_for(lambda: p.poll() is None and len(os.listdir(f"/proc/{p.pid}/task")) >= 2, "the run began")
    time.sleep(0.5)


def descendants(pid):
    """Every process below ``pid`` (from /proc)."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), ()):
            out.append(k)
            todo.append(k)
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- signals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "guest,vcpus,vm,sig,fmt",
    [
        ("spin_forever", 1, "default", signal.SIGINT, "jsonl"),
        ("spin_forever", 1, "tdx", signal.SIGTERM, "perfetto"),
        ("wait_forever", 2, "default", signal.SIGTERM, "perfetto"),
        ("wait_forever", 2, "tdx", signal.SIGINT, "jsonl"),
    ],
)
def test_signal_stops_a_spinning_guest(tmp_path, guest, vcpus, vm, sig, fmt):
    trace = tmp_path / f"trace.{fmt}"
    p = start(
        "run",
        guest,
        "--vcpus",
        vcpus,
        "--vm",
        vm,
        "--json",
        "--trace",
        fmt,
        "--trace-file",
        trace,
        "--trace-events",
        "kvm_entry,kvm_exit,kvm_userspace_exit",
    )
    running(p)
    os.kill(p.pid, sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err
    assert err == ""
    res = json.loads(out)
    assert res["exit"] == "interrupted"
    name = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}[sig]
    spinners = range(vcpus) if guest == "spin_forever" else [1]
    assert res["error"].startswith(f"{name}: ")
    for i in spinners:
        assert f"vCPU {i} at rip " in res["error"]
    loop = "spin_loop+0x0..spin_even+0x1" if guest == "spin_forever" else "wait_for_flag+0x0..wait_for_flag+0xb"
    assert res["error"].count(f"({loop})") == len(spinners)
    assert res["vcpu_exits"] == ["interrupted" if i in spinners else "hlt" for i in range(vcpus)]
    if guest == "wait_forever":  # interrupted: where every vCPU is
        assert "; vCPU 0 ended (hlt) at rip 0x" in res["error"] and " emu_halt+0x" in res["error"]
    # The trace is whole: Perfetto's JSON closed, every JSON line complete.
    text = trace.read_text()
    if fmt == "perfetto":
        events = json.loads(text)["traceEvents"]
    else:
        events = [json.loads(line) for line in text.splitlines()]
    assert sum(1 for e in events if e.get("name", e.get("event")) == "kvm_entry") >= vcpus


def test_sigint_text_output_names_the_loop():
    p = start("run", "spin_forever")
    running(p)
    os.kill(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err == ""
    line = [ln for ln in out.splitlines() if ln.startswith("exit:")]
    assert len(line) == 1
    assert line[0].startswith("exit: interrupted: SIGINT: vCPU 0 at rip 0x")
    assert "looping in 0x100004-0x100017 (spin_loop+0x0..spin_even+0x1)" in line[0]


# -- the watchdogs --------------------------------------------------------------------------------------
def test_max_insns_stops_at_the_same_point_every_time():
    runs = [
        json.loads(emu("run", "spin_forever", "--max-insns", n, "--json").stdout)
        for n in (1_000_003, 1_000_003, 1_000_004)
    ]
    a, b, c = runs
    assert a["exit"] == "hang" and a["stats"]["guest_blocks"] == 1_000_003
    assert a["vcpus"] == b["vcpus"] and a["error"] == b["error"]
    assert a["error"].startswith("--max-insns 1000003 reached: vCPU 0 at rip ")
    # Block-granular: one block more is another point of the loop (the loop is two blocks a turn).
    assert c["vcpus"][0]["rip"] != a["vcpus"][0]["rip"] or c["vcpus"][0]["rax"] != a["vcpus"][0]["rax"]
    assert abs(a["vcpus"][0]["rax"] - 1_000_003 // 2) <= 2  # two blocks per turn of the loop


@pytest.mark.parametrize("vm", ["default", "tdx"])
def test_max_insns_two_vcpus_deterministic(vm):
    outs = [
        json.loads(emu("run", "spin_forever", "--vm", vm, "--vcpus", 2, "--max-insns", 300_007, "--json").stdout)
        for _ in range(2)
    ]
    assert outs[0]["exit"] == "hang" and outs[0]["vcpus"] == outs[1]["vcpus"]
    assert sum(v["rax"] for v in outs[0]["vcpus"]) > 0
    assert outs[0]["stats"]["guest_blocks"] == 300_007


def test_timeout_is_a_hang():
    p = emu("run", "wait_forever", "--vcpus", 2, "--timeout", 0.5, "--json")
    assert p.returncode == 1 and p.stderr == ""
    res = json.loads(p.stdout)
    assert res["exit"] == "hang" and res["vcpu_exits"] == ["hlt", "hang"]
    assert res["error"].startswith("--timeout 0.5 s reached: vCPU 1 at rip ")
    assert "mov rax, qword ptr [rip + " in res["error"]
    assert "looping in " in res["error"] and "vCPU 0" not in res["error"]


@pytest.mark.parametrize(
    "opt,value",
    [
        ("--timeout", "0"),
        ("--timeout", "-1"),
        ("--timeout", "x"),
        ("--max-insns", "0"),
        ("--max-insns", "1.5"),
        ("--max-insns", "lots"),
    ],
)
def test_bad_limits_are_refused(opt, value):
    p = emu("run", "hello", opt, value)
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.splitlines()) == 1
    assert p.stderr.startswith(f"emu: error: argument {opt}: ")


def test_progress_line_on_a_terminal_only():
    import pty

    master, slave = pty.openpty()
    p = subprocess.Popen(
        [sys.executable, "-m", "emu", "run", "spin_forever", "--timeout", "2.6"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    out = p.stdout.read()
    p.wait()
    os.close(master)
    err = b"".join(chunks).decode()
    assert p.returncode == 1 and "exit: hang: --timeout 2.6 s reached" in out
    lines = [t for t in err.split("\r") if t.strip()]
    assert lines and all("guest blocks" in t and "exits" in t and "pages mapped" in t for t in lines)
    assert err.endswith("\r") and not err.rstrip("\r").split("\r")[-1].strip()  # cleared
    # On a pipe: never (the same run).
    p = emu("run", "spin_forever", "--timeout", "2.6")
    assert p.returncode == 1 and p.stderr == ""


# -- the loop finder ------------------------------------------------------------------------------------
def _reader(base, code):
    return lambda a, n: code[a - base : a - base + n] if base <= a < base + len(code) else b""


@pytest.mark.parametrize(
    "code,rip,expect",
    [
        ("ebfe", 0, (0, 2)),  # 1: jmp 1b
        ("488b05000000004885c074f4f4", 0, (0, 12)),  # mov; test; jz 1b; hlt
        ("488b05000000004885c074f4f4", 12, None),  # the hlt after it
        ("e800000000ebf9", 0, (0, 7)),  # 1: call f; jmp 1b (f returns)
        ("4885c07402ebf9c3", 0, (0, 7)),  # a loop left by a jz to a ret
        ("c3", 0, None),
        ("ffe0", 0, None),  # jmp rax: unknown
    ],
)
def test_loop_range(code, rip, expect):
    code = bytes.fromhex(code)
    assert loop_range(_reader(0x1000, code), 0x1000 + rip) == (
        None if expect is None else (0x1000 + expect[0], 0x1000 + expect[1])
    )


# -- a dead VM stops every vCPU ---------------------------------------------------------------------------
@pytest.mark.parametrize("vm", ["default", "tdx"])
def test_dead_vm_kicks_a_vcpu_spinning_in_guest_mode(vm):
    """kvm_vm_dead() while vCPU 1 spins in guest mode, between two of its slices: it leaves guest
    mode at once (KVM_REQ_VM_DEAD and the kick), runs no more guest code, and KVM_RUN fails -EIO.
    (vCPU 1 enters first, while vCPU 0 may still run, so it runs in slices; vCPU 0 then halts.)"""
    m = Machine("wait_forever", vm=vm, vcpus=2)
    kvm = m.kvm
    v1 = m.vcpus[1]
    state = {}
    guard = BlockLimit(10**7)  # without the kick: a bounded spin, then a failure
    for v in m.vcpus:
        v.hw.limit = guard

    def on_step(s, who, what):
        if what == "guest_slice" and who == 1 and "blocks" not in state and all(t.done for t in s.tasks[:1]):
            kvm.kvm_vm_dead("the test kills the VM")
            state["blocks"] = v1.hw.blocks

    results = {}

    def task(v):
        def body():
            while True:
                try:
                    run = v.run()
                except KvmIoctlError as e:
                    results[v.vcpu_id] = e.errno
                    return
                if run.name == "hlt":
                    results[v.vcpu_id] = "hlt"
                    return

        return body

    sched = Scheduler(ReplayStrategy([1], strict=False), on_step=on_step, max_steps=20000)
    kvm.sched = sched
    if m.td:
        m.host.tdx_module.sched = sched
    for v in m.vcpus:
        sched.spawn(task(v))
    sched.run()
    assert results == {0: "hlt", 1: EIO}
    assert v1.hw.blocks == state["blocks"]  # not one more block of guest code
    assert not v1.hw.in_guest


def test_campaign_spinner_and_a_dying_vcpu():
    """vCPU 1 spins while an injected fault kills the VM under vCPU 0: every run ends (kvm_bug_on or
    hang), none is broken, and the campaign's table goes on."""
    p = emu(
        "campaign",
        GUESTS / "spin_waiter.S",
        "--vm",
        "tdx",
        "--vcpus",
        2,
        "--runs",
        8,
        "--max-points",
        2,
        "--inject",
        "seamcall.TDH_MEM_PAGE_AUG@1=TDX_OPERAND_INVALID",
        "--json",
    )
    assert p.returncode in (0, 1), p.stderr
    res = json.loads(p.stdout)
    assert res["runs"] == 8 and res["outcomes"]["invariant_broken"] == 0
    assert res["outcomes"]["kvm_bug_on"] + res["outcomes"]["hang"] == 8
    assert res["points"]["seamcall.TDH_MEM_PAGE_AUG"]["kvm_bug_on"] == 8


# -- explore and campaign: limits and hangs ------------------------------------------------------------
def test_explore_reports_a_schedule_that_hangs():
    p = emu("explore", GUESTS / "lost_wakeup.S", "--vcpus", 2, "--json")
    assert p.returncode == 1, p.stderr
    res = json.loads(p.stdout)
    assert res["run_limit"] == 10**7  # the clean run is short: the floor
    f = res["first_failure"]
    assert f["error"].startswith("hang: --max-insns 10000000 reached: vCPU 1 at rip ")
    assert "(lw_spin+0x0..lw_spin+0xb)" in f["error"]
    # The printed reproducer hangs the same way.
    p = emu(
        "explore",
        GUESTS / "lost_wakeup.S",
        "--vcpus",
        2,
        "--max-insns",
        res["run_limit"],
        "--replay",
        f["minimized"],
        "--json",
    )
    assert p.returncode == 1
    assert json.loads(p.stdout)["error"] == f["error"]


def test_explore_random_hangs_on_every_path():
    """PCT runs that hang, on the in-place workers and in the fork tree, give the same outcomes."""
    outs = {}
    for inplace in (True, False):
        ex = Explorer(lambda: Machine(str(GUESTS / "lost_wakeup.S"), vcpus=2), max_insns=200_000)
        ex.inplace = inplace
        r = ex.random(runs=12, seed=4, stop_at_first=False)
        assert r.runs == 12 and 0 < r.failures < 12
        assert r.first_failure.error.startswith("hang: --max-insns 200000 reached")
        outs[inplace] = r.failures
    assert outs[True] == outs[False]


@pytest.mark.parametrize("cmd", ["explore", "campaign"])
def test_a_clean_run_that_hangs_is_one_error(cmd):
    p = emu(cmd, "wait_forever", "--vcpus", 2, "--max-insns", 100_000)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.splitlines()) == 1
    assert "hangs" in p.stderr and "--max-insns 100000 reached: vCPU 1 at rip " in p.stderr


def test_explorer_clean_run_hangs_raises():
    ex = Explorer(lambda: Machine("wait_forever", vcpus=2), max_insns=50_000)
    with pytest.raises(CleanRunHangs, match="wait_for_flag"):
        ex.dfs(bound=1)


def test_stalled_child_is_killed_and_reported():
    """in_children: a run's process that does not answer within ``stall`` seconds is killed, its
    run is a hang, and the others go on."""

    def run(k):
        def fn():
            if k == 1:
                time.sleep(600)
            return Outcome([], None, {0: [k]})

        return fn

    t0 = time.monotonic()
    outs = list(in_children((run(k) for k in range(4)), _explorer_error, 2, stall=1.0))
    assert [o.error for o in outs] == [None, "hang: the run's process stopped answering (killed after 1 s)", None, None]
    assert [o.reports for o in outs if o.error is None] == [{0: [0]}, {0: [2]}, {0: [3]}]
    assert time.monotonic() - t0 < 60


def test_stalled_pool_worker_is_replaced():
    """pct_runs: a worker stuck in one run is killed after ``stall`` seconds; that run is a hang,
    and the runs queued behind it run on the worker that replaces it."""

    def serve(req, res):
        while True:
            head = req.read(16)
            if len(head) < 16:
                return
            n, seed = struct.unpack("<QQ", head)
            if seed == 1003:
                time.sleep(600)
            data = pickle.dumps((n, Outcome([], None, {0: [seed]}), [(n, (0, 1), None, "start")]))
            res.write(struct.pack("<Q", len(data)) + data)
            res.flush()

    class Never:
        def choose(self, sched, enabled, current, what):
            return type(enabled[0])(-1)

    outs = list(pct_runs(range(1000, 1010), 10, 2, serve, lambda s: Never(), _explorer_error, stall=1.0))
    assert [o.error for o in outs].count(None) == 9
    assert outs[3].error.startswith("hang: the run's process stopped answering")
    assert [o.reports[0][0] for i, o in enumerate(outs) if i != 3] == [s for s in range(1000, 1010) if s != 1003]


# -- Ctrl-C on explore and campaign -------------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["explore", GUESTS / "lost_wakeup.S", "--vcpus", 2, "--random", 500, "--all", "--max-insns", 10**12],
        ["explore", GUESTS / "lost_wakeup.S", "--vcpus", 2, "--bound", 3, "--all", "--max-insns", 10**12],
        ["campaign", "convert", "--vm", "tdx", "--runs", 2000],
    ],
)
def test_ctrl_c_keeps_results_and_leaves_no_process(args):
    p = start(*args)
    # Runs under way: processes running runs (some of them spinning in guest code).
    wait_for(lambda: len(descendants(p.pid)) >= 1, "runs started")
    time.sleep(1.5)
    # A run's process may just have ended and the next not yet begun (DFS forks one per run): wait
    # for one to be there, so that the signal finds a run under way.
    procs = []
    wait_for(lambda: procs.extend(descendants(p.pid)) or procs, "a run under way")
    os.killpg(p.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole group
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130, err
    assert "internal error" not in err and "Traceback" not in err
    assert "interrupted" in out
    time.sleep(0.2)
    assert [q for q in procs if alive(q)] == []


# -- exceptions in Unicorn hooks are internal errors ------------------------------------------------------
HOOKS = {
    "_tlb_fill": False,
    "_exit_site_c": None,
    "_missed_cpuid": 1,
    "_missed_in": 0,
    "_missed_out": None,
    "_insn_invalid": True,
    "_interrupt": None,
    "_pause": None,
    "_fill_slow": -1,
    "_fetch_slow": False,
}


def test_every_hook_is_guarded():
    """Every Unicorn hook of the vCPU goes through emu.hw.vcpu.hook (its exceptions are kept)."""
    from emu.hw.vcpu import Vcpu

    for name in HOOKS:
        assert getattr(getattr(Vcpu, name), "guarded", False), name


@pytest.mark.parametrize(
    "name,guest",
    [
        ("_tlb_fill", "hello"),
        ("_exit_site", "hello"),
        ("_fetch_slow", "hello"),
        ("_insn_invalid", REPO / "tests" / "kvm" / "guests" / "ud.S"),
    ],
)
@pytest.mark.parametrize("vm", ["default", "tdx"])
def test_hook_exception_is_raised_not_a_guest_fault(monkeypatch, capfd, name, guest, vm):
    """The TLB fill (whose refused fill fails emu_start too) of the Python MMU, the compiled fill's
    hand-over to the Python model (a code page to scan), an instruction hook, the invalid-opcode
    hook: the hook's exception comes out of the run with its traceback, no exit is made of it, and
    nothing is printed."""
    import traceback
    from emu.hw import native
    from emu.hw.vcpu import Vcpu, hook

    def boom(*a, **k):
        raise IndexError("a bug in a hook")

    if name == "_tlb_fill":
        monkeypatch.setattr(native, "mmu", None)  # vCPUs with the Python MMU
        monkeypatch.setattr("emu.hw.vcpu.translate", boom)  # the walk, in the real fill hook
    elif name == "_fetch_slow":
        if native.mmu is None:
            pytest.skip(f"no compiled MMU: {native.why_not}")
        monkeypatch.setattr(Vcpu, "_scan_code_page", boom)  # what the compiled fill hands over
    elif name == "_exit_site":
        monkeypatch.setattr(Vcpu, name, boom)  # what the C code hook (_exit_site_c) calls
    else:
        # (before the vCPUs exist: hooks are bound at creation)
        monkeypatch.setattr(Vcpu, name, hook(returns=HOOKS[name])(boom))
    m = Machine(str(guest), vm=vm)
    with pytest.raises(IndexError, match="a bug in a hook") as info:
        m.run()
    assert "in boom" in "".join(traceback.format_tb(info.value.__traceback__))
    assert capfd.readouterr().err == ""


def test_shared_eptp_beyond_host_memory_is_an_internal_error(monkeypatch):
    """(issue 28, defect 6) A shared EPT root beyond host memory is refused by TDH.VP.WR
    (shared_hpa_check()); an exception the EPT walk raises anyway in a TD vCPU's fill hook (a bug
    of the model's) is raised, not turned into a TD triple fault."""
    from tdxmod.module import MD_TDVPS_VMCS_SHARED_EPTP
    from tdxmod import abi as A
    from emu.hw import native
    from emu.hw import vcpu as vcpu_mod

    monkeypatch.setattr(native, "mmu", None)  # vCPUs with the Python MMU
    m = Machine("sharedrw", vm="tdx")
    v = m.vcpus[0]
    v.mmu_load()
    assert (
        m.kvm.x86_ops.vp_wr(v, MD_TDVPS_VMCS_SHARED_EPTP, 1 << 46).rax & ~0xFFFFFFFF
        == A.TDX_METADATA_FIELD_VALUE_NOT_VALID & ~0xFFFFFFFF
    )

    def beyond(*a, **k):
        raise IndexError("host memory index out of range")

    monkeypatch.setattr(vcpu_mod, "translate", beyond)
    with pytest.raises(IndexError):
        m.run()


def test_hook_exception_cli_one_line_or_traceback(tmp_path):
    script = (
        "import sys; from emu.hw import vcpu\n"
        "def boom(*a, **k): raise IndexError('a bug in a hook')\n"
        "vcpu.Vcpu._scan_code_page = boom\n"
        "from emu.cli import main; sys.exit(main(['run', 'hello']))\n"
    )
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and p.stdout == ""
    assert p.stderr == ("emu: internal error: IndexError: a bug in a hook (EMU_DEBUG=1 shows the traceback)\n")
    p = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, EMU_DEBUG="1"),
    )
    assert p.returncode == 1 and "Traceback" in p.stderr and "in boom" in p.stderr


# -- bad inputs that slipped through -------------------------------------------------------------------------
def test_empty_source_has_no_start(tmp_path):
    src = tmp_path / "empty.S"
    src.write_text("")
    p = emu("run", src)
    assert p.returncode == 2 and p.stdout == ""
    assert (
        p.stderr == f"emu: error: {src}: no _start: a guest's code begins at the global label _start "
        f"(.globl _start, then _start: on its first instruction)\n"
    )


@pytest.mark.skipif(not Path("/bin/true").is_file(), reason="no /bin/true")
def test_dynamic_elf_is_refused():
    from elftools.elf.elffile import ELFFile

    with open("/bin/true", "rb") as f:
        if not any(s["p_type"] == "PT_INTERP" for s in ELFFile(f).iter_segments()):
            pytest.skip("/bin/true is static here")
    p = emu("run", "/bin/true")
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.splitlines()) == 1
    assert "a dynamically linked program (it asks for the interpreter " in p.stderr


def test_trace_file_that_cannot_be_written():
    p = emu("run", "hello", "--trace", "jsonl", "--trace-file", "/dev/full")
    assert p.returncode == 2
    assert p.stderr == "emu: error: cannot write the trace to /dev/full: No space left on device\n"
    assert "exit: hlt" in p.stdout and "report  vcpu 0:" in p.stdout  # the results, still


def test_unknown_trace_event_is_refused():
    p = emu("run", "hello", "--trace", "--trace-events", "kvm_exit,kvm_exitt")
    assert p.returncode == 2 and p.stdout == "" and len(p.stderr.splitlines()) == 1
    assert "unknown event 'kvm_exitt'; the events are: " in p.stderr and "kvm_exit," in p.stderr


def test_every_emitted_event_is_known():
    """--trace-events takes emu.trace.EVENTS: every event name the code emits must be there."""
    import re
    from emu.trace import EVENTS

    emitted = set()
    for path in list((REPO / "emu").rglob("*.py")) + list((REPO / "tdxmod").rglob("*.py")):
        emitted |= set(re.findall(r'(?:trace_emit|\bemit)\(\s*"([a-z_0-9]+)"', path.read_text()))
    assert emitted and emitted <= set(EVENTS), emitted - set(EVENTS)


def test_host_event_bad_step_blames_the_step():
    p = emu("run", "hello", "--host", "migrate 0x0-0x1000@abc")
    assert p.returncode == 2
    assert "bad step in host event 'migrate 0x0-0x1000@abc': STEP (after @)" in p.stderr


def test_td_exception_line_has_the_instruction():
    lines = {}
    for vm in ("default", "tdx"):
        p = emu("run", REPO / "tests" / "kvm" / "guests" / "ud.S", "--vm", vm)
        assert p.returncode == 1
        lines[vm] = [ln for ln in p.stdout.splitlines() if ln.startswith("exit:")][0]
    assert lines["tdx"] == lines["default"]
    assert "at rip 0x100001 _start+0x1: ud2 (no IDT: triple fault)" in lines["tdx"]


def test_stalled_ray_worker_is_replaced():
    """Cluster.map (emu.checkers.distributed) on a stand-in for Ray whose worker never finishes the
    batch holding run 3: after ``stall`` seconds a run that worker is killed, that batch's runs are
    hangs, the batch queued behind it runs on the worker that replaces it, and the results come in
    run order."""
    from emu.checkers.distributed import Cluster

    class Ref:
        def __init__(self, value, ok, before):
            self.value, self.ok, self.before = value, ok, before

        @property
        def ready(self):  # an actor runs its batches one after the other
            return self.ok and all(r.ready for r in self.before)

    class Actor:
        def __init__(self, ray, *job):
            self.ray, self.job = ray, job
            self.run_batch = self
            self.refs = []

        def remote(self, batch_no, attempt, items):
            self.ray.calls.append((self, batch_no))
            ref = Ref(("ok", [Outcome([], None, {0: [i]}) for i in items]), 3 not in items, list(self.refs))
            self.refs.append(ref)
            return ref

    class FakeRay:
        def __init__(self):
            self.calls, self.killed, self.created = [], [], 0

        def remote(self, **_):
            def make(_s, *job):
                self.created += 1
                return Actor(self, *job)

            return lambda cls: type("W", (), {"remote": make})()

        def put(self, x):
            return x

        def cluster_resources(self):
            return {"CPU": 2}

        def wait(self, refs, num_returns=1, timeout=None):
            ready = [r for r in refs if r.ready][:num_returns]
            if not ready:
                time.sleep(timeout)
            return ready, [r for r in refs if r not in ready]

        def get(self, ref):
            return ref.value

        def kill(self, a):
            self.killed.append(a)

    fake = FakeRay()
    cl = Cluster(fake, "fake")
    outs = list(
        cl.map(
            type("Spec", (), {"on_error": staticmethod(_explorer_error)})(),
            iter(range(8)),
            8,
            elf=REPO / "build" / "guest" / "hello.elf",
            machine={},
            stall=0.3,
        )
    )
    assert len(outs) == 8
    assert fake.created == 3  # two workers, and the one that replaced one
    stuck = fake.killed[0]  # killed first, before the job's end
    assert 3 in [b for a, b in fake.calls if a is stuck]
    hung = [i for i, o in enumerate(outs) if o.error is not None]
    assert hung == [3] and all(
        o.error.startswith("hang: the run's Ray worker stopped answering") for o in (outs[i] for i in hung)
    )
    assert [o.reports for i, o in enumerate(outs) if i not in hung] == [{0: [i]} for i in range(8) if i not in hung]
