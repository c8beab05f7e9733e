"""A stateful fuzzer of the TDX module: SEAMCALLs and TDCALLs, plausible and hostile, from two CPUs.

    fz = SeamFuzzer(seed=1)
    report = fz.run(calls=10_000)          # a FuzzReport: coverage, failures (with reproducers)

The module is driven the way a hostile host would drive it, at the register level
(``TdxModule.seamcall``): most calls are the next plausible step of some TD's life (create, add
control pages, initialise, build a tiny guest with PAGE.ADD, finalise, map and unmap pages,
enter the TD, flush and tear down), the others take any leaf with operands drawn from a pool of
plausible and hostile values: other TDs' pages, pages of the PAMT (the module's own memory),
control and S-EPT pages, wrong levels, the shared bit, reserved bits, HKID bits, unaligned and
out-of-range values, the wrong logical CPU.  TDCALLs come from the TDs' guests: a few bytes of
code (TDCALL, a load, a store, INT 18, UD2, HLT...) run with registers set through TDH.VP.WR.

A second logical CPU runs at the module's own scheduling points (the hook the module exposes:
``TdxModule.sched``): at each point a call of the first CPU reaches, with some probability, a
whole SEAMCALL of the second runs there (biased towards the same TD, vCPU, GPA or page), while
the first holds its locks.  It may also kick a vCPU (an IPI: the TD exits on an external
interrupt).

After every call:

* no Python exception escaped ``seamcall()``;
* an error changed nothing (but the locks' own bookkeeping: host-priority bits, and the
  association of a vCPU with the calling CPU that TDH.VP.ENTER, RD and WR make before they
  fail, as the module does);
* a success made exactly its change (the leaf's keys and nothing else; for the main leaves the
  new entry, page type and owner, child count, epoch);
* once no call is in flight: no lock held, the PAMT's index equal to its table, every TD's
  pages (TDR, TDCS, TDVPR, TDVPX, S-EPT tables, private pages) owned by it in the PAMT and
  nothing else, its child count their sum, no page mapped twice, the TLB-tracking counts those
  of the vCPUs in the TD, the associations counted, the HKIDs in use, the host's protection of
  exactly the module's and the TDs' pages.

A failure's reproducer is the sequence of calls (with the second CPU's calls at their points)
from a fresh module, shortened while it still fails the same way.

Coverage: the (leaf, status) pairs reached, against those each handler can return, derived
from the handlers' source (``can_return()``: every status constant the handler and the
functions it calls name); UNREACHABLE lists, with the reason, the pairs no call can reach.
"""

import random
import time
import traceback

from tdxmod import abi as A
from tdxmod import locks as L
from tdxmod import sept as S
from tdxmod.vmm_dispatcher import HANDLERS
from emu.hw.memory import HostAccessError
from .seamfuzz_calls import CallMaker, sept_entries
from .seamfuzz_coverage import status_of, leaf_name, tdcall_name, can_return, unreachable  # noqa: F401

PAGE = 4096


# ==================================================================================================
# A snapshot of everything the module keeps, and its invariants
# ==================================================================================================
class Snapshot:
    """The module's state as facts: key -> value (lock bookkeeping left out), and the pages the host
    may not touch."""

    __slots__ = ("facts", "prot", "septs")

    def __init__(self, mod):
        f = {}
        pamt = mod.pamt
        for hpa, (pt, owner, size) in pamt.index.items():
            f[("pamt", hpa)] = (pt, owner, size, pamt.bepoch_of(hpa, size))
        self.septs = {}
        for tdr, td in mod.tds.items():
            f[("td", tdr)] = (
                td.lifecycle,
                td.op_state,
                td.chldcnt,
                td.fatal,
                td.num_vcpus,
                td.num_assoc_vcpus,
                td.epoch,
                tuple(td.refcount),
                tuple(td.tdcx),
                td.wbcache_needed,
                td.hkid,
                td.finalized_mrtd,
                td.attributes,
                td.max_vcpus,
                td.pwl,
                td.sept_root,
            )
            f[("mrtd", tdr)] = td.mrtd.digest()
            entries = self.septs[tdr] = sept_entries(mod, td)
            for gpa, lvl, state, hpa, _locked in entries:
                f[("sept", tdr, gpa, lvl)] = (state, hpa)
        for tdvpr, v in mod.vcpus.items():
            f[("vcpu", tdvpr)] = (v.state, v.assoc_lpid, tuple(v.tdvpx), v.shared_eptp, v.epoch, v.vcpu_index, v.td.tdr)
        for h in mod.hkids:
            f[("hkid", h)] = True
        self.facts = f
        self.prot = frozenset(mod.mem.protected)

    def changed(self, other):
        keys = {k for k, _ in self.facts.items() ^ other.facts.items()}
        if self.prot != other.prot:
            keys.update(("prot", pfn) for pfn in self.prot ^ other.prot)
        return keys


