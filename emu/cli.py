"""python -m emu: run a guest and watch its EPT violations being handled.

    python -m emu run GUEST [--vm default|tdx] [--mem SIZE] [--vcpus N] [--trace [text|jsonl]] [--json]

Exit status: 0 when the guest ended normally, 1 when it ended in an error exit
(a hang past --timeout or --max-insns too), 2 for bad input to the command, 130 and
143 when SIGINT or SIGTERM stopped it (the results so far are printed).  Errors are
one line on stderr, never a traceback (EMU_DEBUG=1 shows a bug's).
"""

import argparse
import os
import json
import sys

from .trace import Tracer, open_sink, EVENTS
from .userspace.vmm import Machine, MachineError, parse_size
from .userspace.watchdog import Signals, StatusLine


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        if "required: cmd" in message:
            message = "say what to do: run, explore, campaign, inject or fuzz (python -m emu --help)"
        raise UsageError(message)


def _add_run_options(p):
    p.add_argument("guest", help="a guest name from guest/, or a path to a .S, .c or ELF file")
    p.add_argument(
        "--vm",
        default="default",
        choices=("default", "sw-protected", "tdx"),
        help="VM type: default, sw-protected (KVM_X86_SW_PROTECTED_VM: private memory from "
        "guest_memfd, no hardware protection) or tdx (default: %(default)s)",
    )
    p.add_argument("--mem", default="64M", help="guest memory size, e.g. 64M, 4G (default: %(default)s)")
    p.add_argument("--vcpus", default=1, type=int, help="number of vCPUs (default: %(default)s)")
    p.add_argument(
        "--hugepages",
        choices=("4k", "2m", "1g"),
        default=None,
        help="page size of the host memory backing the guest (huge EPT mappings where aligned)",
    )
    p.add_argument(
        "--nx-huge-pages",
        action="store_true",
        help="KVM's NX huge page mitigation (kvm.nx_huge_pages=on): an exec fault maps 4K and "
        "marks the table; the 'nx-recover' host event zaps such tables",
    )
    p.add_argument(
        "--tdx-huge-pages",
        action="store_true",
        help="KVM's kvm_intel.tdx_huge_page (the S-EPT hugepage series, RFC v5): a TD's private "
        "memory mapped with 2M pages once the TD runs; needs --hugepages 2m (guest_memfd in "
        "2M folios) and implies --mirror-hooks 7.2",
    )
    p.add_argument(
        "--mirror-hooks",
        choices=("6.16", "7.2"),
        default=None,
        help="how KVM reflects a TD's mirror SPTEs into the S-EPT: 6.16, the seed's reflect_* "
        "freeze protocol (default), or 7.2, one set_external_spte(old, new) from "
        "__handle_changed_spte() (default with --tdx-huge-pages)",
    )
    p.add_argument(
        "--demote-interruptible",
        action="store_true",
        help="a TDX module without TDX_FEATURES0.ENHANCED_DEMOTE_INTERRUPTIBILITY (the tdx_1.5 "
        "source, which has no such bit): DEMOTE returns TDX_INTERRUPTED_RESTARTABLE on a "
        "pending host interrupt, and KVM keeps tdx_huge_page off",
    )
    p.add_argument(
        "--sept-ve-disable",
        choices=("on", "off"),
        default="on",
        help="the TD attribute SEPT_VE_DISABLE (QEMU's sept-ve-disable): off makes an access to an "
        "unaccepted page and a bare HLT a #VE for the guest (default: %(default)s; a TD's only)",
    )
    p.add_argument(
        "--trace",
        nargs="?",
        const="text",
        choices=("text", "jsonl", "perfetto"),
        default=None,
        help="write the trace (text when given no value; jsonl; perfetto: Chrome/Perfetto "
        "trace-event JSON) to stderr or --trace-file",
    )
    p.add_argument("--trace-file", default=None, help="write the trace here instead of stderr")
    p.add_argument("--trace-events", default=None, help="comma-separated event names to keep")
    p.add_argument(
        "--trace-gpa",
        default=None,
        metavar="START-END",
        help="keep only events about GPAs in [START, END) (events with no GPA are kept)",
    )
    p.add_argument(
        "--inject",
        action="append",
        default=[],
        metavar="PLAN",
        help="fault-injection plan POINT[@N|@every|@p=P][=ERROR] (repeatable; see `inject --list`)",
    )
    p.add_argument(
        "--dump-tables",
        action="store_true",
        help="print the mirror root, the S-EPT and the shared EPT side by side at the end of the run "
        "(the --trace-gpa range only, when given)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="'EVENT[@STEP]'",
        help="a host event on a host task, from scheduling point STEP on (repeatable): "
        "'migrate START-END', 'shared START-END', 'private START-END', 'nx-recover START-END', "
        "'punch START-END', 'delete START-END' (the range's memslot), 'move START-END TO'",
    )
    p.add_argument(
        "--bug",
        action="append",
        default=[],
        metavar="NAME",
        help="switch a realistic KVM bug into the model (repeatable; see `inject --list`)",
    )
    p.add_argument(
        "--timeout",
        default=None,
        metavar="SECONDS",
        type=_seconds,
        help="wall-clock limit of a run (of each run for explore and campaign); past it the run "
        "ends as a hang (exit 1)",
    )
    p.add_argument(
        "--max-insns",
        default=None,
        metavar="N",
        type=_count,
        help="limit of guest code per run, all vCPUs together, counted deterministically in "
        "translated blocks (each at least one instruction; docs/limits.md); past it the run "
        "ends as a hang.  explore and campaign default to 100x the clean run's, at least 10^7",
    )


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _count(text):
    """A positive whole number: 1000000, 1_000_000, 1e6 or 0x100."""
    try:
        value = int(text, 0)
    except ValueError:
        try:
            f = float(text)
            value = int(f) if f == int(f) else None
        except (ValueError, OverflowError):
            value = None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def check_host_and_bugs(args):
    from .userspace.hostevents import parse_host_event, HostEventError
    from .kvm.bugs import BUGS

    for text in args.host:
        try:
            parse_host_event(text)
        except HostEventError as e:
            raise UsageError(f"--host: {e}") from None
    for name in args.bug:
        if name not in BUGS:
            raise UsageError(f"--bug {name!r}: unknown bug; the bugs are: {', '.join(BUGS)}")


