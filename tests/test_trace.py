"""Tracing guest faults: the events of every layer and their fields, the three sinks, filters, golden text."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emu.checkers.explore import Explorer
from emu.trace import Tracer, ListSink, TextSink, JsonlSink
from emu.userspace.vmm import Machine

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"


def traced(guest, vm="default", events=None, gpa_range=None, **kw):
    sink = ListSink()
    t = Tracer([sink], events, gpa_range)
    m = Machine(guest, vm=vm, tracer=t, **kw)
    res = m.run()
    return m, res, sink.events


def by_name(events, name):
    return [e for e in events if e.name == name]


def test_default_vm_events_and_fields():
    m, res, evs = traced("hello")
    assert res.ok
    for e in evs:
        assert isinstance(e.seq, int) and e.ts == e.seq
    assert [e.seq for e in evs] == sorted(e.seq for e in evs)
    exits = by_name(evs, "kvm_exit")
    first = exits[0].fields
    # the guest's first walk: the loader's PML4 page is not in EPT yet (paging-structure access)
    assert first["reason"] == "EPT_VIOLATION" and first["gpa"] == 0x3C00000 and first["gla"] == 0x100000
    assert first["info1"] == 0x83 and first["qualification"] == "read,write,gla-valid"
    assert first["where"] == "_start+0x0" and first["insn"].startswith("lea rsi")
    data = [e.fields for e in exits if e.fields.get("qualification", "").startswith("read,gla-valid,final")]
    assert data and data[0]["where"].startswith("fnv_loop+") and "byte ptr [rsi]" in data[0]["insn"]
    assert exits[-1].fields["reason"] == "HLT" and exits[-1].vcpu == 0
    pf = by_name(evs, "kvm_page_fault")[0].fields
    assert pf["address"] == 0x3C00000 and pf["error_code"] == 0x200000006
    done = by_name(evs, "kvm_tdp_page_fault_done")[0].fields
    assert (done["gfn"], done["level"], done["root"], done["ret"]) == (0x3C00, 1, "direct", "FIXED")
    ch = by_name(evs, "kvm_tdp_mmu_spte_changed")[0].fields
    assert ch["level"] == 4 and ch["old_spte"] == 1 << 63 and ch["new_spte"] & 0x907 == 0x907
    walk = by_name(evs, "hw_walk")
    assert walk[0].fields["access"] == "fetch" and walk[0].fields["gva"] == 0x100000
    assert walk[0].fields["ept"][0][0] == "EPT" and walk[0].fields["ept"][0][1] == 0x3C00000
    # the loader's identity map uses 2M pages: PML4E, PDPTE, PDE (a leaf)
    full = [w for w in walk if len(w.fields["guest"]) == 3 and w.fields["result"].startswith("-> gpa")]
    assert full and [lvl for lvl, *_ in full[0].fields["guest"]] == [4, 3, 2]
    assert full[0].fields["guest"][2][3] & 0x80  # PS: the 2M leaf
    for name in (
        "kvm_entry",
        "kvm_mmu_spte_requested",
        "kvm_mmu_set_spte",
        "kvm_hypercall",
        "kvm_userspace_exit",
        "kvm_mmu_get_page",
    ):
        assert by_name(evs, name), name


def test_td_events_and_fields():
    m, res, evs = traced("private", vm="tdx")
    assert res.ok
    calls = by_name(evs, "seamcall")
    aug = [c.fields for c in calls if c.fields["leaf"] == "TDH_MEM_PAGE_AUG"]
    assert len(aug) == 16 and aug[0]["status"] == "TDX_SUCCESS" and aug[0]["rcx"] == 0x1000000
    assert len(by_name(evs, "seamcall_entry")) == len(calls)
    refl = [e.fields for e in by_name(evs, "kvm_reflect")]
    assert {"reflect_link_spt", "reflect_set_spte"} <= {r["op"] for r in refl} and all(r["ret"] == 0 for r in refl)
    assert by_name(evs, "kvm_tdp_mmu_spte_frozen") and by_name(evs, "kvm_tdp_mmu_spte_unfrozen")
    tdc = [e.fields for e in by_name(evs, "tdcall")]
    assert tdc and tdc[0]["leaf"] == "TDG_MEM_PAGE_ACCEPT" and tdc[0]["status"] == "TDX_SUCCESS"
    tx = [e.fields for e in by_name(evs, "tdx_exit")]
    accept_exit = [t for t in tx if t["reason"] == "EPT_VIOLATION"][0]
    assert accept_exit["insn"] == "tdcall" and accept_exit["where"].startswith("emu_accept+")
    assert accept_exit["ext_qualification"] & 0xF == 1  # type ACCEPT
    done = [e.fields for e in by_name(evs, "kvm_tdp_page_fault_done") if e.fields["root"] == "mirror"]
    assert done and done[0]["ret"] == "FIXED"
    walks = [w.fields for w in by_name(evs, "hw_walk") if any(x[0] == "S-EPT" for x in w.fields["ept"])]
    assert walks


def test_scheduling_injection_and_flush_events():
    ex = Explorer(lambda: Machine("race2", vm="tdx", vcpus=2, no_freeze=True))
    res = ex.dfs(bound=2)
    assert any("sched_switch" in line for line in res.first_failure.trace)
    m, r, evs = traced("convert", vm="tdx", inject=["seamcall.TDH_MEM_PAGE_AUG@2=TDX_OPERAND_BUSY"])
    assert by_name(evs, "inject")[0].fields["msg"].startswith("seamcall.TDH_MEM_PAGE_AUG call 2 fails")
    assert by_name(evs, "kvm_flush_remote_tlbs") and by_name(evs, "kvm_tlb_flush")
    blocks = [e.fields for e in by_name(evs, "seamcall") if e.fields["leaf"] == "TDH_MEM_RANGE_BLOCK"]
    assert len(blocks) == 4


def test_event_and_gpa_filters():
    _, _, evs = traced("hello", events=["kvm_exit", "kvm_page_fault"])
    assert {e.name for e in evs} == {"kvm_exit", "kvm_page_fault"}
    _, _, evs = traced("private", vm="tdx", gpa_range=(0x1000000, 0x1001000))
    gpas = [e.fields.get("gpa", e.fields.get("address")) for e in evs]
    assert all(g is None or 0x1000000 <= g < 0x1001000 for g in gpas)
    assert any(e.name == "kvm_page_fault" for e in evs)
    gfns = [e.fields["gfn"] for e in evs if "gfn" in e.fields]
    assert gfns and set(gfns) == {0x1000}


def test_text_trace_is_golden():
    """The text format is stable: a short guest's trace, byte for byte (regenerate with
    EMU_REGEN_GOLDEN=1 after an intended change, and review the diff)."""
    buf = io.StringIO()
    t = Tracer([TextSink(buf)])
    res = Machine("hello", tracer=t).run()
    assert res.ok
    golden = GOLDEN / "hello.trace"
    if os.environ.get("EMU_REGEN_GOLDEN"):
        golden.write_text(buf.getvalue())
    assert buf.getvalue() == golden.read_text()


def test_jsonl_sink_keeps_typed_fields():
    buf = io.StringIO()
    Machine("hello", tracer=Tracer([JsonlSink(buf)])).run()
    lines = [json.loads(l) for l in buf.getvalue().splitlines()]
    exit0 = next(l for l in lines if l["event"] == "kvm_exit")
    assert exit0["gpa"] == 0x3C00000 and exit0["vcpu"] == 0 and isinstance(exit0["seq"], int)


def check_trace_event_format(doc):
    """A schema check of the Chrome trace-event format as Perfetto reads it."""
    assert set(doc) >= {"traceEvents"}
    evs = doc["traceEvents"]
    assert isinstance(evs, list) and evs
    named = set()
    open_slices = {}
    open_async = {}
    for e in evs:
        assert isinstance(e["name"], str) and e["ph"] in {"M", "B", "E", "i", "b", "e", "X"}
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "thread_name") and isinstance(e["args"]["name"], str)
            if e["name"] == "thread_name":
                named.add(e["tid"])
            continue
        assert isinstance(e["ts"], (int, float)) and e["tid"] in named, e
        assert isinstance(e.get("args", {}), dict)
        if e["ph"] == "i":
            assert e["s"] in ("t", "p", "g")
        if e["ph"] == "B":
            open_slices[e["tid"]] = open_slices.get(e["tid"], 0) + 1
        if e["ph"] == "E":
            assert open_slices.get(e["tid"], 0) > 0, "E without B"
            open_slices[e["tid"]] -= 1
        if e["ph"] in ("b", "e"):
            assert isinstance(e["id"], int) and isinstance(e["cat"], str)
            key = (e["cat"], e["id"])
            if e["ph"] == "b":
                open_async[key] = True
            else:
                assert open_async.pop(key), "e without b"
    assert not any(open_slices.values()) and not open_async


@pytest.mark.parametrize("guest, vm", [("hello", "default"), ("private", "tdx"), ("convert", "tdx")])
def test_perfetto_trace_event_json(tmp_path, guest, vm):
    out = tmp_path / "t.json"
    p = subprocess.run(
        [sys.executable, "-m", "emu", "run", guest, "--vm", vm, "--trace", "perfetto", "--trace-file", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    check_trace_event_format(doc)
    threads = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert "vCPU 0" in threads and (vm != "tdx" or "TDX module" in threads)
    if vm == "tdx":
        assert any(e["ph"] == "b" and e["name"] == "TDH_MEM_PAGE_AUG" for e in doc["traceEvents"])


def test_dump_tables_api():
    from emu.dump import dump_tables

    m, res, _ = traced("convert", vm="tdx")
    text = dump_tables(m.kvm, 0x1000000, 0x1004000)
    rows = [l for l in text.splitlines() if l.startswith("0x")]
    assert len(rows) == 4 and all("MAPPED" in r for r in rows)