def invariants(mod, full=False, snap=None):
    """What must hold whenever no call is in flight: a list of problems.  ``snap``: a Snapshot taken
    since the last call (its S-EPT scans are reused)."""
    problems = []
    pamt = mod.pamt
    if pamt.any_lock_held():
        held = pamt.locks_held()
        problems.append(
            f"PAMT entry locks held with no call in flight: {[(hex(h), lv, hex(w)) for h, lv, w in held[:4]]}"
        )
    if full:
        mem_view = pamt.scan_owned_pages()
        if mem_view != pamt.owned_pages():
            problems.append("the PAMT's index and its table disagree")
    owned_by = {}
    for hpa, (pt, owner, size) in pamt.index.items():
        owned_by.setdefault(owner if pt != A.PT_TDR else hpa, []).append((hpa, pt, size))
    live_hkids = set()
    all_vcpus = {}
    protected = set()
    for hpa, pt, size in (x for lst in owned_by.values() for x in lst):
        protected.update(range(hpa >> 12, (hpa >> 12) + 512**size))
    for tdr, td in mod.tds.items():
        where = f"TD {tdr:#x}"
        if td.op_state_lock & ~L.SHAREX_HP_HOST_PRIORITY or td.secure_ept_lock or td.epoch_lock:
            problems.append(f"{where}: a TDCS lock held with no call in flight")
        if pamt.index.get(tdr) != (A.PT_TDR, 0, 0):
            problems.append(f"{where}: its TDR is {pamt.describe(tdr)} in the PAMT")
        want = {(p, A.PT_TDCX, 0) for p in td.tdcx}
        for tdvpr, v in td.vcpus.items():
            all_vcpus[tdvpr] = v
            want.add((tdvpr, A.PT_TDVPR, 0))
            want.update((p, A.PT_TDCX, 0) for p in v.tdvpx)
            if v.td is not td:
                problems.append(f"{where}: vCPU {tdvpr:#x} belongs to another TD")
        hpas = {}
        entries = snap.septs[tdr] if snap is not None and tdr in snap.septs else sept_entries(mod, td)
        for gpa, lvl, state, hpa, locked in entries:
            if locked:
                problems.append(f"{where}: S-EPT entry gpa {gpa:#x} level {lvl} locked with no call in flight")
            if state == S.SEPT_FREE:
                continue
            if state in S.LEAF_STATES:
                if lvl > 1:
                    problems.append(f"{where}: a leaf at level {lvl} (gpa {gpa:#x})")
                want.add((hpa, A.PT_REG, lvl))
            elif state in S.NL_STATES:
                want.add((hpa, A.PT_EPT, 0))
            else:
                problems.append(f"{where}: S-EPT entry gpa {gpa:#x} level {lvl} in state {state:#x}")
            if hpa in hpas:
                problems.append(f"{where}: {hpa:#x} mapped at gpa {hpas[hpa]:#x} and {gpa:#x}")
            hpas[hpa] = gpa
        have = {x for x in owned_by.get(tdr, []) if x[0] != tdr}
        if td.lifecycle == A.TD_TEARDOWN:
            # Torn down: its pages go back one by one (RECLAIM), its TDCS and S-EPT are dead.
            if td.chldcnt != sum(512**s for _, _, s in have):
                problems.append(
                    f"{where}: child count {td.chldcnt}, the PAMT gives it {sum(512**s for _, _, s in have)} pages"
                )
            continue
        if have != want:
            extra, missing = sorted(have - want)[:3], sorted(want - have)[:3]
            problems.append(
                f"{where}: the PAMT gives it {[(hex(h), p, s) for h, p, s in extra]} it does not "
                f"use, and not {[(hex(h), p, s) for h, p, s in missing]} it uses"
            )
        if td.chldcnt != sum(512**s for _, _, s in have):
            problems.append(
                f"{where}: child count {td.chldcnt}, the PAMT gives it {sum(512**s for _, _, s in have)} pages"
            )
        active = sum(1 for v in td.vcpus.values() if v.state == A.VCPU_ACTIVE)
        if min(td.refcount) < 0 or sum(td.refcount) != active:
            problems.append(f"{where}: TLB-tracking counts {td.refcount} with {active} vCPUs in the TD")
        if td.num_assoc_vcpus != sum(1 for v in td.vcpus.values() if v.assoc_lpid is not None):
            problems.append(
                f"{where}: {td.num_assoc_vcpus} associated vCPUs counted, "
                f"{sum(1 for v in td.vcpus.values() if v.assoc_lpid is not None)} associated"
            )
        if td.num_vcpus != sum(1 for v in td.vcpus.values() if v.initialized):
            problems.append(
                f"{where}: {td.num_vcpus} vCPUs counted, "
                f"{sum(1 for v in td.vcpus.values() if v.initialized)} initialized"
            )
        if td.op_state != A.OP_STATE_UNINITIALIZED and td.sept_root != td.tdcx[-1]:
            problems.append(f"{where}: its S-EPT root is not its last TDCS page")
        if td.lifecycle != A.TD_TEARDOWN:
            live_hkids.add(td.hkid)
    for owner in owned_by:
        if owner not in mod.tds:
            problems.append(f"the PAMT gives pages to {owner:#x}, not a TD")
    if set(mod.vcpus) != set(all_vcpus):
        problems.append("the module's vCPUs are not its TDs' vCPUs")
    if mod.hkids != live_hkids:
        problems.append(f"HKIDs in use {sorted(mod.hkids)}, the TDs hold {sorted(live_hkids)}")
    first, last = mod.seamrr_base >> 12, mod.seamrr_end >> 12
    prot = {pfn for pfn in mod.mem.protected if not first <= pfn < last}
    if prot != protected:
        extra, missing = sorted(prot - protected)[:3], sorted(protected - prot)[:3]
        problems.append(
            f"host protection of pfns {[hex(p) for p in extra]} the module does not own, "
            f"none of {[hex(p) for p in missing]} it owns"
        )
    return problems


