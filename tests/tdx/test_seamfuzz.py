"""The TDX module's stateful fuzzer (emu.checkers.seamfuzz) and ``python -m emu fuzz``: a short run
breaks nothing and reaches the main pairs; the defects issue 28 found, switched back in, are found
again, with a reproducer that replays; the statuses each handler can return are derived from its
source."""

import io
import json

import pytest

from emu import cli
from emu.checkers.seamfuzz import SeamFuzzer, can_return, unreachable
from tdxmod import abi as A
from tdxmod import locks as L


def test_a_short_run_breaks_nothing():
    """1500 calls of a seed: every check after every call holds; the run reaches the fault path,
    a TD entry, a guest's TDCALLs and a second CPU's contention."""
    fz = SeamFuzzer(seed=0).run(1500)
    assert fz.failures == [], fz.failures[0].message
    assert fz.calls >= 1500
    for pair in [
        ("TDH_MEM_PAGE_AUG", "TDX_SUCCESS"),
        ("TDH_MEM_SEPT_ADD", "TDX_SUCCESS"),
        ("TDH_MEM_RANGE_BLOCK", "TDX_SUCCESS"),
        ("TDH_VP_ENTER", "exit:EPT_VIOLATION"),
        ("TDG_MEM_PAGE_ACCEPT", "TDX_SUCCESS"),
        ("TDH_PHYMEM_PAGE_RECLAIM", "TDX_SUCCESS"),
        ("TDH_MEM_PAGE_AUG", "TDX_OPERAND_BUSY"),
    ]:
        assert fz.pairs.get(pair), pair
    cov = fz.coverage()
    assert cov["not_derived"] == [] and cov["reached"] > cov["reachable"] // 2


def test_what_each_handler_can_return_is_derived():
    """can_return() reads the handlers and what they call (helpers, the PAMT, the locks)."""
    cr = can_return()
    assert {
        "TDX_SUCCESS",
        "TDX_OPERAND_BUSY",
        "TDX_EPT_WALK_FAILED",
        "TDX_PAGE_METADATA_INCORRECT",
        "TDX_TD_FATAL",
        "TDX_OP_STATE_INCORRECT",
        "TDX_EPT_ENTRY_STATE_INCORRECT",
    } <= cr["TDH_MEM_PAGE_AUG"]
    assert cr["TDH_PHYMEM_CACHE_WB"] == {"TDX_SUCCESS", "TDX_OPERAND_INVALID", "TDX_NO_HKID_READY_TO_WBCACHE"}
    assert {
        "TDX_VCPU_ASSOCIATED",
        "TDX_VCPU_STATE_INCORRECT",
        "TDX_NON_RECOVERABLE_VCPU",
        "TDX_NON_RECOVERABLE_TD_NON_ACCESSIBLE",
        "exit:EPT_VIOLATION",
        "exit:TDCALL",
        "exit:EXTERNAL_INTERRUPT",
    } <= cr["TDH_VP_ENTER"]
    assert "TDX_PAGE_ALREADY_ACCEPTED" not in cr["TDH_VP_ENTER"]  # a TDCALL's, not VP.ENTER's
    assert {"TDX_SUCCESS", "TDX_OPERAND_BUSY_HOST_PRIORITY", "TDX_PAGE_ALREADY_ACCEPTED"} <= cr["TDG_MEM_PAGE_ACCEPT"]
    for (leaf, status), why in unreachable().items():
        assert status in cr[leaf] and why


def _tdr_shared_in_page_add(monkeypatch):
    """Issue 28 defect 5: TDH.MEM.PAGE.ADD without its TDR held exclusively."""
    import tdxmod.api_calls.tdh_mem_page as P

    orig = P.check_lock_tdr
    monkeypatch.setattr(
        P,
        "check_lock_tdr",
        lambda mod, held, tdr, op, lock_type, caller=None: orig(mod, held, tdr, op, L.TDX_LOCK_SHARED, caller),
    )


