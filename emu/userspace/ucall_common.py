"""The host side of a ucall (tools/testing/selftests/kvm/lib/ucall_common.c, include/ucall_common.h).

A ucall is the guest asking its host to look at something: GUEST_SYNC, GUEST_PRINTF,
GUEST_ASSERT (UCALL_ABORT), GUEST_DONE.  As upstream, the guest fills a ``struct ucall``
from a pool in memory the host can read (shared memory in a TD: the pool is set up by the
VMM, as ucall_init() does with vm_vaddr_alloc_shared()), then tells the host where it is;
the host copies it out (get_ucall()).  The layout, little-endian:

    struct ucall {                        offset
        u64 cmd;                          0       UCALL_*
        u64 args[UCALL_MAX_ARGS];         8       7 arguments
        char buffer[UCALL_BUFFER_LEN];    64      the formatted text of a PRINTF or ABORT
        u64 hva;                          1088    the host's handle for this struct (its GPA)
        u64 nargs;                        1096    (emu) how many args the guest passed
    };
    struct ucall_header {
        u64 in_use[UCALL_POOL_SLOTS / 64];  0     one bit per struct ucall
        struct ucall ucalls[UCALL_POOL_SLOTS];  8
    };

``hva`` is what the guest hands the host (upstream: the struct's host virtual address, written
by ucall_init()); the VMM writes each struct's GPA there, which it reads through its own
mapping.  ``nargs`` is emu's addition: upstream's host knows how many arguments each of its
tests passes; a generic host needs to be told (uc.args of a GUEST_SYNC is empty, of a
GUEST_SYNC_ARGS four values).  The transport, how the guest says "read the ucall at this
address", is emu.userspace.guestabi.ucall_arch_get_ucall()'s, as upstream's x86: ``in`` from
port 0x1000 with RDI = the address; in a TD an 8-byte MMIO write of the address to the ucall GPA.

A failed assert (UCALL_ABORT) carries upstream's three arguments (the expression, the file
name, the line; the strings' addresses are in the guest image's .rodata) and emu's three more:
the kind of assert (ASSERT_KIND_*) and, for the comparing asserts, the two values.
"""

import struct

# enum ucall (include/ucall_common.h)
UCALL_NONE, UCALL_SYNC, UCALL_ABORT, UCALL_PRINTF, UCALL_DONE, UCALL_UNHANDLED = range(6)
UCALL_NAMES = {UCALL_NONE: "UCALL_NONE", UCALL_SYNC: "UCALL_SYNC", UCALL_ABORT: "UCALL_ABORT",
               UCALL_PRINTF: "UCALL_PRINTF", UCALL_DONE: "UCALL_DONE", UCALL_UNHANDLED: "UCALL_UNHANDLED"}
UCALL_MAX_ARGS = 7
UCALL_BUFFER_LEN = 1024
GUEST_UCALL_FAILED = (1 << 64) - 1        # ucall_arch_do_ucall(-1): the guest had no free struct ucall

