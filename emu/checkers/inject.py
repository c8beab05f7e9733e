"""Fault injection: named fault points in every layer, and plans that make them fail.

A plan is ``POINT[@N|@every|@p=P][=ERROR]``:

    seamcall.TDH_MEM_PAGE_AUG@1=TDX_OPERAND_BUSY     the first AUG answers BUSY
    seamcall.TDH_MEM_SEPT_ADD@every=TDX_EPT_WALK_FAILED|0x1
    mmu_cache_alloc@p=0.1                            each allocation fails with probability 0.1
    spte_cmpxchg@3=lost                              the third SPTE cmpxchg loses to "another writer"

``@N`` is the Nth call of the point (default @1), ``@every`` every call, ``@p=P`` each call with
probability P drawn from the plan's seeded generator: the same plans and seed give the same run.
ERROR is what the point returns (a status name or number for a SEAMCALL, an errno name for KVM's
points); without it, the point's default.  ``python -m emu inject --list`` lists them.

When no plan is active, ``kvm.inject`` and ``module.inject`` are None and each point costs one test.
"""

import random

from tdxmod import abi as A

ERRNO = {"ENOMEM": 12, "EBUSY": 16, "EIO": 5, "EFAULT": 14, "EINVAL": 22, "EAGAIN": 11}


class PlanError(ValueError):
    """A plan that names no fault point or no error the point can return: one line for the user."""


class Point:
    def __init__(self, name, where, errors, default, reaction):
        self.name, self.where, self.errors, self.default, self.reaction = name, where, errors, default, reaction

    def parse_error(self, text):
        if text is None:
            return self.default
        if self.errors == "status":
            return parse_status(text)
        if text.upper() in self.errors:
            return self.errors[text.upper()]
        raise PlanError(f"fault point {self.name} cannot fail with {text!r} (it can: {', '.join(self.errors)})")

    def describe_errors(self):
        return "a TDX status (name or number)" if self.errors == "status" else ", ".join(self.errors)

    def error_name(self, value):
        if self.errors == "status":
            return A.status_name(value)
        for k, v in self.errors.items():
            if v == value:
                return k
        return str(value)


def _kvm_errno(*names):
    return {n: -ERRNO[n] for n in names}


POINTS = {}


def _register(p):
    POINTS[p.name] = p


for _leaf, _name in sorted(A.SEAMCALL_NAMES.items()):
    _register(
        Point(
            f"seamcall.{_name}",
            "the TDX module, at SEAMCALL entry (no state changes)",
            "status",
            A.TDX_OPERAND_BUSY,
            "as KVM handles that status for that leaf",
        )
    )
_register(
    Point(
        "mmu_cache_alloc",
        "KVM: a page for the vCPU's MMU memory caches (top-up before mmu_lock)",
        _kvm_errno("ENOMEM"),
        -ERRNO["ENOMEM"],
        "the fault fails with -ENOMEM: KVM_RUN returns it",
    )
)
_register(
    Point(
        "backing_alloc",
        "KVM: faulting in the host page behind a GFN (faultin_pfn)",
        _kvm_errno("EFAULT"),
        -ERRNO["EFAULT"],
        "the fault fails with -EFAULT: KVM_RUN returns it",
    )
)
_register(
    Point(
        "spte_cmpxchg",
        "KVM: tdp_mmu_set_spte_atomic's cmpxchg (and the freeze's)",
        {"LOST": "lost"},
        "lost",
        "-EBUSY: the fault returns RET_PF_RETRY and the guest faults again",
    )
)
_register(
    Point(
        "tlb_flush",
        "KVM: kvm_flush_remote_tlbs",
        {"DELAYED": "delayed"},
        "delayed",
        "the flush requests reach the vCPUs only with the next flush: a stale translation may be used",
    )
)
_register(
    Point(
        "tdx.host_interrupt",
        "the TDX module: a host interrupt pending where DEMOTE (without "
        "ENHANCED_DEMOTE_INTERRUPTIBILITY) and PROMOTE look for one",
        {"PENDING": "pending"},
        "pending",
        "TDX_INTERRUPTED_RESTARTABLE, nothing done: KVM turns huge pages off on such a module, so "
        "only PROMOTE (never called by KVM) or a bug switch meets it",
    )
)
for _op in ("link_spt", "set_spte", "remove_spte", "free_spt", "split_spte"):
    _register(
        Point(
            f"reflect.{_op}",
            f"KVM: the x86 op reflect_{_op} (before its SEAMCALLs)",
            _kvm_errno("EBUSY", "EIO"),
            -ERRNO["EBUSY"],
            {
                "link_spt": "-EBUSY: old SPTE restored, fault retried; -EIO: KVM_BUG_ON",
                "set_spte": "-EBUSY: old SPTE restored, fault retried; -EIO: KVM_BUG_ON",
                "remove_spte": "any error: KVM_BUG_ON (the VM is dead)",
                "free_spt": "any error: the S-EPT page is leaked on purpose (accounted)",
                "split_spte": "(--mirror-hooks 7.2, a split: BLOCK, TRACK, DEMOTE) any error: KVM_BUG_ON",
            }[_op],
        )
    )