def _shared_eptp_unchecked(monkeypatch):
    """Issue 28 defect 1: TDH.VP.WR stores any SHARED_EPTP."""
    import tdxmod.api_calls.tdh_vp as VP

    monkeypatch.setattr(VP, "shared_hpa_check", lambda mod, hpa, size=4096, read=False: True)


def _vp_enter_does_not_associate(monkeypatch):
    """Issue 28 defects 2 and 4: TDH.VP.ENTER checks the vCPU's state but never associates it."""
    import tdxmod.td_dispatch as D

    def check_only(mod, v, lp, allow_disabled):
        ok = v.state == A.VCPU_READY or (v.state == A.VCPU_DISABLED and allow_disabled)
        return (A.TDX_SUCCESS if ok else A.TDX_VCPU_STATE_INCORRECT), False

    monkeypatch.setattr(D, "check_and_associate_vcpu", check_only)


@pytest.mark.parametrize(
    "defect, seed, calls, kind",
    [
        (_tdr_shared_in_page_add, 4, 500, "invariant"),
        (_shared_eptp_unchecked, 5, 3000, "exception"),
        (_vp_enter_does_not_associate, 4, 1000, "success changed too much"),
    ],
    ids=["tdr-lock", "shared-eptp", "association"],
)
def test_a_switched_in_defect_is_found_with_a_reproducer(monkeypatch, defect, seed, calls, kind):
    defect(monkeypatch)
    fz = SeamFuzzer(seed=seed).run(calls)
    assert fz.failures, f"not found in {fz.calls} calls"
    f = fz.failures[0]
    assert f.kind == kind, f.message
    m = fz.minimize(f, seconds=10)
    assert len(m.records) <= len(f.records)
    replayed = fz.replay(m.records)
    assert replayed is not None and replayed.kind == kind


def _main(argv):
    out = io.StringIO()
    rc = cli.main(argv, out=out)
    return rc, out.getvalue()


def test_cli_fuzz_json():
    rc, text = _main(["fuzz", "--calls", "300", "--seed", "2", "--json"])
    assert rc == 0
    obj = json.loads(text)
    assert obj["calls"] >= 300 and obj["seed"] == 2 and obj["failures"] == []
    assert obj["coverage"]["reachable"] + len(obj["unreachable"]) == obj["coverage"]["possible"]
    assert obj["pairs"]["TDH_MNG_CREATE"]["TDX_SUCCESS"] >= 1
    assert set(obj["can_return"]) >= {"TDH_MEM_PAGE_AUG", "TDH_VP_ENTER", "TDG_MEM_PAGE_ACCEPT"}


def test_cli_fuzz_reports_a_broken_check(monkeypatch):
    _tdr_shared_in_page_add(monkeypatch)
    rc, text = _main(["fuzz", "--calls", "500", "--seed", "4", "--minimize", "5"])
    assert rc == 1
    assert "a check broke" in text and "reproducer (" in text and "TDH_MEM_PAGE_ADD" in text


@pytest.mark.parametrize("argv", [["--calls", "0"], ["--second-cpu", "2"], ["--timeout", "0"]])
def test_cli_fuzz_bad_input(argv, capsys):
    rc, _ = _main(["fuzz"] + argv)
    assert rc == 2
    assert capsys.readouterr().err.startswith("emu: error: ")


def test_cli_fuzz_timeout():
    rc, text = _main(["fuzz", "--calls", "100000000", "--timeout", "0.5", "--json"])
    obj = json.loads(text)
    assert rc == 0 and obj["timed_out"] and not obj["interrupted"] and obj["calls"] < 100000000


def test_cli_fuzz_ctrl_c_prints_what_it_found():
    """Ctrl-C (SIGINT) ends the run within a second or two: the report of the calls made so far,
    exit status 130."""
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen(
        [sys.executable, "-m", "emu", "fuzz", "--calls", "100000000", "--seed", "9", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(3)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 130
    obj = json.loads(out)
    assert obj["interrupted"] and obj["calls"] > 0 and obj["failures"] == []
