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

from ..kvm.kvm_host import KvmIoctlError

# enum ucall (include/ucall_common.h)
UCALL_NONE, UCALL_SYNC, UCALL_ABORT, UCALL_PRINTF, UCALL_DONE, UCALL_UNHANDLED = range(6)
UCALL_NAMES = {
    UCALL_NONE: "UCALL_NONE",
    UCALL_SYNC: "UCALL_SYNC",
    UCALL_ABORT: "UCALL_ABORT",
    UCALL_PRINTF: "UCALL_PRINTF",
    UCALL_DONE: "UCALL_DONE",
    UCALL_UNHANDLED: "UCALL_UNHANDLED",
}
UCALL_MAX_ARGS = 7
UCALL_BUFFER_LEN = 1024
GUEST_UCALL_FAILED = (1 << 64) - 1  # ucall_arch_do_ucall(-1): the guest had no free struct ucall

# struct ucall
UCALL_OFF_CMD = 0
UCALL_OFF_ARGS = 8
UCALL_OFF_BUFFER = UCALL_OFF_ARGS + 8 * UCALL_MAX_ARGS
UCALL_OFF_HVA = UCALL_OFF_BUFFER + UCALL_BUFFER_LEN
UCALL_OFF_NARGS = UCALL_OFF_HVA + 8
UCALL_SIZE = UCALL_OFF_NARGS + 8
# struct ucall_header
UCALL_POOL_SLOTS = 64  # the most vCPUs a VM has (emu.userspace.vmm)
UCALL_HEADER_UCALLS = 8 * (UCALL_POOL_SLOTS // 64)
UCALL_POOL_SIZE = UCALL_HEADER_UCALLS + UCALL_POOL_SLOTS * UCALL_SIZE

# enum guest_assert_builtin_args, and emu's after them
GUEST_ERROR_STRING, GUEST_FILE, GUEST_LINE, GUEST_ASSERT_KIND, GUEST_ASSERT_A, GUEST_ASSERT_B = range(6)
# The kinds (args[GUEST_ASSERT_KIND]); guest/include/emu.h has the same numbers.
ASSERT_KIND_ASSERT = 0  # GUEST_ASSERT(cond)
ASSERT_KIND_EQ = 1  # GUEST_ASSERT_EQ(a, b)
ASSERT_KIND_NE = 2
ASSERT_KIND_LT = 3
ASSERT_KIND_LE = 4
ASSERT_KIND_GT = 5
ASSERT_KIND_GE = 6
ASSERT_KIND_FMT = 7  # __GUEST_ASSERT(cond, fmt, ...)
ASSERT_KIND_FAIL = 8  # GUEST_FAIL(fmt, ...)
# kind -> (macro, the operator that held, the one that failed)
COMPARISONS = {
    ASSERT_KIND_EQ: ("GUEST_ASSERT_EQ", "==", "!="),
    ASSERT_KIND_NE: ("GUEST_ASSERT_NE", "!=", "=="),
    ASSERT_KIND_LT: ("GUEST_ASSERT_LT", "<", ">="),
    ASSERT_KIND_LE: ("GUEST_ASSERT_LE", "<=", ">"),
    ASSERT_KIND_GT: ("GUEST_ASSERT_GT", ">", "<="),
    ASSERT_KIND_GE: ("GUEST_ASSERT_GE", ">=", "<"),
}
KIND_NAMES = {
    ASSERT_KIND_ASSERT: "assert",
    ASSERT_KIND_EQ: "eq",
    ASSERT_KIND_NE: "ne",
    ASSERT_KIND_LT: "lt",
    ASSERT_KIND_LE: "le",
    ASSERT_KIND_GT: "gt",
    ASSERT_KIND_GE: "ge",
    ASSERT_KIND_FMT: "assert",
    ASSERT_KIND_FAIL: "fail",
}

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

    def __init__(
        self, cmd, stage=None, args=(), text=None, raw_args=(0,) * UCALL_MAX_ARGS, nargs=0, vcpu=None, guest_assert=None
    ):
        self.cmd, self.stage, self.args, self.text = cmd, stage, tuple(args), text
        self.raw_args, self.nargs, self.vcpu, self.guest_assert = tuple(raw_args), nargs, vcpu, guest_assert

    def __repr__(self):
        extra = f", text={self.text!r}" if self.text is not None else ""
        return (
            f"Ucall({UCALL_NAMES.get(self.cmd, self.cmd)}, vcpu={self.vcpu}, stage={self.stage!r}, "
            f"args={self.args!r}{extra})"
        )


def read_ucall(read, addr):
    """get_ucall(): copy the struct ucall at ``addr`` (the host's handle, a GPA) out with
    ``read(gpa, n)``: (cmd, args, nargs, text)."""
    raw = read(addr, UCALL_SIZE)
    (cmd,) = struct.unpack_from("<Q", raw, UCALL_OFF_CMD)
    args = struct.unpack_from(f"<{UCALL_MAX_ARGS}Q", raw, UCALL_OFF_ARGS)
    (nargs,) = struct.unpack_from("<Q", raw, UCALL_OFF_NARGS)
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


def is_scheduler_control(e):
    """An exception the scheduler or the explorer raises through a task to stop or steer it
    (a deadlock, the step limit, a replay that diverged, a run cut short): not a failure of the
    selftest's own code, so it goes on up."""
    from ..checkers.sched import Deadlock, StepLimit, ScheduleError, SleepBlocked

    return isinstance(e, (Deadlock, StepLimit, ScheduleError, SleepBlocked)) or type(e).__name__ == "InvariantBroken"


def describe_exception(e):
    """'AssertionError: message (at test_x.py:42)': where in the selftest's code it was raised."""
    import os
    import traceback

    where = ""
    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = traceback.extract_tb(e.__traceback__)
    for f in reversed(frames):
        if not os.path.abspath(f.filename).startswith(pkg + os.sep):
            where = f" (at {os.path.basename(f.filename)}:{f.lineno})"
            break
    text = str(e).strip().split("\n")[0]  # one line (pytest's assertion detail follows the first)
    return f"{type(e).__name__}{': ' + text if text else ''}{where}"


class UcallHost:
    """The VMM's side of ucalls (get_ucall() and what a selftest's vCPU thread does with one), a
    part of emu.userspace.vmm.Machine: the struct the guest pointed at is read through the VMM's
    mapping, recorded in the run's Result (syncs, printfs, a failed assert) and handed to the
    selftest's on_ucall callback on the vCPU's own task."""

    def _ucall(self, v, addr, res):
        """get_ucall(): the struct ucall the guest pointed at (the handle is its GPA, read
        through the VMM's mapping: shared memory), handled as a selftest's vCPU thread does."""
        if addr == GUEST_UCALL_FAILED:
            res.exit = "fail"
            res.error = f"vCPU {v.vcpu_id}: the guest failed to allocate a struct ucall (no free one in the pool)"
            return "fail"
        if addr == 0:
            uc = Ucall(UCALL_NONE, vcpu=v.vcpu_id)  # GUEST_UCALL_NONE()
        else:
            try:
                cmd, args, nargs, text = read_ucall(self.read_guest, addr)
            except KvmIoctlError:
                res.exit = "fail"
                res.error = f"vCPU {v.vcpu_id}: a ucall at {addr:#x}, outside the VMM's memory"
                return "fail"
            uc = Ucall(cmd, raw_args=args, nargs=nargs, vcpu=v.vcpu_id)
            if cmd == UCALL_SYNC:
                marker = self._sync_marker()
                if nargs >= 2 and args[0] == marker:  # GUEST_SYNC, GUEST_SYNC_ARGS
                    uc.stage, uc.args = args[1], tuple(args[2:nargs])
                elif nargs >= 1:  # GUEST_SYNC1..6
                    uc.stage, uc.args = args[0], tuple(args[1:nargs])
            elif cmd in (UCALL_PRINTF, UCALL_ABORT):
                uc.text = text
            if cmd == UCALL_ABORT:
                uc.guest_assert = self._ucall_assert(v.vcpu_id, args, text)
        return self._ucall_done(v, uc, res)

    def _sync_marker(self):
        sym = [a for a, _, n in self.image.symbols if n == "__ucall_sync_hello"]
        return sym[0] if sym else None

    def _ucall_done(self, v, uc, res):
        """What the VMM records of a ucall (syncs, printfs, a failed assert), then the selftest's
        callback on this vCPU's task; the vCPU's final exit, or None to run it again."""
        vid = v.vcpu_id
        outcome = None
        if uc.cmd == UCALL_SYNC:
            res.syncs.append((vid, uc.stage, *uc.args))
            if self.tracer.enabled:
                extra = f" args {', '.join(f'{a:#x}' for a in uc.args)}" if uc.args else ""
                self.tracer.emit("guest_sync", vid, msg=f"value {uc.stage:#x} ({uc.stage}){extra}")
        elif uc.cmd == UCALL_PRINTF:
            res.printfs.append((vid, uc.text))
            if self.tracer.enabled:
                self.tracer.emit("guest_printf", vid, msg=uc.text.rstrip("\n"))
        elif uc.cmd == UCALL_ABORT:
            if res.error is None:
                res.exit = "fail"
                res.guest_assert = uc.guest_assert
                res.error = f"vCPU {vid}: {uc.guest_assert['message']}"
            if self.tracer.enabled:
                self.tracer.emit("guest_assert", vid, msg=f"vCPU {vid}: {uc.guest_assert['message']}")
            outcome = "fail"
        elif uc.cmd not in (UCALL_DONE, UCALL_NONE):
            res.exit = "fail"
            res.error = f"vCPU {vid}: unknown ucall {uc.cmd:#x}"
            return "fail"
        fn = self.on_ucall
        if fn is not None:
            # (emu.checkers.dpor) the callback's Python state is not announced: it touches everything.
            self.kvm.touch_all()
            try:
                fn(vid, uc)
            except Exception as e:
                if is_scheduler_control(e):
                    raise
                self._host_failed(res, e, f"vCPU {vid}: on_ucall({UCALL_NAMES.get(uc.cmd, uc.cmd)})")
                return outcome or "host_assert"
        return outcome

    def _ucall_assert(self, vcpu, args, text):
        """A UCALL_ABORT's failed assert as a dict (vcpu, file, line, expr, kind, a, b, message),
        its strings read from the ELF image (what guest memory holds there: a TD's is private)."""
        kind = args[GUEST_ASSERT_KIND]
        expr = self.image.read_cstring(args[GUEST_ERROR_STRING]) or f"<expression at {args[0]:#x}>"
        file = self.image.read_cstring(args[GUEST_FILE]) or f"<file at {args[1]:#x}>"
        line = args[GUEST_LINE]
        a, b = args[GUEST_ASSERT_A], args[GUEST_ASSERT_B]
        return {
            "vcpu": vcpu,
            "file": file,
            "line": line,
            "expr": expr,
            "kind": KIND_NAMES.get(kind, "assert"),
            "a": a,
            "b": b,
            "message": assert_message(kind, file, line, expr, a, b, text),
        }
