"""Shared helpers of the KVM-layer tests (tests/kvm/).

Everything here is written independently of the code under test: table walks
read host memory directly, expected values come from the guests' sources and
ELF symbols, from shared/REFERENCE.md section 1 and from the Linux sources it
names.
"""

import re
import struct
from pathlib import Path

from emu.kvm.spte import make_spte, make_nonleaf_spte, ACC_ALL, MT_MASK_DEFAULT_VM, SHADOW_NONPRESENT_VALUE
from emu.kvm.tdp_iter import TdpIter, for_each_tdp_pte_min_level


REPO = Path(__file__).resolve().parents[2]
GUEST_SRC = REPO / "guest"
TEST_GUESTS = Path(__file__).resolve().parent / "guests"

NONPRESENT = 1 << 63  # SHADOW_NONPRESENT_VALUE, spelled out
MMU_PRESENT = 1 << 11  # SPTE_MMU_PRESENT_MASK
PS = 1 << 7
ADDR_MASK = ((1 << 48) - 1) & ~0xFFF  # bits MAXPHYADDR-1:12 (MAXPHYADDR = 48 in this CPU)


def pages_per(level):
    return 1 << (9 * (level - 1))


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & ((1 << 64) - 1)
    return h


def hello_string():
    src = (GUEST_SRC / "hello.S").read_text()
    m = re.search(r'^greeting:\s*\n\s*\.ascii\s+"([^"]*)"', src, re.M)
    assert m, "could not find the greeting in guest/hello.S"
    return m.group(1).encode()


def equ(src_name, name):
    """The value of `.equ name, value` in guest/<src_name>."""
    src = (GUEST_SRC / src_name).read_text()
    m = re.search(rf"^\.equ\s+{name}\s*,\s*(\S+)", src, re.M)
    assert m, f".equ {name} not found in {src_name}"
    return int(m.group(1), 0)


# ---------------------------------------------------------------------------
# Walking KVM's tables in host memory
# ---------------------------------------------------------------------------


def read64(mem, hpa):
    return struct.unpack_from("<Q", mem.buf, hpa)[0]


def all_entries(mem, table, level, base_gfn=0):
    """Pre-order (level, gfn, sptep, spte) of every entry below ``table``, descending
    into entries that have the MMU-present bit and are not leaves."""
    out = []

    def rec(t, lvl, gfn):
        for i in range(512):
            sptep = t + 8 * i
            spte = read64(mem, sptep)
            g = gfn + i * pages_per(lvl)
            out.append((lvl, g, sptep, spte))
            if spte & MMU_PRESENT and lvl > 1 and not spte & PS:
                rec(spte & ADDR_MASK, lvl - 1, g)

    rec(table, level, base_gfn)
    return out


def present_leaves(mem, root_spt, root_level):
    """{gfn: (level, spte)} of every present leaf under a root (an independent walk)."""
    return {
        g: (lvl, s)
        for lvl, g, _, s in all_entries(mem, root_spt, root_level)
        if s & MMU_PRESENT and (lvl == 1 or s & PS)
    }


def table_pages(mem, root_spt, root_level):
    """HPAs of every table linked below the root (not the root itself)."""
    return [
        s & ADDR_MASK
        for lvl, _, _, s in all_entries(mem, root_spt, root_level)
        if s & MMU_PRESENT and lvl > 1 and not s & PS
    ]