def td_attributes(args):
    """The TD's ATTRIBUTES: a debug TD, with SEPT_VE_DISABLE unless --sept-ve-disable off."""
    from tdxmod.abi import TD_ATTR_SEPT_VE_DISABLE, TD_ATTR_DEBUG

    return TD_ATTR_DEBUG | (TD_ATTR_SEPT_VE_DISABLE if getattr(args, "sept_ve_disable", "on") == "on" else 0)


def machine_options(args, mem):
    """The Machine options every command takes from its arguments (run and explore add
    --no-freeze, --inject and --seed; a campaign draws its own faults and seeds)."""
    return dict(
        vm=args.vm,
        mem=mem,
        vcpus=args.vcpus,
        hugepages=args.hugepages,
        nx_huge_pages=args.nx_huge_pages,
        td_attributes=td_attributes(args),
        host_events=args.host,
        bugs=args.bug,
        tdx_huge_pages=args.tdx_huge_pages,
        mirror_hooks=args.mirror_hooks,
        demote_interruptible=args.demote_interruptible,
    )


def hooks_note(args):
    """What an exploration's summary says of the mirror hooks when they are not 6.16's."""
    if getattr(args, "tdx_huge_pages", False) or getattr(args, "mirror_hooks", None) == "7.2":
        return ", mirror hooks 7.2" + (", TDX huge pages" if getattr(args, "tdx_huge_pages", False) else "")
    return ""


def machine_flags(args):
    """The options that shape the machine, for a reproducer's command line."""
    flags = ""
    if args.mem != "64M":
        flags += f" --mem {args.mem}"
    if getattr(args, "hugepages", None):
        flags += f" --hugepages {args.hugepages}"
    if getattr(args, "nx_huge_pages", False):
        flags += " --nx-huge-pages"
    if getattr(args, "no_freeze", False):
        flags += " --no-freeze"
    if getattr(args, "tdx_huge_pages", False):
        flags += " --tdx-huge-pages"
    if getattr(args, "mirror_hooks", None):
        flags += f" --mirror-hooks {args.mirror_hooks}"
    if getattr(args, "demote_interruptible", False):
        flags += " --demote-interruptible"
    if getattr(args, "sept_ve_disable", "on") == "off":
        flags += " --sept-ve-disable off"
    flags += "".join(f" --host '{h}'" for h in args.host)
    flags += "".join(f" --bug {b}" for b in args.bug)
    return flags