def parse_status(text):
    t = text.strip()
    base, _, detail = t.partition("|")
    try:
        value = int(base, 0)
    except ValueError:
        name = base.upper()
        if not name.startswith("TDX_"):
            name = "TDX_" + name
        value = getattr(A, name, None)
        if not isinstance(value, int) or name not in A.STATUS_NAMES.values():
            raise PlanError(
                f"unknown TDX status {base!r} (e.g. TDX_OPERAND_BUSY, TDX_EPT_WALK_FAILED|0x1, or a number)"
            ) from None
    if detail:
        try:
            value |= int(detail, 0)
        except ValueError:
            raise PlanError(f"bad status detail {detail!r} in {text!r}") from None
    return value & ((1 << 64) - 1)


class Rule:
    def __init__(self, text, point, when, n, p, error):
        self.text, self.point, self.when, self.n, self.p, self.error = text, point, when, n, p, error

    def __repr__(self):
        return f"Rule({self.text})"


def parse_rule(text):
    t = text.strip()
    if not t:
        raise PlanError("empty fault-injection plan")
    spec, eq, err = t.partition("=")
    # "@p=0.1" has an '=' of its own: put it back.
    if spec.endswith("@p") or spec.endswith("@P"):
        prob, eq2, err = err.partition("=")
        spec = f"{spec}={prob}"
        eq = eq2
    name, at, trig = spec.partition("@")
    point = POINTS.get(name.strip())
    if point is None:
        close = [p for p in POINTS if name.strip().lower() in p.lower()][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise PlanError(f"unknown fault point {name.strip()!r}{hint}; `python -m emu inject --list` lists them")
    when, n, p = "nth", 1, None
    if at:
        trig = trig.strip()
        if trig == "every":
            when = "every"
        elif trig.startswith("p="):
            when = "p"
            try:
                p = float(trig[2:])
            except ValueError:
                raise PlanError(f"bad probability in {t!r}") from None
            if not 0 <= p <= 1:
                raise PlanError(f"probability {p} in {t!r} is not between 0 and 1")
        else:
            try:
                n = int(trig)
            except ValueError:
                raise PlanError(f"bad trigger {trig!r} in {t!r}: use @N, @every or @p=P") from None
            if n < 1:
                raise PlanError(f"bad trigger {trig!r} in {t!r}: calls count from 1")
    error = point.parse_error(err.strip() if eq else None)
    return Rule(t, point.name, when, n, p, error)


class Plan:
    """Active rules, their seeded generator, and what fired."""

    def __init__(self, rules=(), seed=0, tracer=None, count_all=False):
        self.rules = {}
        for r in rules:
            r = parse_rule(r) if isinstance(r, str) else r
            self.rules.setdefault(r.point, []).append(r)
        self.rng = random.Random(seed)
        self.seed = seed
        self.calls = {}
        self.fired = []  # (point, call number, error)
        self.tracer = tracer
        self.count_all = count_all  # count the calls of every point (to plan campaigns)

    def _check(self, point):
        rules = self.rules.get(point)
        if rules is None:
            if self.count_all:
                self.calls[point] = self.calls.get(point, 0) + 1
            return None
        n = self.calls[point] = self.calls.get(point, 0) + 1
        for r in rules:
            if r.when == "every" or (r.when == "nth" and n == r.n) or (r.when == "p" and self.rng.random() < r.p):
                self.fired.append((point, n, r.error))
                if self.tracer is not None and self.tracer.enabled:
                    self.tracer.emit("inject", msg=f"{point} call {n} fails: {POINTS[point].error_name(r.error)}")
                return r.error
        return None

    def should_fail(self, point):
        """A KVM fault point: the injected error (truthy) or None."""
        return self._check(point)

    def seamcall_status(self, leaf_name):
        return self._check("seamcall." + leaf_name)

    @property
    def points(self):
        return sorted(self.rules)


# -- the reaction upstream's code gives each fault (what a campaign judges a run by) --------------------
# Outcomes (emu/campaign.py): "survived" (the fault-free results; a leak upstream accepts is accounted
# and still survives), "guest_error" (a clean error exit: KVM_RUN fails, the watchdog), "kvm_bug_on".
SURVIVED, ERROR_EXIT, BUG_ON = "survived", "guest_error", "kvm_bug_on"

# SEAMCALLs whose BUSY KVM retries until it goes through (the fault is retried, the TD entered again).
_BUSY_RETRIED = {"TDH_MEM_SEPT_ADD", "TDH_MEM_PAGE_AUG", "TDH_VP_ENTER"}
# SEAMCALLs whose BUSY KVM retries once, with no vCPU entering (tdx_no_vcpus_enter_start/stop).
_BUSY_RETRIED_ONCE = {"TDH_MEM_RANGE_BLOCK", "TDH_MEM_TRACK", "TDH_MEM_PAGE_REMOVE", "TDH_MEM_PAGE_DEMOTE"}
# Any failure is a KVM_BUG_ON.
_BUG_ON = (
    {"TDH_PHYMEM_PAGE_WBINVD", "TDH_VP_WR", "TDH_VP_FLUSH", "TDH_MNG_VPFLUSHDONE", "TDH_MNG_KEY_FREEID"}
    | _BUSY_RETRIED
    | _BUSY_RETRIED_ONCE
)
# A failure leaks the page, as upstream accepts (accounted).
_LEAKED = {"TDH_PHYMEM_PAGE_RECLAIM"}


def expected_outcomes(rule):
    """The outcomes upstream's code allows a run in which ``rule`` fired (a frozenset).

    A fault that fires on every call (or at random) may make progress impossible: then a clean
    error exit (the watchdog) is allowed too.  Points not listed here run only while a VM is built
    or torn down, where the model's reaction is not yet checked against upstream: any clean end."""
    name, err, persistent = rule.point, rule.error, rule.when != "nth"
    stuck = {ERROR_EXIT} if persistent else set()
    if name.startswith("seamcall."):
        leaf = name[len("seamcall.") :]
        busy = isinstance(err, int) and (err & A.TDX_STATUS_MASK) in (
            A.TDX_OPERAND_BUSY,
            A.TDX_OPERAND_BUSY_HOST_PRIORITY,
        )
        if busy and leaf in _BUSY_RETRIED:
            return frozenset({SURVIVED} | stuck)
        if busy and leaf in _BUSY_RETRIED_ONCE:
            return frozenset({SURVIVED, BUG_ON} if persistent else {SURVIVED})
        if leaf in _BUG_ON:
            return frozenset({BUG_ON})
        if leaf in _LEAKED:
            return frozenset({SURVIVED})
        return frozenset({SURVIVED, ERROR_EXIT, BUG_ON})
    if name == "mmu_cache_alloc":
        # kvm_mmu_topup_memory_cache() fails only below the minimum: a top-up that already has
        # enough objects goes on without the page.
        return frozenset({ERROR_EXIT, SURVIVED})
    if name == "backing_alloc":
        return frozenset({ERROR_EXIT})
    if name == "spte_cmpxchg":
        return frozenset({SURVIVED} | stuck)
    if name in ("reflect.link_spt", "reflect.set_spte"):
        if err == -ERRNO["EBUSY"]:
            return frozenset({SURVIVED} | stuck)
        return frozenset({BUG_ON})
    if name in ("reflect.remove_spte", "reflect.split_spte"):
        return frozenset({BUG_ON})
    if name == "tdx.host_interrupt":
        return frozenset({SURVIVED})
    if name in ("reflect.free_spt", "tlb_flush"):
        return frozenset({SURVIVED})
    return frozenset({SURVIVED, ERROR_EXIT, BUG_ON})


def judge(rules, fired_points, outcome):
    """None when ``outcome`` is a reaction upstream gives to the faults that fired, else why not.

    Each fired fault allows its outcomes; a fault whose reaction must show (its set has no
    "survived") forbids surviving: the error was swallowed."""
    fired = [r for r in rules if r.point in fired_points]
    if not fired:
        return None if outcome == SURVIVED else f"{outcome} with no fault injected"
    allowed = frozenset().union(*(expected_outcomes(r) for r in fired))
    if outcome == SURVIVED and any(SURVIVED not in expected_outcomes(r) for r in fired):
        must = [r.text for r in fired if SURVIVED not in expected_outcomes(r)]
        return f"survived, but upstream does not survive {', '.join(must)}"
    if outcome not in allowed:
        return (
            f"{outcome}, but upstream's reaction to {', '.join(r.text for r in fired)} is "
            f"{' or '.join(sorted(allowed))}"
        )
    return None


def _reaction_classes(point):
    """For inject --list: the judged outcomes of each kind of error at this point."""

    class _R:
        def __init__(self, err, when="nth"):
            self.point, self.error, self.when, self.text = point.name, err, when, ""

    if point.errors == "status":
        busy = expected_outcomes(_R(A.TDX_OPERAND_BUSY))
        other = expected_outcomes(_R(A.TDX_OPERAND_INVALID))
        return f"BUSY: {' or '.join(sorted(busy))}; other statuses: {' or '.join(sorted(other))}"
    return "; ".join(f"{e}: {' or '.join(sorted(expected_outcomes(_R(v))))}" for e, v in point.errors.items())


def list_points():
    lines = []
    for name, p in POINTS.items():
        default = "" if p.default is None else f" (default {p.error_name(p.default)})"
        lines.append(
            f"{name:<36} {p.where}\n{'':<36} errors: {p.describe_errors()}{default}\n"
            f"{'':<36} KVM's reaction: {p.reaction}\n"
            f"{'':<36} campaigns accept (a fault that fires once): {_reaction_classes(p)}"
        )
    return "\n".join(lines)