# struct ucall
UCALL_OFF_CMD = 0
UCALL_OFF_ARGS = 8
UCALL_OFF_BUFFER = UCALL_OFF_ARGS + 8 * UCALL_MAX_ARGS
UCALL_OFF_HVA = UCALL_OFF_BUFFER + UCALL_BUFFER_LEN
UCALL_OFF_NARGS = UCALL_OFF_HVA + 8
UCALL_SIZE = UCALL_OFF_NARGS + 8
# struct ucall_header
UCALL_POOL_SLOTS = 64                     # the most vCPUs a VM has (emu.userspace.vmm)
UCALL_HEADER_UCALLS = 8 * (UCALL_POOL_SLOTS // 64)
UCALL_POOL_SIZE = UCALL_HEADER_UCALLS + UCALL_POOL_SLOTS * UCALL_SIZE

# enum guest_assert_builtin_args, and emu's after them
GUEST_ERROR_STRING, GUEST_FILE, GUEST_LINE, GUEST_ASSERT_KIND, GUEST_ASSERT_A, GUEST_ASSERT_B = range(6)
# The kinds (args[GUEST_ASSERT_KIND]); guest/include/emu.h has the same numbers.
ASSERT_KIND_ASSERT = 0        # GUEST_ASSERT(cond)
ASSERT_KIND_EQ = 1            # GUEST_ASSERT_EQ(a, b)
ASSERT_KIND_NE = 2
ASSERT_KIND_LT = 3
ASSERT_KIND_LE = 4
ASSERT_KIND_GT = 5
ASSERT_KIND_GE = 6
ASSERT_KIND_FMT = 7           # __GUEST_ASSERT(cond, fmt, ...)
ASSERT_KIND_FAIL = 8          # GUEST_FAIL(fmt, ...)
# kind -> (macro, the operator that held, the one that failed)
COMPARISONS = {ASSERT_KIND_EQ: ("GUEST_ASSERT_EQ", "==", "!="), ASSERT_KIND_NE: ("GUEST_ASSERT_NE", "!=", "=="),
               ASSERT_KIND_LT: ("GUEST_ASSERT_LT", "<", ">="), ASSERT_KIND_LE: ("GUEST_ASSERT_LE", "<=", ">"),
               ASSERT_KIND_GT: ("GUEST_ASSERT_GT", ">", "<="), ASSERT_KIND_GE: ("GUEST_ASSERT_GE", ">=", "<")}
KIND_NAMES = {ASSERT_KIND_ASSERT: "assert", ASSERT_KIND_EQ: "eq", ASSERT_KIND_NE: "ne", ASSERT_KIND_LT: "lt",
              ASSERT_KIND_LE: "le", ASSERT_KIND_GT: "gt", ASSERT_KIND_GE: "ge", ASSERT_KIND_FMT: "assert",
              ASSERT_KIND_FAIL: "fail"}

# The guest library's "hello" (GUEST_SYNC and GUEST_SYNC_ARGS pass its address as args[0], as
# upstream passes the literal): a sync with it has its stage in args[1]; GUEST_SYNC1..6 have none.
UCALL_SYNC_MARKER_SYMBOL = "__ucall_sync_hello"


class Ucall:
    """One ucall as the host's on_ucall callback sees it.

    ``cmd``      UCALL_SYNC, UCALL_ABORT, UCALL_PRINTF or UCALL_DONE (or UCALL_NONE)
    ``stage``    the stage of GUEST_SYNC / GUEST_SYNC_ARGS (the first argument of GUEST_SYNCn),
                 else None
    ``args``     the further arguments of a sync, as a tuple (empty for GUEST_SYNC)
    ``text``     the formatted text of a PRINTF or ABORT, else None
    ``raw_args`` the seven args as the guest left them; ``nargs`` how many it passed
    ``vcpu``     the vCPU that made it
    ``guest_assert`` for an ABORT: the failed assert (a dict: file, line, expr, kind, a, b, message)
    """

    __slots__ = ("cmd", "stage", "args", "text", "raw_args", "nargs", "vcpu", "guest_assert")

    def __init__(self, cmd, stage=None, args=(), text=None, raw_args=(0,) * UCALL_MAX_ARGS, nargs=0, vcpu=None,
                 guest_assert=None):
        self.cmd, self.stage, self.args, self.text = cmd, stage, tuple(args), text
        self.raw_args, self.nargs, self.vcpu, self.guest_assert = tuple(raw_args), nargs, vcpu, guest_assert

    def __repr__(self):
        extra = f", text={self.text!r}" if self.text is not None else ""
        return (f"Ucall({UCALL_NAMES.get(self.cmd, self.cmd)}, vcpu={self.vcpu}, stage={self.stage!r}, "
                f"args={self.args!r}{extra})")


def read_ucall(read, addr):
    """get_ucall(): copy the struct ucall at ``addr`` (the host's handle, a GPA) out with
    ``read(gpa, n)``: (cmd, args, nargs, text)."""
    raw = read(addr, UCALL_SIZE)
    cmd, = struct.unpack_from("<Q", raw, UCALL_OFF_CMD)
    args = struct.unpack_from(f"<{UCALL_MAX_ARGS}Q", raw, UCALL_OFF_ARGS)
    nargs, = struct.unpack_from("<Q", raw, UCALL_OFF_NARGS)
    text = raw[UCALL_OFF_BUFFER:UCALL_OFF_HVA].split(b"\0", 1)[0].decode("utf-8", "replace")
    return cmd, args, min(nargs, UCALL_MAX_ARGS), text


def pool_image(pool_gpa):
    """The ucall pool as ucall_init() leaves it: nothing in use, each struct's ``hva`` its GPA."""
    buf = bytearray(UCALL_POOL_SIZE)
    for i in range(UCALL_POOL_SLOTS):
        at = pool_gpa + UCALL_HEADER_UCALLS + i * UCALL_SIZE
        struct.pack_into("<Q", buf, UCALL_HEADER_UCALLS + i * UCALL_SIZE + UCALL_OFF_HVA, at)
    return bytes(buf)


def assert_message(kind, file, line, expr, a, b, text):
    """The one line a failed assert becomes (the run's error, after 'vCPU N: ')."""
    where = f"{file}:{line}"
    if kind in COMPARISONS:
        macro, _, failed = COMPARISONS[kind]
        return f"{macro} failed at {where}: {expr} ({a:#x} {failed} {b:#x})"
    if kind == ASSERT_KIND_FMT:
        return f"GUEST_ASSERT failed at {where}: {expr}: {text}"
    if kind == ASSERT_KIND_FAIL:
        return f"GUEST_FAIL at {where}: {text}"
    return f"GUEST_ASSERT failed at {where}: {expr}"