def _add_ray_options(p):
    p.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster: auto, HOST:PORT, ray://HOST:PORT, or local (a Ray runtime on "
        "this machine, for this run); the results are those without --ray",
    )
    # The tests' dying worker: the first try of this batch kills its Ray worker (os._exit).
    p.add_argument("--ray-kill-batch", type=int, default=None, help=argparse.SUPPRESS)


def build_parser():
    p = _Parser(prog="python -m emu", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run a guest")
    _add_run_options(run)
    run.add_argument("--seed", type=int, default=0, help="seed of the fault-injection plans (default 0)")
    run.add_argument(
        "--no-freeze",
        action="store_true",
        help="the bug switch: reflect mirror SPTEs without freezing them (before the seed patch)",
    )
    ex = sub.add_parser("explore", help="explore the vCPU interleavings of a guest")
    _add_run_options(ex)
    ex.add_argument(
        "--no-freeze",
        action="store_true",
        help="the bug switch: reflect mirror SPTEs without freezing them (before the seed patch)",
    )
    mode = ex.add_mutually_exclusive_group()
    mode.add_argument(
        "--bound", type=int, default=None, help="exhaustive depth-first search with at most K preemptions (default 2)"
    )
    mode.add_argument("--random", type=int, default=None, metavar="RUNS", help="RUNS random (PCT) schedules")
    mode.add_argument("--replay", default=None, metavar="SCHEDULE", help="run one printed schedule, traced")
    ex.add_argument(
        "--dpor",
        action="store_true",
        help="dynamic partial-order reduction: one schedule per class of equivalent "
        "interleavings (no preemption bound unless --bound K is given)",
    )
    ex.add_argument("--seed", type=int, default=0, help="seed of --random and of the injection plans (default 0)")
    ex.add_argument("--depth", type=int, default=3, help="PCT depth: priority change points + 1 (default 3)")
    ex.add_argument("--max-runs", type=int, default=None, help="stop the search after this many runs")
    ex.add_argument("--all", action="store_true", help="go on after the first failure, counting failures")
    ex.add_argument(
        "--check-steps",
        action="store_true",
        help="check the step invariants (emu.checkers.check.check_step) at every scheduling point",
    )
    _add_ray_options(ex)
    camp = sub.add_parser("campaign", help="many runs, each with randomly drawn fault plans (and schedules)")
    _add_run_options(camp)
    camp.add_argument("--runs", type=int, default=100, help="number of runs (default 100)")
    camp.add_argument("--seed", type=int, default=0, help="the campaign's seed: it names every run (default 0)")
    camp.add_argument(
        "--max-points",
        type=int,
        default=3,
        help="fault points drawn per run, at most (default 3; 0: only the --inject plans)",
    )
    _add_ray_options(camp)
    inj = sub.add_parser("inject", help="fault injection: list the fault points")
    inj.add_argument("--list", action="store_true", help="list every fault point, its errors and KVM's reaction")
    fz = sub.add_parser(
        "fuzz",
        help="a stateful fuzzer of the TDX module: SEAMCALLs and TDCALLs from two CPUs, "
        "every check after every call (docs/fuzzing.md)",
    )
    fz.add_argument("--calls", type=int, default=10000, help="SEAMCALLs to make, both CPUs' (default %(default)s)")
    fz.add_argument("--seed", type=int, default=0, help="the seed: it names the whole run (default 0)")
    fz.add_argument(
        "--second-cpu",
        type=float,
        default=0.25,
        metavar="P",
        help="probability that the second CPU runs a call at each of the module's scheduling "
        "points (default %(default)s; 0: one CPU)",
    )
    fz.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="stop after this long, reporting what was found"
    )
    fz.add_argument(
        "--minimize",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="time to shorten a failure's reproducer (default %(default)s)",
    )
    fz.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return p


def parse_gpa_range(text):
    try:
        a, sep, b = text.replace(":", "+", 1).partition("-") if "-" in text else text.partition("+")
        lo = int(a, 0)
        hi = int(b, 0) if sep == "-" else lo + parse_size(b)
    except (ValueError, MachineError):
        raise UsageError(f"--trace-gpa {text!r}: use START-END or START+SIZE (e.g. 0x1000000-0x1010000)") from None
    if hi <= lo:
        raise UsageError(f"--trace-gpa {text!r}: the range is empty")
    return lo, hi


