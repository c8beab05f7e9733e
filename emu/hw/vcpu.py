"""A virtual CPU: one Unicorn instance whose MMU is ours.

Unicorn runs in UC_TLB_VIRTUAL mode, so it never walks page tables itself:
every TLB miss calls ``_tlb_fill``, which runs the guest walk and the EPT walk
(``paging.translate``) and either fills the TLB entry (host frame + rights) or
records a VM exit and refuses the fill, which makes emu_start stop with RIP at
the faulting instruction.  Once the exit is handled, ``run()`` restarts there.

VMCALL and TDCALL are invalid instructions to Unicorn; the invalid-instruction
hook decodes them into exits.  HLT ends emu_start by itself.  Exceptions Unicorn
raises (#DE, #UD, INT n, ...) arrive through the interrupt hook, guest #PF and
#GP from the fill hook.  An exception whose bit is set in ``exception_bitmap``
(the VMCS exception bitmap; all of them by default) is an EXCEPTION_NMI exit;
any other is delivered through the guest's IDT (emu.hw.idt) before the guest
runs on, and only a delivery that fails for good (a triple fault) exits.  The
hypervisor injects events with ``inject_event``; they are delivered at the next
entry.  With the "EPT-violation #VE" control on (``ve_info`` set: a TD's, which
the TDX module always enables), a convertible EPT violation is a #VE instead of
an exit (``_convert_to_ve``).

An exception a hook raises (a bug of the model: the walker, the fill) is never guest
behaviour: the hook (``@hook``) keeps it and stops emulation, and ``run()`` raises it
again with its traceback, also where what the hook left undone (a refused fill) made
emu_start fail too.  ``kick()`` may come from another thread (the VMM's signal and
timeout watchdog): it stops emu_start at the next block, and the vCPU exits as for an
IPI.
"""

from unicorn import Uc, UcError, UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, UC_HOOK_TLB_FILL, \
    UC_HOOK_INSN_INVALID, UC_HOOK_INTR, UC_HOOK_INSN, UC_HOOK_BLOCK, UC_HOOK_CODE, UC_TLB_VIRTUAL, UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE
from unicorn import x86_const as X
import ctypes
import functools
import zlib
import unicorn

# The fill hook and the slice budget call the C library directly, through the binding's module
# that loads it; its path is private to the binding, so only the tested versions are accepted.
TESTED_UNICORN = ("2.1.",)
try:
    if not unicorn.__version__.startswith(TESTED_UNICORN):
        raise ImportError
    from unicorn.unicorn_py3.unicorn import uclib
except ImportError:
    raise ImportError(f"emu needs the Unicorn Python binding 2.1 (tested with 2.1.4), found "
                      f"{getattr(unicorn, '__version__', '?')}: pip install 'unicorn>=2.1.4,<2.2'") from None

from . import ept as ept_mod
from . import insn as insn_mod
from .ept import (EptTranslation, EptViolation, EptMisconfig, decode_eptp, decode_qualification,
                  EPT_VIOLATION_GVA_TRANSLATED)
from .exits import (VmExit, VeInfo, EXIT_REASON_EPT_VIOLATION, EXIT_REASON_EPT_MISCONFIG, EXIT_REASON_EXCEPTION_NMI,
                    EXIT_REASON_HLT, EXIT_REASON_VMCALL, EXIT_REASON_TDCALL, EXIT_REASON_EXTERNAL_INTERRUPT,
                    EXIT_REASON_TRIPLE_FAULT)
from . import idt as idt_mod
from .slice import block_hook_stub, Budget, NO_BUDGET
from .memory import PAGE_MASK, PAGE_SIZE
from .paging import Translation, PageFault, GeneralProtection, translate, probe, PAGING, X86_CR0_WP, \
    X86_CR0_PG, X86_CR4_PAE, EFER_NXE, PFERR_WRITE, READ, WRITE, FETCH

MSR_EFER = 0xC0000080
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
BOOT_CR0 = X86_CR0_PG | X86_CR0_WP | 0x33          # PG WP NE ET MP PE
BOOT_EFER = EFER_LME | EFER_LMA | EFER_NXE

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
CTRL = ("cr0", "cr2", "cr3", "cr4")
_UC_REG = {name: getattr(X, "UC_X86_REG_" + name.upper()) for name in GPRS + CTRL}
_UC_GPRS = [_UC_REG[n] for n in GPRS]

_VMCALL = b"\x0f\x01\xc1"
_PAUSE = b"\xf3\x90"
PAUSE_WINDOW = 8                        # PAUSEs in one slice before it ends (pause-loop exiting's window)
_TDCALL = b"\x66\x0f\x01\xcc"
_ACCESS = {16: 1, 17: 2, 18: 4}         # UC_MEM_READ/WRITE/FETCH -> R/W/X (the UC_PROT_* bits too)


