"""Trace events from every layer, and the sinks that write them.

An event is (seq, ts, vcpu, name, fields).  ``ts`` is a logical clock in
microseconds (one tick per event), so a run and its replay trace the same
bytes; ``seq`` orders events across vCPUs.  Event names are KVM's tracepoint
names where KVM has one (kvm_exit, kvm_entry, kvm_page_fault,
kvm_mmu_spte_requested, kvm_tdp_mmu_spte_changed, ...).  Fields are typed
(integers, strings, lists): the JSON-lines and Perfetto sinks keep them, the
text sink renders each event with its format below.

Sinks stream: each event is written when emitted, so nothing already traced is
lost when a run ends in an error.  The Perfetto sink writes a complete JSON
array (closing it when the tracer closes).  A sink whose output fails (a full disk,
a closed pipe) keeps the error and writes nothing more: the run goes on, and the
CLI reports it (``Tracer.error``).
"""

import json
import sys

# How the text sink renders an event (trace-cmd style).  Events not here print "key value" pairs.
FORMATS = {
    "kvm_entry": "vcpu {vcpu_id}, rip {rip:#x}",
    "kvm_exit": "vcpu {vcpu_id} reason {reason} rip {rip:#x} info1 {info1:#018x} info2 {info2:#018x} "
    "error_code {error_code:#010x}{detail}",
    "kvm_page_fault": "vcpu {vcpu_id} rip {rip:#x} address {address:#018x} error_code {error_code:#x}",
    "kvm_tdp_page_fault_done": "gfn {gfn:x} level {level} {root} ret {ret}",
    "kvm_mmu_spte_requested": "gfn {gfn:x} pfn {pfn:x} level {level} {root}",
    "kvm_tdp_mmu_spte_changed": "as id {as_id} gfn {gfn:x} level {level} old_spte {old_spte:x} new_spte {new_spte:x}",
    "kvm_mmu_set_spte": "gfn {gfn:x} level {level} spte {spte:x} ({decoded})",
    "kvm_tdp_mmu_spte_frozen": "gfn {gfn:x} level {level} old_spte {old_spte:x}",
    "kvm_tdp_mmu_spte_unfrozen": "gfn {gfn:x} level {level} {what} {spte:x}",
    "kvm_reflect": "{op} gfn {gfn:x} level {level} -> {ret}",
    "seamcall_entry": "{leaf} rcx {rcx:#x} rdx {rdx:#x} r8 {r8:#x}",
    "seamcall": "{leaf} rcx {rcx:#x} rdx {rdx:#x} r8 {r8:#x} -> {status}{outputs}",
    "tdcall": "{leaf} rcx {rcx:#x} -> {status}",
    "hw_walk": "{access} gva {gva:#x}: {walk}",
    "tdx_exit": "reason {reason} rip {rip:#x} {where}: {insn}",
    "kvm_pio": "pio_{rw} at {port:#x} size {size} count {count} val {val:#x}{more}",
    "kvm_msr": "msr_{rw} {index:x} = {data:#x}{ex} ({msr})",
    "kvm_cpuid": "func {function:x} idx {index:x} rax {rax:x} rbx {rbx:x} rcx {rcx:x} rdx {rdx:x}, "
    "cpuid entry {found}{used_max_basic}",
}


# Every event name the layers emit (--trace-events takes these; tests/test_trace.py checks that
# every name the code emits is here).
EVENTS = (
    "checker_violation",
    "guest_assert",
    "guest_console",
    "guest_printf",
    "guest_report",
    "guest_sync",
    "host_event",
    "host_migrate",
    "hw_event",
    "hw_walk",
    "inject",
    "kvm_bug_on",
    "kvm_cpuid",
    "kvm_entry",
    "kvm_exit",
    "kvm_flush_remote_tlbs",
    "kvm_hypercall",
    "kvm_mmio",
    "kvm_msr",
    "kvm_mmu_get_page",
    "kvm_mmu_prepare_zap_page",
    "kvm_mmu_set_spte",
    "kvm_mmu_split_huge_page",
    "kvm_mmu_spte_requested",
    "kvm_mmu_zap_all_fast",
    "kvm_nx_recover",
    "kvm_page_fault",
    "kvm_page_fault_stale",
    "kvm_page_leaked",
    "kvm_pio",
    "kvm_reflect",
    "kvm_set_memory_attributes",
    "kvm_set_memslot",
    "kvm_tdp_mmu_spte_changed",
    "kvm_tdp_mmu_spte_frozen",
    "kvm_tdp_mmu_spte_frozen_retry",
    "kvm_tdp_mmu_spte_unfrozen",
    "kvm_tdp_page_fault_done",
    "kvm_tdx_huge_page",
    "kvm_tlb_flush",
    "kvm_userspace_exit",
    "kvm_vm_dead",
    "kvm_warn",
    "sched_switch",
    "seamcall",
    "seamcall_entry",
    "soft_lockup",
    "tdcall",
    "tdx_exit",
)