def make_tracer(args):
    events = [e.strip() for e in args.trace_events.split(",")] if args.trace_events else None
    unknown = [e for e in events or () if e not in EVENTS]
    if unknown:
        raise UsageError(f"--trace-events: unknown event {unknown[0]!r}; the events are: {', '.join(EVENTS)}")
    if not args.trace and not args.trace_file:
        return Tracer()
    gpa_range = parse_gpa_range(args.trace_gpa) if args.trace_gpa else None
    try:
        sink = open_sink(args.trace or "text", args.trace_file)
    except OSError as e:
        raise UsageError(f"cannot open trace file: {e}") from None
    return Tracer([sink], events, gpa_range)


def check_plans(plans):
    from .checkers.inject import parse_rule, PlanError

    for text in plans:
        try:
            parse_rule(text)
        except PlanError as e:
            raise UsageError(f"--inject {text!r}: {e}") from None


def cmd_inject(args, out):
    from .checkers.inject import list_points

    if not args.list:
        raise UsageError("inject: say --list")
    out.write(list_points() + "\n")
    return 0


def cmd_run(args, out):
    check_plans(args.inject)
    check_host_and_bugs(args)
    mem = parse_size(args.mem)
    tracer = make_tracer(args)
    try:
        m = Machine(
            args.guest,
            tracer=tracer,
            no_freeze=args.no_freeze,
            inject=args.inject,
            seed=args.seed,
            **machine_options(args, mem),
        )
        m.max_insns, m.timeout, m.signals = args.max_insns, args.timeout, args.signals
        m.check_at_end = True
        if sys.stderr.isatty() and not args.json and not (tracer.enabled and args.trace_file is None):
            m.progress = StatusLine(sys.stderr)  # a long run's status line (not over a trace)
        res = m.run()
    finally:
        tracer.close()
    tables = None
    if args.dump_tables:
        from .dump import dump_tables

        lo, hi = parse_gpa_range(args.trace_gpa) if args.trace_gpa else (0, None)
        tables = dump_tables(m.kvm, lo, hi)
    if args.json:
        obj = res.as_json()
        if tables is not None:
            obj["tables"] = tables.splitlines()
        out.write(json.dumps(obj) + "\n")
    else:
        print_text(m, res, out)
        if tables is not None:
            out.write(tables + "\n")
    trace_error(tracer, args)
    return 0 if res.ok else 1


def trace_error(tracer, args):
    """A trace that could not be written (a full disk, /dev/full, a closed pipe): one line, exit 2
    (the results were printed first)."""
    if tracer.error is not None:
        e = tracer.error
        raise UsageError(f"cannot write the trace to {args.trace_file or 'stderr'}: {e.strerror or e}")


def quiet(args):
    """A signal from now on no longer interrupts (explore, campaign: the results are being printed)."""
    if args.signals is not None:
        args.signals.quiet()


def connect_ray(args):
    """The Ray cluster of --ray, or None; a bad address or a missing Ray is one line."""
    if args.ray is None:
        return None
    from .checkers.distributed import Cluster, ClusterError

    try:
        cluster = Cluster.connect(args.ray)
    except ClusterError as e:
        raise UsageError(str(e)) from None
    cluster.kill_batch = args.ray_kill_batch
    return cluster


def run_on(cluster, fn):
    """``fn()``, its cluster closed after it (a --ray local runtime stops); its errors one line."""
    from .checkers.distributed import ClusterError

    try:
        return fn()
    except ClusterError as e:
        raise UsageError(str(e)) from None
    finally:
        if cluster is not None:
            cluster.close()


