"""End-to-end tests of the TDX side: guests run in a TD, KVM's mirror root, the simulated TDX module.

What is checked, and where the expected values come from:
  * the SEAMCALLs KVM issues to build the S-EPT (shared/REFERENCE.md 1.6, 2, 3.5 "Canonical
    sequences": SEPT.ADD top-down for every missing level, then AUG / PAGE.ADD);
  * the freeze protocol of the seed patch (REFERENCE 1.6): the mirror SPTE holds FROZEN_SPTE
    while the SEAMCALL runs, the old value comes back when the hook fails, the fault is retried;
  * the KVM_BUG_ONs of the seed patch (REFERENCE 1.6, 1.8);
  * invariants after every run (emu.checkers.check.check_vm) and a clean teardown (PAMT empty, every
    kernel page back);
  * TDX memory protection, pending pages vs. the TD's ATTRIBUTES (REFERENCE 3.10), MapGPA
    conversion (REFERENCE 1.4 "Who zaps what", 3.5 "Remove a page from a running TD");
  * the CLI's JSON statistics.

Expected guest results are computed here from the guests' sources (guest/*.S) and ELF symbols.
SEAMCALLs are recorded by wrapping TdxModule.seamcall (class level, so the TD build is seen too);
a wrapped call can also be answered with an injected status instead of reaching the module.
"""

import json
import re
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from emu.checkers.check import check_vm
from emu.hw.memory import HostAccessError
from emu.kvm.kvm import KVM_EXIT_SHUTDOWN, KvmIoctlError, EIO
from emu.kvm.spte import make_spte, make_nonleaf_spte, ACC_ALL, PG_LEVEL_4K, PG_LEVEL_2M
from emu.kvm.mmu import PFERR_WRITE_MASK, PFERR_PRIVATE_ACCESS
from emu.kvm.tdp_iter import TdpIter, for_each_tdp_pte_min_level
from emu.kvm.tdp_mmu import RET_PF_RETRY
from emu.trace import Tracer
from emu.userspace.vmm import Machine
from tdxmod import abi as A
from tdxmod import sept as S
from tdxmod.module import Regs, TdxModule

REPO = Path(__file__).resolve().parents[2]
GUEST_SRC = REPO / "guest"
MiB = 1 << 20
U64 = (1 << 64) - 1

# SPTE facts spelled out from shared/REFERENCE.md 1.1 (not imported from the code under test).
SHADOW_NONPRESENT = 1 << 63
FROZEN = SHADOW_NONPRESENT | 0x5A0
MMU_PRESENT = 1 << 11
PS = 1 << 7
ADDR_MASK = ((1 << 48) - 1) & ~0xFFF
EBUSY = 16

# The area the private and convert guests use (16 MiB: outside the loaded image).
AREA = 0x1000000


# ----------------------------------------------------------------------------------------------
# Expected values from the guest sources
# ----------------------------------------------------------------------------------------------


def equ(src, name):
    """The value of `.equ name, expr` in guest/<src>; expr may use other .equ names and PAGE_SIZE."""
    text = (GUEST_SRC / src).read_text()
    m = re.search(rf"^\.equ\s+{name}\s*,\s*([^#\n]+)", text, re.M)
    assert m, f".equ {name} not in {src}"
    expr = m.group(1).strip()
    if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", expr):
        return int(expr, 0)
    consts = {"PAGE_SIZE": 0x1000}
    for n in set(re.findall(r"\b[A-Za-z_]\w*\b", expr)):
        consts[n] = consts[n] if n in consts else equ(src, n)
    assert re.fullmatch(r"[\w\s*+()-]+", expr), expr
    return int(eval(expr, {"__builtins__": {}}, consts))  # noqa: S307 (constants and * + -)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & U64
    return h


def hello_expected(m, nvcpus):
    text = (GUEST_SRC / "hello.S").read_text()
    s = re.search(r'^greeting:\s*\n\s*\.ascii\s+"([^"]*)"', text, re.M).group(1).encode()
    assert s == b"hello, EPT"
    return {i: [fnv1a64(s)] for i in range(nvcpus)}


def touch_expected(m, nvcpus):
    n, low = equ("touch.S", "TOUCH_PAGES"), equ("touch.S", "PATTERN_LOW")
    assert (n, low) == (32, 0x5A)
    out = {}
    for i in range(nvcpus):
        mine = range(i, n, nvcpus)
        out[i] = [len(mine), sum((p << 12) + low for p in mine) & U64]
    return out


def pagewalk_expected(m, nvcpus):
    values = [equ("pagewalk.S", f"V{k}") for k in (1, 2, 3, 4)]
    out = {i: [] for i in range(nvcpus)}
    out[0] = [m.image.symbol("pt_pool")] + values
    return out


def private_expected(m, nvcpus):
    n = equ("private.S", "PRIVATE_PAGES")
    assert n == 16 and equ("private.S", "AREA") == AREA
    out = {}
    for i in range(nvcpus):
        mine = range(i, n, nvcpus)
        out[i] = [len(mine), sum(p * 0x10001 + 0x5A5A for p in mine) & U64]
    return out


def convert_sum(pattern):
    size = equ("convert.S", "SIZE")
    return sum(pattern + off for off in range(0, size, 512)) & U64


def convert_expected(m, nvcpus):
    assert equ("convert.S", "CONVERT_PAGES") == 4 and equ("convert.S", "AREA") == AREA
    a, b = equ("convert.S", "PATTERN_A"), equ("convert.S", "PATTERN_B")
    out = {i: [] for i in range(nvcpus)}
    out[0] = [1, 0, convert_sum(b), 0, convert_sum(a)]
    return out


EXPECTED = {
    "hello": hello_expected,
    "touch": touch_expected,
    "pagewalk": pagewalk_expected,
    "private": private_expected,
    "convert": convert_expected,
}


def reports_by_vcpu(res, nvcpus):
    return {i: [v for c, v in res.reports if c == i] for i in range(nvcpus)}


# ----------------------------------------------------------------------------------------------
# Recording (and answering) SEAMCALLs
# ----------------------------------------------------------------------------------------------