# ==================================================================================================
# The fuzzer
# ==================================================================================================
class Failure:
    def __init__(self, kind, message, records, index):
        self.kind = kind  # "exception", "error changed state", "success changed...", "invariant"
        self.message = message
        self.records = records  # the call sequence that reproduces it (minimized if it could be)
        self.index = index  # the call (in the original run) where it broke

    def as_json(self):
        return {
            "kind": self.kind,
            "message": self.message,
            "at_call": self.index,
            "reproducer": [format_record(r) for r in self.records],
        }


def format_record(r):
    regs = " ".join(f"{k}={v:#x}" for k, v in sorted(r["regs"].items()) if v)
    text = f"cpu{r['lp']} {leaf_name(r['leaf'])}({r['leaf'] & 0xFFFF:#x}{'.v' + str(r['leaf'] >> 16) if r['leaf'] >> 16 else ''}) {regs}"
    for act in r.get("prep", ()):
        text = f"[{act[0]} {act[1]:#x}] " + text
    for k, subs in r.get("nested", ()):
        text += f"  ||  at point {k}: " + " ; ".join(format_record(sub) for sub in subs)
    return text


class Broken(Exception):
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


class _SecondCpu:
    """The scheduler the module sees: at its scheduling points, the second CPU may run a call."""

    def __init__(self, fuzzer):
        self.fz = fuzzer
        self.points = 0
        self.nested = None  # while recording: the list the top-level record's nested calls go to
        self.replay = None  # while replaying: {point number: record}
        self.busy = False

    def point(self, caller, what, arg=None):
        if self.busy:
            return
        self.points += 1
        k = self.points
        fz = self.fz
        if self.replay is not None:
            recs = self.replay.get(k)
            if recs is None:
                return
        else:
            if self.nested is None or fz.rng.random() >= fz.second_cpu:
                return
            # The other logical CPU (one CPU cannot be in two SEAMCALLs at once).
            recs = fz.make_nested(1 - (fz.top["lp"] or 0), fz.current)
            if not recs:
                return
            self.nested.append((k, recs))
        self.busy = True
        try:
            for rec in recs:
                fz.execute(rec, nested=True)
        finally:
            self.busy = False