def cmd_explore(args, out):
    from .checkers.explore import Explorer, CleanRunHangs
    from .checkers.sched import decode_schedule, ScheduleError

    check_plans(args.inject)
    check_host_and_bugs(args)
    mem = parse_size(args.mem)
    if args.replay is not None:
        try:
            decode_schedule(args.replay)
        except ScheduleError as e:
            raise UsageError(str(e)) from None
    if args.random is not None and args.random < 1:
        raise UsageError("--random needs at least 1 run")
    if args.bound is not None and args.bound < 0:
        raise UsageError("--bound must be 0 or more")
    if args.depth < 1:
        raise UsageError("--depth must be at least 1")
    if args.dpor and (args.random is not None or args.replay is not None):
        raise UsageError("--dpor is an exhaustive search: it does not combine with --random or --replay")
    if args.ray is not None and args.random is None:
        raise UsageError("--ray runs random exploration (--random RUNS) and campaigns")
    tracer = make_tracer(args)
    mk = dict(no_freeze=args.no_freeze, inject=args.inject, seed=args.seed, **machine_options(args, mem))
    ex = Explorer(
        lambda: Machine(args.guest, **mk), check_steps=args.check_steps, max_insns=args.max_insns, timeout=args.timeout
    )
    if args.replay is not None:
        o = ex.replay(args.replay)
        quiet(args)
        for line in o.trace or []:
            tracer.sinks[0].out.write(line + "\n") if tracer.enabled else None
        tracer.close()
        if args.json:
            out.write(
                json.dumps({"schedule": args.replay, "error": o.error, "reports": o.reports, "trace": o.trace}) + "\n"
            )
        else:
            out.write(f"replayed {args.replay}: {'FAILED: ' + o.error if o.error else 'passed'}\n")
        trace_error(tracer, args)
        return 1 if o.error else 0
    cluster = connect_ray(args)
    progress = _Progress(sys.stderr, cluster) if sys.stderr.isatty() and not args.json else None
    ex.progress = progress
    try:
        if args.random is not None:
            res = run_on(
                cluster,
                lambda: ex.random(
                    args.random,
                    seed=args.seed,
                    depth=args.depth,
                    stop_at_first=not args.all,
                    cluster=cluster and (cluster, mk),
                ),
            )
        elif args.dpor:
            res = ex.dpor(bound=args.bound, max_runs=args.max_runs, stop_at_first=not args.all)
        else:
            res = ex.dfs(
                bound=2 if args.bound is None else args.bound, max_runs=args.max_runs, stop_at_first=not args.all
            )
    except CleanRunHangs as e:
        raise MachineError(str(e)) from None
    quiet(args)  # what was found is printed whole
    if progress is not None:
        progress.done()
    f = res.first_failure
    if f is not None and tracer.enabled:
        for line in f.trace or []:
            tracer.sinks[0].out.write(line + "\n")
    tracer.close()
    if args.json:
        obj = res.as_json()
        if cluster is not None:
            obj["ray"] = cluster.stats()
        obj["exit"] = "interrupted" if res.interrupted else "done"
        obj["run_limit"] = ex.run_limit
        out.write(json.dumps(obj) + "\n")
    else:
        what = (
            f"random (PCT depth {args.depth}, seed {args.seed})"
            if args.random is not None
            else (
                "partial-order reduction"
                + ("" if args.bound is None else f", preemption bound {args.bound}")
                + f", {res.sleep_blocked} runs cut by sleep sets"
            )
            if args.dpor
            else f"exhaustive, preemption bound {2 if args.bound is None else args.bound}"
        )
        state = (
            "interrupted"
            if res.interrupted
            else "stopped at the first failure"
            if f is not None and not args.all
            else "complete"
            if res.complete
            else "stopped"
        )
        out.write(
            f"explored {res.runs} schedules of {args.guest} ({what}, {args.vcpus} vCPUs, "
            f"{'no freeze' if args.no_freeze else 'freeze protocol'}{hooks_note(args)}): {res.failures} failing, {state}, "
            f"{res.rate:.0f} schedules/s\n"
        )
        if cluster is not None:
            out.write(ray_line(cluster) + "\n")
        if f is not None:
            out.write(
                f"first failure: {f.error}\n  schedule:  {f.schedule}\n  minimized: {f.minimized} "
                f"({f.preemptions} preemptions)\n  replay: python -m emu explore {args.guest} --vm {args.vm} "
                f"--vcpus {args.vcpus}{machine_flags(args)}{limit_flags(args, ex.run_limit, f.error.startswith('hang: '))} "
                f"--replay '{f.minimized}' --trace\n"
            )
            if f.trace and not tracer.enabled:
                at, window = failure_window(f.trace)
                out.write(f"  events around the failure (event {at + 1} of {len(f.trace)}, every task):\n")
                for line in window:
                    out.write("    " + line.strip() + "\n")
    trace_error(tracer, args)
    return 1 if res.failures else 0