Call = namedtuple("Call", "name rcx rdx r8 r9 caller out injected")


class SeamcallLog:
    def __init__(self):
        self.calls = []
        self.faults = []  # [name, status, times left, predicate(rcx) or None]
        self.hooks = []  # callables(module, name, rcx, rdx, r8) run before each call

    def answer(self, name, status, times=1, pred=None):
        """The next ``times`` calls of ``name`` (matching ``pred``) get ``status`` without reaching the module."""
        self.faults.append([name, status, times, pred])

    def named(self, *names):
        return [c for c in self.calls if c.name in names]

    def mark(self):
        return len(self.calls)

    def since(self, mark):
        return self.calls[mark:]


@pytest.fixture
def seamcalls(monkeypatch):
    log = SeamcallLog()
    real = TdxModule.seamcall

    def seamcall(mod, leaf, rcx=0, rdx=0, r8=0, r9=0, caller=None, **kw):
        name = A.seamcall_name(leaf)
        for hook in log.hooks:
            hook(mod, name, rcx, rdx, r8)
        out = None
        for f in log.faults:
            if f[0] == name and f[2] > 0 and (f[3] is None or f[3](rcx)):
                f[2] -= 1
                out = Regs(f[1])
                break
        injected = out is not None
        if out is None:
            out = real(mod, leaf, rcx=rcx, rdx=rdx, r8=r8, r9=r9, caller=caller, **kw)
        log.calls.append(Call(name, rcx, rdx, r8, r9, caller, out, injected))
        return out

    monkeypatch.setattr(TdxModule, "seamcall", seamcall)
    return log


# ----------------------------------------------------------------------------------------------
# Reading KVM's tables and the S-EPT
# ----------------------------------------------------------------------------------------------


def mirror_root(kvm):
    roots = [r for r in kvm.tdp_mmu.roots if r.is_mirror and not r.invalid]
    assert len(roots) == 1
    return roots[0]


def direct_root(kvm):
    roots = [r for r in kvm.tdp_mmu.roots if not r.is_mirror and not r.invalid]
    assert len(roots) == 1
    return roots[0]


def index(gfn, level):
    return (gfn >> (9 * (level - 1))) & 511


def sptep_at(kvm, root, gfn, level):
    """(sptep, value) of the entry for ``gfn`` at ``level`` (gfn with any shared bit included);
    None when the walk meets a non-present or leaf entry above ``level``."""
    q = kvm.mem.q
    table, lvl = root.spt, root.role_level
    while True:
        ptr = table + (index(gfn, lvl) << 3)
        e = q[ptr >> 3]
        if lvl == level:
            return ptr, e
        if not e & MMU_PRESENT or e & PS:
            return None
        table = e & ADDR_MASK
        lvl -= 1


def leaves(kvm, root, strip=0):
    """{gfn: (level, spte)} of the present leaves under ``root``; ``strip`` = GFN bits to clear."""
    q = kvm.mem.q
    out = {}

    def walk(table, lvl, base):
        for i in range(512):
            e = q[(table >> 3) + i]
            if not e & MMU_PRESENT:
                continue
            g = base + (i << (9 * (lvl - 1)))
            if lvl == 1 or e & PS:
                out[g & ~strip] = (lvl, e)
            else:
                walk(e & ADDR_MASK, lvl - 1, g)

    walk(root.spt, root.role_level, 0)
    return out


def td_of(m):
    return m.host.tdx_module.tds[m.kvm.tdx.tdr_pa]


def sept_leaves(m):
    mod = m.host.tdx_module
    return {gpa: (lvl, state, hpa) for gpa, lvl, state, hpa in mod.sept_leaves(td_of(m))}


def leaf_spte(pfn):
    """make_spte() for a writable 4K private page of a TD (REFERENCE 1.1: bit 11, R|SVE, A, X, R,
    MT = WB (no IPAT in a TD), HostW, pfn, W, MMU-W, D)."""
    return (1 << 63) | (1 << 58) | (1 << 57) | (pfn << 12) | MMU_PRESENT | (1 << 9) | (1 << 8) | (6 << 3) | 0b111


def nonleaf_spte(child):
    """make_nonleaf_spte() (REFERENCE 1.1): bit 11, child, R|SVE, W, R, X, A."""
    return (1 << 63) | child | MMU_PRESENT | (1 << 8) | 0b111


def gmem_pfn(m, gpa):
    return (m.gmem + gpa) >> 12


def assert_clean_teardown(m):
    mod = m.host.tdx_module
    m.destroy()
    assert mod.pamt.owned_pages() == []
    assert mod.tds == {} and mod.hkids == set()
    assert m.host.kernel.in_use == 0
    assert m.host.leaked == []
    assert m.kvm.warnings == []


class UnfreezeWatch:
    """A trace sink: at each kvm_tdp_mmu_spte_unfrozen event, read the mirror SPTE it names
    (the event is emitted right after the final value is written)."""

    def __init__(self):
        self.kvm = None
        self.seen = []  # (gfn, level, restored?, spte value read from memory)

    def write(self, ev):
        if ev.name != "kvm_tdp_mmu_spte_unfrozen" or self.kvm is None:
            return
        gfn, level = ev.fields["gfn"], ev.fields["level"]
        found = sptep_at(self.kvm, mirror_root(self.kvm), gfn, level)
        self.seen.append((gfn, level, ev.fields["what"] == "restored", None if found is None else found[1]))

    def close(self):
        pass


# ----------------------------------------------------------------------------------------------
# 1. Building the S-EPT: SEPT.ADD for each missing level, top-down, then AUG (or PAGE.ADD)
# ----------------------------------------------------------------------------------------------


