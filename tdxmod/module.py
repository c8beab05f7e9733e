"""The simulated TDX module: TD management, the S-EPT, and the SEAMCALL dispatcher.

    mod = TdxModule(mem, pamt_base, tdmr_base, tdmr_size)
    out = mod.seamcall(TDH_MEM_PAGE_AUG, rcx=gpa | 0, rdx=tdr_pa, r8=page_pa)
    out.rax            # the status; out.rcx, out.rdx, ... the output registers

Every handler has the same shape (the module's own: take the locks it needs,
walk, check the entry's state against the leaf's legal states, check and lock
the page in the PAMT, write, release, return a status).  A failed check
returns a status with the operand id and changes nothing.

``caller`` names the logical CPU the SEAMCALL runs on (current_lp(): KVM passes the vCPU it
calls for; a scheduler's task is a CPU; otherwise CPU 0): a vCPU is associated with one CPU at a
time (TDX_VCPU_ASSOCIATED).  The locks are tdx_1.5's (tdxmod/locks.py, helpers.py); a lock held
across a scheduling point (``sched.point``) can be met there by another CPU's call.

The module's pages (TDR, TDCS, TDVPR, S-EPT) and TD private pages are
protected: host software touching them gets HostAccessError, as TDX's memory
protection makes them unreadable to the VMM.  The TD and vCPU control
structures' contents are Python objects tied to those pages (the PAMT and the
S-EPT are real tables in memory).
"""

from emu.hw.memory import table_entries
from . import abi
from .abi import *  # noqa: F401,F403  (status codes and leaves by name)
from .pamt import Pamt
from . import sept as S
from .regs import Regs  # noqa: F401  (importable from here, as before)
from .td_structures import (  # noqa: F401  (the names importable from here, as before)
    PAGE,
    KEYID_BITS,
    TDCS_PAGES,
    TDVPX_PAGES,
    MAX_VCPUS_DEFAULT,
    TD_PARAMS_ATTRIBUTES,
    TD_PARAMS_XFAM,
    TD_PARAMS_MAX_VCPUS,
    TD_PARAMS_EPTP_CONTROLS,
    TD_PARAMS_CONFIG_FLAGS,
    MD_TDVPS_VMCS_SHARED_EPTP,
    MD_TDVPS_GPR_BASE,
    MD_TDVPS_RIP,
    MD_TDVPS_CR3,
    GPR_ORDER,
    Td,
    TdVcpu,
)
from .vmm_dispatcher import HANDLERS