def hook(returns=None):
    """A Unicorn hook of the vCPU.  An exception it raises is a bug of the model, never guest
    behaviour: the first one is kept in ``_hook_error``, emulation stops, and the hook returns
    ``returns`` to Unicorn (a value of the type it wants: the binding would print an error for
    None); ``run()`` raises it again.  Every hook on the vCPU's Unicorn should be one of these."""
    def wrap(fn):
        @functools.wraps(fn)
        def hooked(self, uc, *args):
            try:
                return fn(self, uc, *args)
            except BaseException as e:
                self._hook_failed(uc, e)
                return returns
        hooked.guarded = True
        return hooked
    return wrap


class Vcpu:
    """vCPU ``index`` over host memory ``mem``.

    The hypervisor loads the EPT pointers with ``load_eptp`` (for a TD: the shared
    EPTP plus the secure EPTP and the shared-GPA bit), sets registers, and calls
    ``run()`` until it returns an exit it cannot handle.
    """

    def __init__(self, mem, index=0):
        self.mem = mem
        self.index = index
        # leaf -> (eax, ebx, ecx, edx), as the hypervisor sets it.  0x80000008: the physical and
        # linear address widths the walkers implement (48, 48).
        self.cpuid = {0x80000008: (0x3030, 0, 0, 0)}
        self.pending = None                  # the exit recorded by a hook during emu_start
        self.exception_bitmap = 0xFFFFFFFF   # VMCS exception bitmap: these vectors exit instead of delivery
        self.event = None                    # an emu.hw.idt.Event to deliver at the next entry
        # The "EPT-violation #VE" VM-execution control and the virtualization-exception
        # information area it writes: None while the control is 0 (every VM but a TD).
        self.ve_info = None
        self.ve_gpas = None                  # (emu.checkers.dpor) GPAs of #VE-converted walks, while recording
        self.eptp = None
        self.secure_eptp = None
        self.shared_mask = 0
        self.stats_fills = 0
        self.tracer = None                   # set (with hw_walk wanted) to trace every walk
        self._hook_error = None              # the exception a hook raised (``hook``)
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map_ptr(0, mem.size, UC_PROT_ALL, mem.address())
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        # No stop address: with exits enabled and an empty list, emu_start runs until an exit.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        uc.hook_add(UC_HOOK_TLB_FILL, self._tlb_fill)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._insn_invalid)
        uc.hook_add(UC_HOOK_INTR, self._interrupt)
        uc.hook_add(UC_HOOK_INSN, self._cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | X86_CR4_PAE)
        uc.msr_write(MSR_EFER, BOOT_EFER)
        uc.reg_write(X.UC_X86_REG_CR0, BOOT_CR0)
        self._ept = None
        self.gpa_cache = {}
        self.pscache = {}                    # paging-structure cache (emu.hw.paging.translate)
        self.tlb_shadow = {}                 # GVA page -> HPA page of every fill since the last flush
        self.code_pfns = set()               # host pages filled executable since the last code flush
        self.code_generation = mem.generation
        # Register reads in the TLB-fill hook go straight to the C library: the binding's
        # reg_read costs ~1.7 us, a direct call ~0.5 us, and a fill reads two registers.
        val = ctypes.c_uint64()
        read, uch, ref = uclib.uc_reg_read, uc._uch, ctypes.byref(val)

        def reg_fast(reg_id):
            read(uch, reg_id, ref)
            return val.value
        self._reg_fast = reg_fast
        self._nxe = lambda: bool(uc.msr_read(MSR_EFER) & EFER_NXE)
        # Guest mode across scheduling points (emu.hw.slice): with slice_blocks set, guest
        # code runs in slices; guest_point(kind) is called between two slices, the vCPU
        # still in guest mode; an IPI (intr_pending) there, or at entry, makes it exit.
        self.slice_blocks = 0
        self.pause_window = PAUSE_WINDOW
        self.guest_point = None
        self.on_leave = None                 # called as guest mode ends (emu.checkers.dpor's footprints)
        self.page_crc = None                 # (emu.checkers.dpor) HPA -> CRC of the page when last looked at
        self.intr_pending = False
        self.in_guest = False
        self.slices = 0
        self.checked_generation = -1         # (the checker's) tables generation last checked here
        # The run's deterministic watchdog (emu.hw.slice.BlockLimit, shared by the vCPUs of a
        # run), or None; with it (or slicing) the blocks guest code runs are counted here.
        self.limit = None
        self.blocks = 0
        self._budget = None
        self._slice_left = 0                 # blocks left in the current slice
        self._armed = 0                      # the budget emu_start was armed with
        self._pauses = 0
        self._pause_pages = set()            # (GVA page, HPA page) scanned for PAUSE
        self._slice_end = None

    # -- VMCS-like state ------------------------------------------------------------------------------
    def load_eptp(self, eptp, secure_eptp=None, shared_mask=0):
        """Load the EPT pointer(s); the VM-entry checks on them raise InvalidEptp.

        For a TD: GPAs with ``shared_mask`` set translate through ``eptp`` (KVM's
        shared EPT), all others through ``secure_eptp`` (the TDX module's S-EPT).
        """
        decode_eptp(eptp)
        if secure_eptp is not None:
            decode_eptp(secure_eptp)
        self.eptp, self.secure_eptp, self.shared_mask = eptp, secure_eptp, shared_mask
        self._ept = self._make_ept()
        self.flush_tlb()

    def _make_ept(self):
        """The EPT walk this vCPU's MMU uses, with its cache of guest-physical mappings.

        Like a real CPU (SDM "Information That May Be Cached"), the vCPU caches
        successful GPA->HPA translations, tagged by EPTP and kept until INVEPT
        (flush_tlb).  Failures are never cached, so a newly present entry is seen
        at once; a changed or removed one is seen only after the hypervisor's
        flush, which is exactly why KVM must flush.  A write through a cached
        translation whose EPT leaf is not yet dirty walks again, so D is set.
        """
        mem, walk = self.mem, ept_mod.walk
        eptp, secure, shared = self.eptp, self.secure_eptp, self.shared_mask
        pt_shared = 3 if decode_eptp(eptp)[2] else 1
        pt_secure = 3 if secure is not None and decode_eptp(secure)[2] else 1
        cache = self.gpa_cache = {}
        tracer = self.tracer
        if tracer is not None:
            return self._make_traced_ept(cache, mem, walk, eptp, secure, shared, pt_shared, pt_secure)

        def ept(gpa, access):
            if secure is None or gpa & shared:
                root, pt = eptp, pt_shared
            else:
                root, pt = secure, pt_secure
            if access == PAGING:
                access = pt
            c = cache.get(gpa >> 12)
            if c is not None:
                hpa, level, perms, dirty = c
                if perms & access == access and (dirty or not access & 2):
                    return EptTranslation(hpa | (gpa & 0xFFF), level, perms, dirty)
            t = walk(mem, root, gpa, access)
            if t.__class__ is EptTranslation:
                cache[gpa >> 12] = (t.hpa & PAGE_MASK, t.level, t.perms, t.dirty)
            return t
        return ept

    def _make_traced_ept(self, cache, mem, walk, eptp, secure, shared, pt_shared, pt_secure):
        """The same walk, recording each EPT (or S-EPT) walk for the hw_walk trace event."""
        log = self._ept_log = []

        def ept(gpa, access):
            if secure is None or gpa & shared:
                root, pt, which = eptp, pt_shared, "EPT"
            else:
                root, pt, which = secure, pt_secure, "S-EPT"
            if access == PAGING:
                access = pt
            c = cache.get(gpa >> 12)
            if c is not None:
                hpa, level, perms, dirty = c
                if perms & access == access and (dirty or not access & 2):
                    log.append((which, gpa, "cached"))
                    return EptTranslation(hpa | (gpa & 0xFFF), level, perms, dirty)
            path = []
            t = walk(mem, root, gpa, access, path=path)
            log.append((which, gpa, path))
            if t.__class__ is EptTranslation:
                cache[gpa >> 12] = (t.hpa & PAGE_MASK, t.level, t.perms, t.dirty)
            return t
        return ept

    def set_tracer(self, tracer):
        """Trace every walk (event hw_walk) when ``tracer`` wants it; None stops."""
        self.tracer = tracer if tracer is not None and tracer.wants("hw_walk") else None
        if self.eptp is not None:
            self._ept = self._make_ept()

    def _emit_walk(self, vaddr, acc, guest_path, r):
        names = {4: "PML4E", 3: "PDPTE", 2: "PDE", 1: "PTE"}
        parts = []
        eptlog = self._ept_log
        k = 0
        for level, egpa, ehpa, e in guest_path:
            # the EPT walks made for this entry come first (the 2D walk)
            while k < len(eptlog) and eptlog[k][1] == egpa:
                parts.append(_fmt_ept(eptlog[k]))
                k += 1
            parts.append(f"{names[level]}[{(vaddr >> (12 + 9 * (level - 1))) & 511}]@{egpa:#x}={e:#x}")
        while k < len(eptlog):
            parts.append(_fmt_ept(eptlog[k]))
            k += 1
        result = (f"-> gpa {r.gpa:#x} hpa {r.hpa:#x} perms {r.perms}" if r.__class__ is Translation
                  else f"-> {r!r}")
        self.tracer.emit("hw_walk", self.index, access={1: "read", 2: "write", 4: "fetch"}[acc], gva=vaddr,
                         guest=[list(x) for x in guest_path],
                         ept=[[w, g, p if p == "cached" else [list(x) for x in p]] for w, g, p in eptlog],
                         result=result, walk=" ".join(parts) + " " + result)

    def ept_entries(self):
        """(emu.checkers.dpor) The EPT entries behind every GPA this vCPU caches a translation of, as
        the tables are now: a change of any of them may change what the guest sees.  (A
        changed translation differs from the current path at an entry both paths share.)"""
        out = set()
        walk = ept_mod.walk
        gpages = list(self.gpa_cache)
        if self.ve_gpas:
            # Walks this step turned into a #VE read the shared EPT too (reported once).
            gpages += [g >> 12 for g in self.ve_gpas]
            self.ve_gpas.clear()
        for gpage in gpages:
            gpa = gpage << 12
            if self.secure_eptp is not None and not gpa & self.shared_mask:
                continue                     # the S-EPT: the TDX module's, tracked as a whole
            path = []
            walk(self.mem, self.eptp, gpa, 1, path=path, set_ad=False)
            out.update(p[1] for p in path)
        return out

    def flush_tlb(self):
        """INVEPT (all contexts) for this vCPU: no cached translation survives it."""
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self.gpa_cache.clear()
        self.pscache.clear()
        self.tlb_shadow.clear()

    # -- registers ------------------------------------------------------------------------------------
    def get_regs(self):
        uc = self.uc
        vals = uc.reg_read_batch(_UC_GPRS)
        regs = dict(zip(GPRS, vals))
        for n in CTRL:
            regs[n] = uc.reg_read(_UC_REG[n])
        regs["efer"] = uc.msr_read(MSR_EFER)
        return regs

    def set_regs(self, regs):
        for name, value in regs.items():
            if name == "efer":
                self.uc.msr_write(MSR_EFER, value)
            else:
                self.uc.reg_write(_UC_REG[name], value)

    def reg(self, name):
        return self._reg_fast(_UC_REG[name])

    def set_reg(self, name, value):
        self.uc.reg_write(_UC_REG[name], value)

    # -- guest memory as this vCPU sees it (no side effects) -------------------------------------------
    def gva_to_hpa(self, gva):
        """The HPA a linear address reaches now, without setting A/D or exiting; None if unmapped."""
        mem = self.mem

        def ept(gpa, access=None):
            if self.secure_eptp is not None and not gpa & self.shared_mask:
                t = ept_mod.walk(mem, self.secure_eptp, gpa, 1, set_ad=False)
                if t.__class__ is not EptTranslation:
                    t = ept_mod.walk(mem, self.secure_eptp, gpa, 4, set_ad=False)
            else:
                t = ept_mod.walk(mem, self.eptp, gpa, 1, set_ad=False)
                if t.__class__ is not EptTranslation:
                    t = ept_mod.walk(mem, self.eptp, gpa, 4, set_ad=False)
            return t.hpa if t.__class__ is EptTranslation else None
        gpa = probe(mem.q, ept, self.reg("cr3"), gva)
        return None if gpa is None else ept(gpa)

    def read_guest(self, gva, n):
        out = bytearray()
        while n > 0:
            hpa = self.gva_to_hpa(gva)
            chunk = min(n, 0x1000 - (gva & 0xFFF))
            if hpa is None:
                break
            out += self.mem.read(hpa, chunk)
            gva += chunk
            n -= chunk
        return bytes(out)

    # -- running ---------------------------------------------------------------------------------------
    def _code_coherence(self):
        """Host software wrote memory since this vCPU last ran: if it hit a page this
        vCPU may have run code from, drop the translated code."""
        ranges = self.mem.written_since(self.code_generation)
        self.code_generation = self.mem.generation
        code = self.code_pfns
        if ranges is None or code and any(a in code if a == b else not code.isdisjoint(range(a, b + 1))
                                          for a, b in ranges):
            self.uc.ctl_flush_tb()
            code.clear()

    def _arm_budget(self):
        """Install the block-budget hook (once; Unicorn translates blocks with it from then on)."""
        b = self._budget = Budget()
        b.remaining = NO_BUDGET
        b.stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        stub = block_hook_stub()
        if stub is not None:
            hh = ctypes.c_size_t()
            err = uclib.uc_hook_add(self.uc._uch, ctypes.byref(hh), UC_HOOK_BLOCK, ctypes.c_void_p(stub),
                                    ctypes.c_void_p(ctypes.addressof(b)), 1, 0)
            if err:
                raise UcError(err)
        else:
            @hook()
            def block(_self, uc, _addr, _size, _data):
                b.remaining -= 1
                if b.remaining <= 0:
                    b.expired = 1
                    uc.emu_stop()
            self.uc.hook_add(UC_HOOK_BLOCK, functools.partial(block, self))
        self.uc.ctl_flush_tb()
        self.code_pfns.clear()

    def kick(self):
        """An IPI to this CPU: in guest mode it causes an external-interrupt VM exit.  It stays
        pending until the host takes it with interrupts on (the hypervisor clears it then).

        Safe from another thread (a signal, the VMM's watchdog): a vCPU inside emu_start (the
        binding runs it without the GIL) leaves it at the next block; one between two slices
        or outside guest code sees ``intr_pending`` before it runs any (uc_emu_stop then does
        nothing).  The caller repeats it until the vCPU is out: a kick that lands just before
        emu_start begins is lost to Unicorn, which clears its stop request as it starts."""
        self.intr_pending = True
        if self.in_guest:
            self.uc.emu_stop()

    def blocks_run(self):
        """Blocks run so far, the running slice's too (a reader on another thread, the progress
        line: the callback counts in ``_budget`` while emu_start runs).  0 when not counted."""
        b = self._budget
        return self.blocks + (max(0, self._armed - b.remaining) if b is not None else 0)

    def run(self):
        """Run the guest until the next VM exit and return it (a VmExit).

        With ``slice_blocks`` set, the guest runs in slices; between two slices the vCPU
        stays in guest mode and ``guest_point`` runs (other tasks run meanwhile)."""
        self.pending = None
        uc = self.uc
        reg = self._reg_fast
        if self.intr_pending:
            # An IPI that arrived with interrupts off in the host: it exits right after entry.
            # (It stays pending until the host enables interrupts: the hypervisor clears it.)
            return VmExit(EXIT_REASON_EXTERNAL_INTERRUPT, reg(X.UC_X86_REG_RIP), vcpu=self.index)
        slicing = self.slice_blocks
        limit = self.limit
        if (slicing or limit is not None) and self._budget is None:
            self._arm_budget()
        budget = self._budget
        self.in_guest = True
        try:
            while True:
                if self.event is not None:
                    ex = self._deliver_event()
                    if ex is not None:
                        return ex
                if self.mem.generation != self.code_generation:
                    self._code_coherence()
                if budget is not None:
                    # The slice runs across entries: guest code between exits the module or
                    # the hypervisor handles (a TDCALL retried on BUSY) counts until a slice ends.
                    armed = NO_BUDGET
                    if slicing:
                        if self._slice_left <= 0 or self._slice_left > slicing:
                            self._slice_left = slicing
                        armed = self._slice_left
                    if limit is not None:
                        if limit.left <= 0:
                            # The run's limit is spent: the VMM's watchdog signals every vCPU,
                            # and this one exits as for the IPI.
                            limit.expire(self)
                            return VmExit(EXIT_REASON_EXTERNAL_INTERRUPT, reg(X.UC_X86_REG_RIP), vcpu=self.index)
                        if limit.left < armed:
                            armed = limit.left
                    budget.remaining = self._armed = armed
                    budget.expired = 0
                self._pauses = 0
                self._slice_end = None
                failed = None
                try:
                    uc.emu_start(reg(X.UC_X86_REG_RIP), 0)
                except UcError as e:
                    failed = e
                error = self._hook_error or uc._hook_exception
                if error is not None:
                    # A hook raised (a hook added without @hook: the binding kept it), and what
                    # it left undone (a refused fill) may have failed emu_start too: the hook's
                    # exception is the error, never a guest fault.
                    self._hook_error = None
                    raise error
                if budget is not None:
                    ran = armed - budget.remaining
                    self._armed = budget.remaining        # (blocks_run: nothing in flight)
                    self.blocks += ran
                    self._slice_left -= ran
                    if limit is not None:
                        limit.spend(ran)
                if failed is not None and self.pending is None:
                    return VmExit(EXIT_REASON_EXCEPTION_NMI, reg(X.UC_X86_REG_RIP), vector=6, vcpu=self.index,
                                  misconfig=f"unicorn: {failed}")
                if self.pending is not None:
                    p = self.pending
                    ex = self._pending_exit()
                    if ex.reason == EXIT_REASON_EXCEPTION_NMI and not self.exception_bitmap >> ex.vector & 1 \
                            and ex.misconfig is None:
                        self._raise(ex)           # delivered through the IDT before the guest goes on
                        continue
                    if p.__class__ is EptViolation and not p.suppress_ve and self.ve_info is not None \
                            and self._convert_to_ve(ex):
                        continue                  # a #VE, delivered through the IDT
                    return ex
                if limit is not None and limit.left <= 0:
                    continue                      # spent: the next entry expires it
                end = self._slice_end or ("guest_slice" if slicing and self._slice_left <= 0 else None)
                if end is None:
                    if self.intr_pending:
                        # A kick from another thread stopped emu_start (not a HLT).
                        return VmExit(EXIT_REASON_EXTERNAL_INTERRUPT, reg(X.UC_X86_REG_RIP), vcpu=self.index)
                    break
                # Still in guest mode, between two slices: the others may run now.
                self.slices += 1
                if self.guest_point is not None:
                    self.guest_point(end)
                if self.intr_pending:
                    return VmExit(EXIT_REASON_EXTERNAL_INTERRUPT, reg(X.UC_X86_REG_RIP), vcpu=self.index)
        finally:
            self.in_guest = False
            if self.on_leave is not None:
                self.on_leave()
        # HLT returns from emu_start with RIP just past it; report the HLT itself.
        return VmExit(EXIT_REASON_HLT, reg(X.UC_X86_REG_RIP) - 1, 1, vcpu=self.index)

    # -- events -----------------------------------------------------------------------------------------
    def _convert_to_ve(self, ex):
        """A convertible EPT violation (its deciding entry has suppress-#VE clear) with the
        "EPT-violation #VE" control on: a virtualization exception instead of the VM exit
        when CR0.PE = 1 and the area's valid word (offset 4) is 0 (SDM Vol. 3C "Convertible
        EPT Violations").  The CPU stores what the exit would have saved (exit reason 48, the
        qualification with bits 7/8, GLA, the full GPA, the EPTP index), sets valid, and
        delivers #VE (vector 20, a fault, no error code) with RIP at the faulting instruction.
        A violation while delivering an event is never converted: that path exits
        (``_deliver_event``).  False when it exits after all (the area is busy)."""
        ve = self.ve_info
        if ve.valid or not self._reg_fast(X.UC_X86_REG_CR0) & 1:
            return False
        ve.exit_reason = EXIT_REASON_EPT_VIOLATION
        ve.valid = VeInfo.VALID
        ve.qualification, ve.gla, ve.gpa, ve.eptp_index = ex.qualification, ex.gla or 0, ex.gpa, 0
        self.uc.reg_write(X.UC_X86_REG_RIP, ex.rip)
        self.pending = None
        self.event = idt_mod.Event(20)
        if self.ve_gpas is not None:
            self.ve_gpas.append(ex.gpa)       # (emu.checkers.dpor) the walk read the entries on its path
        if self.tracer is not None:
            self.tracer.emit("hw_event", self.index, msg=f"#VE: convertible EPT violation at rip {ex.rip:#x} "
                             f"gpa {ex.gpa:#x} gla {ex.gla or 0:#x} qualification {ex.qualification:#x} "
                             f"[{decode_qualification(ex.qualification)}]")
        return True

    def inject_event(self, vector, error_code=None, soft=False):
        """VM-entry event injection: ``vector`` (with ``error_code``) is delivered through the
        guest's IDT at the next entry.  RIP is what gets pushed (for a fault, the faulting
        instruction; for a software interrupt, the next one)."""
        self.event = idt_mod.Event(vector, error_code, soft)

    def _raise(self, ex):
        """An exception the guest raised and the bitmap does not intercept: deliver it."""
        soft = ex.vector == 3 or ex.vector == 4 or (ex.vector >= 32 and ex.insn_len > 0)
        if soft:
            self.uc.reg_write(X.UC_X86_REG_RIP, ex.rip + ex.insn_len)     # traps push the next RIP
        else:
            self.uc.reg_write(X.UC_X86_REG_RIP, ex.rip)
        self.pending = None
        self.event = idt_mod.Event(ex.vector, ex.error_code, soft)

    def _deliver_event(self):
        """Deliver the pending event; None when the guest may run on, else the VM exit (an EPT
        exit of a delivery access, the event kept for the next entry; or the triple fault)."""
        uc = self.uc
        ev = self.event
        rip = self._reg_fast(X.UC_X86_REG_RIP)
        regs = {"rip": rip, "rsp": self._reg_fast(X.UC_X86_REG_RSP),
                "rflags": self._reg_fast(X.UC_X86_REG_RFLAGS), "cs": uc.reg_read(X.UC_X86_REG_CS),
                "ss": uc.reg_read(X.UC_X86_REG_SS)}
        r = idt_mod.deliver(self, ev, regs)
        if r is None:
            self.event = None
            if self.tracer is not None:
                self.tracer.emit("hw_event", self.index, msg=f"{_vec_name(ev.vector)} delivered through the IDT "
                                 f"from rip {rip:#x} to {self._reg_fast(X.UC_X86_REG_RIP):#x}")
            return None
        if r.__class__ is idt_mod.Shutdown:
            self.event = None
            first = r.chain[0]
            why = "; ".join(f"{_vec_name(v)}{'' if e is None else f'({e:#x})'} {w}" for v, e, w in r.chain[1:])
            if self.tracer is not None:
                self.tracer.emit("hw_event", self.index, msg=f"triple fault: {why}")
            cr2 = self._reg_fast(X.UC_X86_REG_CR2) if first[0] == 14 else None
            return VmExit(EXIT_REASON_TRIPLE_FAULT, rip, vector=first[0], error_code=first[1], cr2=cr2,
                          misconfig=why, vcpu=self.index)
        # An EPT violation or misconfiguration while delivering: the event stays pending.
        res, gla = r
        if res.__class__ is EptViolation:
            q, gpa = res.qualification, res.gpa
            if q & EPT_VIOLATION_GVA_TRANSLATED:
                gpa |= gla & 0xFFF
            return VmExit(EXIT_REASON_EPT_VIOLATION, rip, qualification=q, gpa=gpa, gla=gla, vcpu=self.index)
        return VmExit(EXIT_REASON_EPT_MISCONFIG, rip, gpa=res.gpa | (gla & 0xFFF), gla=gla, misconfig=res.reason,
                      vcpu=self.index)

    def _pending_exit(self):
        """The VmExit for what a hook recorded during emu_start (self.pending)."""
        uc = self.uc
        reg = self._reg_fast
        p = self.pending
        if p.__class__ is VmExit:
            return p
        rip = reg(X.UC_X86_REG_RIP)
        gla, rmw = self._exact_access(rip)
        if p.__class__ is EptViolation:
            q, gpa = p.qualification, p.gpa
            if q & EPT_VIOLATION_GVA_TRANSLATED:
                gpa |= gla & 0xFFF                # the final access: its GPA is exact too
                if rmw and q & 7 == READ:
                    q = q & ~READ | WRITE         # a read-modify-write exits as a write
            return VmExit(EXIT_REASON_EPT_VIOLATION, rip, qualification=q, gpa=gpa, gla=gla, vcpu=self.index)
        if p.__class__ is EptMisconfig:
            return VmExit(EXIT_REASON_EPT_MISCONFIG, rip, gpa=p.gpa | (gla & 0xFFF), gla=gla, misconfig=p.reason,
                          vcpu=self.index)
        if p.__class__ is PageFault:
            ec = p.error_code | (PFERR_WRITE if rmw else 0)
            uc.reg_write(X.UC_X86_REG_CR2, gla)
            return VmExit(EXIT_REASON_EXCEPTION_NMI, rip, vector=14, error_code=ec, cr2=gla, gla=gla,
                          vcpu=self.index)
        if p.__class__ is GeneralProtection:
            return VmExit(EXIT_REASON_EXCEPTION_NMI, rip, vector=13, error_code=0, gla=p.gva, vcpu=self.index)
        raise AssertionError(p)

    def _exact_access(self, rip):
        """(exact linear address, is a read-modify-write) of the access whose fill failed.

        The fill hook knows only the page: decode the instruction to find the operand on
        that page (instruction decodes are cached, and the code bytes come from the TLB
        shadow, so this costs a few microseconds).
        """
        page, access = self._fault_gla, self._fault_access
        if access == FETCH:
            return (rip if rip & ~0xFFF == page else page), False
        d = insn_mod.decode(self._code_bytes(rip, 15), rip)
        if d is None:
            return page, False
        hit = insn_mod.locate(d, rip, self._reg_fast, page)
        if hit is None:
            return page, False
        gla, writes = hit
        return gla, bool(writes and access == READ)

    # -- hooks (run inside emu_start) ------------------------------------------------------------------
    def _hook_failed(self, uc, e):
        """(@hook) a hook raised ``e``: keep the first, and stop emulation; run() raises it."""
        if self._hook_error is None:
            self._hook_error = e
        uc.emu_stop()

    def _tlb_fill(self, uc, vaddr, access, entry, _data):
        # (@hook's guard, written out: the fill is the hot hook, and a try costs nothing)
        try:
            if self.pending is not None:
                return False                     # already exiting: refuse whatever Unicorn tries next
            self.stats_fills += 1
            reg = self._reg_fast
            acc = _ACCESS[access]
            if self.tracer is not None:
                self._ept_log.clear()
                path = []
                r = translate(self.mem.q, self._ept, reg(X.UC_X86_REG_CR3), vaddr, acc,
                              wp=reg(X.UC_X86_REG_CR0) & X86_CR0_WP, nxe=self._nxe, path=path)
                self._emit_walk(vaddr, acc, path, r)
            else:
                r = translate(self.mem.q, self._ept, reg(X.UC_X86_REG_CR3), vaddr, acc,
                              wp=reg(X.UC_X86_REG_CR0) & X86_CR0_WP, nxe=self._nxe, pscache=self.pscache)
            if r.__class__ is Translation:
                hpa = entry.paddr = r.hpa & PAGE_MASK
                self.tlb_shadow[vaddr] = hpa
                if self.page_crc is not None and hpa not in self.page_crc:
                    self.page_crc[hpa] = zlib.crc32(self.mem.buf[hpa:hpa + PAGE_SIZE])
                if acc == FETCH:
                    entry.perms = r.perms
                    self.code_pfns.add(hpa >> 12)      # code may be translated from this page
                    if self.slice_blocks and (vaddr, hpa) not in self._pause_pages:
                        self._hook_pauses(vaddr, hpa)
                else:
                    # A data access installs no execute right: the first fetch from the page
                    # fills again, so code_pfns holds exactly the pages code can come from,
                    # and host writes to data pages never drop translated code.
                    entry.perms = r.perms & ~FETCH
                return True
            self.pending = r
            self._fault_gla = vaddr
            self._fault_access = acc
            return False
        except BaseException as e:
            self._hook_failed(uc, e)
            return False

    _tlb_fill.guarded = True

    def _hook_pauses(self, gva_page, hpa):
        """A code hook on every PAUSE of a page about to be translated (the fill comes
        first).  A byte pair inside another instruction gets a hook that never fires."""
        self._pause_pages.add((gva_page, hpa))
        page = bytes(self.mem.buf[hpa:hpa + 0x1000])
        i = page.find(_PAUSE)
        while i >= 0:
            self.uc.hook_add(UC_HOOK_CODE, self._pause, None, gva_page + i, gva_page + i)
            i = page.find(_PAUSE, i + 1)

    @hook()
    def _pause(self, uc, _addr, _size, _data):
        self._pauses += 1
        if self._pauses >= self.pause_window and self.slice_blocks:
            self._slice_end = "guest_pause"
            uc.emu_stop()

    def _code_bytes(self, rip, n):
        """The instruction bytes at ``rip``: from the page the TLB holds (it was just fetched)."""
        hpa = self.tlb_shadow.get(rip & ~0xFFF)
        off = rip & 0xFFF
        if hpa is not None and off <= 0x1000 - n:
            return bytes(self.mem.buf[hpa + off:hpa + off + n])
        return self.read_guest(rip, n)

    @hook(returns=True)
    def _insn_invalid(self, uc, _data):
        rip = self._reg_fast(X.UC_X86_REG_RIP)
        code = self._code_bytes(rip, 4)
        if code[:3] == _VMCALL:
            self.pending = VmExit(EXIT_REASON_VMCALL, rip, 3, vcpu=self.index)
        elif code[:4] == _TDCALL:
            self.pending = VmExit(EXIT_REASON_TDCALL, rip, 4, vcpu=self.index)
        else:
            self.pending = VmExit(EXIT_REASON_EXCEPTION_NMI, rip, vector=6, vcpu=self.index)
        uc.emu_stop()
        return True

    @hook()
    def _interrupt(self, uc, intno, _data):
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        insn_len = 0
        if intno == 3 or intno == 4 or intno >= 32:
            # Traps: Unicorn reports RIP after the instruction; a VM exit saves the RIP of
            # INT3 / INT n itself and the instruction length (SDM "Saving RIP").
            before = self.read_guest(rip - 2, 2)
            if len(before) == 2 and before[1] == 0xCC and intno == 3:
                insn_len = 1
            elif len(before) == 2 and before[0] == 0xCD and before[1] == intno:
                insn_len = 2
            rip -= insn_len
        self.pending = VmExit(EXIT_REASON_EXCEPTION_NMI, rip, insn_len, vector=intno, vcpu=self.index)
        uc.emu_stop()

    @hook(returns=1)
    def _cpuid(self, uc, _data):
        leaf = uc.reg_read(X.UC_X86_REG_EAX)
        regs = self.cpuid.get(leaf)
        if regs is None:
            return 0                          # Unicorn's own CPUID model answers
        for r, v in zip((X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX), regs):
            uc.reg_write(r, v)
        return 1                              # handled: skip Unicorn's CPUID


def _vec_name(vector):
    from .exits import VECTOR_NAMES
    return VECTOR_NAMES.get(vector, f"vector {vector}")


def _fmt_ept(entry):
    which, gpa, path = entry
    if path == "cached":
        return f"[{which} {gpa:#x} cached]"
    levels = " ".join(f"L{lvl}@{ptr:#x}={e:#x}" for lvl, ptr, e in path)
    return f"[{which} {gpa:#x}: {levels}]"