class TestSeptBuildOrder:
    def test_first_image_page_adds_every_level_then_page_add(self, seamcalls):
        """The TD build starts from an empty S-EPT: the first image page needs SEPT.ADD at TDX
        levels 3, 2, 1 (GPA 0 aligned, level in RCX[2:0]), then TDH.MEM.PAGE.ADD."""
        m = Machine("private", vm="tdx")
        first = min(c.rcx for c in seamcalls.named("TDH_MEM_PAGE_ADD"))
        assert first == m.image.image_range()[0] == 0x100000
        build = [
            (c.name, c.rcx)
            for c in seamcalls.calls
            if c.name in ("TDH_MEM_SEPT_ADD", "TDH_MEM_PAGE_ADD", "TDH_MEM_PAGE_AUG")
        ]
        assert build[:4] == [
            ("TDH_MEM_SEPT_ADD", 0 | 3),
            ("TDH_MEM_SEPT_ADD", 0 | 2),
            ("TDH_MEM_SEPT_ADD", 0 | 1),
            ("TDH_MEM_PAGE_ADD", 0x100000),
        ]
        assert not seamcalls.named("TDH_MEM_PAGE_AUG")  # nothing is AUGed before finalize
        assert all(c.out.rax == A.TDX_SUCCESS for c in seamcalls.calls)
        # Each SEPT.ADD page is a mirror SP's external_spt, now owned by the module as PT_EPT.
        ext = {sp.external_spt for sp in m.kvm.tdp_mmu.sp_of.values() if sp.is_mirror and sp.external_spt}
        added = {c.r8 for c in seamcalls.named("TDH_MEM_SEPT_ADD")}
        assert added == ext
        pamt = m.host.tdx_module.pamt
        assert all(pamt.page_type(p) == A.PT_EPT and pamt.owner(p) == m.kvm.tdx.tdr_pa for p in added)
        assert check_vm(m.kvm) == []
        assert_clean_teardown(m)

    def test_private_fault_adds_missing_levels_then_aug(self, seamcalls):
        m = Machine("private", vm="tdx")
        td = td_of(m)
        mod = m.host.tdx_module
        # Which S-EPT levels are missing for the area: the walk stops at the first FREE entry.
        _, e, stop = mod.sept_walk(td, AREA, 0)
        assert S.sept_state(e) == S.SEPT_FREE
        # The image at 1 MiB already built the PML4E and PDPTE of the first GiB: only the PDE is missing.
        assert stop == 1
        mark = seamcalls.mark()
        res = m.run()
        assert res.exit == "hlt", res.error
        run = [
            (c.name, c.rcx, c.r8) for c in seamcalls.since(mark) if c.name in ("TDH_MEM_SEPT_ADD", "TDH_MEM_PAGE_AUG")
        ]
        sept_add_pages = [r8 for n, _, r8 in run if n == "TDH_MEM_SEPT_ADD"]
        expected = [
            ("TDH_MEM_SEPT_ADD", (AREA & ~((1 << (12 + 9 * lvl)) - 1)) | lvl, sept_add_pages[k])
            for k, lvl in enumerate(range(stop, 0, -1))
        ]
        expected += [("TDH_MEM_PAGE_AUG", AREA + (p << 12), gmem_pfn(m, AREA + (p << 12)) << 12) for p in range(16)]
        assert run == expected
        assert run[:2] == [
            ("TDH_MEM_SEPT_ADD", 0x1000001, sept_add_pages[0]),
            ("TDH_MEM_PAGE_AUG", 0x1000000, gmem_pfn(m, AREA) << 12),
        ]
        # The mirror now holds exactly what was reflected: the 2M-level link to the SP whose
        # external page went to SEPT.ADD, and a writable leaf for the gmem page.
        kvm = m.kvm
        root = mirror_root(kvm)
        gfn = AREA >> 12
        _, pde = sptep_at(kvm, root, gfn, 2)
        child = kvm.tdp_mmu.sp_of[pde & ADDR_MASK]
        assert pde == nonleaf_spte(child.spt)
        assert child.external_spt == sept_add_pages[0] and child.role_level == 1 and child.gfn == gfn
        for p in range(16):
            _, pte = sptep_at(kvm, root, gfn + p, 1)
            assert pte == leaf_spte(gmem_pfn(m, AREA + (p << 12)))
        sl = sept_leaves(m)
        for p in range(16):
            assert sl[AREA + (p << 12)] == (0, S.SEPT_MAPPED, gmem_pfn(m, AREA + (p << 12)) << 12)
        assert check_vm(kvm) == []
        assert_clean_teardown(m)

    def test_prefault_in_empty_pml4e_adds_levels_3_2_1_then_aug(self, seamcalls):
        """A private GPA under a PML4E the S-EPT does not have yet (a second memslot at 512 GiB,
        pre-faulted as KVM_PRE_FAULT_MEMORY would): SEPT.ADD 3, 2, 1, then AUG, in that order."""
        m = Machine("private", vm="tdx")
        kvm, v0 = m.kvm, m.vcpus[0]
        gpa = 1 << 39
        spare = 32 * MiB  # backing the private guest never touches
        kvm.set_user_memory_region(1, 0, gpa, 2 * MiB, m.hva + spare, gmem_addr=m.gmem + spare)
        kvm.set_memory_attributes(gpa >> 12, (gpa + 2 * MiB) >> 12, private=True)
        _, _, stop = m.host.tdx_module.sept_walk(td_of(m), gpa, 0)
        assert stop == 3
        mark = seamcalls.mark()
        assert v0.kvm_tdp_map_page(gpa + 0x5000, private=True) == 0
        got = [(c.name, c.rcx) for c in seamcalls.since(mark)]
        assert got == [
            ("TDH_MEM_SEPT_ADD", gpa | 3),
            ("TDH_MEM_SEPT_ADD", gpa | 2),
            ("TDH_MEM_SEPT_ADD", gpa | 1),
            ("TDH_MEM_PAGE_AUG", gpa + 0x5000),
        ]
        assert all(c.out.rax == A.TDX_SUCCESS for c in seamcalls.since(mark))
        assert seamcalls.since(mark)[-1].r8 == m.gmem + spare + 0x5000
        assert sept_leaves(m)[gpa + 0x5000] == (0, S.SEPT_PENDING, m.gmem + spare + 0x5000)
        assert check_vm(kvm) == []
        assert_clean_teardown(m)


