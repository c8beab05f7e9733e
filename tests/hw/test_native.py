"""The compiled MMU (emu/hw/mmu.c) against the Python model it must equal.

The Python walkers (emu.hw.ept.walk_py, emu.hw.paging.translate and the Python TLB fill of
emu.hw.vcpu) are the reference.  Here both run on copies of the same random world and must give
the same outcome for every access, field by field (the translation; the exit with every bit of
its qualification, its suppress-#VE bit, the misconfiguration's reason, level and entry; the
#PF error code), leave the same bytes in memory (accessed and dirty flags, in EPT and in the
guest's tables), and cache the same things (the vCPU's GPA cache and TLB shadow, in order; its
code pages; its fill count), also when tables change under a cache without a flush.

The worlds: 4- or 5-level EPT with A/D on or off, a TD's secure EPT next to the shared one
(the S-EPT/shared split on the GPA's shared bit), guest 4-level paging with 4K, 2M and 1G pages,
EPT 4K and 2M leaves, random permissions (execute-only included), then random damage: bits
flipped in random entries (reserved bits, memory types, write-without-read, XD, PS, A/D, bit
63, address bits pointing outside host memory), CR0.WP and EFER.NXE either way.

The KUT-style access matrix (tests/hw/test_ept.py) runs on both walkers too; `make test` runs
the hardware tests once more with EMU_PURE_PYTHON=1.
"""

import ctypes
import types

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emu.hw import ept as ept_mod
from emu.hw import native
from emu.hw.ept import InvalidEptp, make_eptp
from emu.hw.memory import HostMemory
from emu.hw.vcpu import Vcpu

compiled = pytest.mark.skipif(native.mmu is None, reason=f"no compiled MMU: {native.why_not}")

PAGE = 0x1000
MEM = 6 << 20
POOL_END = 2 << 20  # tables and 4K pages come from [PAGE, POOL_END)
LARGE = (2 << 20, 4 << 20)  # the frames EPT 2M leaves map
ADDR = ((1 << 48) - 1) & ~0xFFF
UC_READ, UC_WRITE, UC_FETCH = 16, 17, 18
SHARED_BIT = 1 << 47

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
_libc = ctypes.CDLL(None)
_libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def same_bytes(a, b):
    """Two HostMemory buffers hold the same bytes."""
    return a.size == b.size and _libc.memcmp(a.base_address, b.base_address, a.size) == 0


# Bits worth flipping in an entry: present/R, W, X, the memory type, PS, A, D, ignored and
# reserved bits, the address's top bits (outside host memory), XD / suppress-#VE.
FLIP_BITS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 20, 21, 29, 30, 40, 47, 48, 51, 52, 62, 63)


def one_in(n):
    """True one time in ``n`` (False is what hypothesis shrinks to)."""
    return st.sampled_from((False,) * (n - 1) + (True,))


def describe(o):
    """A walk's outcome as comparable data: its class and every slot."""
    slots = [s for c in type(o).__mro__ for s in getattr(c, "__slots__", ())]
    return (type(o).__name__,) + tuple(getattr(o, s, None) for s in slots)


# -----------------------------------------------------------------------------------------------
# 1. The EPT walk: compiled ``walk`` against ``walk_py``
# -----------------------------------------------------------------------------------------------
class EptWorld:
    """A random EPT tree in ``mem`` built by ``map`` calls, then damaged."""

    def __init__(self, mem, levels, ad, memtype=6, alloc=None):
        self.mem, self.levels = mem, levels
        self.next = PAGE
        if alloc is not None:
            self.alloc = alloc  # another tree's pool
        self.root = self.alloc()
        self.eptp = make_eptp(self.root, levels=levels, ad=ad, memtype=memtype)
        self.entries = []  # HPAs of every entry written

    def alloc(self):
        hpa = self.next
        self.next += PAGE
        assert self.next <= POOL_END
        return hpa

    def map(self, gpa, hpa, leaf_level, perms, upper_perms, extra=0):
        """An EPT path for ``gpa``: missing tables with ``upper_perms`` (one per level, top
        first), the leaf ``hpa | perms | WB | extra`` (PS above level 1).  An existing leaf
        above ``leaf_level`` stops it (the GPA maps as that leaf says)."""
        table = self.root
        for i, level in enumerate(range(self.levels, leaf_level, -1)):
            ptr = table + (((gpa >> (12 + 9 * (level - 1))) & 511) << 3)
            e = self.mem.read64(ptr)
            if not e & 7:
                e = self.alloc() | upper_perms[i % len(upper_perms)]
                self.mem.write64(ptr, e)
                self.entries.append(ptr)
            elif e & (1 << 7) and level <= 3:
                return
            table = e & ADDR
        ptr = table + (((gpa >> (12 + 9 * (leaf_level - 1))) & 511) << 3)
        if self.mem.read64(ptr) & 7:
            return
        self.mem.write64(ptr, (hpa & ADDR) | perms | (6 << 3) | ((1 << 7) if leaf_level > 1 else 0) | extra)
        self.entries.append(ptr)


