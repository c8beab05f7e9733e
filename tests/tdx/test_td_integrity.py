"""TD memory integrity: the TD bit of each cache line, who sets it, who clears it, and the checker
that reports a page going back to the host with TD lines left (the bug switch no-clear-page).

On TDX hardware a line written with a TD's private key carries the TD bit; a host read of it
returns zeros and a host write of part of it ends in a machine check, which is why KVM clears every
page it takes back with MOVDIR64B (tdx_clear_page(), arch/x86/kvm/vmx/tdx.c: after
TDH.MEM.PAGE.REMOVE in tdx_sept_drop_private_spte(), after TDH.PHYMEM.PAGE.RECLAIM in
tdx_reclaim_page() and for the TDR in tdx_reclaim_td_control_pages()).  The module writes with a
private key in tdh_mng_create.c (the TDR), tdh_mng_add_cx.c, tdh_vp_create.c, tdh_vp_addcx.c,
tdh_mem_sept_add.c, tdh_mem_page_add.c and tdg_mem_page_accept.c.
"""

import io
import json

from hypothesis import given, settings, strategies as st

from emu import cli
from emu.hw.memory import HostMemory
from emu.userspace.vmm import Machine
from emu.checkers.explore import Explorer
from emu.checkers.check import check_vm

PAGE = 4096


# ----------------------------------------------------------------------------------------------
# The memory model
# ----------------------------------------------------------------------------------------------
def test_host_reads_of_td_lines_are_zero():
    mem = HostMemory(1 << 20)
    mem.write(0x2000, bytes(range(256)) * 16)
    mem.td_write(0x2040, 64)  # one line
    assert mem.td_line_count(2) == 1
    data = mem.host_read(0x2000, 256)
    assert data[:64] == bytes(range(64)) and data[64:128] == bytes(64) and data[128:] == bytes(range(128, 256))
    assert mem.host_read64(0x2048) == 0 and mem.host_read64(0x2000) == int.from_bytes(bytes(range(8)), "little")
    assert mem.read(0x2040, 4) == bytes(range(64, 68))  # physical reads: the TD's own view


def test_partial_host_write_is_a_machine_check_and_stays_poisoned():
    mem = HostMemory(1 << 20)
    seen = []
    mem.on_machine_check = lambda hpa, what: seen.append(hpa)
    mem.td_write(0x3000)
    mem.host_write64(0x3088, 1)
    assert seen == [0x3080] and mem.machine_checks[0][0] == 0x3080
    assert mem.td_line_count(3) == 64  # the line stays TD (poisoned)
    mem.host_write(0x3000, bytes(128))  # two whole lines: the host's now
    assert mem.td_line_count(3) == 62 and len(seen) == 1
    mem.movdir64b(0x3000)
    assert mem.td_line_count(3) == 0 and mem.td_lines == {} and mem.host_read(0x3080, 8) == bytes(8)


@settings(max_examples=200, deadline=None)
@given(td=st.integers(0, (1 << 64) - 1), off=st.integers(0, PAGE - 1), n=st.integers(1, PAGE))
def test_host_write_rule(td, off, n):
    """For any TD lines and any host write inside the page: a machine check iff the write covers
    part of a TD line; lines wholly covered lose the bit; the others keep it."""
    n = min(n, PAGE - off)
    mem = HostMemory(1 << 16)
    for line in range(64):
        if td >> line & 1:
            mem.td_write(0x1000 + 64 * line, 64)
    mem.host_write(0x1000 + off, bytes(n))
    touched = {line for line in range(64) if line * 64 < off + n and (line + 1) * 64 > off}
    whole = {line for line in touched if line * 64 >= off and (line + 1) * 64 <= off + n}
    partial_td = {line for line in touched - whole if td >> line & 1}
    assert bool(mem.machine_checks) == bool(partial_td)
    left = mem.td_lines.get(1, 0)
    assert left == sum(1 << line for line in range(64) if td >> line & 1 and line not in whole)


# ----------------------------------------------------------------------------------------------
# The module sets it, KVM clears it
# ----------------------------------------------------------------------------------------------
def test_the_module_writes_its_pages_with_a_private_key():
    """Control pages, S-EPT pages and PAGE.ADDed pages have every line TD once the TD is built; a
    page only AUGed has none until the guest ACCEPTs it (the module zeroes it with the TD's key)."""
    m = Machine("convert", vm="tdx")
    mem, tdx, mod = m.host.mem, m.kvm.tdx, m.kvm.x86_ops.module
    td = mod.tds[tdx.tdr_pa]
    control = (
        [tdx.tdr_pa] + tdx.tdcs_pa + [v.arch.tdvpr_pa for v in m.vcpus] + [p for v in m.vcpus for p in v.arch.tdvpx_pa]
    )
    septs = [sp.external_spt for sp in m.kvm.tdp_mmu.sp_of.values() if sp.external_spt is not None]
    added = [hpa for gpa, lvl, state, hpa in mod.sept_leaves(td)]
    assert control and septs and added
    assert all(mem.td_line_count(p >> 12) == 64 for p in control + septs + added)
    assert all(mem.td_line_count(pfn) == 0 for pfn in range(m.hva >> 12, (m.hva + m.mem_size) >> 12))  # shared


def test_kvm_clears_every_page_it_takes_back():
    """A conversion guest (private pages REMOVEd and the guest_memfd hole punched), then the VM's
    destruction (S-EPT pages and control pages RECLAIMed): no machine check, no page freed with a
    TD line, and no TD line left anywhere outside the PAMT's pages."""
    m = Machine("convert", vm="tdx")
    res = m.run()
    assert res.ok, res.error
    assert check_vm(m.kvm) == []
    m.destroy()
    assert m.kvm.violations == [] and m.host.mem.machine_checks == []
    leftover = [pfn for pfn in m.host.mem.td_lines if pfn << 12 not in {h for h, _ in m.host.leaked}]
    assert leftover == []


def test_bug_no_clear_page_is_reported_by_run():
    """tdx_clear_page() switched off: the run fails when guest_memfd gives the first removed page
    back (naming kvm_gmem_punch_hole() and TDH.MEM.PAGE.REMOVE); destroying the VM names the S-EPT
    and control-page paths."""
    m = Machine("convert", vm="tdx", bugs=["no-clear-page"])
    res = m.run()
    assert res.exit == "checker"
    assert "kvm_gmem_punch_hole() frees the private page of gfn 0x1000" in res.error
    assert "TDH.MEM.PAGE.REMOVE" in res.error and "64 of its 64 cache lines" in res.error
    m.destroy()
    assert any(v.startswith("tdp_mmu_free_sp() frees an S-EPT page") for v in m.kvm.violations)
    assert any(v.startswith("tdx_reclaim_td_control_pages() frees a control page") for v in m.kvm.violations)


def test_bug_no_clear_page_cli_and_explore():
    out = io.StringIO()
    status = cli.main(["run", "convert", "--vm", "tdx", "--bug", "no-clear-page", "--json"], out)
    obj = json.loads(out.getvalue())
    assert status == 1 and obj["exit"] == "checker" and "tdx_clear_page()" in obj["error"]
    bad = Explorer(lambda: Machine("convert", vm="tdx", bugs=["no-clear-page"])).random(runs=3, seed=1)
    assert bad.failures >= 1 and "tdx_clear_page()" in bad.first_failure.error
    good = Explorer(lambda: Machine("convert", vm="tdx")).random(runs=3, seed=1)
    assert good.failures == 0