# ----------------------------------------------------------------------------------------------
# 2. Every guest in a TD: right results, invariants, clean teardown
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("guest", ["hello", "touch", "pagewalk", "private", "convert"])
def test_guest_in_td(guest, vcpus):
    m = Machine(guest, vm="tdx", vcpus=vcpus)
    res = m.run()
    assert res.exit == "hlt" and res.error is None, res.error
    assert res.vcpu_exits == ["hlt"] * vcpus
    assert res.shared_bit == 1 << 47
    assert reports_by_vcpu(res, vcpus) == EXPECTED[guest](m, vcpus)
    assert res.stats["kvm_bug_on"] == 0 and not m.kvm.vm_dead
    assert check_vm(m.kvm) == []
    # Every private page the mirror maps is in the S-EPT, at the same level, with the same page.
    mirror = leaves(m.kvm, mirror_root(m.kvm))
    sl = sept_leaves(m)
    assert {g << 12: (lvl - 1, e & ADDR_MASK) for g, (lvl, e) in mirror.items()} == {
        gpa: (lvl, hpa) for gpa, (lvl, _, hpa) in sl.items()
    }
    assert {st for _, st, _ in sl.values()} == {S.SEPT_MAPPED}
    assert_clean_teardown(m)


# ----------------------------------------------------------------------------------------------
# 3. A failed reflect op: the old SPTE comes back; BUSY retries, anything else bugs the VM
# ----------------------------------------------------------------------------------------------


def _machine_with_watch():
    watch = UnfreezeWatch()
    m = Machine("private", vm="tdx", tracer=Tracer([watch]))
    watch.kvm = m.kvm
    return m, watch


def _frozen_probe(m, log, name, gfn, level, seen):
    """While ``name`` runs for ``gfn``, the mirror SPTE at ``level`` must hold FROZEN_SPTE."""

    def hook(mod, n, rcx, rdx, r8):
        if n == name and rcx >> 12 == gfn:
            seen.append(sptep_at(m.kvm, mirror_root(m.kvm), gfn, level)[1])

    log.hooks.append(hook)


BUSY_CASES = [
    # leaf answered BUSY once, KVM level of the mirror entry it reflects, calls for AREA's first page
    ("TDH_MEM_PAGE_AUG", 1, ["TDH_MEM_SEPT_ADD", "TDH_MEM_PAGE_AUG", "TDH_MEM_PAGE_AUG"]),
    ("TDH_MEM_SEPT_ADD", 2, ["TDH_MEM_SEPT_ADD", "TDH_MEM_SEPT_ADD", "TDH_MEM_PAGE_AUG"]),
]


@pytest.mark.parametrize("leaf,level,sequence", BUSY_CASES)
def test_busy_restores_old_spte_and_retries(seamcalls, leaf, level, sequence):
    m, watch = _machine_with_watch()
    gfn = AREA >> 12
    # Before the run the 2M entry is non-present (and there is no 4K table under it yet).
    assert sptep_at(m.kvm, mirror_root(m.kvm), gfn, 2)[1] == SHADOW_NONPRESENT
    frozen = []
    _frozen_probe(m, seamcalls, leaf, gfn, level, frozen)
    seamcalls.answer(leaf, A.TDX_OPERAND_BUSY | A.OPERAND_ID_SEPT)
    mark = seamcalls.mark()
    res = m.run()

    assert res.exit == "hlt", res.error
    assert reports_by_vcpu(res, 1) == private_expected(m, 1)
    calls = [
        c for c in seamcalls.since(mark) if c.name in ("TDH_MEM_SEPT_ADD", "TDH_MEM_PAGE_AUG") and c.rcx >> 12 == gfn
    ]
    assert [c.name for c in calls] == sequence
    assert [c.injected for c in calls].count(True) == 1
    # The freeze: every call for that entry ran with the mirror SPTE frozen.
    assert frozen == [FROZEN, FROZEN]
    # The unfreeze right after the BUSY call wrote the old value back.
    restored = [(g, lv, val) for g, lv, r, val in watch.seen if r]
    assert restored == [(gfn, level, SHADOW_NONPRESENT)]
    # ... and the retry installed the real one.
    final = [val for g, lv, r, val in watch.seen if g == gfn and lv == level and not r]
    assert len(final) == 1
    if level == 1:
        assert final[0] == leaf_spte(gmem_pfn(m, AREA))
    else:
        child = m.kvm.tdp_mmu.sp_of[final[0] & ADDR_MASK]
        assert final[0] == nonleaf_spte(child.spt)
        assert child.external_spt == calls[1].r8 and not calls[1].injected
    # The vCPU counted the retried fault; the retry was local (no extra TD entry or exit).
    assert m.vcpus[0].stat["pf_retry"] == 1 and res.stats["pf_retry"] == 1
    # TD entries: 16 EPT-violation exits (one per page), 2 reports, 1 halt -- none for the retry.
    assert res.stats["seamcalls"]["TDH_VP_ENTER"] == res.stats["exits"] == 16 + 2 + 1
    assert res.stats["seamcalls"][leaf] == (16 if leaf == "TDH_MEM_PAGE_AUG" else 6) + 1
    assert res.stats["kvm_bug_on"] == 0 and not m.kvm.vm_dead
    assert check_vm(m.kvm) == []
    assert_clean_teardown(m)


@pytest.mark.parametrize(
    "leaf,level,what", [("TDH_MEM_PAGE_AUG", 1, "TDH.MEM.PAGE.AUG"), ("TDH_MEM_SEPT_ADD", 2, "TDH.MEM.SEPT.ADD")]
)
def test_non_busy_error_bugs_the_vm(seamcalls, leaf, level, what):
    m, watch = _machine_with_watch()
    gfn = AREA >> 12
    seamcalls.answer(leaf, A.TDX_EPT_WALK_FAILED | A.OPERAND_ID_RCX)
    res = m.run()

    assert res.exit == "ioctl_error" and "(-EIO)" in res.error
    assert what in res.error and "TDX_EPT_WALK_FAILED" in res.error
    assert res.vcpu_exits == ["ioctl_error"]
    assert res.reports == []
    kvm = m.kvm
    assert kvm.vm_dead and kvm.vm_bugged and kvm.stat["kvm_bug_on"] == 1
    assert what in kvm.bug_reason
    # The failed install was undone: the mirror entry is back to non-present, nothing frozen.
    assert [(g, lv, r, val) for g, lv, r, val in watch.seen if g == gfn and lv == level] == [
        (gfn, level, True, SHADOW_NONPRESENT)
    ]
    assert sptep_at(kvm, mirror_root(kvm), gfn, level)[1] == SHADOW_NONPRESENT
    assert check_vm(kvm) == []
    # Every later KVM_RUN fails at once, without entering the TD.
    mark = seamcalls.mark()
    for _ in range(2):
        with pytest.raises(KvmIoctlError) as e:
            m.vcpus[0].run()
        assert e.value.errno == EIO and what in str(e.value)
    assert seamcalls.since(mark) == []
    # A bugged TD can still be torn down completely.
    assert_clean_teardown(m)