# Mostly RWX, or deep paths AND down to nothing; 6 and 2 are write without read, 0 not present.
PERMS = st.sampled_from((7,) * 12 + (1, 3, 5, 4, 6, 2, 0))
UPPER = st.sampled_from([(7,)] * 8 + [(7, 7, 5), (7, 3), (1,), (7, 7, 7, 4), (5, 7), (7, 7, 7, 7, 6)])


@st.composite
def ept_worlds(draw):
    levels = draw(st.sampled_from((4, 5)))
    ad = draw(st.booleans())
    memtype = draw(st.sampled_from((0, 6)))
    mem = HostMemory(MEM)
    w = EptWorld(mem, levels, ad, memtype)
    width = 12 + 9 * levels
    regions = draw(st.lists(st.integers(0, (1 << (width - 21)) - 1), min_size=1, max_size=3))
    gpas = []
    for _ in range(draw(st.integers(1, 10))):
        base = draw(st.sampled_from(regions)) << 21
        gpa = base | draw(st.integers(0, 511)) << 12 | draw(st.integers(0, 0xFFF))
        leaf = draw(st.sampled_from((1, 1, 1, 2, 3)))
        frame = w.alloc() if leaf == 1 else (LARGE[draw(st.integers(0, 1))] if leaf == 2 else 0)
        a_d = draw(st.sampled_from((0, 0, 1 << 8, 3 << 8)))
        w.map(gpa, frame, leaf, draw(PERMS), draw(UPPER), a_d | draw(st.sampled_from((0, 0, 1 << 63))))
        gpas.append(gpa)
    for _ in range(draw(st.integers(0, 4))):
        if w.entries:
            ptr = draw(st.sampled_from(w.entries))
            mem.write64(ptr, mem.read64(ptr) ^ (1 << draw(st.sampled_from(FLIP_BITS))))
    return w, gpas, width


def twin(mem):
    """A second HostMemory with the same bytes."""
    other = HostMemory(mem.size)
    other.buf[:] = mem.buf
    return other


def outcome(fn):
    try:
        return describe(fn())
    except Exception as e:  # noqa: BLE001  (both must raise the same)
        return ("raises", type(e).__name__, str(e))


@compiled
class TestEptWalk:
    @SETTINGS
    @given(world=ept_worlds(), data=st.data())
    def test_compiled_walk_equals_the_python_walk(self, world, data):
        w, gpas, width = world
        other = twin(w.mem)
        log = data.draw(st.booleans(), label="AD_LOG")
        gpa_st = st.one_of(
            st.sampled_from(gpas), st.integers(0, (1 << width) - 1), st.integers(0, (1 << (width + 2)) - 1)
        )  # some too wide: ValueError
        for _ in range(data.draw(st.integers(1, 12), label="walks")):
            gpa = data.draw(gpa_st, label="gpa")
            access = data.draw(st.sampled_from((1, 2, 4, 3, ept_mod.Access.WRITE)), label="access")
            set_ad = data.draw(st.booleans(), label="set_ad")
            logs = []
            results = []
            for walk, mem in ((native.mmu.walk, w.mem), (ept_mod.walk_py, other)):
                ept_mod.AD_LOG = [] if log else None
                try:
                    results.append(outcome(lambda: walk(mem, w.eptp, gpa, access, set_ad=set_ad)))
                finally:
                    logs.append(ept_mod.AD_LOG)
                    ept_mod.AD_LOG = None
            assert results[0] == results[1]
            assert logs[0] == logs[1]
            assert same_bytes(w.mem, other)

    @pytest.mark.parametrize("eptp", [make_eptp(0x1000) | 1, make_eptp(0x1000) | (1 << 8), 0x1000 | 6 | (1 << 3)])
    def test_an_invalid_eptp_raises_as_the_python_walk_does(self, eptp):
        mem = HostMemory(1 << 20)
        with pytest.raises(InvalidEptp):
            native.mmu.walk(mem, eptp, 0, 1)

    def test_a_path_to_record_goes_to_the_python_walk(self):
        mem = HostMemory(1 << 20)
        w = EptWorld(mem, 4, True)
        w.map(0x5000, 0x7000, 1, 7, (7,))
        path = []
        t = ept_mod.walk(mem, w.eptp, 0x5123, 2, path=path)
        assert (t.hpa, t.level, t.perms, t.dirty) == (0x7123, 1, 7, True)
        assert [lvl for lvl, _, _ in path] == [4, 3, 2, 1]