def cmd_campaign(args, out):
    from .checkers.campaign import Campaign, format_table, reproducer

    check_plans(args.inject)
    check_host_and_bugs(args)
    mem = parse_size(args.mem)
    if args.runs < 1:
        raise UsageError("--runs needs at least 1")
    tracer = make_tracer(args)
    mk = machine_options(args, mem)
    try:
        c = Campaign(
            lambda: Machine(args.guest, **mk),
            plans=args.inject,
            max_points=args.max_points,
            max_insns=args.max_insns,
            timeout=args.timeout,
        )
    except RuntimeError as e:
        raise MachineError(str(e)) from None
    cluster = connect_ray(args)
    progress = _Progress(sys.stderr, cluster) if sys.stderr.isatty() and not args.json else None
    if progress is not None:
        c.progress = lambda rep, total: progress.bar(len(rep.runs), total, len(rep.failures), rep.seconds)
    rep = run_on(cluster, lambda: c.run(args.runs, seed=args.seed, cluster=cluster and (cluster, mk)))
    quiet(args)  # what was found is printed whole
    if progress is not None:
        progress.done()
    if tracer.enabled and rep.failures:
        # --trace: the first failing run, traced (a campaign's other runs are not)
        for line in c.trace(rep.failures[0]):
            tracer.sinks[0].out.write(line + "\n")
    tracer.close()
    flags = machine_flags(args)
    if args.json:
        obj = rep.as_json()
        for f, r in zip(obj["failures"], rep.failures):
            f["reproducer"] = reproducer(args.guest, args.vm, args.vcpus, r, flags)
        for f, r in zip(obj["hangs"], rep.hangs):
            f["reproducer"] = reproducer(args.guest, args.vm, args.vcpus, r, flags + limit_flags(args, c.run_limit))
        if cluster is not None:
            obj["ray"] = cluster.stats()
        obj["exit"] = "interrupted" if rep.interrupted else "done"
        obj["run_limit"] = c.run_limit
        out.write(json.dumps(obj) + "\n")
    else:
        out.write(
            f"campaign on {args.guest} ({args.vm} VM, {args.vcpus} vCPUs, seed {args.seed}): "
            f"{len(rep.runs)} runs in {rep.seconds:.1f} s{' (interrupted)' if rep.interrupted else ''}\n"
        )
        if cluster is not None:
            out.write(ray_line(cluster) + "\n")
        out.write(format_table(rep) + "\n")
        for r in rep.failures:
            out.write(
                f"FAILED run {r.index}: {r.error}\n  reproduce: {reproducer(args.guest, args.vm, args.vcpus, r, flags)}\n"
            )
        for r in rep.hangs:
            out.write(
                f"HANG run {r.index}: {r.error}\n  reproduce: "
                f"{reproducer(args.guest, args.vm, args.vcpus, r, flags + limit_flags(args, c.run_limit))}\n"
            )
    trace_error(tracer, args)
    return 1 if rep.failures or rep.hangs else 0


def limit_flags(args, run_limit, hang=True):
    """The limits a reproducer of a hang needs to stop where the run did."""
    if not hang:
        return ""
    flags = f" --max-insns {run_limit}" if run_limit else ""
    return flags + (f" --timeout {args.timeout:g}" if args.timeout else "")


# Trace events that mark where a run went wrong, the first of which a failure report centers on.
FAILURE_EVENTS = ("kvm_bug_on:", "kvm_vm_dead:", "checker_violation:", "kvm_page_leaked:", "kvm_warn:")


def failure_window(trace, before=10, after=4):
    """(index of the first failure event, the lines around it): the events of every task that led
    to it, and what followed; the last lines when no event marks the failure."""
    at = next((i for i, line in enumerate(trace) if any(ev in line for ev in FAILURE_EVENTS)), None)
    if at is None:
        at = len(trace) - 1
        return at, trace[-(before + after) :]
    return at, trace[max(0, at - before) : at + after + 1]


def ray_line(cluster):
    s = cluster.stats()
    line = f"on Ray ({s['address']}): {s['workers']} workers"
    if s["rerun_batches"]:
        line += f", {s['rerun_batches']} batches run again after their worker died"
    return line


class _Progress:
    """One status line on a terminal: runs, rate, failures, and on Ray the live workers (Ctrl-C
    stops and keeps what was found)."""

    def __init__(self, out, cluster=None):
        self.out = out
        self.cluster = cluster
        self.last = 0.0
        self.width = 0

    def _workers(self):
        return f", {self.cluster.workers} workers" if self.cluster is not None else ""

    def _write(self, text):
        self.width = max(self.width, len(text))
        self.out.write("\r" + text.ljust(self.width))
        self.out.flush()

    def __call__(self, res):
        import time

        now = time.monotonic()
        if now - self.last < 0.5:
            return
        self.last = now
        self._write(f"  {res.runs} runs, {res.rate:.0f}/s, {res.failures} failing{self._workers()}")

    def bar(self, done, total, failures, seconds=0.0):
        import time

        now = time.monotonic()
        if now - self.last < 0.3 and done != total:
            return
        self.last = now
        width = 30
        filled = width * done // max(total, 1)
        rate = f", {done / seconds:.0f}/s" if seconds else ""
        self._write(
            f"  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} runs{rate}, {failures} failing{self._workers()}"
        )

    def done(self):
        self.out.write("\r" + " " * max(self.width, 60) + "\r")