@pytest.mark.parametrize("freeze", [True, False])
def test_walker_meeting_a_frozen_entry_retries(seamcalls, freeze):
    """The race the seed patch closes (REFERENCE 1.6): while vCPU 0's SEPT.ADD for the 2M entry
    is in flight, vCPU 1 faults on the next page of the same 2M region.  With the freeze it meets
    FROZEN_SPTE and retries without any SEAMCALL; without it (the code before the patch) it walks
    below the entry, AUGs under a PDE the S-EPT lacks and the module's EPT_WALK_FAILED bugs the VM."""
    m = Machine("private", vm="tdx", vcpus=2)
    kvm = m.kvm
    kvm.tdp_mmu.freeze_mirror_sptes = freeze
    v0, v1 = m.vcpus
    v1.mmu_load()
    nested = {}

    def hook(mod, name, rcx, rdx, r8):
        if name == "TDH_MEM_SEPT_ADD" and rcx == AREA | 1 and not nested:
            nested["spte"] = sptep_at(kvm, mirror_root(kvm), AREA >> 12, 2)[1]
            nested["mark"] = seamcalls.mark()
            nested["ret"] = v1.kvm_mmu_do_page_fault(AREA + 0x1000, PFERR_WRITE_MASK | PFERR_PRIVATE_ACCESS)
            nested["calls"] = [(c.name, c.rcx, c.caller) for c in seamcalls.since(nested["mark"])]

    seamcalls.hooks.append(hook)
    res = m.run(scheduled=False)  # the nested fault runs inline, not as a scheduled task
    if freeze:
        assert nested["spte"] == FROZEN
        assert nested["ret"] == RET_PF_RETRY and nested["calls"] == []
        assert v1.stat["pf_retry"] == 1
        assert res.exit == "hlt", res.error
        assert reports_by_vcpu(res, 2) == private_expected(m, 2)
        assert check_vm(kvm) == []
        assert_clean_teardown(m)
    else:
        assert nested["spte"] & MMU_PRESENT  # published before the S-EPT has it
        assert nested["calls"] == [("TDH_MEM_PAGE_AUG", AREA + 0x1000, 1)]
        assert res.exit == "ioctl_error"
        assert kvm.vm_bugged and "TDH.MEM.PAGE.AUG gpa 0x1001000" in kvm.bug_reason
        assert "TDX_EPT_WALK_FAILED" in kvm.bug_reason


# ----------------------------------------------------------------------------------------------
# 4. The seed patch's KVM_BUG_ONs
# ----------------------------------------------------------------------------------------------


def _iter_at(kvm, root, gfn, level):
    it = TdpIter(kvm, root, level, gfn, 0)
    for it in for_each_tdp_pte_min_level(it, gfn + 1):
        if it.level == level:
            return it
    raise AssertionError(f"no entry for gfn {gfn:#x} at level {level}")


def _assert_dead_after(m, words):
    kvm = m.kvm
    assert kvm.vm_dead and kvm.vm_bugged and kvm.stat["kvm_bug_on"] == 1
    assert words in kvm.bug_reason
    with pytest.raises(KvmIoctlError) as e:
        m.vcpus[0].run()
    assert e.value.errno == EIO and words in str(e.value)