# -----------------------------------------------------------------------------------------------
# 2. The 2D walk and the TLB fill: the compiled Mmu against the Python fill of a Vcpu
# -----------------------------------------------------------------------------------------------
P, RW, US, A, D, PS, XD = 1, 2, 4, 1 << 5, 1 << 6, 1 << 7, 1 << 63


class World:
    """Host memory with an EPT (and for a TD a secure EPT) and guest page tables."""

    def __init__(self, draw, levels, ad, td):
        self.mem = HostMemory(MEM)
        self.ept = EptWorld(self.mem, levels, ad)
        self.sept = None
        if td:
            self.sept = EptWorld(self.mem, 4, draw(st.booleans()), alloc=self.ept.alloc)
        self.draw = draw
        self.guest_entries = []  # HPAs of the guest entries written
        self.gpa_regions = [draw(st.integers(0, (1 << 22) - 1)) << 21 for _ in range(2)]
        self.data_regions = [draw(st.integers(1, (1 << 12) - 1)) << 30 for _ in range(2)]
        self.used = set()
        self.cr3_gpa = self.table_gpa()
        self.cr3_hpa = self.ept_map_page(self.cr3_gpa)

    def table_gpa(self):
        """A fresh guest page for a table or data page, in one of two 2M regions (so that EPT
        tables are shared); for a TD, on either side of the shared bit."""
        while True:
            gpa = self.draw(st.sampled_from(self.gpa_regions)) | self.draw(st.integers(0, 511)) << 12
            if self.sept is not None and self.draw(st.booleans()):
                gpa |= SHARED_BIT
            if gpa not in self.used:
                self.used.add(gpa)
                return gpa

    def data_gpa(self, level):
        """A GPA for a guest leaf at ``level``, in one of two 1G regions of their own (so that EPT
        may map 2M of it with one leaf)."""
        gpa = self.draw(st.sampled_from(self.data_regions))
        if level == 1:
            gpa |= self.draw(st.integers(0, (1 << 18) - 1)) << 12
        elif level == 2:
            gpa |= self.draw(st.integers(0, 511)) << 21
        if self.sept is not None and self.draw(st.booleans()):
            gpa |= SHARED_BIT
        return gpa

    def tree_of(self, gpa):
        return self.ept if self.sept is None or gpa & SHARED_BIT else self.sept

    def ept_map_page(self, gpa, data=False):
        """EPT-map ``gpa`` (4K, or for data sometimes a 2M leaf into a large frame); its HPA, or
        None when the draw leaves it unmapped (or the tree maps it elsewhere already)."""
        tree = self.tree_of(gpa)
        draw = self.draw
        if draw(one_in(20)):
            return None
        large = data and draw(one_in(5))
        hpa = LARGE[draw(st.integers(0, 1))] | (gpa & 0x1FF000) if large else tree.alloc()
        perms = draw(PERMS) if data else draw(st.sampled_from((7,) * 10 + (3, 1, 5)))
        extra = draw(st.sampled_from((0, 1 << 8, 3 << 8, 1 << 63)))
        tree.map(gpa, hpa & ~0x1FFFFF if large else hpa, 2 if large else 1, perms, draw(UPPER), extra)
        return hpa

    def guest_map(self, gva):
        """Guest tables for ``gva`` (creating what is missing), a leaf at a drawn level."""
        draw = self.draw
        leaf_level = draw(st.sampled_from((1, 1, 1, 2, 3)))
        table_gpa, table_hpa = self.cr3_gpa, self.cr3_hpa
        for level in (4, 3, 2, 1):
            if table_hpa is None:
                return
            ptr = table_hpa + (((gva >> (12 + 9 * (level - 1))) & 511) << 3)
            e = self.mem.read64(ptr)
            flags = (
                P
                | draw(st.sampled_from((RW,) * 6 + (0,)))
                | draw(st.sampled_from((0, US)))
                | draw(st.sampled_from((0, A, A, A | D)))
                | draw(st.sampled_from((0,) * 10 + (XD,)))
            )
            if level == leaf_level:
                if e & P:
                    return
                gpa = self.data_gpa(level) if self.draw(st.integers(0, 7)) else self.table_gpa()
                gpa &= ~((1 << (12 + 9 * (level - 1))) - 1)
                self.ept_map_page(gpa | (gva & ((1 << (12 + 9 * (level - 1))) - 1) & ~0xFFF), data=True)
                self.mem.write64(ptr, gpa | flags | (PS if level > 1 else 0))
                self.guest_entries.append(ptr)
                return
            if not e & P:
                gpa = self.table_gpa()
                hpa = self.ept_map_page(gpa)
                e = gpa | flags
                self.mem.write64(ptr, e)
                self.guest_entries.append(ptr)
                table_gpa, table_hpa = gpa, hpa
            else:
                if e & PS and level <= 3:
                    return
                table_gpa = e & ADDR
                table_hpa = self.hpa_of(table_gpa)

    def hpa_of(self, gpa):
        t = ept_mod.walk_py(self.mem, self.tree_of(gpa).eptp, gpa, 1, set_ad=False)
        if t.__class__ is not ept_mod.EptTranslation:
            t = ept_mod.walk_py(self.mem, self.tree_of(gpa).eptp, gpa, 4, set_ad=False)
        return t.hpa if t.__class__ is ept_mod.EptTranslation and t.hpa < POOL_END else None

    def all_entries(self):
        out = self.guest_entries + self.ept.entries
        return out + (self.sept.entries if self.sept is not None else [])