class Stream:
    """A sink's output: a write that fails keeps the OSError in ``error`` and drops everything
    after it (a trace cut short, never the run)."""

    def __init__(self, out, owned=False):
        self.out = out
        self.owned = owned  # opened by open_sink: closed with the sink
        self.error = None

    def write(self, text):
        if self.error is None:
            try:
                self.out.write(text)
            except OSError as e:
                self.error = e

    def flush(self):
        if self.error is None:
            try:
                self.out.flush()
            except OSError as e:
                self.error = e

    def close(self):
        self.flush()
        if self.owned:
            try:
                self.out.close()
            except OSError as e:
                self.error = self.error or e


class Event:
    __slots__ = ("seq", "ts", "vcpu", "name", "fields")

    def __init__(self, seq, ts, vcpu, name, fields):
        self.seq, self.ts, self.vcpu, self.name, self.fields = seq, ts, vcpu, name, fields

    def as_dict(self):
        d = {"seq": self.seq, "ts": self.ts, "vcpu": self.vcpu, "event": self.name}
        d.update(self.fields)
        return d

    def text(self):
        fmt = FORMATS.get(self.name)
        if "msg" in self.fields:
            return self.fields["msg"]
        if fmt is not None:
            try:
                return fmt.format(**self.fields)
            except (KeyError, ValueError, TypeError):
                pass
        return " ".join(f"{k} {_fmt_value(k, v)}" for k, v in self.fields.items())


def _fmt_value(k, v):
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int) and k not in ("level", "vcpu", "count", "retries", "index", "as_id", "vcpu_id"):
        return f"{v:#x}"
    return str(v)


def format_text(ev):
    """One line in the style of `trace-cmd report`."""
    if isinstance(ev.vcpu, str):  # a host task ("host0"): a track of its own
        task, cpu = ev.vcpu, 0
    else:
        task = "emu" if ev.vcpu is None else f"vcpu-{ev.vcpu}"
        cpu = 0 if ev.vcpu is None else ev.vcpu
    return f"{task:>12} [{cpu:03d}] {ev.ts // 1000000:5d}.{ev.ts % 1000000:06d}: {ev.name + ':':<28} {ev.text()}"


def _stream(out):
    return out if isinstance(out, Stream) else Stream(out)


class TextSink:
    def __init__(self, out):
        self.out = _stream(out)

    def write(self, ev):
        self.out.write(format_text(ev) + "\n")

    def close(self):
        self.out.close()


class JsonlSink:
    def __init__(self, out):
        self.out = _stream(out)

    def write(self, ev):
        self.out.write(json.dumps(ev.as_dict()) + "\n")

    def close(self):
        self.out.close()


MODULE_TID = 1000  # the TDX module's track
HOST_TID = 2000  # host tasks' tracks (host0, host1, ...)
VMM_TID = 999  # userspace and setup (no vCPU)


