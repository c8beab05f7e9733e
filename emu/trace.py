"""Trace events from every layer, and the sinks that write them.

An event is (seq, ts, vcpu, name, fields).  ``ts`` is a logical clock in
microseconds (one tick per event), so a run and its replay trace the same
bytes; ``seq`` orders events across vCPUs.  Event names are KVM's tracepoint
names where KVM has one (kvm_exit, kvm_entry, kvm_page_fault,
kvm_mmu_spte_requested, kvm_tdp_mmu_spte_changed, ...).

Sinks stream: each event is written when emitted, so nothing already traced is
lost when a run ends in an error.
"""

import json
import sys


class Event:
    __slots__ = ("seq", "ts", "vcpu", "name", "fields")

    def __init__(self, seq, ts, vcpu, name, fields):
        self.seq, self.ts, self.vcpu, self.name, self.fields = seq, ts, vcpu, name, fields

    def as_dict(self):
        d = {"seq": self.seq, "ts": self.ts, "vcpu": self.vcpu, "event": self.name}
        d.update(self.fields)
        return d


def _fmt_value(k, v):
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int) and k not in ("level", "vcpu", "count", "retries", "index", "as_id"):
        return f"{v:#x}"
    return str(v)


def format_text(ev):
    """One line in the style of `trace-cmd report`."""
    task = "emu" if ev.vcpu is None else f"vcpu-{ev.vcpu}"
    cpu = 0 if ev.vcpu is None else ev.vcpu
    msg = ev.fields.get("msg")
    if msg is None:
        msg = " ".join(f"{k} {_fmt_value(k, v)}" for k, v in ev.fields.items())
    return f"{task:>12} [{cpu:03d}] {ev.ts // 1000000:5d}.{ev.ts % 1000000:06d}: {ev.name + ':':<28} {msg}"


class TextSink:
    def __init__(self, out):
        self.out = out

    def write(self, ev):
        self.out.write(format_text(ev) + "\n")

    def close(self):
        self.out.flush()


class JsonlSink:
    def __init__(self, out):
        self.out = out

    def write(self, ev):
        self.out.write(json.dumps(ev.as_dict()) + "\n")

    def close(self):
        self.out.flush()


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
    every emitter tests it first, so tracing off costs one attribute test."""

    def __init__(self, sinks=(), events=None):
        self.sinks = list(sinks)
        self.filter = set(events) if events else None
        self.enabled = bool(self.sinks)
        self.seq = 0
        self.vcpu = None                  # the vCPU running now (set by whoever switches vCPUs)

    def add_sink(self, sink):
        self.sinks.append(sink)
        self.enabled = True

    def emit(self, name, vcpu=-1, **fields):
        if self.filter is not None and name not in self.filter:
            return
        self.seq += 1
        ev = Event(self.seq, self.seq, self.vcpu if vcpu == -1 else vcpu, name, fields)
        for s in self.sinks:
            s.write(ev)

    def close(self):
        for s in self.sinks:
            s.close()


NULL_TRACER = Tracer()


def open_sink(fmt, path=None):
    out = sys.stderr if path is None else open(path, "w")
    if fmt == "text":
        return TextSink(out)
    if fmt == "jsonl":
        return JsonlSink(out)
    raise ValueError(f"unknown trace format {fmt!r} (text, jsonl)")