class TdxModule:
    def __init__(self, mem, pamt_base, tdmr_base, tdmr_size, maxphyaddr=48):
        self.mem = mem
        self.pamt = Pamt(mem, pamt_base, tdmr_base, tdmr_size)
        self.maxphyaddr = maxphyaddr
        self.x86_phys_bits = maxphyaddr - KEYID_BITS
        self.tds = {}  # TDR PA -> Td
        self.vcpus = {}  # TDVPR PA -> TdVcpu
        self.hkids = set()
        self.tracer = None
        self.sched = None
        self.inject = None
        self.counts = {}  # leaf name -> calls
        self.make_cpu = None  # callable(index) -> emu.hw.vcpu.Vcpu, given by the platform
        self.on_tdcall = None  # (checkers) callable(vcpu, leaf, status): a TDCALL completed in the guest
        # SEAMRR, the module's own memory: in this model the memory it keeps its PAMT in (the
        # host can neither read it nor hand it to the module as a shared page).
        self.seamrr_base = pamt_base
        self.seamrr_end = pamt_base + self.pamt.size
        self.pamt.touch = self.touch
        self.pamt.module = self
        # TDX_FEATURES0 as TDH.SYS.RD reports it: a module that demotes without being interrupted
        # (a module newer than the tdx_1.5 source); the platform may take the bit away (a tdx_1.5-source module).
        self.features0 = TDX_FEATURES0_NO_RBP_MOD | TDX_FEATURES0_ENHANCED_DEMOTE_INTERRUPTIBILITY
        self._handlers = HANDLERS

    # -- the interface ----------------------------------------------------------------------------------
    def seamcall(
        self, leaf, rcx=0, rdx=0, r8=0, r9=0, r10=0, r11=0, r12=0, r13=0, r14=0, r15=0, rbx=0, rsi=0, rdi=0, caller=None
    ):
        """One SEAMCALL: the leaf (RAX) and input registers in, a Regs out (RAX = status)."""
        name = abi.seamcall_name(leaf)
        self.counts[name] = self.counts.get(name, 0) + 1
        # (positional: Regs' own order, rax rcx rdx r8..r15 rbx rsi rdi; a third of the keywords' cost)
        inp = Regs(leaf, rcx, rdx, r8, r9, r10, r11, r12, r13, r14, r15, rbx, rsi, rdi)
        tracer = self.tracer
        if tracer is not None and tracer.enabled:
            tracer.emit("seamcall_entry", caller, leaf=name, rcx=rcx, rdx=rdx, r8=r8)
        if self.sched is not None:
            if getattr(self.sched, "record", False):
                self.sched.module_call(self.footprint(leaf & 0xFFFF, inp, caller))
            self.sched.point(caller, "seamcall_entry", leaf)
        out = None
        if self.inject is not None:
            status = self.inject.seamcall_status(name)
            if status is not None:
                out = Regs(status)
        if out is None:
            handler = self._handlers.get(leaf & 0xFFFF)
            out = handler(self, inp, caller) if handler is not None else Regs(TDX_OPERAND_INVALID)
        if tracer is not None and tracer.enabled:
            tracer.emit(
                "seamcall",
                caller,
                leaf=name,
                rcx=rcx,
                rdx=rdx,
                r8=r8,
                status=abi.status_name(out.rax),
                rax=out.rax,
                out_rcx=out.rcx,
                out_rdx=out.rdx,
                outputs=f" rcx {out.rcx:#x} rdx {out.rdx:#x}" if out.rax and out.rax & TDX_ERROR else "",
            )
        if self.sched is not None:
            self.sched.point(caller, "seamcall_exit", leaf)
        return out

    # -- what a call touches (emu.checkers.dpor) ---------------------------------------------------------------
    @staticmethod
    def sept_keys(gpa, level):
        """(reads, writes) of an S-EPT entry at ``level`` (0 = 4K) for ``gpa``: the entry is
        written, the entries above it on the walk are read."""
        gpa &= ~0xFFF
        writes = {("sept", level, gpa >> (12 + 9 * level))}
        reads = {("sept", m, gpa >> (12 + 9 * m)) for m in range(level + 1, 5)}
        return reads, writes

    def footprint(self, leaf, r, caller):
        """What a SEAMCALL may read and write: for the fault path's leaves and the vCPU's own, the
        S-EPT entry, the page it takes, the TD's state, epoch and vCPU; None (everything) for the
        others, rarer, leaves.  The locks a call takes announce themselves as it takes them
        (touch(): a shared acquire is a read, anything else a write)."""
        if leaf == TDH_VP_ENTER:
            v = self.vcpus.get(r.rcx & ~0xFFF & ((1 << 52) - 1))
            reads = {"td_epoch"} | ({("td", v.td.tdr)} if v is not None else set())
            return frozenset(reads), frozenset({("tdvpr", r.rcx)}), False
        if leaf in (TDH_VP_RD, TDH_VP_WR):
            v = self.vcpus.get(r.rcx)
            reads = {("td", v.td.tdr)} if v is not None else set()
            return frozenset(reads), frozenset({("tdvpr", r.rcx)}), False
        if leaf in (TDH_MEM_PAGE_AUG, TDH_MEM_SEPT_ADD):
            level = r.rcx & 7
            reads, writes = self.sept_keys(r.rcx & ~0xFFF, level)
            size = level if leaf == TDH_MEM_PAGE_AUG and level < 2 else 0
            writes.add(("pamt", size, r.r8 >> (12 + 9 * size)))
            reads.add("td_epoch")
            reads.add(("td", r.rdx & ~0xFFF))
            return frozenset(reads), frozenset(writes), False
        return None

    def tdcall_footprint(self, leaf, rcx, caller):
        if leaf == TDG_MEM_PAGE_ACCEPT:
            reads, writes = self.sept_keys(rcx & ~0xFFF, rcx & 7)
            return frozenset(reads), frozenset(writes), False
        return frozenset(), frozenset(), False  # the vCPU's own state: its task's

    # -- helpers the handlers share -----------------------------------------------------------------------
    def point(self, caller, what):
        """A scheduling point inside the module: another CPU may run while locks are held here."""
        if self.sched is not None:
            self.sched.point(caller, what)

    def touch(self, key, write):
        """(emu.checkers.dpor) the running step reads or writes ``key`` (a lock, a structure)."""
        sched = self.sched
        if sched is not None and getattr(sched, "record", False):
            sched.touch(key, write)

    def current_lp(self, caller):
        """get_local_data()->lp_info.lp_id: the logical CPU a SEAMCALL runs on.  KVM names the vCPU
        it calls for (its vcpu_id, or the vCPU: each vCPU thread runs on a CPU of its own in this
        model); otherwise the scheduler's running task (a host task is a CPU too); otherwise
        CPU 0."""
        if caller.__class__ is int:
            return caller
        vid = getattr(caller, "vcpu_id", None)
        if vid is not None:
            return vid
        cur = getattr(self.sched, "current", None)
        return cur.index if cur is not None else 0

    def give_to_module(self, hpa, pt, owner):
        """A control page (TDR, TDCS, TDVPR, TDVPX) or an S-EPT page: the module fills it with a
        private key (the TDR with the global one, the others with the TD's: tdh_mng_create.c
        zero_area_cacheline(), tdh_mng_add_cx.c and tdh_mem_sept_add.c fill_area_cacheline()),
        so every line gets the TD bit."""
        self.pamt.set(hpa, pt, owner)
        self.mem.protect(hpa >> 12, "the TDX module")
        self.mem.td_write(hpa)

    def give_to_td(self, hpa, owner, npages=1):
        """``npages`` (1 or 512) private pages from ``hpa``: a 2M page is its PAMT 2M entry."""
        size = 1 if npages == 512 else 0
        self.pamt.set(hpa, PT_REG, owner, size)
        self.pamt.set_bepoch(hpa, 0, size)
        for i in range(npages):
            self.mem.protect((hpa >> 12) + i, "TD private memory")

    def release(self, hpa, npages=1):
        size = 1 if npages == 512 else 0
        self.pamt.set(hpa, PT_NDA, 0, size)
        self.pamt.set_bepoch(hpa, 0, size)
        for i in range(npages):
            self.mem.unprotect((hpa >> 12) + i)

    def private_gpa_ok(self, td, gpa):
        if gpa & td.shared_bit or gpa >> self.maxphyaddr:
            return False
        if not td.gpaw and gpa >> 47:
            return False
        return True

    def sept_walk(self, td, gpa, level):
        """Walk from the root down to ``level``; stops at any entry with RWX = 0 or a leaf.

        Returns (entry HPA, entry, entry level): the entry level is ``level`` when the
        walk got there, higher when it stopped early (the caller's EPT_WALK_FAILED).
        """
        q = self.mem.q
        table = td.sept_root
        lvl = td.sept_top_level
        while True:
            ptr = table + (((gpa >> S.GPA_INDEX_SHIFT[lvl]) & 511) << 3)  # S.index(gpa, lvl)
            e = q[ptr >> 3]
            if lvl == level:
                return ptr, e, lvl
            if not e & S.SEPT_RWX or S.sept_state(e) in S.LEAF_STATES:  # S.is_leaf_state()
                return ptr, e, lvl
            table = e & S.SEPT_HPA
            lvl -= 1

    def walk_failed(self, e, lvl):
        return Regs(
            TDX_EPT_WALK_FAILED | OPERAND_ID_RCX, rcx=S.architectural_entry(e), rdx=S.entry_info(S.sept_state(e), lvl)
        )

    def state_incorrect(self, e, lvl):
        return Regs(
            TDX_EPT_ENTRY_STATE_INCORRECT | OPERAND_ID_RCX,
            rcx=S.architectural_entry(e),
            rdx=S.entry_info(S.sept_state(e), lvl),
        )

    def lock_entry(self, ptr):
        """sept_lock_acquire_host(): the entry lock (TDEL).  A host that loses it sets TDHP so
        that the guest side backs off; a host that gets it clears TDHP."""
        q = self.mem.q
        e = q[ptr >> 3]
        if e & S.SEPT_TDEL:
            q[ptr >> 3] = e | S.SEPT_TDHP
            return False
        q[ptr >> 3] = (e | S.SEPT_TDEL) & ~S.SEPT_TDHP
        return True

    def lock_entry_guest(self, ptr):
        """sept_lock_acquire_guest(): TDX_SUCCESS, TDX_OPERAND_BUSY (held), or
        TDX_OPERAND_BUSY_HOST_PRIORITY (free, but a host asked for priority: not taken)."""
        q = self.mem.q
        e = q[ptr >> 3]
        if e & S.SEPT_TDEL:
            return TDX_OPERAND_BUSY
        if e & S.SEPT_TDHP:
            return TDX_OPERAND_BUSY_HOST_PRIORITY
        q[ptr >> 3] = e | S.SEPT_TDEL
        return TDX_SUCCESS

    def unlock_entry(self, ptr):
        """sept_lock_release(): clears TDEL only (TDHP stays until a host takes the lock)."""
        q = self.mem.q
        q[ptr >> 3] &= ~S.SEPT_TDEL

    def sept_details(self, e, lvl):
        """set_arch_septe_details_in_vmm_regs(): RCX = the architectural entry, RDX = level and state."""
        e = S.cleanup_if_pending(e, lvl)
        return S.architectural_entry(e), S.entry_info(S.sept_state(e), lvl)

    def interrupt_pending_host_side(self, caller):
        """is_interrupt_pending_host_side(), where a long SEAMCALL (DEMOTE, PROMOTE) may give up
        with TDX_INTERRUPTED_RESTARTABLE.  A host interrupt is pending when the fault point
        tdx.host_interrupt fires, or when the scheduler lets another task run at this point: a
        host CPU inside a SEAMCALL is preempted only by an interrupt, which the module sees
        pending (so the explorer's preemptions here are interrupts)."""
        inj = self.inject
        if inj is not None and inj.should_fail("tdx.host_interrupt"):
            return True
        sched = self.sched
        if sched is None:
            return False
        before = sched.steps
        sched.point(caller, "host_interrupt_window")
        return sched.steps > before + 1

    def is_tlb_tracked(self, td, bepoch):
        if bepoch < td.epoch - 1:
            return True
        return bepoch == td.epoch - 1 and td.refcount[bepoch & 1] == 0

    # -- inspection (tests, table dumps, invariant checks) --------------------------------------------------
    def sept_scan(self, td):
        """One walk of the TD's S-EPT: (leaves as sept_leaves() gives them, tables as
        sept_tables() gives them).  Free entries, most of a table, are skipped in C
        (emu.hw.memory.table_entries: the checker runs after every explored schedule)."""
        leaves, tables = [], []
        mem, free = self.mem, S.SEPT_FREE_ENTRY
        sept_state, leaf_states, nl_states, hpa_mask = S.sept_state, S.LEAF_STATES, S.NL_STATES, S.SEPT_HPA

        def walk(tbl, lvl, base):
            for i, e in table_entries(mem, tbl, free):
                st = sept_state(e)
                gpa = base + (i << (12 + 9 * lvl))
                if st in leaf_states:
                    leaves.append((gpa, lvl, st, S.leaf_hpa(e, lvl)))
                elif st in nl_states and lvl > 0:
                    tables.append((gpa, lvl, e & hpa_mask))
                    walk(e & hpa_mask, lvl - 1, gpa)

        if td.sept_root is not None:
            walk(td.sept_root, td.sept_top_level, 0)
        return leaves, tables

    def sept_leaves(self, td):
        """(gpa, tdx level, state, hpa) of every leaf-state entry of the TD's S-EPT."""
        return self.sept_scan(td)[0]

    def sept_tables(self, td):
        """(gpa, tdx level of the entry, child table HPA) of every non-leaf entry."""
        return self.sept_scan(td)[1]
