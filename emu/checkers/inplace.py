"""The snapshot put back in place: many runs in one process, without a fork each.

A forked run pays for its process: on this kind of machine (a VM in a VM) a fork and exit
cost ~2.5 ms, and each copy-on-write fault ~5 us, ~1000 of them per run (most from
reference counts on the snapshot's objects).  Here one process runs one run after
another, and between two runs it restores what a run can change:

- host physical memory: every page the OS has committed in the buffer (``mincore``),
  copied back from a shadow copy taken at the snapshot (a page first touched since was
  zero then: it is zeroed);
- the Python objects of the model, from the Machine down: each instance's attributes,
  each list's, dict's and set's items, each closure cell, each ctypes structure's bytes,
  put back in the same objects, so what holds them (Unicorn's hooks, closures) still
  holds the right ones;
- each vCPU's Unicorn CPU context, and its TLB flushed (with the compiled MMU, its
  counters and flags put back, its caches flushed with the TLB).

What stays is Unicorn's translated code (the point: a run no longer translates the
guest again) and the code hooks on PAUSE that came with it.  Translated code stays right
because a page it came from that the run changed is found when memory is compared back,
and the code of every vCPU is dropped then (emu.hw.vcpu.Vcpu._code_coherence's rule).

An object the walk does not know how to restore (a generator, a thread, an unknown
C type) makes the snapshot refuse (NotRestorable): the explorer forks instead
(emu.checkers.forktree).
Runs here give exactly the outcomes of forked runs; tests/test_inplace.py compares
them over many schedules.
"""

import ctypes
import hashlib
import mmap
import random
import types
import collections
import functools
from enum import Enum

PAGE = 4096


class NotRestorable(Exception):
    pass


_ATOMIC = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    range,
    type,
    types.ModuleType,
    types.BuiltinFunctionType,
    types.CodeType,
    memoryview,
    mmap.mmap,
    type(Ellipsis),
    type(NotImplemented),
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    type(ctypes.byref(ctypes.c_int())),
)
_HASH = type(hashlib.sha256())
_CFUNC = ctypes._CFuncPtr
_CDATA = (ctypes._SimpleCData, ctypes.Structure, ctypes.Union, ctypes.Array)

_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
        _libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        _libc.memcmp.restype = ctypes.c_int
    return _libc


