"""The JSON output's schemas (docs/schema/*.schema.json): valid schemas, documented in docs/json.md,
strict on the core fields, open to new ones, and applied to every `--json` output of the tests
(tests/conftest.py hooks tests/cli_json.py into every CLI call)."""

import copy
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

import cli_json
from emu import cli

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ("run", "explore", "replay", "campaign")


def emu_json(*args):
    """``python -m emu ARGS --json`` in-process: (exit status, the object), validated by the hook."""
    out = io.StringIO()
    status = cli.main([*map(str, args), "--json"], out)
    return status, json.loads(out.getvalue())


def errors(name, obj):
    return [e.message for e in cli_json.validator(name).iter_errors(obj)]


@pytest.fixture(scope="module")
def outputs():
    """One real output of each kind (a few tenths of a second each)."""
    res = {}
    res["run"] = emu_json("run", "hello")
    res["run_td"] = emu_json("run", "private", "--vm", "tdx", "--dump-tables")
    res["explore"] = emu_json("explore", "race2", "--vm", "tdx", "--vcpus", "2", "--dpor", "--no-freeze")
    res["replay"] = emu_json(
        "explore",
        "race2",
        "--vm",
        "tdx",
        "--vcpus",
        "2",
        "--no-freeze",
        "--replay",
        res["explore"][1]["first_failure"]["minimized"],
    )
    res["campaign"] = emu_json(
        "campaign", "accept2", "--vm", "tdx", "--vcpus", "2", "--runs", "60", "--seed", "2", "--bug", "busy-is-fatal"
    )
    return res


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_is_a_valid_draft_2020_12_schema(name):
    schema = json.loads((cli_json.SCHEMA_DIR / f"{name}.schema.json").read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema.get("additionalProperties", True) is True  # new fields stay allowed


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_required_field_is_documented(name):
    """docs/json.md names every core field of every schema (nested ones too)."""
    doc = (ROOT / "docs" / "json.md").read_text()
    schema = json.loads((cli_json.SCHEMA_DIR / f"{name}.schema.json").read_text())

    def required(node):
        if isinstance(node, dict):
            yield from node.get("required", ())
            for v in node.values():
                yield from required(v)
        elif isinstance(node, list):
            for v in node:
                yield from required(v)

    fields = set(required(schema))
    assert fields
    missing = sorted(f for f in fields if f"`{f}`" not in doc and f'"{f}"' not in doc)
    assert not missing, f"docs/json.md does not mention {missing}"


def test_real_outputs_follow_their_schemas(outputs):
    (s_run, run), (s_td, td) = outputs["run"], outputs["run_td"]
    assert s_run == 0 and run["exit"] == "hlt" and run["shared_bit"] is None and run["vcpus"][0]["efer"]
    assert s_td == 0 and td["shared_bit"] == 1 << 47 and td["stats"]["seamcalls"]["TDH_MEM_PAGE_AUG"] > 0
    assert td["tables"] and "rflags" not in td["vcpus"][0]  # a TD's registers: GPRs, rip, cr3
    s_ex, ex = outputs["explore"]
    assert s_ex == 1 and ex["failures"] == 1 and ex["first_failure"]["preemptions"] == 1
    s_rp, rp = outputs["replay"]
    assert s_rp == 1 and "TDX_EPT_WALK_FAILED" in rp["error"]
    s_c, camp = outputs["campaign"]
    assert s_c == 1 and camp["failures"] and camp["failures"][0]["reproducer"].startswith("python -m emu ")
    for key, name in (
        ("run", "run"),
        ("run_td", "run"),
        ("explore", "explore"),
        ("replay", "replay"),
        ("campaign", "campaign"),
    ):
        assert errors(name, outputs[key][1]) == [], key


@pytest.mark.parametrize(
    "name,path,bad",
    [
        ("run", ("exit",), None),  # dropped
        ("run", ("exit",), 0),  # another type
        ("run", ("error",), 1),
        ("run", ("reports",), "14341135807438812874"),
        ("run", ("reports", 0), -1),  # not a u64
        ("run", ("report_vcpus",), None),
        ("run", ("syncs",), [[0]]),  # a sync is [vcpu, value, ...]
        ("run", ("stats", "seamcalls"), None),
        ("run", ("stats", "pages_mapped", "2m"), None),
        ("run", ("stats", "ept_violations"), "7"),
        ("run", ("vcpus",), []),
        ("run", ("vcpus", 0, "rip"), None),
        ("run", ("vcpus", 0, "rax"), 1.5),
        ("explore", ("runs",), None),
        ("explore", ("complete",), "yes"),
        ("explore", ("first_failure", "schedule"), "0*15.1*21"),
        ("explore", ("first_failure", "error"), None),
        ("replay", ("trace",), "a line"),
        ("replay", ("reports",), [1, 2]),
        ("campaign", ("outcomes", "survived"), None),
        ("campaign", ("failures", 0, "reproducer"), None),
        ("campaign", ("interrupted",), None),
    ],
)
def test_a_broken_core_field_is_refused(outputs, name, path, bad):
    key = {"run": "run", "explore": "explore", "replay": "replay", "campaign": "campaign"}[name]
    obj = copy.deepcopy(outputs[key][1])
    node = obj
    for p in path[:-1]:
        node = node[p]
    if bad is None:
        del node[path[-1]]
    else:
        node[path[-1]] = bad
    assert errors(name, obj), f"{name}: {path} = {bad!r} was accepted"


def test_new_fields_and_values_are_accepted(outputs):
    """What other work adds must not need a schema change: new exits, errno, memory_fault,
    I/O counters, syncs with their further arguments, new campaign outcomes."""
    run = copy.deepcopy(outputs["run"][1])
    run.update(
        exit="memory_fault",
        error="vCPU 0: KVM_EXIT_MEMORY_FAULT ...",
        errno=14,
        memory_fault={"flags": 8, "gpa": 0x1000000, "size": 4096},
    )
    run["stats"]["io"] = {"in": 1, "out": 2}
    run["syncs"] = [[0, 1], [1, 2, 3, 4, 5, 6]]
    run["vcpus"][0]["xcr0"] = 3
    assert errors("run", run) == []
    run["exit"] = "interrupted"
    assert errors("run", run) == []
    camp = copy.deepcopy(outputs["campaign"][1])
    camp["outcomes"]["hang"] = 2
    camp["limits"] = {"max_insns": 10**7}
    assert errors("campaign", camp) == []
    ex = copy.deepcopy(outputs["explore"][1])
    ex["first_failure"]["plans"] = ["spte_cmpxchg@1"]
    ex["hangs"] = 0
    assert errors("explore", ex) == []


def test_schema_of_each_command_line():
    assert cli_json.schema_name(["run", "hello", "--json"]) == "run"
    assert cli_json.schema_name(["explore", "race2", "--replay", "emu-sched/1:0*3", "--json"]) == "replay"
    assert cli_json.schema_name(["explore", "race2", "--random", "3", "--json"]) == "explore"
    assert cli_json.schema_name(["campaign", "race2", "--json"]) == "campaign"
    assert cli_json.schema_name(["run", "hello"]) is None
    assert cli_json.schema_name(["inject", "--list", "--json"]) is None
    assert cli_json.emu_args([sys.executable, "-m", "emu", "run", "x"]) == ["run", "x"]
    assert cli_json.emu_args([sys.executable, "-m", "pytest"]) is None


def test_the_hook_checks_every_subprocess_call():
    """A process that looks like `python -m emu run ... --json` and prints an object its schema
    refuses fails the test that ran it (here the "emu" is a stand-in printing a bad object)."""
    fake = [sys.executable, "-c", "print('{\"exit\": 5}')", "-m", "emu", "run", "hello", "--json"]
    with pytest.raises(AssertionError, match=re.escape("docs/schema/run.schema.json")):
        subprocess.run(fake, capture_output=True, text=True, timeout=60)
    silent = [sys.executable, "-c", "pass", "-m", "emu", "run", "hello", "--json"]
    with pytest.raises(AssertionError, match="printed no JSON object"):
        subprocess.run(silent, capture_output=True, timeout=60)
    refused = [sys.executable, "-c", "import sys; sys.exit(2)", "-m", "emu", "run", "hello", "--json"]
    assert subprocess.run(refused, capture_output=True, timeout=60).returncode == 2  # bad input: no JSON


def test_the_hook_checks_in_process_calls(monkeypatch):
    """cli.main([... --json]) in-process goes through the same check."""
    out = io.StringIO()
    assert cli.main(["run", "hello", "--json"], out) == 0
    assert json.loads(out.getvalue())["exit"] == "hlt"
    monkeypatch.setattr("emu.userspace.vmm.Result.as_json", lambda self: {"exit": "hlt"})
    with pytest.raises(AssertionError, match="is a required property"):
        cli.main(["run", "hello", "--json"], io.StringIO())
