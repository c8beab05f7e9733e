"""python -m emu: run a guest and watch its EPT violations being handled.

    python -m emu run GUEST [--vm default|tdx] [--mem SIZE] [--vcpus N] [--trace [text|jsonl]] [--json]

Exit status: 0 when the guest ended normally, 1 when it ended in an error exit,
2 for bad input to the command.  Errors are one line on stderr, never a traceback.
"""

import argparse
import os
import json
import sys

from .trace import Tracer, open_sink
from .vmm import Machine, MachineError, parse_size


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _add_run_options(p):
    p.add_argument("guest", help="a guest name from guest/, or a path to a .S or ELF file")
    p.add_argument("--vm", default="default", choices=("default", "tdx"), help="VM type (default: %(default)s)")
    p.add_argument("--mem", default="64M", help="guest memory size, e.g. 64M, 4G (default: %(default)s)")
    p.add_argument("--vcpus", default=1, type=int, help="number of vCPUs (default: %(default)s)")
    p.add_argument("--hugepages", choices=("4k", "2m", "1g"), default=None,
                   help="page size of the host memory backing the guest (huge EPT mappings where aligned)")
    p.add_argument("--trace", nargs="?", const="text", choices=("text", "jsonl"), default=None,
                   help="write the trace (text when given no value) to stderr or --trace-file")
    p.add_argument("--trace-file", default=None, help="write the trace here instead of stderr")
    p.add_argument("--trace-events", default=None, help="comma-separated event names to keep")
    p.add_argument("--inject", action="append", default=[], help="fault-injection plan (not yet available)")
    p.add_argument("--dump-tables", action="store_true", help="print the EPT tables at the end of the run")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def build_parser():
    p = _Parser(prog="python -m emu", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    _add_run_options(sub.add_parser("run", help="run a guest"))
    return p


def make_tracer(args):
    if not args.trace and not args.trace_file:
        return Tracer()
    events = [e.strip() for e in args.trace_events.split(",")] if args.trace_events else None
    try:
        sink = open_sink(args.trace or "text", args.trace_file)
    except OSError as e:
        raise UsageError(f"cannot open trace file: {e}") from None
    return Tracer([sink], events)


def cmd_run(args, out):
    if args.inject:
        raise UsageError("--inject: fault injection is not available yet in this version")
    mem = parse_size(args.mem)
    tracer = make_tracer(args)
    try:
        m = Machine(args.guest, vm=args.vm, mem=mem, vcpus=args.vcpus, tracer=tracer, hugepages=args.hugepages)
        res = m.run()
    finally:
        tracer.close()
    if args.json:
        out.write(json.dumps(res.as_json()) + "\n")
    else:
        print_text(m, res, out)
    if args.dump_tables:
        from .dump import dump_tables
        out.write(dump_tables(m.kvm) + "\n")
    return 0 if res.ok else 1


def print_text(m, res, out):
    w = out.write
    w(f"guest {m.elf} on a {args_vm_name(m)} VM, {m.mem_size >> 20} MiB, {m.nvcpus} vCPU(s)\n")
    for vcpu, value in res.reports:
        w(f"  report  vcpu {vcpu}: {value:#x} ({value})\n")
    if res.ok:
        w("exit: hlt (every vCPU halted)\n")
    else:
        w(f"exit: {res.exit}: {res.error}\n")
    s = res.stats
    pm = s["pages_mapped"]
    w(f"EPT violations: {s['ept_violations']}   pages mapped: 4K {pm['4k']}, 2M {pm['2m']}, 1G {pm['1g']}   "
      f"page tables: {s['page_tables']}   zaps: {s['zaps']}   TLB fills: {s['tlb_fills']}\n")
    if s["seamcalls"]:
        w("SEAMCALLs: " + ", ".join(f"{k} {v}" for k, v in sorted(s["seamcalls"].items())) + "\n")


def args_vm_name(m):
    return "TDX" if m.vm_type else "default"


def main(argv=None, out=None):
    out = out or sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return {"run": cmd_run}[args.cmd](args, out)
    except UsageError as e:
        sys.stderr.write(f"emu: error: {e}\n")
        return 2
    except MachineError as e:
        sys.stderr.write(f"emu: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("emu: interrupted\n")
        return 130
    except Exception as e:            # a bug in emu itself: one line, the traceback on request
        if os.environ.get("EMU_DEBUG"):
            raise
        sys.stderr.write(f"emu: internal error: {type(e).__name__}: {e} (EMU_DEBUG=1 shows the traceback)\n")
        return 3