class TestSeedKvmBugOns:
    def test_non_atomic_set_of_present_mirror_spte(self, seamcalls):
        m = Machine("private", vm="tdx")
        kvm = m.kvm
        gfn = 0x1F0  # in the image's leaf table, not mapped
        sptep, old = sptep_at(kvm, mirror_root(kvm), gfn, 1)
        assert old == SHADOW_NONPRESENT
        new = make_spte(PG_LEVEL_4K, gmem_pfn(m, gfn << 12), ACC_ALL, kvm.mt_mask)[0]
        assert new == leaf_spte(gmem_pfn(m, gfn << 12))
        pages_4k = kvm.stat["pages_4k"]
        mark = seamcalls.mark()
        kvm.mmu_lock.write_lock()
        try:
            ret = kvm.tdp_mmu.tdp_mmu_set_spte(0, sptep, old, new, gfn, 1)
        finally:
            kvm.mmu_lock.write_unlock()
        assert ret == old
        assert kvm.mem.q[sptep >> 3] == new  # written, then the bug is caught
        assert kvm.stat["pages_4k"] == pages_4k + 1
        assert seamcalls.since(mark) == []  # the S-EPT is not touched
        _assert_dead_after(m, "non-atomic set of a present mirror SPTE")

    def test_non_atomic_overwrite_of_present_mirror_leaf_still_removes_it(self, seamcalls):
        m = Machine("private", vm="tdx")
        kvm = m.kvm
        gfn = 0x100  # the first image page (MAPPED by PAGE.ADD)
        sptep, old = sptep_at(kvm, mirror_root(kvm), gfn, 1)
        assert old & MMU_PRESENT
        new = old & ~0b010  # the same page, write-protected
        mark = seamcalls.mark()
        kvm.mmu_lock.write_lock()
        try:
            kvm.tdp_mmu.tdp_mmu_set_spte(0, sptep, old, new, gfn, 1)
        finally:
            kvm.mmu_lock.write_unlock()
        assert kvm.vm_bugged
        assert [(c.name, c.rcx) for c in seamcalls.since(mark) if c.name != "TDH_MEM_TRACK"] == [
            ("TDH_MEM_RANGE_BLOCK", 0x100000),
            ("TDH_MEM_PAGE_REMOVE", 0x100000),
            ("TDH_PHYMEM_PAGE_WBINVD", (old & ADDR_MASK) | (m.kvm.tdx.hkid << m.host.tdx_module.x86_phys_bits)),
        ]
        assert 0x100000 not in sept_leaves(m)

    def test_atomic_zap_of_present_mirror_spte(self, seamcalls):
        m = Machine("private", vm="tdx")
        kvm = m.kvm
        gfn = 0x100
        kvm.mmu_lock.read_lock()
        try:
            it = _iter_at(kvm, mirror_root(kvm), gfn, 1)
            old = it.old_spte
            assert old == leaf_spte(gmem_pfn(m, gfn << 12))
            mark = seamcalls.mark()
            ret = kvm.tdp_mmu.tdp_mmu_set_spte_atomic(it, SHADOW_NONPRESENT)
        finally:
            kvm.mmu_lock.read_unlock()
        assert ret == -EBUSY
        assert kvm.mem.q[it.sptep >> 3] == old  # untouched, never frozen
        assert seamcalls.since(mark) == []
        assert sept_leaves(m)[0x100000][1] == S.SEPT_MAPPED
        _assert_dead_after(m, "atomic zap of mirror SPTE")

    def test_mirror_link_without_external_spt(self, seamcalls):
        m = Machine("private", vm="tdx")
        kvm, v0 = m.kvm, m.vcpus[0]
        tdp = kvm.tdp_mmu
        gfn = AREA >> 12
        kvm.mmu_lock.read_lock()
        try:
            it = _iter_at(kvm, mirror_root(kvm), gfn, PG_LEVEL_2M)
            assert it.old_spte == SHADOW_NONPRESENT
            sp = tdp.alloc_sp(v0)
            tdp.init_child_sp(sp, it)
            assert sp.is_mirror and sp.external_spt is None
            mark = seamcalls.mark()
            ret = tdp.tdp_mmu_set_spte_atomic(it, make_nonleaf_spte(sp.spt), v0.vcpu_id)
        finally:
            kvm.mmu_lock.read_unlock()
        tdp.free_sp(sp)
        assert ret < 0
        assert kvm.mem.q[it.sptep >> 3] == SHADOW_NONPRESENT  # the freeze was undone
        assert seamcalls.since(mark) == []  # no SEPT.ADD with a missing page
        _assert_dead_after(m, "without a mirrored page")


# ----------------------------------------------------------------------------------------------
# 5. The host cannot read private memory
# ----------------------------------------------------------------------------------------------


def test_private_memory_refused_to_host_shared_readable():
    m = Machine("private", vm="tdx")
    res = m.run()
    assert res.exit == "hlt", res.error
    mem = m.host.mem
    sl = sept_leaves(m)
    area = {gpa: hpa for gpa, (_, _, hpa) in sl.items() if AREA <= gpa < AREA + 16 * 0x1000}
    assert sorted(area) == [AREA + (p << 12) for p in range(16)]
    for p in range(16):
        gpa = AREA + (p << 12)
        hpa = area[gpa]
        assert hpa == gmem_pfn(m, gpa) << 12
        with pytest.raises(HostAccessError) as e:
            mem.host_read(hpa, 8)
        assert e.value.hpa == hpa and e.value.write is False
        with pytest.raises(HostAccessError):
            mem.host_write(hpa + 0x800, b"\0" * 8)
        # What the guest wrote is there (the hardware's view), at both ends of the page.
        pattern = (p * 0x10001 + 0x5A5A).to_bytes(8, "little")
        assert mem.read(hpa, 8) == pattern and mem.read(hpa + 0xFF8, 8) == pattern
    # The module's pages too: the TDR and the S-EPT tables.
    td = td_of(m)
    for page in [td.tdr] + [c for _, _, c in m.host.tdx_module.sept_tables(td)]:
        with pytest.raises(HostAccessError):
            mem.host_read(page, 8)
    # The shared alias's backing (the VMM's own memory) is readable: never written, all zero.
    assert m.read_gpa(AREA, 8) == bytes(8)
    assert mem.host_read(m.hva + AREA + 0xFF8, 8) == bytes(8)
    hpas = list(area.values())
    m.destroy()
    # After teardown the pages are the host's again, cleared.
    for hpa in hpas:
        assert mem.host_read(hpa, 0x1000) == bytes(0x1000)


# ----------------------------------------------------------------------------------------------
# 6. Touching an AUGed but unaccepted page
# ----------------------------------------------------------------------------------------------

PENDING_GUEST = """\
# Accept page A, write and report it, then read page B (A + 4K, never accepted):
# KVM AUGs B (PENDING) on the first fault and the retried access meets a PENDING page.
.intel_syntax noprefix
.include "emu.inc"
.equ AREA, 0x1000000
    .text
    .globl _start
_start:
    test rdi, rdi
    jnz done
    mov rdi, AREA
    mov rsi, PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz failed
    mov rax, 0x1234
    mov qword ptr [AREA], rax
    REPORT qword ptr [AREA]
    .globl touch_b
touch_b:
    mov rax, qword ptr [AREA + PAGE_SIZE]
    REPORT rax
done:
    EXIT
failed:
    FAIL 1
"""


@pytest.fixture(scope="module")
def guest_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("td_e2e_guests")


def write_guest(guest_dir, name, text):
    p = guest_dir / name
    if not p.exists():
        p.write_text(text)
    return p


@pytest.fixture
def pending_guest(guest_dir):
    return write_guest(guest_dir, "pending.S", PENDING_GUEST)


def _pending_common(m, seamcalls, mark):
    b = AREA + 0x1000
    augs = [c.rcx for c in seamcalls.since(mark) if c.name == "TDH_MEM_PAGE_AUG"]
    assert augs == [AREA, b]  # B was AUGed exactly once
    sl = sept_leaves(m)
    assert sl[AREA][1] == S.SEPT_MAPPED and sl[b][1] == S.SEPT_PENDING
    assert check_vm(m.kvm) == []
    return b