def print_text(m, res, out):
    w = out.write
    w(f"guest {m.elf} on a {args_vm_name(m)} VM, {m.mem_size >> 20} MiB, {m.nvcpus} vCPU(s)")
    if m.td:
        w(f", shared bit {m.shared_bit:#x} (shared alias of a GPA = GPA | {m.shared_bit:#x})")
    w("\n")
    for vcpu, value in res.reports:
        w(f"  report  vcpu {vcpu}: {value:#x} ({value})\n")
    for vcpu, value, *args in res.syncs:
        w(
            f"  sync    vcpu {vcpu}: {value:#x} ({value})"
            + (f" args {', '.join(f'{a:#x}' for a in args)}" if args else "")
            + "\n"
        )
    for vcpu, text in res.printfs:
        for line in text.rstrip("\n").split("\n"):
            w(f"  printf  vcpu {vcpu}: {line}\n")
    for line in res.console.splitlines():  # the debug console (port 0xe9)
        w(f"  console {line}\n")
    if res.ok:
        w("exit: hlt (every vCPU halted)\n")
    else:
        w(f"exit: {res.exit}: {res.error}\n")
    if res.memory_fault is not None:
        mf = res.memory_fault
        w(
            f"memory fault: flags {mf['flags']:#x}, gpa {mf['gpa']:#x}, size {mf['size']:#x}"
            + (f" (KVM_RUN errno {res.errno})" if res.errno else "")
            + "\n"
        )
    s = res.stats
    pm = s["pages_mapped"]
    w(
        f"EPT violations: {s['ept_violations']}   pages mapped: 4K {pm['4k']}, 2M {pm['2m']}, 1G {pm['1g']}   "
        f"page tables: {s['page_tables']}   zaps: {s['zaps']}   TLB fills: {s['tlb_fills']}\n"
    )
    if s["seamcalls"]:
        w("SEAMCALLs: " + ", ".join(f"{k} {v}" for k, v in sorted(s["seamcalls"].items())) + "\n")


