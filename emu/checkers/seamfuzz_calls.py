"""What the TDX module's fuzzer calls (emu.checkers.seamfuzz): each TD's plausible life, hostile
operands, the second CPU's contending calls, and the guest that makes the TDCALLs.

Every choice is made with the fuzzer's seeded random generator and returned as a record
(``{"lp", "leaf", "regs", "prep"}``): the logical CPU, the leaf (RAX), the input registers and
what the host does first (write one of its own pages, kick a vCPU).  The records are what a
reproducer replays.  Choosing looks at the module's state (which TDs exist, which pages are
free) so that most calls are the next step a host would take; checking is seamfuzz's.
"""

from tdxmod import abi as A
from tdxmod import sept as S
from tdxmod.module import MD_TDVPS_VMCS_SHARED_EPTP, MD_TDVPS_GPR_BASE, MD_TDVPS_RIP, MD_TDVPS_CR3
from tdxmod.module import TD_PARAMS_ATTRIBUTES, TD_PARAMS_MAX_VCPUS, TD_PARAMS_EPTP_CONTROLS, TD_PARAMS_CONFIG_FLAGS
from tdxmod.module import GPR_ORDER, TDCS_PAGES, TDVPX_PAGES
from emu.hw.exits import EXIT_REASON_EPT_VIOLATION

PAGE = 4096
M2 = 2 << 20
U64 = (1 << 64) - 1
GPR = {name: MD_TDVPS_GPR_BASE + i for i, name in enumerate(GPR_ORDER)}

# How often the guest runs each snippet (the destructive ones rarely: they end the vCPU or the TD).
SNIPPET_WEIGHTS = {
    "tdcall": 40,
    "read": 15,
    "write": 10,
    "read_loop": 4,
    "hlt": 10,
    "loop": 3,
    "mc": 0.6,
    "ud2": 1,
    "vmcall": 1.5,
    "idt": 6,
}


def sept_entries(mod, td):
    """(gpa, level, state, hpa, TDEL) of every entry of the TD's S-EPT that is not FREE."""
    from emu.hw.memory import table_entries

    out = []
    if td.sept_root is None or td.lifecycle == A.TD_TEARDOWN:
        return out  # (torn down: its S-EPT pages go back one by one)
    mem, free = mod.mem, S.SEPT_FREE_ENTRY

    def walk(tbl, lvl, base):
        for i, e in table_entries(mem, tbl, free):
            st = S.sept_state(e)
            gpa = base + (i << (12 + 9 * lvl))
            if st == S.SEPT_FREE:
                if e & S.SEPT_TDEL:
                    out.append((gpa, lvl, st, 0, True))
                continue
            out.append((gpa, lvl, st, e & S.SEPT_HPA, bool(e & S.SEPT_TDEL)))
            if st in S.NL_STATES and lvl > 0:
                walk(e & S.SEPT_HPA, lvl - 1, gpa)

    walk(td.sept_root, td.sept_top_level, 0)
    return out


