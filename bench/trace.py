"""The cost of tracing: off (the default) must cost nothing measurable on the fault path."""

from . import Result
from bench import hw
from .kvm import kvm_prepare, machine_prepare, NEWPAGES, GUEST
from emu.kvm.kvm import Kvm
from emu.trace import Tracer


class _Discard:
    def write(self, ev):
        pass

    def close(self):
        pass


def bench_trace_cost(ctx):
    """New 4K page with tracing off vs the trace calls removed (target: nothing measurable), and on."""
    # Baseline: KVM's trace calls compiled out (trace_emit a no-op); ours: tracing off as shipped.
    orig = Kvm.trace_emit
    Kvm.trace_emit = lambda self, *a, **k: None
    try:
        none, _ = hw.per_new_page(kvm_prepare, NEWPAGES, ctx.repeats)
    finally:
        Kvm.trace_emit = orig
    off, _ = hw.per_new_page(kvm_prepare, NEWPAGES, ctx.repeats)

    def traced_prepare(n):
        return machine_prepare(GUEST, "default", tracer=Tracer([_Discard()]))

    on, _ = hw.per_new_page(traced_prepare, NEWPAGES, max(2, ctx.repeats // 2))
    return [
        Result(
            "trace.off",
            "new 4K page, tracing off vs trace calls removed",
            off,
            "s/page",
            ratio=off / none,
            target=("<=", 1.05),
            ratio_note="off / no trace calls",
        ),
        Result(
            "trace.on",
            "new 4K page, tracing on (every event, discarded)",
            on,
            "s/page",
            ratio=on / off,
            ratio_note="on / off",
        ),
    ]