class InPlace:
    """The state of ``machine`` now, kept to be put back by ``restore()`` after each run."""

    def __init__(self, machine):
        if getattr(machine, "user_code", False):
            # A selftest's callbacks and host threads keep state where the walk does not reach
            # (their modules' globals, objects of the test): only a fork gives each run a fresh copy.
            raise NotRestorable("the selftest's host side (callbacks, host threads) may keep state outside the machine")
        self.machine = machine
        self.mem = machine.host.mem
        self.hws = []  # every emu.hw.vcpu.Vcpu (KVM's, or the TDX module's)
        self._walk(machine)
        self._save_memory()
        self.contexts = [(hw.uc, hw.uc.context_save()) for hw in self.hws]

    # -- objects --------------------------------------------------------------------------------------
    def _walk(self, root):
        from ..hw.vcpu import Vcpu
        from ..hw import native

        mmu_type = native.mmu.Mmu if native.mmu is not None else None
        self.mmus = []
        seen = set()
        self.slotted = []
        lists, dicts, sets, cells, cdata, deques, fresh, randoms = [], [], [], [], [], [], [], []
        stack = [root]
        from unicorn import Uc

        while stack:
            o = stack.pop()
            if id(o) in seen or isinstance(o, _ATOMIC) or type(o) is object:  # (a sentinel)
                continue
            seen.add(id(o))
            t = type(o)
            if t is tuple or t is frozenset:
                stack.extend(o)
            elif isinstance(o, dict):
                dicts.append((o, dict(o)))
                stack.extend(o.keys())
                stack.extend(o.values())
                if t is not dict:
                    self._instance(o, stack, allow_none=True)
            elif isinstance(o, list):
                lists.append((o, list(o)))
                stack.extend(o)
            elif isinstance(o, set):
                sets.append((o, o.copy()))
                stack.extend(o)
            elif isinstance(o, bytearray):
                lists.append((o, bytes(o)))
            elif isinstance(o, collections.deque):
                deques.append((o, list(o)))
                stack.extend(o)
            elif t is types.CellType:
                try:
                    v = o.cell_contents
                except ValueError:
                    continue
                cells.append((o, v))
                stack.append(v)
            elif t is types.FunctionType:
                stack.extend(o.__closure__ or ())
                stack.extend(o.__defaults__ or ())
            elif t is types.MethodType:
                stack.append(o.__self__)
                stack.append(o.__func__)
            elif t is functools.partial:
                stack.extend((o.func, o.args, o.keywords))
            elif isinstance(o, Uc) or isinstance(o, _CFUNC):
                continue  # Unicorn's: its CPU context is saved apart
            elif t is mmu_type:
                self.mmus.append((o, o.getstate()))  # a vCPU's compiled MMU: counters, flags
            elif isinstance(o, _CDATA):
                cdata.append((o, ctypes.string_at(ctypes.addressof(o), ctypes.sizeof(o))))
            elif isinstance(o, _HASH):
                fresh.append(o)
            elif isinstance(o, random.Random):
                randoms.append((o, o.getstate()))
                self._instance(o, stack, allow_none=True)
            elif isinstance(o, Enum):
                continue
            else:
                if t is Vcpu:
                    # Kept across runs, as Unicorn keeps what they describe: the pages code
                    # was translated from, the pages whose PAUSEs and exit sites have hooks.
                    self.hws.append(o)
                    seen.update((id(o.code_pfns), id(o._pause_pages), id(o._site_pages), id(o._sites)))
                self._instance(o, stack)
        self.lists, self.dicts, self.sets, self.cells = lists, dicts, sets, cells
        self.cdata, self.deques, self.randoms = cdata, deques, randoms
        if fresh:
            # A hash object cannot be put back in place: its holder gets a fresh copy instead.
            self.fresh = [(d, k, v.copy()) for d, _ in dicts for k, v in d.items() if isinstance(v, _HASH)]
            if len(self.fresh) < len(fresh):
                raise NotRestorable("a hash object held elsewhere than in an attribute or a dict")
        else:
            self.fresh = []

    def _instance(self, o, stack, allow_none=False):
        d = getattr(o, "__dict__", None)
        slots = [s for c in type(o).__mro__ for s in _slot_names(c)]
        if d is None and not slots:
            if allow_none:
                return
            raise NotRestorable(f"cannot restore a {type(o).__module__}.{type(o).__qualname__} in place")
        if d is not None:
            stack.append(d)
        if slots:
            names = tuple(n for n in slots if n not in ("__dict__", "__weakref__"))
            values = tuple(getattr(o, n, _UNSET) for n in names)
            self.slotted.append((o, names, values))
            stack.extend(values)

    # -- host memory ----------------------------------------------------------------------------------
    def _resident(self):
        n = self.mem.size // PAGE
        vec = ctypes.create_string_buffer(n)
        if _lib().mincore(ctypes.c_void_p(self.base), self.mem.size, vec):
            raise NotRestorable(f"mincore failed: errno {ctypes.get_errno()}")
        return vec.raw

    def _save_memory(self):
        self.base = self.mem.address()
        self.code_flushes = 0
        self.shadow = mmap.mmap(-1, self.mem.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.shadow_base = ctypes.addressof(ctypes.c_char.from_buffer(self.shadow))
        self.ever = bytearray(self._resident())
        self.runs = _runs(self.ever)
        for a, b in self.runs:
            ctypes.memmove(self.shadow_base + a * PAGE, self.base + a * PAGE, (b - a) * PAGE)
        self.last = bytes(self.ever)

    def _restore_memory(self):
        now = self._resident()
        if now != self.last:
            grew = False
            for i, (x, y) in enumerate(zip(now, self.ever)):
                if x & 1 and not y & 1:
                    self.ever[i] = 1  # the shadow holds zero there: the page was untouched
                    grew = True
            if grew:
                self.runs = _runs(self.ever)
            self.last = now
        base, shadow = self.base, self.shadow_base
        # Translated code must not outlive the bytes it came from.  First what a vCPU would
        # do at its next entry for the host's writes since it last ran; then, as the bytes go
        # back to the snapshot's, any page code may come from that the run changed drops
        # every vCPU's code (there is no finer way in Unicorn's API to drop one physical page).
        code = set()
        for hw in self.hws:
            if hw.code_generation != self.mem.generation:
                hw._code_coherence()
            code |= hw.code_pfns
        if code:
            cmp = _lib().memcmp
            if any(p * PAGE < self.mem.size and cmp(base + p * PAGE, shadow + p * PAGE, PAGE) for p in code):
                self.code_flushes += 1
                for hw in self.hws:
                    hw.uc.ctl_flush_tb()
                    hw.code_pfns.clear()
        move = ctypes.memmove
        for a, b in self.runs:
            move(base + a * PAGE, shadow + a * PAGE, (b - a) * PAGE)

    # -- all of it ------------------------------------------------------------------------------------
    def restore(self):
        self._restore_memory()
        for o, v in self.lists:
            o[:] = v
        for o, v in self.dicts:
            o.clear()
            o.update(v)
        for o, v in self.sets:
            o.clear()
            o |= v
        for o, names, values in self.slotted:
            for n, v in zip(names, values):
                if v is _UNSET:
                    if hasattr(o, n):
                        delattr(o, n)
                else:
                    setattr(o, n, v)
        for o, v in self.cells:
            o.cell_contents = v
        for o, v in self.deques:
            o.clear()
            o.extend(v)
        for o, v in self.cdata:
            ctypes.memmove(ctypes.addressof(o), v, len(v))
        for o, v in self.randoms:
            o.setstate(v)
        for d, k, v in self.fresh:
            d[k] = v.copy()
        for uc, ctx in self.contexts:
            uc.context_restore(ctx)
        for mmu, state in self.mmus:
            mmu.setstate(state)
        for hw in self.hws:
            hw.flush_tlb()
            hw.code_generation = self.mem.generation


_UNSET = object()


def _slot_names(cls):
    s = cls.__dict__.get("__slots__", ())
    return (s,) if isinstance(s, str) else s


def _runs(vec):
    """[(first page, end page)) of the runs of resident pages in a mincore vector."""
    out = []
    start = None
    for i, x in enumerate(vec):
        if x & 1:
            if start is None:
                start = i
        elif start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(vec)))
    return out
