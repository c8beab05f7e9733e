"""Host events: what the VMM or the host kernel does to a running VM, on a host task.

    --host 'migrate START-END[@STEP]'   page migration of the host pages behind guest [START, END)
    --host 'shared START-END[@STEP]'    KVM_SET_MEMORY_ATTRIBUTES to shared, and the hole punched in
                                        guest_memfd (as QEMU converts)  (a TD or a sw-protected VM)
    --host 'private START-END[@STEP]'   KVM_SET_MEMORY_ATTRIBUTES to private  (likewise)
    --host 'punch START-END[@STEP]'     fallocate(PUNCH_HOLE) on guest_memfd: private memory taken
                                        from under the TD (its data gone; a TD's huge pages the hole
                                        cuts are split first, so only the hole goes)  (a TD)
    --host 'nx-recover START-END[@STEP]'
                                        the NX huge page recovery worker (kvm_recover_nx_huge_pages,
                                        a kthread): zaps the possible NX huge pages of the range under
                                        mmu_lock for read  (--nx-huge-pages)

    --host 'delete START-END[@STEP]'    KVM_SET_USER_MEMORY_REGION deleting the memslot of [START, END)
    --host 'move START-END TO[@STEP]'   ... moving it to GPA TO (a memslot without guest_memfd: a
                                        default VM)
                                        For these two the VMM gives [START, END) a memslot of its own
                                        when it builds the VM; the guest's page tables also map
                                        [TO, TO + END - START).  A vCPU that touches the range once
                                        it is gone (KVM_EXIT_MEMORY_FAULT for a private access, MMIO
                                        for a shared one), or that touches [TO, ...) before the
                                        memslot is there (MMIO), stops there, as the scenario
                                        expects (private_mem_kvm_exits_test), and the run is not an
                                        error.

Each event runs on a host task that the scheduler interleaves with the vCPUs from
scheduling point STEP on (default 0); if every vCPU has finished by then, it runs then.
"""

import re

EVENTS = ("migrate", "shared", "private", "nx-recover", "punch", "delete", "move")
_SYNTAX = re.compile(r"^\s*([\w-]+)\s+(\S+?)-([^\s@]+)(?:\s+([^\s@]+))?\s*(?:@\s*(\d+))?\s*$")


class HostEventError(Exception):
    pass


class HostEvent:
    def __init__(self, kind, start, end, step=0, text=None, to=None):
        self.kind, self.start, self.end, self.step, self.to = kind, start, end, step, to
        self.text = text or (f"{kind} {start:#x}-{end:#x}" + (f" {to:#x}" if to is not None else "") + f"@{step}")
        self.slot = None  # (delete, move) the memslot the VMM gave the range

    def __repr__(self):
        return f"HostEvent({self.text!r})"


def parse_host_event(text):
    body, at, step_text = (text or "").partition("@")
    if at and not re.fullmatch(r"\s*\d+\s*", step_text):
        raise HostEventError(
            f"bad step in host event {text!r}: STEP (after @) is a scheduling point, a whole number (e.g. @40)"
        )
    m = _SYNTAX.match(text or "")
    if not m:
        raise HostEventError(
            f"bad host event {text!r}: the syntax is 'EVENT START-END[@STEP]' (or "
            f"'move START-END TO[@STEP]') with EVENT one of {', '.join(EVENTS)}"
        )
    kind, a, b, to, step = m.groups()
    if kind not in EVENTS:
        raise HostEventError(f"unknown host event {kind!r} in {text!r} (events: {', '.join(EVENTS)})")
    try:
        start, end = int(a, 0), int(b, 0)
    except ValueError:
        raise HostEventError(f"bad range in host event {text!r}: START-END are numbers (0x... for hex)") from None
    if start % 4096 or end % 4096 or end <= start:
        raise HostEventError(f"bad range in host event {text!r}: START < END, both 4 KiB aligned")
    if (kind == "move") != (to is not None):
        raise HostEventError(
            f"bad host event {text!r}: "
            + ("'move START-END TO' needs the GPA to move to" if kind == "move" else f"{kind} takes no TO")
        )
    if to is not None:
        try:
            to = int(to, 0)
        except ValueError:
            raise HostEventError(f"bad GPA in host event {text!r}: TO is a number (0x... for hex)") from None
        if to % 4096:
            raise HostEventError(f"bad GPA in host event {text!r}: TO must be 4 KiB aligned")
    return HostEvent(kind, start, end, int(step or 0), text.strip(), to)


def check_event(event, machine):
    """Refuse an event that cannot apply to this VM (one line, before anything runs)."""
    if event.end > machine.mem_size:
        raise HostEventError(f"host event {event.text!r}: GPA range outside guest memory ({machine.mem_size:#x} bytes)")
    if event.kind in ("shared", "private") and not getattr(machine, "private_mem", machine.td):
        raise HostEventError(
            f"host event {event.text!r}: memory attributes need a TD (--vm tdx) or a "
            f"software-protected VM (--vm sw-protected)"
        )
    if event.kind in ("delete", "move"):
        from .guestabi import LOADER_REGION

        if event.end > machine.mem_size - LOADER_REGION:
            raise HostEventError(
                f"host event {event.text!r}: the range reaches the loader's top "
                f"{LOADER_REGION >> 20} MiB of guest memory (page tables, stacks)"
            )
        for other in machine.host_events:
            if (
                other is not event
                and other.kind in ("delete", "move")
                and other.start < event.end
                and event.start < other.end
            ):
                raise HostEventError(f"host events {other.text!r} and {event.text!r}: memslot ranges overlap")
    if event.kind == "move":
        if machine.private_mem:
            raise HostEventError(
                f"host event {event.text!r}: a memslot with guest_memfd cannot be moved "
                f"(KVM refuses: private memslots are immutable); use a default VM"
            )
        if event.to < machine.mem_size:
            raise HostEventError(
                f"host event {event.text!r}: TO must lie above guest memory "
                f"({machine.mem_size:#x}), where no memslot is"
            )
    if event.kind == "punch" and not machine.td:
        raise HostEventError(f"host event {event.text!r}: guest_memfd (private memory) needs a TD (--vm tdx)")
    if event.kind == "migrate" and machine.backing_level != 1:
        raise HostEventError(
            f"host event {event.text!r}: page migration moves 4K pages; the guest's "
            f"memory is backed by huge pages (--hugepages)"
        )
    if event.kind == "nx-recover" and not getattr(machine, "nx_huge_pages", False):
        raise HostEventError(
            f"host event {event.text!r}: NX huge page recovery needs the mitigation on (--nx-huge-pages)"
        )


def run_event(event, machine, who):
    """The event's work, on its host task."""
    kvm = machine.kvm
    tracer = machine.tracer
    if tracer.enabled:
        tracer.emit("host_event", who, msg=f"{event.text} begins")
    if event.kind == "migrate":
        machine.migrate(event.start, event.end)
    elif event.kind == "nx-recover":
        kvm.recover_nx_huge_pages(event.start >> 12, event.end >> 12)
    elif event.kind == "punch":
        machine.gmem_punch_hole(event.start, event.end)
    elif event.kind == "delete":
        machine.removed_ranges.append((event.start, event.end))
        machine.delete_region(event.slot)
    elif event.kind == "move":
        machine.removed_ranges.append((event.start, event.end))
        machine.move_region(event.slot, event.to)
    else:
        private = event.kind == "private"
        kvm.set_memory_attributes(event.start >> 12, event.end >> 12, private=private)
        if not private:
            machine.gmem_punch_hole(event.start, event.end)
    if tracer.enabled:
        tracer.emit("host_event", who, msg=f"{event.text} done")