def check_tables(kvm, root):
    """Every SPTE under ``root`` is what KVM builds; returns (leaf counts per level, table HPAs)."""
    tdp = kvm.tdp_mmu
    counts = {1: 0, 2: 0, 3: 0}
    tables = []

    def rec(table, level, base):
        for i in range(512):
            sptep = table + 8 * i
            spte = read64(kvm.mem, sptep)
            gfn = base + i * pages_per(level)
            if not spte & MMU_PRESENT:
                assert spte == SHADOW_NONPRESENT_VALUE, (hex(sptep), hex(spte))
                continue
            if level == 1 or spte & PS:
                slot = kvm.gfn_to_memslot(gfn)
                assert slot is not None, hex(gfn)
                pfn = (slot.userspace_addr >> 12) + gfn - slot.base_gfn
                exp = make_spte(level, pfn, ACC_ALL, MT_MASK_DEFAULT_VM, host_writable=not slot.readonly)[0]
                assert spte == exp, (level, hex(gfn), hex(spte), hex(exp))
                counts[level] += 1
                continue
            child = spte & ADDR_MASK
            assert spte == make_nonleaf_spte(child), (hex(sptep), hex(spte))
            sp = tdp.sp_of[child]
            assert (sp.role_level, sp.gfn, sp.ptep, sp.is_mirror) == (level - 1, gfn, sptep, False)
            tables.append(child)
            rec(child, level - 1, gfn)

    rec(root.spt, root.role_level, 0)
    assert (kvm.stat["pages_4k"], kvm.stat["pages_2m"], kvm.stat["pages_1g"]) == (counts[1], counts[2], counts[3])
    assert tdp.pages == len(tables)
    assert set(tdp.sp_of) == {root.spt} | set(tables)
    return counts, tables


def iter_at(kvm, root, gfn, level=1):
    """A TdpIter positioned on the entry for ``gfn`` at ``level`` (the tables above must exist)."""
    it = TdpIter(kvm, root, level, gfn, 0)
    for i in for_each_tdp_pte_min_level(it, gfn + 1):
        if i.level == level:
            return i
    raise AssertionError(f"no level-{level} entry for gfn {gfn:#x}")


# ---------------------------------------------------------------------------
# Machines
# ---------------------------------------------------------------------------


def record_violations(machine):
    """Record the GFN of every EPT violation each vCPU takes (in order) into a list."""
    seen = []
    for v in machine.vcpus:
        orig = v.handle_ept_violation

        def wrapped(exit, _orig=orig):
            seen.append(exit.gpa >> 12)
            return _orig(exit)

        v.handle_ept_violation = wrapped
    return seen


def expected_touched_pages(machine, guest):
    """The 4K guest frames a guest touches on a first run: from its ELF symbols,
    its source and the boot layout (not from KVM)."""
    img, boot = machine.image, machine.boot
    sym = img.symbol
    pages = {g >> 12 for g in boot.page_table_gpas}
    pages |= {sym(s) >> 12 for s in ("_start", "emu_report", "emu_is_td", "emu_td_state")}
    if guest == "hello":
        nv = machine.nvcpus
        pages |= {sym("greeting") >> 12}
    elif guest == "touch":
        nv = machine.nvcpus
        npages = equ("touch.S", "TOUCH_PAGES")
        pages |= {(sym("touch_area") >> 12) + i for i in range(npages)}
    elif guest == "pagewalk":
        nv = 1  # vCPUs other than 0 only HLT
        pages |= {sym(s) >> 12 for s in ("map_page", "pt_alloc", "emu_accept", "pt_next")}
        # Pool pages: PML4, PDPT, the PD for GVA [0, 1G) (identity + stack map),
        # PD + PT for the 4K aliases at 1G, PD for the 2M alias at 2G.
        pages |= {(sym("pt_pool") >> 12) + i for i in range(6)}
        a = sym("alias_data") >> 12
        pages |= {a + 1, a + 3}
        base2m = equ("pagewalk.S", "ALIAS_2M_GPA")
        pages |= {(base2m + 0x1238) >> 12, (base2m + 0x1FF008) >> 12}
    else:
        raise ValueError(guest)
    pages |= {(boot.stack_range(i)[1] - 8) >> 12 for i in range(nv)}
    return pages


def fresh_regs(machine):
    for i, v in enumerate(machine.vcpus):
        v.set_regs(machine.boot.regs(i))