INDICES = (
    st.sampled_from((0, 1, 255, 256, 511)),
    st.sampled_from((0, 3, 511)),
    st.sampled_from((0, 5, 511)),
    st.sampled_from((0, 1, 2, 511)),
)


@st.composite
def gvas(draw):
    i4, i3, i2, i1 = (draw(s) for s in INDICES)
    gva = i4 << 39 | i3 << 30 | i2 << 21 | i1 << 12
    if i4 >= 256:
        gva |= 0xFFFF << 48  # canonical
    if draw(one_in(16)):
        gva ^= 1 << 50  # not canonical: #GP
    return gva


def vcpu_pair(world, draw):
    other = twin(world.mem)
    vs = []
    for mem, pure in ((world.mem, False), (other, True)):
        v = Vcpu(mem, pure_python=pure)
        if world.sept is not None:
            v.load_eptp(world.ept.eptp, world.sept.eptp, SHARED_BIT)
        else:
            v.load_eptp(world.ept.eptp)
        vs.append(v)
    wp = draw(st.booleans())
    nxe = draw(st.booleans())
    for v in vs:
        v.set_reg("cr3", world.cr3_gpa)
        v.set_reg("cr0", v.reg("cr0") & ~(0 if wp else 1 << 16))
        efer = v.uc.msr_read(0xC0000080)
        v.uc.msr_write(0xC0000080, efer if nxe else efer & ~(1 << 11))
    return vs


def fill_native(v, page, uc_type):
    r = v._mmu.fill(page, uc_type)
    if r is not None:
        out = ("fill",) + r
    else:
        f = v._mmu.take_fault()
        if f is not None:
            out = ("exit", describe(f[0]), f[1], f[2])
        elif v.pending is not None:
            out = ("exit", describe(v.pending), v._fault_gla, v._fault_access)
        else:
            e = v._hook_error
            out = ("error", type(e).__name__, str(e))
    v.pending = None
    v._hook_error = None
    v._mmu.enter(v._fill_to_python(), v.slice_blocks)
    return out


def fill_python(v, page, uc_type):
    entry = types.SimpleNamespace(paddr=0, perms=0)
    if v._tlb_fill(v.uc, page, uc_type, entry, None):
        out = ("fill", entry.paddr, entry.perms)
    elif v.pending is not None:
        out = ("exit", describe(v.pending), v._fault_gla, v._fault_access)
    else:
        e = v._hook_error
        out = ("error", type(e).__name__, str(e))
    v.pending = None
    v._hook_error = None
    return out


def caches(v):
    return (list(v.gpa_cache.items()), list(v.tlb_shadow.items()), sorted(v.code_pfns), v.stats_fills)