def test_pending_access_with_sept_ve_disable_kills_the_vm(seamcalls, pending_guest):
    m = Machine(str(pending_guest), vm="tdx", td_attributes=A.TD_ATTR_SEPT_VE_DISABLE | A.TD_ATTR_DEBUG)
    mark = seamcalls.mark()
    res = m.run()
    assert res.exit == "ioctl_error"  # tdx_handle_ept_violation(): kvm_vm_dead(), -EIO
    assert "Guest access before accepting 0x1001000" in res.error and "(-EIO)" in res.error
    assert res.reports == [(0, 0x1234)]
    b = _pending_common(m, seamcalls, mark)
    # The TD exit the module made: EPT violation (48), extended type PENDING_EPT_VIOLATION (6).
    last = [c for c in seamcalls.since(mark) if c.name == "TDH_VP_ENTER"][-1]
    assert last.out.rax & 0xFFFF == 48 and last.out.rdx & 0xF == 6 and last.out.r8 == b
    assert m.kvm.vm_dead
    assert m.kvm.stat["kvm_bug_on"] == 0 and not m.kvm.vm_bugged  # kvm_vm_dead(), not KVM_BUG_ON
    mark = seamcalls.mark()
    with pytest.raises(KvmIoctlError):
        m.vcpus[0].run()
    assert seamcalls.since(mark) == []
    assert_clean_teardown(m)


def test_pending_access_without_sept_ve_disable_injects_ve(seamcalls, pending_guest):
    m = Machine(str(pending_guest), vm="tdx", td_attributes=A.TD_ATTR_DEBUG)
    mark = seamcalls.mark()
    res = m.run()
    assert res.exit == "shutdown"
    assert "#VE" in res.error and "triple fault" in res.error
    assert res.reports == [(0, 0x1234)]
    _pending_common(m, seamcalls, mark)
    run = m.vcpus[0].kvm_run
    assert run.exit_reason == KVM_EXIT_SHUTDOWN and run.vector == 20
    assert run.error_code is None and run.cr2 is None
    assert not m.kvm.vm_dead  # the guest's fault, not KVM's
    assert_clean_teardown(m)


def test_ve_shutdown_reports_the_faulting_rip(pending_guest):
    m = Machine(str(pending_guest), vm="tdx", td_attributes=A.TD_ATTR_DEBUG)
    res = m.run()
    assert res.exit == "shutdown"
    assert m.vcpus[0].kvm_run.rip == m.image.symbol("touch_b")


# ----------------------------------------------------------------------------------------------
# 7. MapGPA: converting zaps the side the memory leaves
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("vcpus", [1, 2])
def test_convert_zaps_the_other_side(seamcalls, vcpus):
    m = Machine("convert", vm="tdx", vcpus=vcpus)
    kvm = m.kvm
    shared_gfn_bit = m.shared_bit >> 12
    gfns = [(AREA >> 12) + i for i in range(4)]
    snaps = []
    real = kvm.set_memory_attributes
    pamt = m.host.tdx_module.pamt

    def snapshot():
        return {
            "mirror": {g: v for g, v in leaves(kvm, mirror_root(kvm)).items() if g in gfns},
            "direct": {g: v for g, v in leaves(kvm, direct_root(kvm), shared_gfn_bit).items() if g in gfns},
            "sept": {gpa: v for gpa, v in sept_leaves(m).items() if gpa >> 12 in gfns},
            "pamt": {g: pamt.page_type(gmem_pfn(m, g << 12) << 12) for g in gfns},
        }

    def set_memory_attributes(start, end, private):
        before = snapshot()
        real(start, end, private)
        snaps.append(((start, end, private), before, snapshot()))

    kvm.set_memory_attributes = set_memory_attributes
    mark = seamcalls.mark()
    res = m.run()
    assert res.exit == "hlt", res.error
    assert reports_by_vcpu(res, vcpus) == convert_expected(m, vcpus)
    assert [s[0] for s in snaps] == [(gfns[0], gfns[-1] + 1, False), (gfns[0], gfns[-1] + 1, True)]

    # To shared: each private page leaves the S-EPT by BLOCK, TRACK, REMOVE, WBINVD (in that order).
    hkid = kvm.tdx.hkid
    bits = m.host.tdx_module.x86_phys_bits
    removal = [
        (c.name, c.rcx)
        for c in seamcalls.since(mark)
        if c.name in ("TDH_MEM_RANGE_BLOCK", "TDH_MEM_TRACK", "TDH_MEM_PAGE_REMOVE", "TDH_PHYMEM_PAGE_WBINVD")
    ]
    expected = []
    for g in gfns:
        expected += [
            ("TDH_MEM_RANGE_BLOCK", g << 12),
            ("TDH_MEM_TRACK", kvm.tdx.tdr_pa),
            ("TDH_MEM_PAGE_REMOVE", g << 12),
            ("TDH_PHYMEM_PAGE_WBINVD", (gmem_pfn(m, g << 12) << 12) | (hkid << bits)),
        ]
    assert removal == expected
    counts = res.stats["seamcalls"]
    assert [
        counts[k] for k in ("TDH_MEM_RANGE_BLOCK", "TDH_MEM_TRACK", "TDH_MEM_PAGE_REMOVE", "TDH_PHYMEM_PAGE_WBINVD")
    ] == [4, 4, 4, 4]
    assert counts["TDH_MEM_PAGE_AUG"] == 8  # accepted twice
    _, before, after = snaps[0]
    assert sorted(before["mirror"]) == gfns and after["mirror"] == {}
    assert sorted(before["sept"]) == [g << 12 for g in gfns] and after["sept"] == {}
    assert before["direct"] == {} == after["direct"]
    assert set(before["pamt"].values()) == {A.PT_REG} and set(after["pamt"].values()) == {A.PT_NDA}

    # Back to private: the shared mappings the guest made in the direct root are zapped.
    _, before, after = snaps[1]
    assert {g: e & ADDR_MASK for g, (lvl, e) in before["direct"].items()} == {g: m.hva + (g << 12) for g in gfns}
    assert after["direct"] == {}
    assert before["mirror"] == {} and before["sept"] == {}

    # At the end: private again, accepted again; nothing shared is mapped; the shared
    # backing still holds what the guest wrote through the shared alias (pattern B).
    end = snapshot()
    assert end["direct"] == {}
    assert {g: v[1] for g, v in end["mirror"].items()} == {g: leaf_spte(gmem_pfn(m, g << 12)) for g in gfns}
    assert {gpa: v[1] for gpa, v in end["sept"].items()} == {g << 12: S.SEPT_MAPPED for g in gfns}
    assert all(pamt.page_type(gmem_pfn(m, g << 12) << 12) == A.PT_REG for g in gfns)
    b = equ("convert.S", "PATTERN_B")
    assert m.read_gpa(AREA, 8) == b.to_bytes(8, "little")
    assert m.read_gpa(AREA + 0x3E00, 8) == ((b + 0x3E00) & U64).to_bytes(8, "little")
    assert check_vm(kvm) == []
    assert_clean_teardown(m)