class CallMaker:
    """The choosing half of SeamFuzzer (which provides ``rng``, ``mod``, ``mem`` and the platform's
    bookkeeping: ``plans``, ``dying``, ``age``, ``roots``, ``reserved``, ``kernel_end``, ``tdmr_end``)."""

    MAX_TDS = 3
    MAX_VCPUS = 2

    # -- choosing calls ------------------------------------------------------------------------------------
    def make_call(self, lp):
        """A record: the next call of CPU ``lp``: a plausible step of some TD's life, or a hostile call."""
        rng = self.rng
        if rng.random() < 0.8:
            rec = self.plausible(lp)
            if rec is not None:
                return rec
        return self.hostile(lp)

    def make_nested(self, lp, contend):
        """The second CPU's calls at a scheduling point of ``contend``: one call, or a short chain
        (registers set for a guest ACCEPT, then the entry; two TRACKs...)."""
        rng = self.rng
        if rng.random() < 0.6:
            chain = self.contending(contend, lp)
            if chain:
                return chain if isinstance(chain, list) else [chain]
        rec = self.plausible(lp) if rng.random() < 0.6 else self.hostile(lp)
        if rec is not None:
            rec["lp"] = lp
            return [rec]
        return []

    def _rec(self, leaf, lp=0, prep=(), **regs):
        return {"lp": lp, "leaf": leaf, "regs": regs, "prep": list(prep)}

    # the pools of operands
    def free_page(self, kernel=None):
        """A page the PAMT says is free (and the host can write), not one the fuzzer keeps."""
        rng, pamt = self.rng, self.mod.pamt
        lo, hi = (
            (0, self.kernel_end)
            if kernel
            else (self.kernel_end, self.tdmr_end - (8 << 20))
            if kernel is False
            else (0, self.tdmr_end - (8 << 20))
        )
        for _ in range(16):
            hpa = rng.randrange(lo, hi, PAGE)
            if hpa not in self.reserved and pamt.page_type(hpa) == A.PT_NDA and not self.mem.protected.get(hpa >> 12):
                return hpa
        return rng.randrange(lo, hi, PAGE)

    def free_2m(self):
        rng, pamt = self.rng, self.mod.pamt
        for _ in range(8):
            hpa = rng.randrange(self.kernel_end + M2 - 1 & ~(M2 - 1), self.tdmr_end - M2, M2)
            if pamt.is_2mb_range_free(hpa) and pamt.page_type(hpa) == A.PT_NDA:
                return hpa
        return self.kernel_end + M2 - 1 & ~(M2 - 1)

    def hostile_hpa(self):
        """An HPA operand: mostly someone's page, sometimes a bad one."""
        rng, mod = self.rng, self.mod
        owned = list(mod.pamt.index)
        pick = rng.random()
        if pick < 0.3 and owned:
            return rng.choice(owned)
        if pick < 0.5:
            return self.free_page()
        kind = rng.randrange(8)
        if kind == 0:
            return mod.pamt.base + rng.randrange(0, mod.pamt.size, PAGE)  # the PAMT
        if kind == 1:
            return self.free_page() + rng.choice((8, 0x800, 0xFF8))  # unaligned
        if kind == 2:
            return self.free_page() | (rng.randrange(1, 64) << mod.x86_phys_bits)  # HKID bits
        if kind == 3:
            return rng.choice((1 << 48, 1 << 51, U64 & ~0xFFF, 1 << 63))  # beyond MAX_PA
        if kind == 4:
            return mod.pamt.base + mod.pamt.size + rng.randrange(0, 16) * PAGE  # past the TDMR
        if kind == 5 and owned:
            return rng.choice(owned) + rng.choice((PAGE, 511 * PAGE))  # inside a 2M page
        if kind == 6:
            return 0
        return rng.randrange(0, self.tdmr_end, PAGE)

    def some_td(self, any_state=True):
        tds = list(self.mod.tds)
        return self.rng.choice(tds) if tds else None

    def some_tdr_operand(self):
        rng = self.rng
        tdr = self.some_td()
        if tdr is None or rng.random() < 0.15:
            return self.hostile_hpa()
        return tdr

    def some_vcpu(self, tdr=None):
        vs = [t for t, v in self.mod.vcpus.items() if tdr is None or v.td.tdr == tdr]
        return self.rng.choice(vs) if vs else None

    def some_gpa(self, td=None, level=None):
        """A page-info operand (GPA | level): near the GPAs the TDs use, sometimes hostile."""
        rng = self.rng
        lvl = level if level is not None else rng.choice((0, 0, 0, 1, 1, 2, 3))
        base = rng.choice((0x0, 0x0, 0x4000_0000, 0x80_0000_0000))
        span = 8 << 20 if base != 0x80_0000_0000 else 4 << 20
        gpa = (base + rng.randrange(0, span, PAGE)) & ~((PAGE << (9 * lvl)) - 1)
        if td is not None and rng.random() < 0.5:
            entries = [(g, lv) for g, lv, st, _, _ in sept_entries(self.mod, td) if st != S.SEPT_FREE]
            if entries:
                g, lv = rng.choice(entries)
                gpa, lvl = g, lv if level is None else level
        if rng.random() < 0.12:
            kind = rng.randrange(6)
            if kind == 0:
                gpa |= 1 << 47  # the shared bit (GPAW 48)
            elif kind == 1:
                gpa |= rng.choice((1 << 48, 1 << 51, 1 << 52, 1 << 60))
            elif kind == 2:
                gpa |= rng.choice((0x8, 0x100, 0x800))  # reserved bits 11:3
            elif kind == 3:
                gpa += PAGE  # unaligned to the level
            elif kind == 4:
                lvl = rng.choice((4, 5, 7))
            else:
                gpa = rng.randrange(0, 1 << 64) & ~7
        return gpa | lvl

    # -- plausible steps: each TD's life ------------------------------------------------------------------
    def plausible(self, lp):
        rng, mod = self.rng, self.mod
        tds = list(mod.tds.values())
        live = [td for td in tds if td.tdr not in self.dying]
        if not tds or (len(live) < self.MAX_TDS and rng.random() < 0.03):
            tdr = self.free_page(kernel=True)
            free = [h for h in range(1, 64) if h not in mod.hkids]
            return self._rec(A.TDH_MNG_CREATE, lp, rcx=tdr, rdx=rng.choice(free) if free else 1)
        td = rng.choice(tds)
        tdr = td.tdr
        plan = self.plans.get(tdr)
        if plan:
            rec = plan.pop(0)
            rec["lp"] = rec.get("lp", lp) if rec.get("lp") is not None else lp
            return rec
        self.age[tdr] = self.age.get(tdr, 0) + 1
        stuck = td.op_state == A.OP_STATE_RUNNABLE and (
            all(v.state in (A.VCPU_DISABLED, A.VCPU_UNINITIALIZED) for v in td.vcpus.values())
            or not self._guest_intact(td)
        )  # its guest's pages are gone
        if tdr not in self.dying and (
            self.age[tdr] > 400
            and rng.random() < 0.02
            or stuck
            or (td.fatal and rng.random() < 0.05)
            or rng.random() < 0.002
        ):
            self.dying.add(tdr)
        if (td.op_state != A.OP_STATE_RUNNABLE or td.fatal) and rng.random() < 0.3:
            return self.hostile(lp, td)  # linger: the early (and fatal) states' checks too
        if tdr not in self.dying and td.lifecycle == A.TD_HKID_ASSIGNED and not td.fatal:
            return self._rec(A.TDH_MNG_KEY_CONFIG, lp, rcx=tdr)
        if tdr in self.dying or td.lifecycle != A.TD_KEYS_CONFIGURED:
            return self.teardown_step(td, lp)
        if len(td.tdcx) < TDCS_PAGES:
            return self._rec(A.TDH_MNG_ADDCX, lp, rcx=self.free_page(kernel=True), rdx=tdr)
        if td.op_state == A.OP_STATE_UNINITIALIZED:
            return self.mng_init(td, lp)
        if td.op_state == A.OP_STATE_INITIALIZED:
            return self.build_step(td, lp)
        return self.run_step(td, lp)

    def mng_init(self, td, lp):
        rng = self.rng
        params = self.free_page(kernel=False)
        self.reserved.add(params)
        attrs = A.TD_ATTR_SEPT_VE_DISABLE | A.TD_ATTR_DEBUG
        if rng.random() < 0.15:
            attrs = rng.choice((A.TD_ATTR_SEPT_VE_DISABLE, A.TD_ATTR_DEBUG, 0, 1 << 5))
        eptp = 0x1E if rng.random() < 0.8 else rng.choice((0x26, 0x0E, 0x1E | 0x40, 0x36))
        cfg = 0 if rng.random() < 0.9 else rng.choice((1, 4, 2))
        data = bytearray(1024)
        for off, val in (
            (TD_PARAMS_ATTRIBUTES, attrs),
            (TD_PARAMS_MAX_VCPUS, rng.choice((1, 2, 2, 3, 0))),
            (TD_PARAMS_EPTP_CONTROLS, eptp),
            (TD_PARAMS_CONFIG_FLAGS, cfg),
        ):
            data[off : off + 8] = val.to_bytes(8, "little")
        return self._rec(A.TDH_MNG_INIT, lp, prep=[("write", params, bytes(data))], rcx=td.tdr, rdx=params)

    GUEST = {  # GPA -> what the guest build puts there
        0x0000: "pml4",
        0x1000: "pdpt",
        0x2000: "pdpt_shared",
        0x3000: "code",
    }
    # the code page: snippets (offset -> bytes); RIP is set to one of them through TDH.VP.WR
    SNIPPETS = {
        "tdcall": (0x000, bytes.fromhex("660f01cc") + b"\xf4"),  # TDCALL; HLT
        "read": (0x010, bytes.fromhex("488b01") + b"\xf4"),  # MOV RAX, [RCX]; HLT
        "write": (0x020, bytes.fromhex("488901") + b"\xf4"),  # MOV [RCX], RAX; HLT
        "mc": (0x030, bytes.fromhex("cd12") + b"\xf4"),  # INT 18; HLT
        "ud2": (0x040, bytes.fromhex("0f0b")),  # UD2
        "vmcall": (0x050, bytes.fromhex("0f01c1") + b"\xf4"),  # VMCALL; HLT
        "hlt": (0x060, b"\xf4"),
        "loop": (0x070, bytes.fromhex("ebfe")),  # JMP $
        "read_loop": (0x080, bytes.fromhex("488b01") + bytes.fromhex("ebfb")),  # MOV RAX, [RCX]; JMP back
        # MOV RSP, 0x3FF0; LGDT [0x3800]; LIDT [0x3810]; HLT: a stack, a GDT with a 64-bit code
        # segment (selector 8) and an IDT whose only gate is #VE's (vector 20)
        "idt": (
            0x090,
            bytes.fromhex("48c7c4f03f0000")
            + bytes.fromhex("0f01142500380000")
            + bytes.fromhex("0f011c2510380000")
            + b"\xf4",
        ),
    }
    VE_HANDLER = 0x300  # MOV EAX, 3; TDCALL (TDG.VP.VEINFO.GET); JMP $
    VE_HANDLER_CODE = bytes.fromhex("b803000000") + bytes.fromhex("660f01cc") + bytes.fromhex("ebfe")

    def hostile_on(self, td, lp):
        """A call on ``td`` in whatever state it is in (its early states are short otherwise)."""
        rng = self.rng
        leaf = rng.choice(
            (
                A.TDH_MEM_PAGE_AUG,
                A.TDH_MEM_RANGE_UNBLOCK,
                A.TDH_MNG_INIT,
                A.TDH_VP_CREATE,
                A.TDH_MEM_TRACK,
                A.TDH_MEM_SEPT_ADD,
                A.TDH_MEM_PAGE_ADD,
                A.TDH_MR_FINALIZE,
                A.TDH_VP_ADDCX,
                A.TDH_VP_INIT,
                A.TDH_VP_RD,
                A.TDH_VP_ENTER,
            )
        )
        v = self.some_vcpu(td.tdr)
        if leaf in (A.TDH_VP_ADDCX, A.TDH_VP_INIT, A.TDH_VP_RD, A.TDH_VP_ENTER) and v is not None:
            if leaf == A.TDH_VP_ADDCX:
                return self._rec(leaf, lp, rcx=self.free_page(kernel=True), rdx=v)
            return self._rec(leaf, lp, rcx=v, rdx=MD_TDVPS_VMCS_SHARED_EPTP, r8=0)
        if leaf in (A.TDH_MEM_TRACK, A.TDH_MR_FINALIZE):
            return self._rec(leaf, lp, rcx=td.tdr)
        if leaf == A.TDH_MNG_INIT:
            return self.mng_init(td, lp)
        if leaf == A.TDH_VP_CREATE:
            return self._rec(leaf, lp, rcx=self.free_page(kernel=True), rdx=td.tdr)
        return self._rec(leaf, lp, rcx=self.some_gpa(td), rdx=td.tdr, r8=self.free_page(), r9=self.free_page())

    def guest_page(self, what, td):
        if what == "pml4":
            e = bytearray(PAGE)
            e[0:8] = (0x1000 | 0x7).to_bytes(8, "little")
            e[256 * 8 : 257 * 8] = (0x2000 | 0x7).to_bytes(8, "little")
            return bytes(e)
        if what in ("pdpt", "pdpt_shared"):
            base = td.shared_bit if what == "pdpt_shared" else 0
            return b"".join((base | (i << 30) | 0x87).to_bytes(8, "little") for i in range(512))
        code = bytearray(b"\xf4" * PAGE)
        for off, data in self.SNIPPETS.values():
            code[off : off + len(data)] = data
        code[self.VE_HANDLER : self.VE_HANDLER + len(self.VE_HANDLER_CODE)] = self.VE_HANDLER_CODE
        code[0x800:0x80A] = (15).to_bytes(2, "little") + (0x3900).to_bytes(8, "little")  # GDTR
        code[0x810:0x81A] = (21 * 16 - 1).to_bytes(2, "little") + (0x3A00).to_bytes(8, "little")  # IDTR
        code[0x900:0x910] = bytes(8) + (0x00209A0000000000).to_bytes(8, "little")
        handler = 0x3000 + self.VE_HANDLER
        gate = (handler & 0xFFFF) | (8 << 16) | (0x8E << 40) | (((handler >> 16) & 0xFFFF) << 48)
        code[0xA00 + 20 * 16 : 0xA00 + 20 * 16 + 16] = gate.to_bytes(8, "little") + (handler >> 32).to_bytes(
            8, "little"
        )
        return bytes(code)

    def build_step(self, td, lp):
        rng = self.rng
        tdr = td.tdr
        vcpus = list(td.vcpus.values())
        choice = rng.random()
        # the guest's pages: S-EPT path to GPA 0, then the four pages
        missing = [g for g in self.GUEST if self._leaf_at(td, g) is None]
        if missing and choice < 0.5:
            g = missing[0]
            level = self._missing_level(td, g)
            if level is not None:
                return self._rec(A.TDH_MEM_SEPT_ADD, lp, rcx=g | level, rdx=tdr, r8=self.free_page(kernel=True))
            src = self.free_page(kernel=False)
            self.reserved.add(src)
            return self._rec(
                A.TDH_MEM_PAGE_ADD,
                lp,
                prep=[("write", src, self.guest_page(self.GUEST[g], td))],
                rcx=g,
                rdx=tdr,
                r8=self.free_page(kernel=False),
                r9=src,
            )
        if len(vcpus) < self.MAX_VCPUS and choice < 0.6:
            return self._rec(A.TDH_VP_CREATE, lp, rcx=self.free_page(kernel=True), rdx=tdr)
        for v in vcpus:
            if len(v.tdvpx) < TDVPX_PAGES:
                return self._rec(A.TDH_VP_ADDCX, lp, rcx=self.free_page(kernel=True), rdx=v.tdvpr)
            if not v.initialized:
                # vCPU n on CPU n % 2 (the second CPU can then run one of them)
                return self._rec(
                    A.TDH_VP_INIT | (1 << 16),
                    td.num_vcpus % 2,
                    rcx=v.tdvpr,
                    rdx=rng.randrange(0, 1 << 16),
                    r8=rng.choice((0, 1, 2, 3)),
                )
        if choice < 0.7:
            return self._rec(A.TDH_MR_EXTEND, lp, rcx=0x3000 + rng.randrange(0, 16) * 256, rdx=tdr)
        if choice < 0.8 and not missing and td.num_vcpus:
            return self._rec(A.TDH_MR_FINALIZE, lp, rcx=tdr)
        return self.run_step(td, lp)

    def _guest_intact(self, td):
        """The guest's four pages are still mapped (blocked perhaps: a plausible host unblocks them)."""
        have = {
            g
            for g, lv, st, _, _ in sept_entries(self.mod, td)
            if lv == 0 and g in self.GUEST and st in (S.SEPT_MAPPED, S.SEPT_BLOCKED)
        }
        return len(have) == len(self.GUEST)

    def _leaf_at(self, td, gpa):
        ptr, e, lvl = self.mod.sept_walk(td, gpa, 0)
        return e if lvl == 0 and S.is_leaf_state(S.sept_state(e)) else None

    def _missing_level(self, td, gpa, level=0):
        """The level of the first missing S-EPT table on the way to ``gpa`` at ``level``, or None."""
        ptr, e, lvl = self.mod.sept_walk(td, gpa, level)
        if lvl == level:
            return None
        return lvl if S.sept_state(e) == S.SEPT_FREE else None

    def run_step(self, td, lp):
        rng, mod = self.rng, self.mod
        tdr = td.tdr
        pick = rng.random()
        vcpus = [v for v in td.vcpus.values() if v.initialized]
        if vcpus and pick < 0.35:
            return self.enter_plan(td, rng.choice(vcpus), lp)
        if pick < 0.55:
            # map a page: the S-EPT path, then AUG (4K mostly)
            level = 0 if rng.random() < 0.85 else 1
            gpa = self.some_gpa(None, level) & ~0xFFF & ((1 << 47) - 1)
            gpa &= ~((PAGE << (9 * level)) - 1)
            missing = self._missing_level(td, gpa, level)
            if missing is not None:
                g = gpa & ~((PAGE << (9 * missing)) - 1)
                return self._rec(A.TDH_MEM_SEPT_ADD, lp, rcx=g | missing, rdx=tdr, r8=self.free_page(kernel=True))
            page = self.free_2m() if level else self.free_page(kernel=False)
            return self._rec(A.TDH_MEM_PAGE_AUG, lp, rcx=gpa | level, rdx=tdr, r8=page)
        all_entries = sept_entries(mod, td)
        guest = [(g, lv) for g, lv, st, h, _ in all_entries if g < 0x4000 and st in S.BLOCKED_STATES]
        if guest and pick < 0.85:
            # the guest's own pages and tables blocked (by a hostile call): unblock them (TRACK first)
            g, lv = rng.choice(guest)
            if rng.random() < 0.5:
                return self._rec(A.TDH_MEM_TRACK, lp, rcx=tdr)
            return self._rec(A.TDH_MEM_RANGE_UNBLOCK, lp, rcx=g | lv, rdx=tdr)
        entries = [(g, lv, st, h) for g, lv, st, h, _ in all_entries if st != S.SEPT_FREE and g >= 0x4000]
        if entries and pick < 0.85:
            g, lv, st, h = rng.choice(entries)
            if st in (S.SEPT_BLOCKED, S.SEPT_PENDING_BLOCKED, S.SEPT_NL_BLOCKED):
                leaf = rng.choice(
                    (A.TDH_MEM_PAGE_REMOVE, A.TDH_MEM_SEPT_REMOVE, A.TDH_MEM_RANGE_UNBLOCK, A.TDH_MEM_TRACK)
                )
            else:
                leaf = rng.choice(
                    (
                        A.TDH_MEM_RANGE_BLOCK,
                        A.TDH_MEM_RANGE_BLOCK,
                        A.TDH_MEM_TRACK,
                        A.TDH_MEM_PAGE_REMOVE,
                        A.TDH_MEM_SEPT_REMOVE,
                    )
                )
            if leaf == A.TDH_MEM_TRACK:
                return self._rec(leaf, lp, rcx=tdr)
            return self._rec(leaf, lp, rcx=g | lv, rdx=tdr)
        if vcpus and pick < 0.92:
            v = rng.choice(vcpus)
            lp = v.assoc_lpid if v.assoc_lpid is not None and rng.random() < 0.9 else lp
            field = rng.choice((MD_TDVPS_VMCS_SHARED_EPTP, MD_TDVPS_RIP, GPR["rax"], MD_TDVPS_CR3))
            return self._rec(A.TDH_VP_RD, lp, rcx=v.tdvpr, rdx=field)
        if vcpus and pick < 0.96:
            v = rng.choice(vcpus)
            return self._rec(A.TDH_VP_FLUSH, v.assoc_lpid if v.assoc_lpid is not None else lp, rcx=v.tdvpr)
        return self._rec(A.TDH_MEM_TRACK, lp, rcx=tdr)

    def root_of(self, td):
        root = self.roots.get(td.tdr)
        if root is None:
            root = self.free_page(kernel=True)
            self.reserved.add(root)
            self.roots[td.tdr] = root
        return root

    def enter_plan(self, td, v, lp):
        """Registers set through TDH.VP.WR (a debug TD), then TDH.VP.ENTER on the vCPU's CPU."""
        rng = self.rng
        lp = v.assoc_lpid if v.assoc_lpid is not None and rng.random() < 0.92 else rng.choice((0, 1))
        plan = []
        if rng.random() < 0.03:
            # a root the module must refuse: above MAX_PA, with HKID bits, in SEAMRR
            bad = rng.choice(
                (
                    self.root_of(td) | (rng.randrange(1, 16) << 48),
                    self.root_of(td) | (rng.randrange(1, 64) << self.mod.x86_phys_bits),
                    self.mod.seamrr_base,
                )
            )
            plan.append(self._rec(A.TDH_VP_WR, lp, rcx=v.tdvpr, rdx=MD_TDVPS_VMCS_SHARED_EPTP, r8=bad, r9=U64))
        if v.shared_eptp is None or rng.random() < 0.05:
            new_root = td.tdr not in self.roots
            root = self.root_of(td)
            # KVM's empty root: every entry not present with suppress-#VE (SHADOW_NONPRESENT_VALUE)
            prep = [("write", root, (1 << 63).to_bytes(8, "little") * 512)] if new_root else []
            plan.append(
                self._rec(A.TDH_VP_WR, lp, prep=prep, rcx=v.tdvpr, rdx=MD_TDVPS_VMCS_SHARED_EPTP, r8=root, r9=U64)
            )
        if td.attributes & A.TD_ATTR_DEBUG and v.vmcall_pending is None:
            name = rng.choices(list(SNIPPET_WEIGHTS), weights=list(SNIPPET_WEIGHTS.values()))[0]
            off, _ = self.SNIPPETS[name]
            plan.append(self._rec(A.TDH_VP_WR, lp, rcx=v.tdvpr, rdx=MD_TDVPS_RIP, r8=0x3000 + off, r9=U64))
            if v.hw is not None and v.hw.reg("cr3") != 0 and rng.random() < 0.5:
                plan.append(self._rec(A.TDH_VP_WR, lp, rcx=v.tdvpr, rdx=MD_TDVPS_CR3, r8=0, r9=U64))
            if name == "tdcall":
                leaf = rng.choice(
                    (
                        A.TDG_MEM_PAGE_ACCEPT,
                        A.TDG_MEM_PAGE_ACCEPT,
                        A.TDG_MEM_PAGE_ACCEPT,
                        A.TDG_VP_VMCALL,
                        A.TDG_VP_INFO,
                        A.TDG_VP_VEINFO_GET,
                        rng.randrange(0, 1 << 20),
                    )
                )
                if leaf == A.TDG_MEM_PAGE_ACCEPT:
                    pend = [(g, lv) for g, lv, st, _, _ in sept_entries(self.mod, td) if st == S.SEPT_PENDING]
                    rcx = (
                        (lambda g: g[0] | g[1])(rng.choice(pend))
                        if pend and rng.random() < 0.7
                        else self.some_gpa(td, rng.choice((0, 1)))
                    )
                elif leaf == A.TDG_VP_VMCALL:
                    rcx = rng.choice((0x1C00, 0xFFCC, 0x1, 0x10, 0x1C00 | (1 << 32), rng.randrange(0, 1 << 16)))
                else:
                    rcx = rng.randrange(0, 1 << 64)
                plan.append(self._rec(A.TDH_VP_WR, lp, rcx=v.tdvpr, rdx=GPR["rax"], r8=leaf, r9=U64))
                plan.append(self._rec(A.TDH_VP_WR, lp, rcx=v.tdvpr, rdx=GPR["rcx"], r8=rcx, r9=U64))
            elif name in ("read", "write", "read_loop"):
                gpa = self.some_gpa(td, 0) & ~7
                if rng.random() < 0.3:
                    gpa = (gpa & ((1 << 39) - 1)) | 0xFFFF_8000_0000_0000  # the shared alias
                    root = self.root_of(td)
                    if rng.random() < 0.1:
                        # KVM's shared EPT is the host's: an entry RWX = W (a misconfiguration), or none
                        entry = rng.choice(((self.root_of(td) | 0x2), 1 << 63, 0))  # W only; none; none, #VE
                        plan[0].setdefault("prep", []).append(
                            ("write", root + ((td.shared_bit >> 39) & 511) * 8, entry.to_bytes(8, "little"))
                        )
                elif gpa < 0x4000 or gpa >> 47:
                    gpa = 0x4000 + (gpa & 0x3FF8)  # not the page tables
                plan.append(self._rec(A.TDH_VP_WR, lp, rcx=v.tdvpr, rdx=GPR["rcx"], r8=gpa, r9=U64))
        regs = {}
        if v.vmcall_pending is not None and rng.random() < 0.8:
            regs = {"r10": 0, "r11": rng.choice((0, 1))}
        flags = 0 if rng.random() < 0.95 else rng.choice((1, 2, 4, 1 << 52))
        plan.append(self._rec(A.TDH_VP_ENTER, lp, rcx=v.tdvpr | flags, **regs))
        first = plan.pop(0)
        self.plans[td.tdr] = plan + self.plans.get(td.tdr, [])
        return first

    def teardown_step(self, td, lp):
        rng, mod = self.rng, self.mod
        tdr = td.tdr
        if td.lifecycle in (A.TD_HKID_ASSIGNED, A.TD_KEYS_CONFIGURED):
            for v in td.vcpus.values():
                if v.assoc_lpid is not None:
                    return self._rec(A.TDH_VP_FLUSH, v.assoc_lpid, rcx=v.tdvpr)
            return self._rec(A.TDH_MNG_VPFLUSHDONE, lp, rcx=tdr)
        if td.lifecycle == A.TD_BLOCKED:
            if td.wbcache_needed:
                return self._rec(A.TDH_PHYMEM_CACHE_WB, lp, rcx=0)
            return self._rec(A.TDH_MNG_KEY_FREEID, lp, rcx=tdr)
        owned = [h for h, (pt, o, _) in mod.pamt.index.items() if o == tdr and pt != A.PT_TDR]
        if owned:
            return self._rec(A.TDH_PHYMEM_PAGE_RECLAIM, lp, rcx=rng.choice(owned))
        return self._rec(A.TDH_PHYMEM_PAGE_RECLAIM, lp, rcx=tdr)

    # -- hostile calls -------------------------------------------------------------------------------------
    LEAVES = sorted(A.SEAMCALL_NAMES) + [A.TDH_MNG_RD, 99, 0x1234]

    def hostile(self, lp, td=None):
        rng, mod = self.rng, self.mod
        leaf = rng.choice(self.LEAVES)
        lp = rng.choice((0, 1)) if rng.random() < 0.2 else lp
        if td is None:
            td = mod.tds.get(self.some_td()) if mod.tds else None
        elif rng.random() < 0.8:
            return self.hostile_on(td, lp)
        gpa = lambda: self.some_gpa(td)
        regs = {}
        if leaf == A.TDH_MNG_CREATE:
            regs = dict(rcx=self.hostile_hpa(), rdx=rng.choice((0, 1, 63, 64, 1 << 16, rng.randrange(1, 64))))
        elif leaf in (
            A.TDH_MNG_KEY_CONFIG,
            A.TDH_MNG_VPFLUSHDONE,
            A.TDH_MNG_KEY_FREEID,
            A.TDH_MR_FINALIZE,
            A.TDH_MEM_TRACK,
        ):
            regs = dict(rcx=self.some_tdr_operand())
        elif leaf == A.TDH_MNG_INIT:
            regs = dict(
                rcx=self.some_tdr_operand(),
                rdx=rng.choice((self.hostile_hpa(), mod.pamt.base, self.free_page() + 0x400)),
            )
        elif leaf in (A.TDH_MNG_ADDCX, A.TDH_VP_CREATE):
            regs = dict(rcx=self.hostile_hpa(), rdx=self.some_tdr_operand())
        elif leaf == A.TDH_VP_ADDCX:
            regs = dict(rcx=self.hostile_hpa(), rdx=self.some_vcpu() or self.hostile_hpa())
        elif leaf == A.TDH_VP_INIT:
            leaf |= rng.choice((0, 1 << 16, 1 << 16, 2 << 16))
            regs = dict(
                rcx=self.some_vcpu() or self.hostile_hpa(),
                rdx=rng.randrange(0, 1 << 64),
                r8=rng.choice((0, 1, 1 << 32, rng.randrange(0, 4))),
            )
        elif leaf in (A.TDH_VP_RD, A.TDH_VP_WR):
            field = rng.choice(
                (MD_TDVPS_VMCS_SHARED_EPTP, MD_TDVPS_RIP, MD_TDVPS_CR3, GPR["rbx"], 0x9999, rng.randrange(0, 1 << 64))
            )
            value = rng.choice((self.hostile_hpa(), rng.randrange(0, 1 << 64), mod.pamt.base))
            if (
                field == MD_TDVPS_VMCS_SHARED_EPTP
                and (value & 0x000FFFFFFFFFF000) >= mod.mem.size
                and not (value & 0x000FFFFFFFFFF000) >> mod.x86_phys_bits
            ):
                value = self.free_page(kernel=True)  # (a root beyond memory: the CPU model's matter)
            if field in (MD_TDVPS_RIP, MD_TDVPS_CR3) or field in GPR.values():
                value = rng.choice((0, 0x3000, 0x3010, rng.randrange(0, 1 << 64)))
            regs = dict(
                rcx=self.some_vcpu() or self.hostile_hpa(),
                rdx=field,
                r8=value,
                r9=rng.choice((U64, 0, 0xFFF, 0x000FFFFFFFFFF000)),
            )
        elif leaf in (A.TDH_VP_FLUSH, A.TDH_VP_ENTER):
            rcx = self.some_vcpu() if rng.random() < 0.8 else self.hostile_hpa()
            rcx = rcx or 0
            if rng.random() < 0.1:
                rcx |= rng.choice((1, 2, 4, 0x800, 1 << 52))
            regs = dict(rcx=rcx)
        elif leaf == A.TDH_MR_EXTEND:
            regs = dict(rcx=rng.choice((0x3000, 0x3100, 0x3080, gpa() & ~7)), rdx=self.some_tdr_operand())
        elif leaf in (A.TDH_MEM_SEPT_ADD, A.TDH_MEM_PAGE_AUG):
            rdx = self.some_tdr_operand() | (1 if leaf == A.TDH_MEM_SEPT_ADD and rng.random() < 0.2 else 0)
            if rng.random() < 0.05:
                rdx |= 0x10
            r8 = (
                self.hostile_hpa()
                if rng.random() < 0.5
                else (self.free_2m() if rng.random() < 0.3 else self.free_page())
            )
            regs = dict(rcx=gpa(), rdx=rdx, r8=r8)
        elif leaf == A.TDH_MEM_PAGE_ADD:
            regs = dict(
                rcx=gpa(),
                rdx=self.some_tdr_operand(),
                r8=self.hostile_hpa(),
                r9=rng.choice((self.hostile_hpa(), self.free_page(), mod.pamt.base)),
            )
        elif leaf in (A.TDH_MEM_RANGE_BLOCK, A.TDH_MEM_RANGE_UNBLOCK, A.TDH_MEM_PAGE_REMOVE, A.TDH_MEM_SEPT_REMOVE):
            regs = dict(rcx=gpa(), rdx=self.some_tdr_operand())
        elif leaf in (A.TDH_PHYMEM_PAGE_RECLAIM, A.TDH_PHYMEM_PAGE_WBINVD):
            regs = dict(rcx=self.hostile_hpa())
        elif leaf == A.TDH_PHYMEM_CACHE_WB:
            regs = dict(rcx=rng.choice((0, 0, 1, 2, 1 << 40)))
        else:
            regs = dict(rcx=self.hostile_hpa(), rdx=rng.randrange(0, 1 << 64))
        prep = []
        if rng.random() < 0.02:
            v = self.some_vcpu()
            if v is not None:
                prep.append(("kick", v))
        return self._rec(leaf, lp, prep=prep, **regs)

    def contending(self, cur, lp):
        """Calls aimed at what ``cur`` (in flight on the other CPU) holds: its TD (the TDR, the
        tree lock, the epoch), its vCPU (the TDVPR, the association), its GPA (the entry lock: a
        host leaf, or a guest ACCEPT of the same GPA) or its page (the PAMT entry)."""
        rng, mod = self.rng, self.mod
        leaf = cur["leaf"] & 0xFFFF
        r = cur["regs"]
        mem_leaves = (
            A.TDH_MEM_SEPT_ADD,
            A.TDH_MEM_PAGE_AUG,
            A.TDH_MEM_PAGE_ADD,
            A.TDH_MEM_RANGE_BLOCK,
            A.TDH_MEM_RANGE_UNBLOCK,
            A.TDH_MEM_PAGE_REMOVE,
            A.TDH_MEM_SEPT_REMOVE,
            A.TDH_MR_EXTEND,
        )
        v = mod.vcpus.get(r.get("rcx", 0) & ~0xFFF & ((1 << 52) - 1))
        if v is not None:
            tdr = v.td.tdr
        elif leaf in mem_leaves or leaf in (A.TDH_MNG_ADDCX, A.TDH_VP_CREATE):
            tdr = r.get("rdx", 0) & ~0xFFF
        else:
            tdr = r.get("rcx", 0)
        td = mod.tds.get(tdr)
        choice = rng.random()
        if v is not None and choice < 0.5:
            kind = rng.randrange(6)
            if kind == 0:
                return [self._rec(A.TDH_MEM_TRACK, lp, rcx=tdr), self._rec(A.TDH_MEM_TRACK, lp, rcx=tdr)]
            if kind == 1:
                return self._rec(A.TDH_VP_RD, lp, prep=[("kick", v.tdvpr)], rcx=v.tdvpr, rdx=GPR["rbx"])
            leaf2 = (A.TDH_VP_ENTER, A.TDH_VP_FLUSH, A.TDH_VP_RD, A.TDH_VP_WR)[kind - 2]
            return self._rec(leaf2, lp, rcx=v.tdvpr, rdx=GPR["rbx"], r8=1, r9=1)
        if td is None:
            return None
        gpa = r.get("rcx", 0) if leaf in mem_leaves else self.some_gpa(td)
        page = r.get("r8", 0)
        choice = rng.random()
        if choice < 0.25 and td.op_state == A.OP_STATE_RUNNABLE and td.attributes & A.TD_ATTR_DEBUG:
            # a guest ACCEPT of the GPA on a vCPU this CPU may run
            vs = [x for x in td.vcpus.values() if x.initialized and x.assoc_lpid in (None, lp)]
            if vs:
                x = rng.choice(vs)
                off = self.SNIPPETS["tdcall"][0]
                return [
                    self._rec(A.TDH_VP_WR, lp, rcx=x.tdvpr, rdx=MD_TDVPS_RIP, r8=0x3000 + off, r9=U64),
                    self._rec(A.TDH_VP_WR, lp, rcx=x.tdvpr, rdx=GPR["rax"], r8=A.TDG_MEM_PAGE_ACCEPT, r9=U64),
                    self._rec(A.TDH_VP_WR, lp, rcx=x.tdvpr, rdx=GPR["rcx"], r8=gpa & ~0xFF8, r9=U64),
                    self._rec(A.TDH_VP_ENTER, lp, rcx=x.tdvpr),
                ]
        if choice < 0.35:
            return self._rec(
                A.TDH_MEM_PAGE_ADD, lp, rcx=gpa & ~0xFFF, rdx=tdr, r8=self.free_page(False), r9=self.free_page(False)
            )
        if choice < 0.5 and page:
            return self._rec(
                rng.choice((A.TDH_MEM_PAGE_AUG, A.TDH_MEM_SEPT_ADD)), lp, rcx=self.some_gpa(td, 0), rdx=tdr, r8=page
            )
        if choice < 0.6 and page:
            return self._rec(A.TDH_PHYMEM_PAGE_RECLAIM, lp, rcx=page)
        if choice < 0.7:
            return self._rec(A.TDH_MEM_TRACK, lp, rcx=tdr)
        other = rng.choice(
            (
                A.TDH_MEM_PAGE_AUG,
                A.TDH_MEM_SEPT_ADD,
                A.TDH_MEM_RANGE_BLOCK,
                A.TDH_MEM_RANGE_UNBLOCK,
                A.TDH_MEM_PAGE_REMOVE,
                A.TDH_MEM_SEPT_REMOVE,
                A.TDH_MR_EXTEND,
            )
        )
        vcpu = self.some_vcpu(tdr)
        if other in (A.TDH_MEM_PAGE_AUG, A.TDH_MEM_SEPT_ADD):
            return self._rec(other, lp, rcx=gpa, rdx=tdr, r8=self.free_page(other == A.TDH_MEM_SEPT_ADD))
        if other == A.TDH_MR_EXTEND:
            return self._rec(other, lp, rcx=0x3000, rdx=tdr)
        if vcpu is not None and rng.random() < 0.3:
            return self._rec(A.TDH_VP_ENTER, lp, rcx=vcpu)
        return self._rec(other, lp, rcx=gpa, rdx=tdr)

    # -- reacting to what happened (the plausible host's next steps) -----------------------------------------
    def react(self, rec, out):
        leaf = rec["leaf"] & 0xFFFF
        mod = self.mod
        if leaf == A.TDH_VP_ENTER and out.rax == EXIT_REASON_EPT_VIOLATION:
            v = mod.vcpus.get(rec["regs"]["rcx"] & ~0xFFF)
            if v is None or out.r8 & v.td.shared_bit or self.rng.random() < 0.3:
                return
            td = v.td
            gpa = out.r8 & ~0xFFF
            plan = []
            for level in range(td.sept_top_level, 0, -1):
                plan.append(
                    self._rec(
                        A.TDH_MEM_SEPT_ADD,
                        None,
                        rcx=(gpa & ~((PAGE << (9 * level)) - 1)) | level,
                        rdx=td.tdr | 1,
                        r8=self.free_page(kernel=True),
                    )
                )
            plan.append(self._rec(A.TDH_MEM_PAGE_AUG, None, rcx=gpa, rdx=td.tdr, r8=self.free_page(kernel=False)))
            self.plans[td.tdr] = plan + self.plans.get(td.tdr, [])
        if (leaf == A.TDH_PHYMEM_PAGE_RECLAIM and out.rax == 0 and out.rcx == A.PT_TDR) or (
            leaf == A.TDH_MNG_CREATE and out.rax == 0
        ):
            tdr = rec["regs"]["rcx"]
            self.dying.discard(tdr)
            self.plans.pop(tdr, None)
            self.age.pop(tdr, None)
            root = self.roots.pop(tdr, None)
            self.reserved.discard(root)