class PerfettoSink:
    """Chrome/Perfetto trace-event JSON: one track (thread) per vCPU, one for the TDX module.

    Fault handling (kvm_page_fault .. kvm_tdp_page_fault_done) is a slice on the vCPU's
    track; each SEAMCALL is an async slice on the module's track (async, because with several
    vCPUs SEAMCALLs overlap); everything else is an instant event with its fields as args.
    Timestamps are the logical clock (one microsecond per event)."""

    def __init__(self, out):
        self.out = _stream(out)
        self.first = True
        self.tracks = set()
        self.out.write('{"displayTimeUnit": "ns", "traceEvents": [\n')
        self._meta(0, "process_name", {"name": "emu VM"}, pid=1)
        self.open_calls = {}
        self.open_faults = {}  # tid -> page-fault slices not closed yet
        self.last_ts = 0

    def _emit(self, obj):
        self.out.write(("" if self.first else ",\n") + json.dumps(obj))
        self.first = False

    def _meta(self, tid, name, args, pid=1):
        self._emit({"name": name, "ph": "M", "pid": pid, "tid": tid, "args": args})

    def _track(self, tid, label):
        if tid not in self.tracks:
            self.tracks.add(tid)
            self._meta(tid, "thread_name", {"name": label})

    def write(self, ev):
        self.last_ts = ev.ts
        if isinstance(ev.vcpu, str):  # a host task: its own track
            tid = HOST_TID + int(ev.vcpu.removeprefix("host") or 0)
            self._track(tid, f"host task {ev.vcpu}")
        else:
            tid = VMM_TID if ev.vcpu is None else ev.vcpu
            self._track(tid, "VMM / setup" if ev.vcpu is None else f"vCPU {ev.vcpu}")
        args = {k: v for k, v in ev.fields.items()}
        args["seq"] = ev.seq
        base = {"name": ev.name, "pid": 1, "tid": tid, "ts": ev.ts, "cat": ev.name.split("_")[0], "args": args}
        if ev.name in ("seamcall_entry", "seamcall"):
            self._track(MODULE_TID, "TDX module")
            key = ev.vcpu
            if ev.name == "seamcall_entry":
                self.open_calls.setdefault(key, []).append(ev.seq)
                self._emit(
                    dict(
                        base, name=ev.fields.get("leaf", "SEAMCALL"), cat="seamcall", ph="b", tid=MODULE_TID, id=ev.seq
                    )
                )
            else:
                stack = self.open_calls.get(key) or [ev.seq]
                sid = stack.pop()
                self._emit(
                    dict(base, name=ev.fields.get("leaf", "SEAMCALL"), cat="seamcall", ph="e", tid=MODULE_TID, id=sid)
                )
        elif ev.name == "kvm_page_fault":
            self.open_faults[tid] = self.open_faults.get(tid, 0) + 1
            self._emit(dict(base, name="page fault", ph="B"))
        elif ev.name == "kvm_tdp_page_fault_done" and self.open_faults.get(tid):
            self.open_faults[tid] -= 1
            self._emit(dict(base, name="page fault", ph="E"))
        else:
            self._emit(dict(base, ph="i", s="t"))

    def close(self):
        # A run that ended inside a fault or a SEAMCALL (an error exit): close what is open.
        for tid, n in self.open_faults.items():
            for _ in range(n):
                self._emit({"name": "page fault", "ph": "E", "pid": 1, "tid": tid, "ts": self.last_ts})
        for key, stack in self.open_calls.items():
            for sid in stack:
                self._emit(
                    {
                        "name": "SEAMCALL",
                        "cat": "seamcall",
                        "ph": "e",
                        "pid": 1,
                        "tid": MODULE_TID,
                        "ts": self.last_ts,
                        "id": sid,
                    }
                )
        self.out.write("\n]}\n")
        self.out.close()


class ListSink:
    """Keeps the events (tests, the explorer's failure reports)."""

    def __init__(self):
        self.events = []

    def write(self, ev):
        self.events.append(ev)

    def close(self):
        pass


class Tracer:
    """Hands events to its sinks.  ``enabled`` is False when there is no sink, and
    every emitter tests it first, so tracing off costs one attribute test.

    ``events`` keeps only those names; ``gpa_range`` (start, end) keeps only events
    about GPAs in that range (events with no GPA or GFN field always pass)."""

    def __init__(self, sinks=(), events=None, gpa_range=None):
        self.sinks = list(sinks)
        self.filter = set(events) if events else None
        self.gpa_range = gpa_range
        self.enabled = bool(self.sinks)
        self.seq = 0
        self.vcpu = None  # the vCPU running now (set by whoever switches vCPUs)
        self.symbolize = None  # addr -> "sym+0x12" (the VMM sets it from the guest ELF)

    def add_sink(self, sink):
        self.sinks.append(sink)
        self.enabled = True

    def wants(self, name):
        return self.enabled and (self.filter is None or name in self.filter)

    def emit(self, name, vcpu=-1, **fields):
        if self.filter is not None and name not in self.filter:
            return
        if self.gpa_range is not None and not self._in_range(fields):
            return
        self.seq += 1
        ev = Event(self.seq, self.seq, self.vcpu if vcpu == -1 else vcpu, name, fields)
        for s in self.sinks:
            s.write(ev)

    def _in_range(self, fields):
        lo, hi = self.gpa_range
        for key in ("gpa", "address"):
            v = fields.get(key)
            if isinstance(v, int):
                return lo <= v < hi
        gfn = fields.get("gfn")
        if isinstance(gfn, int):
            return lo <= gfn << 12 < hi
        return True

    def close(self):
        for s in self.sinks:
            s.close()

    @property
    def error(self):
        """The first OSError a sink's output met (the trace is cut short there), or None."""
        for s in self.sinks:
            out = getattr(s, "out", None)
            if getattr(out, "error", None) is not None:
                return out.error
        return None


NULL_TRACER = Tracer()

SINKS = {"text": TextSink, "jsonl": JsonlSink, "perfetto": PerfettoSink}


def open_sink(fmt, path=None):
    if fmt not in SINKS:
        raise ValueError(f"unknown trace format {fmt!r} (text, jsonl, perfetto)")
    out = Stream(sys.stderr) if path is None else Stream(open(path, "w"), owned=True)
    return SINKS[fmt](out)
