"""A virtual CPU: one Unicorn instance whose MMU is ours.

Unicorn runs in UC_TLB_VIRTUAL mode, so it never walks page tables itself:
every TLB miss calls ``_tlb_fill``, which runs the guest walk and the EPT walk
(``paging.translate``) and either fills the TLB entry (host frame + rights) or
records a VM exit and refuses the fill, which makes emu_start stop with RIP at
the faulting instruction.  Once the exit is handled, ``run()`` restarts there.
Where the compiled MMU is built (emu.hw.native), its C callback is the fill hook
instead: it does the same in C with the same caches (no Python for a fill that
translates, an exit recorded in the Mmu for ``run()`` to pick up) and calls
``_fill_slow``/``_fetch_slow`` only for what needs the Python model: tracing,
DPOR's footprints, a code page to scan for exiting instructions.  The state
Python reads after fills (``tlb_shadow``, ``gpa_cache``, ``code_pfns``,
``stats_fills``) is then the Mmu's, read through properties.

VMCALL and TDCALL are invalid instructions to Unicorn; the invalid-instruction
hook decodes them into exits.  HLT ends emu_start by itself.  CPUID and the I/O
instructions (IN, OUT, INS, OUTS) exit unconditionally, as with VMX's
"unconditional I/O exiting", and RDMSR/WRMSR exit unless the MSR bitmap lets the
CPU do them (``_msr_native``).  These exits must happen before the instruction
does anything, and Unicorn's instruction hooks fire in the middle of it and let
the rest of the translated block run: so a code hook (which can stop Unicorn
before the instruction) sits on every place of a code page where one of them may
begin, found when the page is filled executable (``_scan_code_page``); the hook
decodes the instruction there (``_exit_site``).  The instruction hooks stay as
the alarm for one the scan missed (code the guest wrote into a page it runs).
RDTSC and RDTSCP return the TSC of this model (a deterministic count plus the VMCS
TSC offset), not Unicorn's wall-clock one.  Exceptions Unicorn
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

from unicorn import (
    Uc,
    UcError,
    UC_ARCH_X86,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_HOOK_TLB_FILL,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_INSN,
    UC_HOOK_BLOCK,
    UC_HOOK_CODE,
    UC_TLB_VIRTUAL,
    UC_CTL_TLB_FLUSH,
    UC_CTL_IO_WRITE,
)
from unicorn import x86_const as X
import ctypes
import functools
import re
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
    raise ImportError(
        f"emu needs the Unicorn Python binding 2.1 (tested with 2.1.4), found "
        f"{getattr(unicorn, '__version__', '?')}: pip install 'unicorn>=2.1.4,<2.2'"
    ) from None

from . import ept as ept_mod
from . import paging as paging_mod
from . import native
from . import insn as insn_mod
from .ept import (
    EptTranslation,
    EptViolation,
    EptMisconfig,
    decode_eptp,
    decode_qualification,
    EPT_VIOLATION_GVA_TRANSLATED,
)
from .exits import (
    VmExit,
    VeInfo,
    EXIT_REASON_EPT_VIOLATION,
    EXIT_REASON_EPT_MISCONFIG,
    EXIT_REASON_EXCEPTION_NMI,
    EXIT_REASON_HLT,
    EXIT_REASON_VMCALL,
    EXIT_REASON_TDCALL,
    EXIT_REASON_EXTERNAL_INTERRUPT,
    EXIT_REASON_TRIPLE_FAULT,
)
from . import idt as idt_mod
from .slice import block_hook_stub, Budget, NO_BUDGET
from .memory import PAGE_MASK, PAGE_SIZE
from .paging import (
    Translation,
    PageFault,
    GeneralProtection,
    translate,
    probe,
    PAGING,
    X86_CR0_WP,
    X86_CR0_PG,
    X86_CR4_PAE,
    EFER_NXE,
    PFERR_WRITE,
    READ,
    WRITE,
    FETCH,
)
from .exits import (
    EXIT_REASON_CPUID,
    EXIT_REASON_IO_INSTRUCTION,
    EXIT_REASON_MSR_READ,
    EXIT_REASON_MSR_WRITE,
    io_qualification,
)
from . import msr as msr_mod

MSR_EFER = 0xC0000080
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
BOOT_CR0 = X86_CR0_PG | X86_CR0_WP | 0x33  # PG WP NE ET MP PE
BOOT_EFER = EFER_LME | EFER_LMA | EFER_NXE

GPRS = (
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
)
CTRL = ("cr0", "cr2", "cr3", "cr4")
_UC_REG = {name: getattr(X, "UC_X86_REG_" + name.upper()) for name in GPRS + CTRL}
_UC_GPRS = [_UC_REG[n] for n in GPRS]

_VMCALL = b"\x0f\x01\xc1"
_PAUSE = b"\xf3\x90"
PAUSE_WINDOW = 8  # PAUSEs in one slice before it ends (pause-loop exiting's window)
_TDCALL = b"\x66\x0f\x01\xcc"
_RDMSR, _WRMSR, _CPUID = b"\x0f\x32", b"\x0f\x30", b"\x0f\xa2"
# Prefixes that may come before an instruction's opcode (legacy, then REX).
_PREFIXES = frozenset(b"\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3") | frozenset(range(0x40, 0x50))
# Where an exiting instruction may begin: a run of prefixes, then an I/O opcode or 0F 30/32/A2.
# (A trailing run of prefixes or a 0F at the page's end may begin one that goes on in the next page.)
_EXIT_SITE = re.compile(
    rb"[\x26\x2e\x36\x3e\x64\x65\x66\x67\xf0\xf2\xf3\x40-\x4f]*"
    rb"(?:[\xe4-\xe7\xec-\xef\x6c-\x6f]|\x0f[\x30\x32\xa2]|\x0f\Z|\Z)"
)
_CODE_HOOK_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p)
_INSN_INVALID_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_void_p)
# I/O opcodes: (size class, in, string, immediate port).  Size class 1 = byte, 0 = word/dword.
_IO_OPCODES = {
    0xE4: (1, True, False, True),
    0xE5: (0, True, False, True),
    0xE6: (1, False, False, True),
    0xE7: (0, False, False, True),
    0xEC: (1, True, False, False),
    0xED: (0, True, False, False),
    0xEE: (1, False, False, False),
    0xEF: (0, False, False, False),
    0x6C: (1, True, True, False),
    0x6D: (0, True, True, False),
    0x6E: (1, False, True, False),
    0x6F: (0, False, True, False),
}
# MSRs the emulated CPU itself keeps (Unicorn's state, or the TSC below): an access the MSR
# bitmap does not intercept is carried out on them; any other MSR is #GP, as on a CPU without it.
_CPU_MSRS = frozenset(
    (
        msr_mod.MSR_IA32_TSC,
        msr_mod.MSR_IA32_SYSENTER_CS,
        msr_mod.MSR_IA32_SYSENTER_ESP,
        msr_mod.MSR_IA32_SYSENTER_EIP,
        msr_mod.MSR_IA32_CR_PAT,
        msr_mod.MSR_EFER,
        msr_mod.MSR_STAR,
        msr_mod.MSR_LSTAR,
        msr_mod.MSR_CSTAR,
        msr_mod.MSR_SYSCALL_MASK,
        msr_mod.MSR_FS_BASE,
        msr_mod.MSR_GS_BASE,
        msr_mod.MSR_KERNEL_GS_BASE,
        msr_mod.MSR_TSC_AUX,
    )
)
# The host TSC: a count that every read advances by TSC_STEP, so that two reads differ, as time
# passes between two instructions, and a run replays exactly.
TSC_STEP = 1000
_TSC_HOOK_CFUNC = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p)
_ACCESS = {16: 1, 17: 2, 18: 4}  # UC_MEM_READ/WRITE/FETCH -> R/W/X (the UC_PROT_* bits too)


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

    def __init__(self, mem, index=0, *, pure_python=False):
        """``pure_python``: (tests) the Python MMU even where the compiled one is loaded."""
        self.mem = mem
        self.index = index
        self.pending = None  # the exit recorded by a hook during emu_start
        self.exception_bitmap = 0xFFFFFFFF  # VMCS exception bitmap: these vectors exit instead of delivery
        self.event = None  # an emu.hw.idt.Event to deliver at the next entry
        # The "EPT-violation #VE" VM-execution control and the virtualization-exception
        # information area it writes: None while the control is 0 (every VM but a TD).
        self.ve_info = None
        self.ve_gpas = None  # (emu.checkers.dpor) GPAs of #VE-converted walks, while recording
        self.eptp = None
        self.secure_eptp = None
        self.shared_mask = 0
        self._fills = 0  # stats_fills, with the Python MMU
        self.tracer = None  # set (with hw_walk wanted) to trace every walk
        self._hook_error = None  # the exception a hook raised (``hook``)
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map_ptr(0, mem.size, UC_PROT_ALL, mem.address())
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        # No stop address: with exits enabled and an empty list, emu_start runs until an exit.
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([])
        self._mmu = None
        if native.mmu is not None and not pure_python:
            # The compiled fill: a C function Unicorn calls with the Mmu as its user data.
            def addr(fn):
                return ctypes.cast(fn, ctypes.c_void_p).value

            self._mmu = native.mmu.Mmu(
                mem,
                uc._uch.value,
                addr(uclib.uc_reg_read),
                addr(uclib.uc_reg_write),
                addr(uclib.uc_emu_start),
                addr(uclib.uc_emu_stop),
                X.UC_X86_REG_CR3,
                X.UC_X86_REG_CR0,
                X.UC_X86_REG_MSR,
                X.UC_X86_REG_RIP,
                self._fill_slow,
                self._fetch_slow,
            )
            hh = ctypes.c_size_t()
            err = uclib.uc_hook_add(
                uc._uch,
                ctypes.byref(hh),
                UC_HOOK_TLB_FILL,
                ctypes.c_void_p(native.mmu.fill_callback()),
                ctypes.c_void_p(id(self._mmu)),
                ctypes.c_uint64(1),
                ctypes.c_uint64(0),
            )
            if err:
                raise UcError(err)
            uc._emu_mmu = self._mmu  # the hook's user data lives as long as the Unicorn instance
        else:
            uc.hook_add(UC_HOOK_TLB_FILL, self._tlb_fill)
        # VMCALL and TDCALL exit through this one (twice per TD private page): a C callback of
        # ours, without the binding's layers of Python around it.
        self._insn_invalid_cb = _INSN_INVALID_CFUNC(lambda _uch, _data: self._insn_invalid(uc, None))
        self._hook_c(UC_HOOK_INSN_INVALID, self._insn_invalid_cb)
        uc.hook_add(UC_HOOK_INTR, self._interrupt)
        uc.hook_add(UC_HOOK_INSN, self._missed_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        uc.hook_add(UC_HOOK_INSN, self._missed_in, None, 1, 0, X.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, self._missed_out, None, 1, 0, X.UC_X86_INS_OUT)
        self._hook_tsc()
        # One C callback for every exit-site code hook (the binding would make one per hook).
        self._exit_site_cb = _CODE_HOOK_CFUNC(self._exit_site_c)
        # The VMCS MSR bitmap (emu.hw.msr.MsrBitmap), None while "use MSR bitmaps" is 0: then every
        # RDMSR and WRMSR exits.  The TSC offset is the VMCS field (RDTSC = host TSC + offset).
        self.msr_bitmap = None
        self.tsc_offset = 0
        self.host_tsc = 0
        self._site_pages = set()  # (GVA page, HPA page) scanned for exit sites
        self._sites = set()  # GVAs that have an exit-site code hook
        uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | X86_CR4_PAE)
        uc.msr_write(MSR_EFER, BOOT_EFER)
        uc.reg_write(X.UC_X86_REG_CR0, BOOT_CR0)
        self._ept = None
        # The MMU's caches: the Mmu's with the compiled MMU (the properties below read them).
        self._gpa_cache = {}  # gfn -> (HPA page, level, perms, dirty) (_make_ept)
        self.pscache = {} if self._mmu is None else None  # paging-structure cache (paging.translate)
        self._tlb_shadow = {}  # GVA page -> HPA page of every fill since the last flush
        self._code_pfns = set()  # host pages filled executable since the last code flush
        m = self._mmu
        self._tlb_get = self._tlb_shadow.get if m is None else m.tlb_get
        self._tlb_put = self._tlb_shadow.__setitem__ if m is None else m.tlb_put
        self.code_generation = mem.generation
        # Register reads go straight to the C library: the binding's reg_read costs ~1.7 us, a
        # direct call ~0.5 us, the compiled MMU's ~0.05 us.
        if self._mmu is not None:
            self._reg_fast = self._mmu.reg
        else:
            val = ctypes.c_uint64()
            read, uch, ref = uclib.uc_reg_read, uc._uch, ctypes.byref(val)

            def reg_fast(reg_id):
                val.value = 0
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
        self.on_leave = None  # called as guest mode ends (emu.checkers.dpor's footprints)
        self.page_crc = None  # (emu.checkers.dpor) HPA -> CRC of the page when last looked at
        self.intr_pending = False
        self.in_guest = False
        self.slices = 0
        self.checked_generation = -1  # (the checker's) tables generation last checked here
        # The run's deterministic watchdog (emu.hw.slice.BlockLimit, shared by the vCPUs of a
        # run), or None; with it (or slicing) the blocks guest code runs are counted here.
        self.limit = None
        self.blocks = 0
        self._budget = None
        self._slice_left = 0  # blocks left in the current slice
        self._armed = 0  # the budget emu_start was armed with
        self._pauses = 0
        self._pause_pages = set()  # (GVA page, HPA page) scanned for PAUSE
        self._slice_end = None

    def _hook_c(self, kind, cb, *extra):
        """uc_hook_add of a ctypes callback (or a C function's address) on every address."""
        hh = ctypes.c_size_t()
        err = uclib.uc_hook_add(
            self.uc._uch, ctypes.byref(hh), kind, cb, None, ctypes.c_uint64(1), ctypes.c_uint64(0), *extra
        )
        if err:
            raise UcError(err)

    # -- what the MMU cached (the compiled MMU keeps it in C) -----------------------------------------
    @property
    def gpa_cache(self):
        """gfn -> (HPA page, level, perms, dirty): the guest-physical translations cached (a copy
        with the compiled MMU)."""
        return self._gpa_cache if self._mmu is None else dict(self._mmu.gpa_items())

    @property
    def tlb_shadow(self):
        """GVA page -> HPA page of every fill since the last flush (a copy with the compiled MMU)."""
        return self._tlb_shadow if self._mmu is None else dict(self._mmu.tlb_items())

    @property
    def code_pfns(self):
        """The host pages filled executable since the last code flush (the set itself: clear() it
        to forget them)."""
        m = self._mmu
        if m is not None and m.code_logged:
            self._code_pfns.update(m.take_code())
        return self._code_pfns

    @property
    def stats_fills(self):
        """TLB fills (misses) so far."""
        return self._fills if self._mmu is None else self._mmu.fills

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
        # The Python MMU walks with the Python walker (the compiled one is the Mmu's).
        mem, walk = self.mem, ept_mod.walk if self._mmu is not None else ept_mod.walk_py
        eptp, secure, shared = self.eptp, self.secure_eptp, self.shared_mask
        pt_shared = 3 if decode_eptp(eptp)[2] else 1
        pt_secure = 3 if secure is not None and decode_eptp(secure)[2] else 1
        tracer = self.tracer
        m = self._mmu
        if m is not None:
            # The same walk in C, on the Mmu's cache (the fill's).
            m.set_eptp(eptp, secure, shared)
            if tracer is None:
                return m.ept
            return self._make_traced_ept(
                m.gpa_get, lambda k, v: m.gpa_put(k, *v), mem, walk, eptp, secure, shared, pt_shared, pt_secure
            )
        cache = self._gpa_cache = {}
        if tracer is not None:
            return self._make_traced_ept(
                cache.get, cache.__setitem__, mem, walk, eptp, secure, shared, pt_shared, pt_secure
            )

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

    def _make_traced_ept(self, cache_get, cache_put, mem, walk, eptp, secure, shared, pt_shared, pt_secure):
        """The same walk, recording each EPT (or S-EPT) walk for the hw_walk trace event."""
        log = self._ept_log = []

        def ept(gpa, access):
            if secure is None or gpa & shared:
                root, pt, which = eptp, pt_shared, "EPT"
            else:
                root, pt, which = secure, pt_secure, "S-EPT"
            if access == PAGING:
                access = pt
            c = cache_get(gpa >> 12)
            if c is not None:
                hpa, level, perms, dirty = c
                if perms & access == access and (dirty or not access & 2):
                    log.append((which, gpa, "cached"))
                    return EptTranslation(hpa | (gpa & 0xFFF), level, perms, dirty)
            path = []
            t = walk(mem, root, gpa, access, path=path)
            log.append((which, gpa, path))
            if t.__class__ is EptTranslation:
                cache_put(gpa >> 12, (t.hpa & PAGE_MASK, t.level, t.perms, t.dirty))
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
        result = f"-> gpa {r.gpa:#x} hpa {r.hpa:#x} perms {r.perms}" if r.__class__ is Translation else f"-> {r!r}"
        self.tracer.emit(
            "hw_walk",
            self.index,
            access={1: "read", 2: "write", 4: "fetch"}[acc],
            gva=vaddr,
            guest=[list(x) for x in guest_path],
            ept=[[w, g, p if p == "cached" else [list(x) for x in p]] for w, g, p in eptlog],
            result=result,
            walk=" ".join(parts) + " " + result,
        )

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
                continue  # the S-EPT: the TDX module's, tracked as a whole
            path = []
            walk(self.mem, self.eptp, gpa, 1, path=path, set_ad=False)
            out.update(p[1] for p in path)
        return out

    def flush_tlb(self):
        """INVEPT (all contexts) for this vCPU: no cached translation survives it."""
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        if self._mmu is not None:
            self._mmu.flush()
        else:
            self._gpa_cache.clear()
            self.pscache.clear()
            self._tlb_shadow.clear()

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
        if self._mmu is not None:
            self._mmu.set_reg(_UC_REG[name], value)
        else:
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
        if (
            ranges is None
            or code
            and any(a in code if a == b else not code.isdisjoint(range(a, b + 1)) for a, b in ranges)
        ):
            self.uc.ctl_flush_tb()
            code.clear()
            # New code may hold new RDMSR/WRMSR: scan the code pages the TLB maps again.
            tlb_get = self._tlb_get
            for key in [k for k in self._site_pages if tlb_get(k[0]) == k[1]]:
                self._scan_code_page(*key)

    def _arm_budget(self):
        """Install the block-budget hook (once; Unicorn translates blocks with it from then on)."""
        b = self._budget = Budget()
        b.remaining = NO_BUDGET
        b.stop = ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value
        stub = block_hook_stub()
        if stub is not None:
            hh = ctypes.c_size_t()
            err = uclib.uc_hook_add(
                self.uc._uch,
                ctypes.byref(hh),
                UC_HOOK_BLOCK,
                ctypes.c_void_p(stub),
                ctypes.c_void_p(ctypes.addressof(b)),
                1,
                0,
            )
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
        mmu = self._mmu
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
                if mmu is not None:
                    # What the binding's emu_start does, in one call (no exception on a refused fill).
                    uc._hook_exception = None
                    err = mmu.start(self._fill_to_python(), self.slice_blocks)
                    if err:
                        failed = UcError(err)
                else:
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
                if mmu is not None and mmu.fault and self.pending is None:
                    # The exit a refused compiled fill recorded.
                    self.pending, self._fault_gla, self._fault_access = mmu.take_fault()
                if budget is not None:
                    ran = armed - budget.remaining
                    self._armed = budget.remaining  # (blocks_run: nothing in flight)
                    self.blocks += ran
                    self._slice_left -= ran
                    if limit is not None:
                        limit.spend(ran)
                if failed is not None and self.pending is None:
                    return VmExit(
                        EXIT_REASON_EXCEPTION_NMI,
                        self._rip_out(),
                        vector=6,
                        vcpu=self.index,
                        misconfig=f"unicorn: {failed}",
                    )
                if self.pending is not None:
                    p = self.pending
                    ex = self._pending_exit()
                    if (
                        ex.reason == EXIT_REASON_EXCEPTION_NMI
                        and not self.exception_bitmap >> ex.vector & 1
                        and ex.misconfig is None
                    ):
                        self._raise(ex)  # delivered through the IDT before the guest goes on
                        continue
                    if (
                        p.__class__ is EptViolation
                        and not p.suppress_ve
                        and self.ve_info is not None
                        and self._convert_to_ve(ex)
                    ):
                        continue  # a #VE, delivered through the IDT
                    return ex
                if limit is not None and limit.left <= 0:
                    continue  # spent: the next entry expires it
                end = self._slice_end or ("guest_slice" if slicing and self._slice_left <= 0 else None)
                if end is None:
                    if self.intr_pending:
                        # A kick from another thread stopped emu_start (not a HLT).
                        return VmExit(EXIT_REASON_EXTERNAL_INTERRUPT, self._rip_out(), vcpu=self.index)
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
        return VmExit(EXIT_REASON_HLT, self._rip_out() - 1, 1, vcpu=self.index)

    def _rip_out(self):
        """RIP as the last emu_start left it (the compiled MMU read it as it returned)."""
        return self._mmu.rip if self._mmu is not None else self._reg_fast(X.UC_X86_REG_RIP)

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
            self.ve_gpas.append(ex.gpa)  # (emu.checkers.dpor) the walk read the entries on its path
        if self.tracer is not None:
            self.tracer.emit(
                "hw_event",
                self.index,
                msg=f"#VE: convertible EPT violation at rip {ex.rip:#x} "
                f"gpa {ex.gpa:#x} gla {ex.gla or 0:#x} qualification {ex.qualification:#x} "
                f"[{decode_qualification(ex.qualification)}]",
            )
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
            self.uc.reg_write(X.UC_X86_REG_RIP, ex.rip + ex.insn_len)  # traps push the next RIP
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
        regs = {
            "rip": rip,
            "rsp": self._reg_fast(X.UC_X86_REG_RSP),
            "rflags": self._reg_fast(X.UC_X86_REG_RFLAGS),
            "cs": uc.reg_read(X.UC_X86_REG_CS),
            "ss": uc.reg_read(X.UC_X86_REG_SS),
        }
        r = idt_mod.deliver(self, ev, regs)
        if r is None:
            self.event = None
            if self.tracer is not None:
                self.tracer.emit(
                    "hw_event",
                    self.index,
                    msg=f"{_vec_name(ev.vector)} delivered through the IDT "
                    f"from rip {rip:#x} to {self._reg_fast(X.UC_X86_REG_RIP):#x}",
                )
            return None
        if r.__class__ is idt_mod.Shutdown:
            self.event = None
            first = r.chain[0]
            why = "; ".join(f"{_vec_name(v)}{'' if e is None else f'({e:#x})'} {w}" for v, e, w in r.chain[1:])
            if self.tracer is not None:
                self.tracer.emit("hw_event", self.index, msg=f"triple fault: {why}")
            cr2 = self._reg_fast(X.UC_X86_REG_CR2) if first[0] == 14 else None
            return VmExit(
                EXIT_REASON_TRIPLE_FAULT,
                rip,
                vector=first[0],
                error_code=first[1],
                cr2=cr2,
                misconfig=why,
                vcpu=self.index,
            )
        # An EPT violation or misconfiguration while delivering: the event stays pending.
        res, gla = r
        if res.__class__ is EptViolation:
            q, gpa = res.qualification, res.gpa
            if q & EPT_VIOLATION_GVA_TRANSLATED:
                gpa |= gla & 0xFFF
            return VmExit(EXIT_REASON_EPT_VIOLATION, rip, qualification=q, gpa=gpa, gla=gla, vcpu=self.index)
        return VmExit(
            EXIT_REASON_EPT_MISCONFIG, rip, gpa=res.gpa | (gla & 0xFFF), gla=gla, misconfig=res.reason, vcpu=self.index
        )

    def _pending_exit(self):
        """The VmExit for what a hook recorded during emu_start (self.pending)."""
        uc = self.uc
        p = self.pending
        if p.__class__ is VmExit:
            return p
        rip = self._rip_out()
        gla, rmw = self._exact_access(rip)
        if p.__class__ is EptViolation:
            q, gpa = p.qualification, p.gpa
            if q & EPT_VIOLATION_GVA_TRANSLATED:
                gpa |= gla & 0xFFF  # the final access: its GPA is exact too
                if rmw and q & 7 == READ:
                    q = q & ~READ | WRITE  # a read-modify-write exits as a write
            return VmExit(EXIT_REASON_EPT_VIOLATION, rip, qualification=q, gpa=gpa, gla=gla, vcpu=self.index)
        if p.__class__ is EptMisconfig:
            return VmExit(
                EXIT_REASON_EPT_MISCONFIG, rip, gpa=p.gpa | (gla & 0xFFF), gla=gla, misconfig=p.reason, vcpu=self.index
            )
        if p.__class__ is PageFault:
            ec = p.error_code | (PFERR_WRITE if rmw else 0)
            uc.reg_write(X.UC_X86_REG_CR2, gla)
            return VmExit(EXIT_REASON_EXCEPTION_NMI, rip, vector=14, error_code=ec, cr2=gla, gla=gla, vcpu=self.index)
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

    def _fill_to_python(self):
        """(the compiled MMU) Whether its fills hand over to the Python model: when tracing walks,
        or when DPOR records footprints (the pages a vCPU saw, the flags a walk set)."""
        return (
            self.tracer is not None
            or self.page_crc is not None
            or ept_mod.AD_LOG is not None
            or paging_mod.AD_LOG is not None
        )

    def _tlb_fill(self, uc, vaddr, access, entry, _data):
        """The TLB-fill hook of the Python MMU."""
        # (@hook's guard, written out: the fill is the hot hook, and a try costs nothing)
        try:
            if self.pending is not None:
                return False  # already exiting: refuse whatever Unicorn tries next
            self._fills += 1
            r = self._fill(vaddr, _ACCESS[access])
            if r is None:
                return False
            entry.paddr, entry.perms = r
            return True
        except BaseException as e:
            self._hook_failed(uc, e)
            return False

    _tlb_fill.guarded = True

    def _fill(self, vaddr, acc):
        """A TLB miss on the page ``vaddr`` for ``acc``: (HPA page, rights) to fill, or None when
        the walk ends in an exit (recorded in ``pending``)."""
        reg = self._reg_fast
        if self.tracer is not None:
            self._ept_log.clear()
            path = []
            r = translate(
                self.mem.q,
                self._ept,
                reg(X.UC_X86_REG_CR3),
                vaddr,
                acc,
                wp=reg(X.UC_X86_REG_CR0) & X86_CR0_WP,
                nxe=self._nxe,
                path=path,
            )
            self._emit_walk(vaddr, acc, path, r)
        else:
            r = translate(
                self.mem.q,
                self._ept,
                reg(X.UC_X86_REG_CR3),
                vaddr,
                acc,
                wp=reg(X.UC_X86_REG_CR0) & X86_CR0_WP,
                nxe=self._nxe,
                pscache=self.pscache,
            )
        if r.__class__ is Translation:
            hpa = r.hpa & PAGE_MASK
            self._tlb_put(vaddr, hpa)
            if self.page_crc is not None and hpa not in self.page_crc:
                self.page_crc[hpa] = zlib.crc32(self.mem.buf[hpa : hpa + PAGE_SIZE])
            if acc == FETCH:
                self._fetched(vaddr, hpa)
                return hpa, r.perms
            # A data access installs no execute right: the first fetch from the page
            # fills again, so code_pfns holds exactly the pages code can come from,
            # and host writes to data pages never drop translated code.
            return hpa, r.perms & ~FETCH
        self.pending = r
        self._fault_gla = vaddr
        self._fault_access = acc
        return None

    def _fetched(self, vaddr, hpa):
        """The page ``vaddr`` is filled executable from ``hpa``: code may be translated from it."""
        self._code_pfns.add(hpa >> 12)
        if (vaddr, hpa) not in self._site_pages:
            self._scan_code_page(vaddr, hpa)
        if self.slice_blocks and (vaddr, hpa) not in self._pause_pages:
            self._hook_pauses(vaddr, hpa)

    def _fill_slow(self, vaddr, access):
        """(the compiled fill) a fill it hands over whole: HPA page | rights, or -1 (refused)."""
        try:
            r = self._fill(vaddr, _ACCESS[access])
            return -1 if r is None else r[0] | r[1]
        except BaseException as e:  # (@hook's guard: a C callback, not the binding's)
            self._hook_failed(self.uc, e)
            return -1

    _fill_slow.guarded = True

    def _fetch_slow(self, vaddr, hpa):
        """(the compiled fill) a code page it translated: True when it may be filled."""
        try:
            self._fetched(vaddr, hpa)
            return True
        except BaseException as e:
            self._hook_failed(self.uc, e)
            return False

    _fetch_slow.guarded = True

    def _hook_pauses(self, gva_page, hpa):
        """A code hook on every PAUSE of a page about to be translated (the fill comes
        first).  A byte pair inside another instruction gets a hook that never fires."""
        self._pause_pages.add((gva_page, hpa))
        if self._mmu is not None:
            self._mmu.scanned(gva_page, hpa, 2)
        page = bytes(self.mem.buf[hpa : hpa + 0x1000])
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
        if self._mmu is not None:
            code = self._mmu.code_bytes(rip, n)
            if code is not None:
                return code
        hpa = self._tlb_get(rip & ~0xFFF)
        off = rip & 0xFFF
        if hpa is not None and off <= 0x1000 - n:
            return bytes(self.mem.buf[hpa + off : hpa + off + n])
        return self.read_guest(rip, n)

    @hook(returns=True)
    def _insn_invalid(self, uc, _data):
        rip = self._reg_fast(X.UC_X86_REG_RIP)
        code = self._code_bytes(rip, 4)
        if code[:3] == _VMCALL:
            self._exit_now(VmExit(EXIT_REASON_VMCALL, rip, 3, vcpu=self.index))
        elif code[:4] == _TDCALL:
            self._exit_now(VmExit(EXIT_REASON_TDCALL, rip, 4, vcpu=self.index))
        else:
            self._exit_now(VmExit(EXIT_REASON_EXCEPTION_NMI, rip, vector=6, vcpu=self.index))
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
        self._exit_now(VmExit(EXIT_REASON_EXCEPTION_NMI, rip, insn_len, vector=intno, vcpu=self.index))

    # -- the instructions that exit: CPUID, IN/OUT/INS/OUTS, RDMSR/WRMSR -------------------------------
    def _scan_code_page(self, gva_page, hpa):
        """A code hook on every byte of a code page where CPUID, an I/O instruction, RDMSR or
        WRMSR may begin (the opcode and each prefix byte before it), added as the page is
        filled executable, before Unicorn translates code from it.  A hook on bytes inside
        another instruction never fires (no instruction begins there)."""
        self._site_pages.add((gva_page, hpa))
        if self._mmu is not None:
            self._mmu.scanned(gva_page, hpa, 1)
        page = bytes(self.mem.buf[hpa : hpa + 0x1000])
        uch, cb, sites = self.uc._uch, self._exit_site_cb, self._sites
        hh = ctypes.c_size_t()
        for m in _EXIT_SITE.finditer(page):
            a, end = m.span()
            if end - a >= 2 and page[end - 2] == 0x0F and page[end - 1] in (0x30, 0x32, 0xA2):
                end -= 1  # the 0F begins the opcode: no hook on its second byte
            for off in range(a, end):
                gva = gva_page + off
                if gva not in sites:
                    sites.add(gva)
                    err = uclib.uc_hook_add(
                        uch, ctypes.byref(hh), UC_HOOK_CODE, cb, None, ctypes.c_uint64(gva), ctypes.c_uint64(gva)
                    )
                    if err:
                        raise UcError(err)

    def _exit_site_c(self, _uch, addr, _size, _data):
        try:
            self._exit_site(addr)
        except BaseException as e:  # (@hook's guard: a C callback, not the binding's)
            self._hook_failed(self.uc, e)

    _exit_site_c.guarded = True

    def _exit_site(self, addr):
        """The instruction at ``addr`` is about to run: if it exits, record the exit and stop
        Unicorn before it does anything (RIP at the instruction).  A privilege check that
        fails comes first (Unicorn raises the #GP itself): RDMSR/WRMSR above CPL 0, I/O above
        IOPL."""
        if self.pending is not None or self._mmu is not None and self._mmu.exiting:
            return
        code = self._code_bytes(addr, 15)
        i = 0
        while i < len(code) and code[i] in _PREFIXES:
            i += 1
        if i >= len(code):
            return
        op = code[i]
        reg = self._reg_fast
        if op == 0x0F:
            two = code[i : i + 2]
            if two == _CPUID:
                self._exit_now(VmExit(EXIT_REASON_CPUID, addr, i + 2, vcpu=self.index))
            elif (two == _RDMSR or two == _WRMSR) and not reg(X.UC_X86_REG_CS) & 3:
                self._msr_exit(addr, i + 2, two == _WRMSR)
            return
        if op not in _IO_OPCODES:
            return
        if (reg(X.UC_X86_REG_CS) & 3) > (reg(X.UC_X86_REG_RFLAGS) >> 12 & 3):
            return  # CPL > IOPL: Unicorn's #GP
        d = self._decode_io(addr)
        length, is_in, string, rep, imm, port, addr32, seg = d
        byte, opsize16 = _IO_OPCODES[op][0], 0x66 in code[:i]
        size = 1 if byte else (2 if opsize16 else 4)
        if port is None:
            port = reg(X.UC_X86_REG_RDX) & 0xFFFF
        gla = None
        if string:
            gla = reg(X.UC_X86_REG_RDI) if is_in else reg(X.UC_X86_REG_RSI)
            if addr32:
                gla &= 0xFFFFFFFF
            if seg is not None and not is_in:
                gla = (gla + self.uc.reg_read(seg)) & ((1 << 64) - 1)
        self._exit_now(
            VmExit(
                EXIT_REASON_IO_INSTRUCTION,
                addr,
                length,
                qualification=io_qualification(size, is_in, port, string, rep, imm),
                gla=gla,
                vcpu=self.index,
            )
        )

    def _exit_now(self, exit):
        """(a hook) Record the exit and stop emulation; every fill is refused from now on."""
        self.pending = exit
        m = self._mmu
        if m is not None:
            m.exiting = 1
            m.stop()
        else:
            self.uc.emu_stop()

    def _decode_io(self, rip):
        """(length, in, string, rep, immediate, the port (None: DX), 67 prefix, segment base
        register) of the I/O instruction at ``rip``; None if the bytes are not one."""
        code = self._code_bytes(rip, 15)
        i, rep, addr32, seg = 0, False, False, None
        while i < len(code) and (code[i] in _PREFIXES):
            b = code[i]
            if b in (0xF2, 0xF3):
                rep = True
            elif b == 0x67:
                addr32 = True
            elif b == 0x64:
                seg = X.UC_X86_REG_FS_BASE
            elif b == 0x65:
                seg = X.UC_X86_REG_GS_BASE
            i += 1
        if i >= len(code) or code[i] not in _IO_OPCODES:
            return None
        _, is_in, string, imm = _IO_OPCODES[code[i]]
        port = code[i + 1] if imm else None
        length = i + 1 + (1 if imm else 0)
        return length, is_in, string, string and rep, imm, port, addr32, seg

    def _missed(self, what):
        """An exiting instruction ran that no exit-site hook caught (the guest wrote it where it
        runs code, after the page was scanned): an error exit, never a wrong answer."""
        if self.pending is None and not (self._mmu is not None and self._mmu.exiting):
            rip = self._reg_fast(X.UC_X86_REG_RIP)
            self._exit_now(
                VmExit(
                    EXIT_REASON_EXCEPTION_NMI,
                    rip,
                    vector=6,
                    vcpu=self.index,
                    misconfig=f"{what} at {rip:#x} was not seen before it ran (code the guest "
                    f"wrote where it runs: not supported)",
                )
            )

    @hook(returns=1)
    def _missed_cpuid(self, uc, _data):
        self._missed("a CPUID")
        return 1

    @hook(returns=0)
    def _missed_in(self, uc, port, size, _data):
        self._missed("an IN/INS")
        return 0

    @hook()
    def _missed_out(self, uc, port, size, value, _data):
        self._missed("an OUT/OUTS")

    def _msr_exit(self, addr, length, write):
        """RDMSR/WRMSR: an exit if the MSR bitmap intercepts the MSR (all when there is none)."""
        index = self._reg_fast(X.UC_X86_REG_RCX) & 0xFFFFFFFF
        bitmap = self.msr_bitmap
        if bitmap is None or bitmap.intercepted(index, write):
            self._exit_now(
                VmExit(EXIT_REASON_MSR_WRITE if write else EXIT_REASON_MSR_READ, addr, length, vcpu=self.index)
            )
        else:
            self._msr_native(self.uc, addr, length, index, write)

    def _msr_native(self, uc, rip, length, index, write):
        """The CPU carries out an RDMSR/WRMSR the MSR bitmap lets through: on the MSRs it keeps
        (Unicorn's, with the canonical-address check of WRMSR; the TSC: host TSC + offset),
        else #GP(0), as a CPU without that MSR."""
        reg = self._reg_fast
        if index not in _CPU_MSRS:
            self._exit_now(VmExit(EXIT_REASON_EXCEPTION_NMI, rip, length, vector=13, error_code=0, vcpu=self.index))
            return
        if write:
            value = (reg(X.UC_X86_REG_RDX) & 0xFFFFFFFF) << 32 | reg(X.UC_X86_REG_RAX) & 0xFFFFFFFF
            if index in msr_mod.CANONICAL_MSRS and not msr_mod.is_canonical(value):
                self._exit_now(VmExit(EXIT_REASON_EXCEPTION_NMI, rip, length, vector=13, error_code=0, vcpu=self.index))
                return
            if index == msr_mod.MSR_IA32_TSC:
                self.tsc_offset = (value - self.host_tsc) & ((1 << 64) - 1)
            else:
                uc.msr_write(index, value)
        else:
            value = self.read_tsc() if index == msr_mod.MSR_IA32_TSC else uc.msr_read(index)
            uc.reg_write(X.UC_X86_REG_RAX, value & 0xFFFFFFFF)
            uc.reg_write(X.UC_X86_REG_RDX, value >> 32 & 0xFFFFFFFF)
        uc.reg_write(X.UC_X86_REG_RIP, rip + length)  # Unicorn goes on after the instruction

    # -- the TSC ---------------------------------------------------------------------------------------------
    def read_tsc(self):
        """RDTSC: the host TSC (advanced by TSC_STEP) plus the VMCS TSC offset."""
        self.host_tsc += TSC_STEP
        return (self.host_tsc + self.tsc_offset) & ((1 << 64) - 1)

    def _hook_tsc(self):
        """RDTSC and RDTSCP hooks (the binding has none: straight to the C library)."""

        def rdtsc(_uc, _data):
            try:
                t = self.read_tsc()
                self.uc.reg_write(X.UC_X86_REG_RAX, t & 0xFFFFFFFF)
                self.uc.reg_write(X.UC_X86_REG_RDX, t >> 32)
            except BaseException as e:  # (@hook's guard: a C callback, not the binding's)
                self._hook_failed(self.uc, e)
            return 1

        def rdtscp(_uc, _data):
            rdtsc(_uc, _data)
            try:
                self.uc.reg_write(X.UC_X86_REG_RCX, self.uc.msr_read(msr_mod.MSR_TSC_AUX) & 0xFFFFFFFF)
            except BaseException as e:
                self._hook_failed(self.uc, e)
            return 1

        self._tsc_cbs = []
        for insn, fn in ((X.UC_X86_INS_RDTSC, rdtsc), (X.UC_X86_INS_RDTSCP, rdtscp)):
            cb = _TSC_HOOK_CFUNC(fn)
            self._tsc_cbs.append(cb)  # keep the C callback alive
            hh = ctypes.c_size_t()
            err = uclib.uc_hook_add(
                self.uc._uch,
                ctypes.byref(hh),
                UC_HOOK_INSN,
                cb,
                None,
                ctypes.c_uint64(1),
                ctypes.c_uint64(0),
                ctypes.c_int(insn),
            )
            if err:
                raise UcError(err)


def _vec_name(vector):
    from .exits import VECTOR_NAMES

    return VECTOR_NAMES.get(vector, f"vector {vector}")


def _fmt_ept(entry):
    which, gpa, path = entry
    if path == "cached":
        return f"[{which} {gpa:#x} cached]"
    levels = " ".join(f"L{lvl}@{ptr:#x}={e:#x}" for lvl, ptr, e in path)
    return f"[{which} {gpa:#x}: {levels}]"