@compiled
class TestFill:
    @SETTINGS
    @given(data=st.data())
    def test_compiled_fill_equals_the_python_fill(self, data):
        draw = data.draw
        world = World(
            draw,
            draw(st.sampled_from((4, 5)), label="levels"),
            draw(st.booleans(), label="ad"),
            draw(st.booleans(), label="td"),
        )
        targets = draw(st.lists(gvas(), min_size=1, max_size=6), label="gvas")
        for gva in targets:
            world.guest_map(gva)
        entries = world.all_entries()
        for _ in range(draw(st.integers(0, 3), label="damage") if entries else 0):
            ptr = draw(st.sampled_from(entries))
            world.mem.write64(ptr, world.mem.read64(ptr) ^ (1 << draw(st.sampled_from(FLIP_BITS))))
        native_v, python_v = vcpu_pair(world, draw)
        for _ in range(draw(st.integers(1, 16), label="steps")):
            op = draw(st.sampled_from(("access",) * 6 + ("change", "flush")), label="op")
            if op == "change" and not entries:
                op = "flush"
            if op == "flush":
                native_v.flush_tlb()
                python_v.flush_tlb()
            elif op == "change":
                # A table changes under the caches, no flush: both must use (or not) the same
                # stale translations.
                ptr = draw(st.sampled_from(entries))
                bit = 1 << draw(st.sampled_from(FLIP_BITS))
                for v in (native_v, python_v):
                    v.mem.write64(ptr, v.mem.read64(ptr) ^ bit)
            else:
                page = draw(gvas() if draw(one_in(4)) else st.sampled_from(targets), label="gva")
                uc_type = draw(st.sampled_from((UC_READ, UC_WRITE, UC_FETCH)), label="type")
                assert fill_native(native_v, page, uc_type) == fill_python(python_v, page, uc_type)
                assert same_bytes(world.mem, python_v.mem)
                assert caches(native_v) == caches(python_v)

    def test_a_fill_that_exits_is_picked_up_by_run(self):
        """End to end: the compiled fill refuses, Vcpu.run() reports the violation exactly as the
        Python fill makes it (qualification, GPA, GLA)."""
        from emu.hw.bare import BareHost

        out = []
        for pure in (False, True):
            host = BareHost(4 << 20)
            host.map_4k(0x200000)
            for i in range(3):  # guest tables at 0x201000.. (identity)
                host.map_4k(0x201000 + i * PAGE)
            host.write_gpa(0x201000, (0x202000 | 3).to_bytes(8, "little"))
            host.write_gpa(0x202000, (0x203000 | 3).to_bytes(8, "little"))
            host.write_gpa(0x203000 + 8, (0x200000 | 0x83).to_bytes(8, "little"))  # 2M at GVA 2M
            host.write_gpa(0x200000, bytes.fromhex("488b0425 00103000f4"))  # mov rax, [0x301000]; hlt
            v = Vcpu(host.mem, pure_python=pure)
            v.load_eptp(host.eptp)
            v.set_regs({"rip": 0x200000, "cr3": 0x201000, "rsp": 0x200800})
            e = v.run()
            out.append((e.reason, e.qualification, e.gpa, e.gla, v.stats_fills, sorted(v.tlb_shadow.items())))
        assert out[0] == out[1]
        assert out[0][:4] == (48, 0x181, 0x301000, 0x301000)


# -----------------------------------------------------------------------------------------------
# 3. Building it, and doing without
# -----------------------------------------------------------------------------------------------
def test_without_a_compiler_runs_fall_back_to_python_with_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(native, "_build_dirs", lambda: iter([tmp_path]))
    monkeypatch.setattr(native, "mmu", None)
    monkeypatch.setattr(native, "why_not", None)
    monkeypatch.delenv("EMU_PURE_PYTHON", raising=False)
    assert native.load(ept_mod, ept_mod.walk_py) is None
    err = capsys.readouterr().err
    assert err == (
        "emu: the hardware MMU runs in pure Python (slower): no C compiler found (gcc or clang): "
        "install one (apt-get install gcc)\n"
    )
    assert native.load(ept_mod, ept_mod.walk_py) is None  # said once
    assert capsys.readouterr().err == ""


def test_emu_pure_python_selects_the_python_walkers(tmp_path):
    import subprocess
    import sys

    code = (
        "from emu.hw import ept, native; from emu.hw.vcpu import Vcpu; from emu.hw.memory import HostMemory; "
        "print(ept.walk is ept.walk_py, native.mmu is None, Vcpu(HostMemory(1 << 20))._mmu is None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "EMU_PURE_PYTHON": "1"},
    )
    assert out.stdout.split() == ["True", "True", "True"] and out.stderr == ""