def cmd_fuzz(args, out):
    """The TDX module's fuzzer (emu.checkers.seamfuzz): the (leaf, status) pairs reached against those
    each handler can return; exit 1 with a reproducer when a check broke."""
    import time
    from .checkers.seamfuzz import SeamFuzzer, can_return, unreachable

    if args.calls < 1:
        raise UsageError("--calls needs at least 1 call")
    if not 0 <= args.second_cpu <= 1:
        raise UsageError("--second-cpu is a probability: from 0 to 1")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be more than 0 seconds")
    if args.minimize < 0:
        raise UsageError("--minimize must be 0 seconds or more")
    fz = SeamFuzzer(args.seed, second_cpu=args.second_cpu)
    tty = sys.stderr.isatty() and not args.json
    progress = (lambda f: sys.stderr.write(f"\r  {f.calls} calls, {len(f.pairs)} pairs ")) if tty else None
    deadline = None if args.timeout is None else time.perf_counter() + args.timeout
    fz.run(args.calls, deadline=deadline, on_progress=progress)
    if tty:
        sys.stderr.write("\r" + " " * 40 + "\r")
    failure = fz.failures[0] if fz.failures else None
    if failure is not None and args.minimize:
        try:
            failure = fz.minimize(failure, seconds=args.minimize)
        except KeyboardInterrupt:
            pass
    cov = fz.coverage()
    cr, un = can_return(), unreachable()
    timed_out = fz.interrupted and deadline is not None and time.perf_counter() >= deadline
    if args.json:
        pairs = {}
        for (leaf, st), n in sorted(fz.pairs.items()):
            pairs.setdefault(leaf, {})[st] = n
        out.write(
            json.dumps(
                {
                    "calls": fz.calls,
                    "second_cpu_calls": fz.second_calls,
                    "seed": args.seed,
                    "second_cpu": args.second_cpu,
                    "seconds": round(fz.seconds, 3),
                    "calls_per_second": round(fz.calls / fz.seconds, 1) if fz.seconds else 0,
                    "interrupted": fz.interrupted and not timed_out,
                    "timed_out": timed_out,
                    "failures": [failure.as_json()] if failure else [],
                    "coverage": cov,
                    "pairs": pairs,
                    "can_return": {leaf: sorted(sts) for leaf, sts in sorted(cr.items())},
                    "unreachable": [[leaf, st, why] for (leaf, st), why in sorted(un.items())],
                }
            )
            + "\n"
        )
    else:
        state = (
            "interrupted"
            if fz.interrupted and not timed_out
            else "stopped by --timeout"
            if timed_out
            else "a check broke"
            if failure
            else "no check broke"
        )
        out.write(
            f"fuzzed {fz.calls} calls ({fz.second_calls} of them the second CPU's at the module's scheduling "
            f"points, p={args.second_cpu:g}; seed {args.seed}): {state}, "
            f"{fz.calls / fz.seconds if fz.seconds else 0:.0f} calls/s\n"
        )
        out.write(
            f"coverage: {cov['reached']} of {cov['reachable']} reachable (leaf, status) pairs "
            f"({cov['percent']}%); {cov['possible'] - cov['reachable']} more pairs the handlers name cannot "
            f"be reached (docs/fuzzing.md)\n"
        )
        for leaf in sorted(cr):
            got = {st: n for (lf, st), n in fz.pairs.items() if lf == leaf}
            reach = sorted(st for st in cr[leaf] if (leaf, st) not in un)
            line = ", ".join(f"{st} {got[st]}" if st in got else f"{st} -" for st in reach)
            out.write(f"  {leaf}: {sum(1 for st in reach if st in got)}/{len(reach)}: {line}\n")
        if failure is not None:
            out.write(f"check broken ({failure.kind}) at call {failure.index}: {failure.message}\n")
            out.write(f"reproducer ({len(failure.records)} calls from a fresh module, seed {args.seed}):\n")
            for r in failure.records:
                from .checkers.seamfuzz import format_record

                out.write("  " + format_record(r) + "\n")
    if failure is not None:
        return 1
    return 130 if fz.interrupted and not timed_out else 0


def args_vm_name(m):
    return {"tdx": "TDX"}.get(m.vm_name, m.vm_name)


def main(argv=None, out=None):
    out = out or sys.stdout
    parser = build_parser()
    signals = None
    try:
        args = parser.parse_args(argv)
        cmd = {
            "run": cmd_run,
            "explore": cmd_explore,
            "inject": cmd_inject,
            "campaign": cmd_campaign,
            "fuzz": cmd_fuzz,
        }[args.cmd]
        # SIGINT and SIGTERM: `run` stops its vCPUs from the watchdog thread; explore and campaign
        # (whose process runs no guest code) stop with KeyboardInterrupt and keep their results.
        with _catch_signals("record" if args.cmd == "run" else "raise") as signals:
            args.signals = signals
            try:
                status = cmd(args, out)
            finally:
                from .checkers.forktree import kill_children

                kill_children()  # no process of a run outlives the command
        return (signals.exit_status if signals is not None else None) or status
    except UsageError as e:
        sys.stderr.write(f"emu: error: {e}\n")
        return _status(signals, 2)
    except MachineError as e:
        sys.stderr.write(f"emu: error: {e}\n")
        return _status(signals, 2)
    except KeyboardInterrupt:
        sys.stderr.write("emu: interrupted\n")
        return _status(signals, 130)
    except BrokenPipeError:
        # Whoever read our output went away (`| head`): nothing more to say, and no error at exit
        # when Python flushes stdout again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return _status(signals, 141)
    except Exception as e:  # a bug in emu itself: one line, the traceback on request
        if os.environ.get("EMU_DEBUG"):
            raise
        sys.stderr.write(f"emu: internal error: {type(e).__name__}: {e} (EMU_DEBUG=1 shows the traceback)\n")
        return _status(signals, 3)


def _status(signals, status):
    """A command a signal stopped exits with 130 (SIGINT) or 143 (SIGTERM), whatever else happened."""
    return (signals.exit_status if signals is not None else None) or status


def _catch_signals(mode):
    """Signals(mode) from the main thread; elsewhere (main() called from a thread) none are caught."""
    import contextlib
    import threading

    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext(None)
    return Signals(mode)