# ----------------------------------------------------------------------------------------------
# 8. The CLI
# ----------------------------------------------------------------------------------------------


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "emu", "run", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def test_cli_json_seamcall_counts():
    p = _cli("private", "--vm", "tdx", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["exit"] == "hlt" and out["error"] is None
    assert out["shared_bit"] == 1 << 47
    assert out["reports"] == private_expected(None, 1)[0]
    sc = out["stats"]["seamcalls"]
    assert isinstance(sc, dict) and all(isinstance(k, str) and isinstance(v, int) for k, v in sc.items())
    assert sc["TDH_MEM_PAGE_AUG"] == 16
    assert sc["TDH_MEM_SEPT_ADD"] >= 1
    # One SEPT.ADD per S-EPT table a same run ends with (nothing was removed).
    m = Machine("private", vm="tdx")
    m.run()
    assert sc["TDH_MEM_SEPT_ADD"] == len(m.host.tdx_module.sept_tables(td_of(m)))
    assert sc["TDH_MEM_PAGE_ADD"] == sum(
        1 for gpa, (_, st, _) in sept_leaves(m).items() if gpa < AREA or gpa >= AREA + 16 * 0x1000
    )


def test_cli_dump_tables_mirror_matches_sept():
    p = _cli("private", "--vm", "tdx", "--dump-tables")
    assert p.returncode == 0, p.stderr
    rows = {}
    for line in p.stdout.splitlines():
        m = re.match(r"(0x[0-9a-f]+)\s+4K RWX pfn (0x[0-9a-f]+) A D\s+4K MAPPED pfn (0x[0-9a-f]+)\s+-$", line)
        if m:
            rows[int(m.group(1), 16)] = (int(m.group(2), 16), int(m.group(3), 16))
    for p_ in range(16):
        gpa = AREA + (p_ << 12)
        assert gpa in rows
        assert rows[gpa][0] == rows[gpa][1]


# ----------------------------------------------------------------------------------------------
# Private accesses KVM must not map: they go to userspace as KVM_EXIT_MEMORY_FAULT (mmu.c:
# kvm_handle_noslot_fault() for a private fault with no memslot; kvm_mmu_faultin_pfn() when
# fault->is_private != kvm_mem_is_private(gfn)), with -EFAULT from KVM_RUN; the VM lives on.
# ----------------------------------------------------------------------------------------------

NOSLOT_GUEST = """\
# Map GPA 64 MiB (just past guest memory: no memslot) in the loader's page tables with a 2M
# PDE, then read it: a private access to a GPA no memslot backs.
.intel_syntax noprefix
.include "emu.inc"
.equ TARGET, 0x4000000
    .text
    .globl _start
_start:
    test rdi, rdi
    jnz done
    mov rax, cr3
    mov rcx, 0x000ffffffffff000
    and rax, rcx
    mov rax, [rax]
    and rax, rcx
    mov rax, [rax]
    and rax, rcx
    mov qword ptr [rax + (TARGET >> 21) * 8], TARGET | 0x83
    invlpg [TARGET]
    REPORT 1
    mov rax, qword ptr [TARGET]
    REPORT 2
done:
    EXIT
"""

MISMATCH_GUEST = """\
# Convert one page to shared (MapGPA), write it through the shared alias, then read its
# private alias without converting back: a private access to a GFN whose attribute is shared.
.intel_syntax noprefix
.include "emu.inc"
.equ AREA, 0x1000000
    .text
    .globl _start
_start:
    test rdi, rdi
    jnz done
    call emu_shared_bit
    mov r12, rax
    mov rdi, AREA
    or rdi, r12
    mov rsi, PAGE_SIZE
    call emu_map_gpa
    test rax, rax
    jnz failed
    mov rax, 0x77
    mov qword ptr [TD_SHARED_WINDOW_GVA + AREA], rax
    REPORT 1
    mov rax, qword ptr [AREA]
    REPORT rax
done:
    EXIT
failed:
    FAIL 1
"""


def test_private_access_without_memslot_is_a_memory_fault(seamcalls, guest_dir):
    m = Machine(str(write_guest(guest_dir, "noslot.S", NOSLOT_GUEST)), vm="tdx")
    res = m.run()
    assert res.reports == [(0, 1)]
    assert not m.kvm.vm_bugged and m.kvm.stat["kvm_bug_on"] == 0
    assert res.exit in ("memory_fault", "ioctl_error")
    assert 0x4000 not in leaves(m.kvm, mirror_root(m.kvm))
    assert check_vm(m.kvm) == []


def test_private_access_to_shared_gfn_is_a_memory_fault(seamcalls, guest_dir):
    m = Machine(str(write_guest(guest_dir, "mismatch.S", MISMATCH_GUEST)), vm="tdx")
    mark = seamcalls.mark()
    res = m.run()
    assert res.reports == [(0, 1)]
    gfn = AREA >> 12
    assert not m.kvm.mem_is_private(gfn)
    # While the GFN is shared, KVM must not AUG it (the guest never accepted it before converting).
    augs = [c.rcx for c in seamcalls.since(mark) if c.name == "TDH_MEM_PAGE_AUG"]
    assert augs == []
    assert gfn not in leaves(m.kvm, mirror_root(m.kvm))
    assert AREA not in sept_leaves(m)
    assert res.exit in ("memory_fault", "ioctl_error")
    assert not m.kvm.vm_dead
