"""The command line, `python -m emu run ...`, as a user runs it (a subprocess, cwd = the repository).

Contract (shared/DESIGN.md "CLI"): `--json` prints one JSON object (exit, reports, stats, vcpus
with lowercase register names); `--trace` writes KVM-tracepoint-named events to stderr; exit
status 0 for a normal end, 1 for an error exit of the guest, 2 for bad input, which is reported
as exactly one line on stderr starting with "emu: error:" and never a traceback.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_GUESTS = REPO / "tests" / "kvm" / "guests"
REGS = [
    "rax",
    "rbx",
    "rcx",
    "rdx",
    "rsi",
    "rdi",
    "rbp",
    "rsp",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rip",
    "rflags",
]


def emu(*args):
    return subprocess.run(
        [sys.executable, "-m", "emu", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & ((1 << 64) - 1)
    return h


def hello_hash():
    src = (REPO / "guest" / "hello.S").read_text()
    return fnv1a64(re.search(r'^greeting:\s*\n\s*\.ascii\s+"([^"]*)"', src, re.M).group(1).encode())


def assert_usage_error(p):
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("emu: error: ")
    assert "Traceback" not in p.stderr
    assert p.stdout == ""
    return lines[0]


class TestRunJson:
    """`run GUEST --json`: one JSON object on stdout."""

    @pytest.mark.parametrize("extra", [[], ["--hugepages", "2m"]])
    def test_hello_json(self, extra):
        p = emu("run", "hello", "--json", *extra)
        assert p.returncode == 0, p.stderr
        assert p.stderr == ""
        lines = p.stdout.splitlines()
        assert len(lines) == 1
        out = json.loads(lines[0])
        assert isinstance(out, dict)
        assert out["exit"] == "hlt"
        assert out["reports"] == [hello_hash()]
        assert all(type(v) is int for v in out["reports"])
        st = out["stats"]
        assert type(st["ept_violations"]) is int
        assert st["ept_violations"] == (3 if extra else 7)
        assert st["pages_mapped"] == ({"4k": 0, "2m": 3, "1g": 0} if extra else {"4k": 7, "2m": 0, "1g": 0})
        assert isinstance(out["vcpus"], list) and len(out["vcpus"]) == 1
        regs = out["vcpus"][0]
        assert set(REGS) <= set(regs)
        assert all(k == k.lower() and type(v) is int for k, v in regs.items())
        assert regs["rax"] == hello_hash()  # the hash is still in RAX at the HLT

    def test_json_two_vcpus(self):
        p = emu("run", "touch", "--json", "--vcpus", "2")
        assert p.returncode == 0, p.stderr
        out = json.loads(p.stdout)
        assert len(out["vcpus"]) == 2
        odd = sum(i * 0x1000 + 0x5A for i in range(1, 32, 2))
        even = sum(i * 0x1000 + 0x5A for i in range(0, 32, 2))
        assert sorted(zip(out["report_vcpus"], out["reports"])) == sorted([(0, 16), (0, even), (1, 16), (1, odd)])
        assert out["stats"]["ept_violations"] == out["stats"]["pages_mapped"]["4k"] == 39  # 32 + 7: two stacks

    def test_fail_guest_exits_1(self):
        p = emu("run", TEST_GUESTS / "fail.S", "--json")
        assert p.returncode == 1, p.stderr
        out = json.loads(p.stdout)
        assert out["exit"] == "fail" and out["reports"] == [7]
        assert out["error"] == "vCPU 0: the guest failed with code 0x2a (FAIL at _start+0x15)"

    def test_fail_guest_text(self):
        p = emu("run", TEST_GUESTS / "fail.S")
        assert p.returncode == 1
        assert "exit: fail: vCPU 0: the guest failed with code 0x2a" in p.stdout
        assert "Traceback" not in p.stderr

    def test_ud2_guest_exits_1(self):
        p = emu("run", TEST_GUESTS / "ud.S")
        assert p.returncode == 1
        assert "exit: shutdown: vCPU 0: unhandled guest exception #UD at rip 0x100001 _start+0x1: ud2" in p.stdout


class TestTrace:
    """`--trace` (text by default, or jsonl) goes to stderr, or to --trace-file."""

    def test_touch_trace_text(self):
        p = emu("run", "touch", "--trace")
        assert p.returncode == 0, p.stderr[-2000:]
        names = [m.group(1) for m in re.finditer(r"^\s*\S+ \[\d{3}\]\s+\d+\.\d{6}: (\w+):", p.stderr, re.M)]
        assert len(names) == len(p.stderr.splitlines())  # every line is an event line
        for ev in ("kvm_exit", "kvm_page_fault", "kvm_tdp_mmu_spte_changed", "kvm_entry", "kvm_mmu_set_spte"):
            assert ev in names
        assert names.count("kvm_page_fault") == 38  # one per first-touched 4K page
        assert p.stderr.count("reason EPT_VIOLATION") == 38
        assert names.count("kvm_tdp_mmu_spte_changed") == 38 + 5  # 38 leaves + 5 linked tables
        assert names.count("kvm_mmu_set_spte") == 38
        assert "EPT violations: 38" in p.stdout

    def test_trace_jsonl(self):
        p = emu("run", "hello", "--trace", "jsonl")
        assert p.returncode == 0
        events = [json.loads(line) for line in p.stderr.splitlines()]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert sum(e["event"] == "kvm_page_fault" for e in events) == 7

    def test_trace_file_and_filter(self, tmp_path):
        f = tmp_path / "t.txt"
        p = emu("run", "hello", "--trace-file", f, "--trace-events", "kvm_page_fault")
        assert p.returncode == 0 and p.stderr == ""
        lines = f.read_text().splitlines()
        assert len(lines) == 7 and all(": kvm_page_fault:" in line for line in lines)


class TestBadInput:
    """Bad input: exit status 2 and exactly one 'emu: error:' line on stderr."""

    def test_unknown_guest(self):
        line = assert_usage_error(emu("run", "nope"))
        assert "unknown guest 'nope'" in line and "hello" in line

    @pytest.mark.parametrize("mem", ["64X", "0", "3M", "-64M", "1.5G", "K", "", "64k"])
    def test_bad_mem(self, mem):
        assert_usage_error(emu("run", "hello", f"--mem={mem}"))

    @pytest.mark.parametrize("vcpus", ["0", "65", "-1", "x"])
    def test_bad_vcpus(self, vcpus):
        line = assert_usage_error(emu("run", "hello", f"--vcpus={vcpus}"))
        if vcpus == "0":
            assert line == "emu: error: bad vCPU count 0: 1 to 64"

    @pytest.mark.parametrize(
        "args",
        [
            ["run", "hello", "--bogus"],
            ["run"],
            [],
            ["walk", "hello"],
            ["run", "hello", "--trace", "bogus"],
            ["run", "hello", "--vm", "sev"],
        ],
    )
    def test_bad_options(self, args):
        line = assert_usage_error(emu(*args))
        if "--bogus" in args:
            assert line == "emu: error: unrecognized arguments: --bogus"

    def test_nonexistent_source(self, tmp_path):
        missing = tmp_path / "missing.S"
        assert assert_usage_error(emu("run", missing)) == f"emu: error: {missing}: no such file"

    def test_neither_elf_nor_source(self, tmp_path):
        f = tmp_path / "notes.txt"
        f.write_text("hello\n")
        assert (
            assert_usage_error(emu("run", f))
            == f"emu: error: {f} is not an ELF file, assembler source (.S) or C source (.c)"
        )

    def test_truncated_elf(self, tmp_path):
        f = tmp_path / "broken"
        f.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(9))
        line = assert_usage_error(emu("run", f))
        assert str(f) in line

    def test_directory(self, tmp_path):
        assert assert_usage_error(emu("run", tmp_path)) == f"emu: error: {tmp_path} is not a file"

    def test_source_with_syntax_error(self, tmp_path):
        f = tmp_path / "bad.S"
        f.write_text(".intel_syntax noprefix\n.globl _start\n_start:\n    frobnicate rax\n    mov rax,\n")
        line = assert_usage_error(emu("run", f))
        assert line.startswith(f"emu: error: assembling {f} failed: ")
        assert "frobnicate" in line and ":4:" in line and ":5:" in line

    def test_trace_file_in_missing_directory(self, tmp_path):
        line = assert_usage_error(emu("run", "hello", "--trace-file", tmp_path / "no" / "t.txt"))
        assert line.startswith("emu: error: cannot open trace file")

    def test_mem_too_large_is_bad_input(self):
        assert_usage_error(emu("run", "hello", "--mem", "1000000G"))


class TestDumpTables:
    """`--dump-tables`: one line per leaf of the direct root, GPA -> HPA."""

    def test_dump_tables_text(self):
        p = emu("run", "hello", "--dump-tables")
        assert p.returncode == 0
        rows = re.findall(r"^\s*(?:gpa )?(0x[0-9a-f]+)\b.*\b4K\b.*\bpfn (0x[0-9a-f]+) A D\s*$", p.stdout, re.M)
        assert len(rows) == 7  # one line per leaf of the direct root
        gfns = [int(g, 16) >> 12 for g, _ in rows]
        assert gfns == sorted(gfns) and len(set(gfns)) == 7
        assert {0x100, 0x101, 0x102} <= set(gfns)  # hello's text, rodata and data pages
        offsets = {int(pfn, 16) - (int(g, 16) >> 12) for g, pfn in rows}
        assert len(offsets) == 1  # one memslot: pfn = hva >> 12 + gfn everywhere

    def test_dump_tables_keeps_json_stdout_parseable(self):
        p = emu("run", "hello", "--json", "--dump-tables")
        assert p.returncode == 0
        assert isinstance(json.loads(p.stdout), dict)


def test_wrong_unicorn_version_is_one_line(tmp_path):
    """The binding's private module path is only trusted on the tested versions (issue 13 part 5)."""
    fake = tmp_path / "sitecustomize.py"
    fake.write_text("import unicorn\nunicorn.__version__ = '2.2.0'\n")
    import os

    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    r = subprocess.run([sys.executable, "-m", "emu", "run", "hello"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "emu: error: emu needs the Unicorn Python binding 2.1 (tested with 2.1.4), "
        "found 2.2.0: pip install 'unicorn>=2.1.4,<2.2'"
    )