class SeamFuzzer(CallMaker):
    def __init__(self, seed=0, second_cpu=0.25, host=None):
        self.seed = seed
        self.rng = random.Random(seed)
        self.second_cpu = second_cpu
        self._fresh(host)
        self.pairs = {}  # (leaf name, status name) -> count
        self.calls = 0  # SEAMCALLs made, both CPUs'
        self.second_calls = 0  # of which the second CPU's
        self.records = []
        self.failures = []

    # -- the platform ------------------------------------------------------------------------------------
    def _fresh(self, host=None):
        from emu.host import Host
        from emu.hw.vcpu import Vcpu

        self.host = host or Host(8 << 20, kernel_size=4 << 20, tdx=True)
        mod = self.mod = self.host.tdx_module
        mem = self.mem = self.host.mem

        def make_cpu(index):
            cpu = Vcpu(mem, index)
            # The host's timer: a guest that runs on (a loop) is interrupted, as an IPI would.
            cpu.slice_blocks = 4096
            cpu.guest_point = lambda end, cpu=cpu: cpu.kick()
            return cpu

        mod.make_cpu = make_cpu
        self.sched = _SecondCpu(self)
        mod.sched = self.sched
        mod.on_tdcall = self._on_tdcall
        self.tdmr_end = mod.pamt.tdmr_end
        self.kernel_end = self.host.user_base
        self.roots = {}  # TDR -> zeroed page the vCPUs' shared EPTP points at
        self.plans = {}  # TDR -> calls queued for that TD
        self.dying = set()  # TDs being torn down
        self.age = {}  # TDR -> calls made on it
        self.current = None  # the record in flight (the second CPU contends with it)
        self.reserved = set()  # pages the fuzzer keeps for itself (shared EPT roots, sources)
        self._after = None  # the snapshot after the last top-level call (the next one's before)

    def _on_tdcall(self, v, leaf, status):
        key = (tdcall_name(leaf), status_of(None, status))
        self.pairs[key] = self.pairs.get(key, 0) + 1

    # -- running -----------------------------------------------------------------------------------------
    def run(self, calls, deadline=None, stop_at_first=True, on_progress=None):
        """About ``calls`` SEAMCALLs (both CPUs'; the last top-level call may bring a few of the
        second CPU's over); stops at the first failure (or the deadline, or Ctrl-C: interrupted)."""
        self.interrupted = False
        t0 = time.perf_counter()
        try:
            while self.calls < calls:
                if deadline is not None and time.perf_counter() > deadline:
                    self.interrupted = True
                    break
                rec = self.make_call(0)
                if rec is None:
                    continue
                self.records.append(rec)
                try:
                    self.execute(rec, nested=False, full=self.calls % 64 == 0)
                except Broken as b:
                    self.failures.append(Failure(b.kind, str(b), list(self.records), self.calls))
                    if stop_at_first:
                        break
                if on_progress is not None and self.calls % 1000 == 0:
                    on_progress(self)
            if not self.failures and not self.interrupted:
                problems = invariants(self.mod, full=True)
                if problems:
                    self.failures.append(Failure("invariant", "; ".join(problems[:3]), list(self.records), self.calls))
        except KeyboardInterrupt:
            self.interrupted = True
        self.seconds = time.perf_counter() - t0
        return self

    def execute(self, rec, nested=False, full=False):
        """One call (a record), with its checks; Broken when one fails."""
        mod = self.mod
        for act in rec.get("prep", ()):
            kind, arg = act[0], act[1]
            if kind == "write":
                try:
                    self.mem.host_write(arg, act[2])
                except HostAccessError:
                    pass  # (the page went to a TD or the module meanwhile)
            elif kind == "kick":
                v = mod.vcpus.get(arg)
                if v is not None and v.hw is not None:
                    v.hw.kick()
        before = self._after if not nested and self._after is not None else Snapshot(mod)
        self._after = None
        prev, self.current = self.current, rec
        if not nested:
            self.top = rec
            self.nested_keys = set()
            self.sched.points = 0
            self.sched.nested = rec.setdefault("nested", []) if self.sched.replay is None else None
        try:
            out = mod.seamcall(rec["leaf"], caller=rec["lp"], **rec["regs"])
        except Broken:
            raise
        except Exception as e:
            raise Broken(
                "exception",
                f"{leaf_name(rec['leaf'])} raised {type(e).__name__}: {e}\n"
                + "".join(traceback.format_exc().splitlines(True)[-6:]),
            ) from None
        finally:
            self.current = prev
            if not nested:
                self.sched.nested = None
        if rec["leaf"] & 0xFFFF == A.TDH_VP_ENTER:
            # The host takes the interrupt the TD exited for (KVM's local_irq_enable()).
            v = mod.vcpus.get(rec["regs"].get("rcx", 0) & ~0xFFF & ((1 << 52) - 1))
            if v is not None and v.hw is not None and v.state != A.VCPU_ACTIVE:
                v.hw.intr_pending = False
        self.calls += 1
        self.second_calls += nested
        st = status_of(rec["leaf"] & 0xFFFF, out.rax)
        key = (leaf_name(rec["leaf"]) if rec["leaf"] & 0xFFFF in HANDLERS else "SEAMCALL_UNKNOWN", st)
        self.pairs[key] = self.pairs.get(key, 0) + 1
        after = Snapshot(mod)
        changed = self.check_change(rec, out, before, after, set() if nested else self.nested_keys)
        if nested:
            self.nested_keys |= changed
        if not nested:
            self._after = after
            problems = invariants(mod, full=full, snap=after)
            if problems:
                raise Broken(
                    "invariant", f"after {format_record(rec)} -> {A.status_name(out.rax)}: " + "; ".join(problems[:3])
                )
        self.react(rec, out)
        return out

    # -- what a call may change ----------------------------------------------------------------------------
    def check_change(self, rec, out, before, after, others=frozenset()):
        """Raise Broken unless the call changed what it may; ``others``: keys the second CPU's
        calls changed meanwhile (checked on their own).  Returns the keys this call changed."""
        leaf = rec["leaf"] & 0xFFFF
        r = rec["regs"]
        all_changed = before.changed(after)
        changed = all_changed - others
        if not changed:
            return all_changed
        bf, af = before.facts, after.facts
        error = out.rax & A.TDX_ERROR and not (leaf == A.TDH_VP_ENTER and not out.rax >> 32)
        tdvpr = r.get("rcx", 0) & ~0xFFF & ((1 << 52) - 1)
        vkey = ("vcpu", tdvpr)
        owner = bf.get(vkey, (None,) * 7)[6]
        if error:
            # The association a vCPU leaf makes before a later check fails (check_and_associate_vcpu()),
            # and the epoch TDH.VP.ENTER samples before the stepping filter is BUSY
            # (adjust_tlb_tracking_state(); revert_tlb_tracking_state() gives back the count only).
            if leaf in (A.TDH_VP_ENTER, A.TDH_VP_RD, A.TDH_VP_WR) and vkey in bf:
                rest = changed - {vkey, ("td", owner)}
                if (
                    not rest
                    and _only(bf, af, vkey, {1, 4})
                    and (("td", owner) in others or _only(bf, af, ("td", owner), {5}))
                ):
                    return all_changed
            raise Broken(
                "error changed state",
                f"{format_record(rec)} -> {A.status_name(out.rax)} changed {_fmt_keys(changed, bf, af)}",
            )
        allowed = self.allowed(leaf, r, out, bf, af, owner)
        extra = {k for k in changed if not allowed(k)}
        if extra:
            raise Broken(
                "success changed too much",
                f"{format_record(rec)} -> {A.status_name(out.rax)} changed {_fmt_keys(extra, bf, af)}",
            )
        if not others:
            self.postconditions(leaf, r, out, bf, af, rec["lp"] or 0)
        return all_changed

    def allowed(self, leaf, r, out, bf, af, owner):
        rcx, rdx, r8 = r.get("rcx", 0), r.get("rdx", 0), r.get("r8", 0)
        tdr_of_rdx = rdx & ~0xFFF

        def pages(hpa, n=1):
            return {("pamt", hpa)} | {("prot", (hpa >> 12) + i) for i in range(n)}

        def in_td(tdr, kinds):
            return lambda k: (k[0] in kinds and len(k) > 1 and k[1] == tdr) or k == ("td", tdr)

        if leaf == A.TDH_MNG_CREATE:
            keys = pages(rcx) | {("td", rcx), ("mrtd", rcx), ("hkid", rdx)}
        elif leaf in (A.TDH_MNG_KEY_CONFIG, A.TDH_MNG_INIT, A.TDH_MNG_VPFLUSHDONE, A.TDH_MR_FINALIZE, A.TDH_MEM_TRACK):
            keys = {("td", rcx)}
        elif leaf == A.TDH_MNG_ADDCX:
            keys = pages(rcx) | {("td", rdx)}
        elif leaf == A.TDH_MNG_KEY_FREEID:
            # (its S-EPT leaves the snapshot: a torn-down TD's pages go back one by one)
            return lambda k: k == ("td", rcx) or k[0] == "hkid" or (k[0] == "sept" and k[1] == rcx)
        elif leaf == A.TDH_PHYMEM_CACHE_WB:
            return lambda k: k[0] == "td"
        elif leaf == A.TDH_VP_CREATE:
            keys = pages(rcx) | {("td", rdx), ("vcpu", rcx)}
        elif leaf == A.TDH_VP_ADDCX:
            keys = pages(rcx) | {("vcpu", rdx), ("td", bf.get(("vcpu", rdx), (None,) * 7)[6])}
        elif leaf in (A.TDH_VP_INIT, A.TDH_VP_RD, A.TDH_VP_WR, A.TDH_VP_FLUSH):
            keys = {("vcpu", rcx), ("td", owner)}
        elif leaf == A.TDH_MR_EXTEND:
            keys = {("mrtd", rdx)}
        elif leaf in (A.TDH_MEM_SEPT_ADD, A.TDH_MEM_PAGE_AUG, A.TDH_MEM_PAGE_ADD):
            tdr = tdr_of_rdx
            gpa, lvl = rcx & ~0xFFF & ((1 << 52) - 1), rcx & 7
            n = 512**lvl if leaf == A.TDH_MEM_PAGE_AUG else 1
            keys = pages(r8, n) | {("sept", tdr, gpa, lvl), ("td", tdr), ("mrtd", tdr)}
        elif leaf in (A.TDH_MEM_RANGE_BLOCK, A.TDH_MEM_RANGE_UNBLOCK):
            tdr = tdr_of_rdx
            gpa, lvl = rcx & ~0xFFF & ((1 << 52) - 1), rcx & 7
            hpa = bf.get(("sept", tdr, gpa, lvl), (0, 0))[1]
            keys = {("sept", tdr, gpa, lvl), ("pamt", hpa)}
        elif leaf in (A.TDH_MEM_PAGE_REMOVE, A.TDH_MEM_SEPT_REMOVE):
            tdr = tdr_of_rdx
            gpa, lvl = rcx & ~0xFFF & ((1 << 52) - 1), rcx & 7
            n = 512**lvl if leaf == A.TDH_MEM_PAGE_REMOVE else 1
            keys = pages(out.rcx, n) | {("sept", tdr, gpa, lvl), ("td", tdr)}
        elif leaf == A.TDH_PHYMEM_PAGE_RECLAIM:
            n = 512**out.r8 if out.r8 < 2 else 1
            keys = pages(rcx, n) | {("td", rcx if out.rcx == A.PT_TDR else out.rdx), ("mrtd", rcx), ("vcpu", rcx)}
        elif leaf == A.TDH_VP_ENTER:
            tdvpr = rcx & ~0xFFF & ((1 << 52) - 1)
            return lambda k: k == ("vcpu", tdvpr) or in_td(owner, ("sept",))(k)
        else:
            keys = set()
        return keys.__contains__

    def postconditions(self, leaf, r, out, bf, af, lp=0):
        rcx, rdx, r8 = r.get("rcx", 0), r.get("rdx", 0), r.get("r8", 0)
        tdr = rdx & ~0xFFF
        gpa, lvl = rcx & ~0xFFF & ((1 << 52) - 1), rcx & 7
        want = None
        if leaf in (A.TDH_VP_INIT, A.TDH_VP_RD, A.TDH_VP_WR, A.TDH_VP_ENTER, A.TDH_VP_FLUSH):
            # One logical CPU per vCPU: a vCPU that ran a leaf on a CPU stays associated with it
            # until TDH.VP.FLUSH there (check_and_associate_vcpu(), associate_vcpu_initial()).
            v = af.get(("vcpu", rcx & ~0xFFF & ((1 << 52) - 1)))
            want_lp = None if leaf == A.TDH_VP_FLUSH else lp
            if v is not None and v[1] != want_lp:
                raise Broken(
                    "success changed too much",
                    f"{leaf_name(leaf)} of {rcx:#x} on CPU {lp}: the vCPU is associated with {v[1]}, want {want_lp}",
                )
            if leaf == A.TDH_VP_INIT and v is not None and v[0] != A.VCPU_READY:
                raise Broken("success changed too much", f"TDH.VP.INIT of {rcx:#x}: vCPU state {v[0]}, want READY")
            return
        if leaf == A.TDH_MEM_PAGE_AUG:
            want = {("sept", tdr, gpa, lvl): (S.SEPT_PENDING, r8), ("pamt", r8): (A.PT_REG, tdr, lvl, 0)}
            dchld = 512**lvl
        elif leaf == A.TDH_MEM_PAGE_ADD:
            want = {("sept", tdr, gpa, 0): (S.SEPT_MAPPED, r8), ("pamt", r8): (A.PT_REG, tdr, 0, 0)}
            dchld = 1
            if self.mem.read(r8, PAGE) != self.mem.read(r.get("r9", 0), PAGE):
                raise Broken("success changed too much", f"{format_record(r_rec(leaf, r))}: the page is not the source")
        elif leaf == A.TDH_MEM_SEPT_ADD and ("sept", tdr & ~1, gpa, lvl) not in bf:
            tdr &= ~1
            want = {("sept", tdr, gpa, lvl): (S.SEPT_NL_MAPPED, r8), ("pamt", r8): (A.PT_EPT, tdr, 0, 0)}
            dchld = 1
        elif leaf in (A.TDH_MEM_PAGE_REMOVE, A.TDH_MEM_SEPT_REMOVE):
            want = {("sept", tdr, gpa, lvl): None, ("pamt", out.rcx): None}
            dchld = -(512**lvl) if leaf == A.TDH_MEM_PAGE_REMOVE else -1
        elif leaf == A.TDH_MEM_RANGE_BLOCK:
            st, hpa = bf[("sept", tdr, gpa, lvl)]
            blocked = {
                S.SEPT_NL_MAPPED: S.SEPT_NL_BLOCKED,
                S.SEPT_MAPPED: S.SEPT_BLOCKED,
                S.SEPT_PENDING: S.SEPT_PENDING_BLOCKED,
            }[st]
            want = {("sept", tdr, gpa, lvl): (blocked, hpa)}
            dchld = 0
        elif leaf == A.TDH_MEM_TRACK:
            if af[("td", rcx)][6] != bf[("td", rcx)][6] + 1:
                raise Broken("success changed too much", f"TRACK of {rcx:#x}: the epoch did not move on by one")
            return
        elif leaf == A.TDH_PHYMEM_PAGE_RECLAIM:
            if ("pamt", rcx) in af:
                raise Broken("success changed too much", f"RECLAIM of {rcx:#x}: still owned")
            return
        if want is None:
            return
        for k, v in want.items():
            if af.get(k) != v:
                raise Broken(
                    "success changed too much",
                    f"{leaf_name(leaf)} {rcx:#x}: {_key(k)} is {_fmt_val(af.get(k))}, want {_fmt_val(v)}",
                )
        chld = af[("td", tdr)][2] - bf[("td", tdr)][2]
        if chld != dchld:
            raise Broken(
                "success changed too much", f"{leaf_name(leaf)} {rcx:#x}: child count moved by {chld}, want {dchld}"
            )

    # -- reproducers ------------------------------------------------------------------------------------
    def replay(self, records):
        """Run ``records`` on a fresh module; the Broken it ends with, or None."""
        fz = SeamFuzzer(self.seed, self.second_cpu)
        fz.sched.replay = {}
        for rec in records:
            fz.sched.replay = {k: subs for k, subs in rec.get("nested", ())}
            try:
                fz.execute(rec, nested=False, full=False)
            except Broken as b:
                return b
        problems = invariants(fz.mod, full=True)
        return Broken("invariant", "; ".join(problems)) if problems else None

    def minimize(self, failure, seconds=20.0):
        """Drop calls (chunks, then one by one) while the replay still breaks the same way."""
        deadline = time.perf_counter() + seconds
        recs = list(failure.records)
        b = self.replay(recs)
        if b is None or b.kind != failure.kind:
            return failure
        chunk = max(1, len(recs) // 2)
        while chunk >= 1 and time.perf_counter() < deadline:
            i = 0
            while i < len(recs) - 1 and time.perf_counter() < deadline:
                trial = recs[:i] + recs[i + chunk :]
                if trial and trial[-1] is recs[-1]:
                    b2 = self.replay(trial)
                    if b2 is not None and b2.kind == failure.kind:
                        recs = trial
                        continue
                i += chunk
            chunk //= 2
        # then the second CPU's calls, one point at a time
        for i in range(len(recs)):
            for entry in list(recs[i].get("nested", ())):
                if time.perf_counter() > deadline:
                    break
                trial_rec = dict(recs[i], nested=[e for e in recs[i]["nested"] if e is not entry])
                trial = recs[:i] + [trial_rec] + recs[i + 1 :]
                b2 = self.replay(trial)
                if b2 is not None and b2.kind == failure.kind:
                    recs = trial
        b = self.replay(recs)
        return Failure(failure.kind, str(b) if b else failure.message, recs, failure.index)

    # -- the report --------------------------------------------------------------------------------------
    def coverage(self):
        possible = {(leaf, st) for leaf, sts in can_return().items() for st in sts}
        reachable = possible - set(unreachable())
        reached = {k for k in self.pairs if k in possible}
        surprising = sorted(k for k in self.pairs if k not in possible)
        return {
            "possible": len(possible),
            "reachable": len(reachable),
            "reached": len(reached & reachable),
            "percent": round(100.0 * len(reached & reachable) / max(1, len(reachable)), 1),
            "missing": sorted(reachable - reached),
            "not_derived": surprising,
        }


def _only(bf, af, key, fields):
    """``key`` differs between the snapshots in the tuple positions ``fields`` only."""
    a, b = bf.get(key), af.get(key)
    if a is None or b is None:
        return a == b
    return all(x == y for i, (x, y) in enumerate(zip(a, b)) if i not in fields)


def _key(k):
    return "(" + ", ".join(hex(x) if isinstance(x, int) and x > 9 else str(x) for x in k) + ")"


def _fmt_val(v):
    if isinstance(v, tuple):
        return "(" + ", ".join(hex(x) if isinstance(x, int) and x > 9 else repr(x) for x in v) + ")"
    return repr(v)


def _fmt_keys(keys, bf, af):
    items = sorted(keys, key=str)[:4]
    return "; ".join(f"{_key(k)}: {_fmt_val(bf.get(k))} -> {_fmt_val(af.get(k))}" for k in items) + (
        f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
    )


def r_rec(leaf, r):
    return {"lp": 0, "leaf": leaf, "regs": r}
