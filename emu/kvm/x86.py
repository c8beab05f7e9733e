"""The vCPU run loop and x86's common exit handling (arch/x86/kvm/x86.c): KVM_RUN (vcpu_run,
vcpu_enter_guest: requests, IN_GUEST_MODE, the last look at requests, the vendor's run and
exit handler), KVM_REQ_VM_DEAD's -EIO, kvm_emulate_hypercall, kvm_read_guest_virt.
"""

import zlib

from ..hw.vcpu import Vcpu
from ..hw.exits import VECTOR_NAMES  # noqa: F401
from .kvm_host import (
    KvmIoctlError,
    KvmRun,
    EIO,
    KVM_ENOSYS,
    KVM_REQ_TLB_FLUSH,
    KVM_REQ_MMU_FREE_OBSOLETE_ROOTS,
    KVM_REQ_VM_DEAD,
    OUTSIDE_GUEST_MODE,
    IN_GUEST_MODE,
    EXITING_GUEST_MODE,
)
from .mmu import KvmMmuMemoryCache
from .spte import SHADOW_NONPRESENT_VALUE
from .uapi import (
    KVM_EXIT_INTR,
    KVM_EXIT_HYPERCALL,
    EXIT_NAMES,
    KVM_HC_MAP_GPA_RANGE,
    KVM_EINVAL,
    KVM_EXIT_HYPERCALL_LONG_MODE,
)


def complete_hypercall_exit(vcpu, run):
    """complete_hypercall_exit(): the guest's RAX = kvm_run.hypercall.ret; on to the guest."""
    vcpu.hw.set_reg("rax", run.ret & ((1 << 64) - 1))
    return 1


class KvmVcpuX86:
    """struct kvm_vcpu (x86): the run loop."""

    def __init__(self, kvm, vcpu_id):
        self.kvm = kvm
        self.vcpu_id = vcpu_id
        # The CPU context: KVM's own for a VMX vCPU; for a TD the module's (set by vcpu_create).
        self.hw = None if kvm.has_mirrored_tdp else Vcpu(kvm.mem, vcpu_id)
        if self.hw is not None:
            # vmx_update_exception_bitmap() with EPT: #PF is not intercepted; #UD, #DB, #AC, #MC are.
            self.hw.exception_bitmap = (1 << 6) | (1 << 1) | (1 << 17) | (1 << 18)
        if self.hw is not None and kvm.tracer.enabled:
            self.hw.set_tracer(kvm.tracer)
        self.root = None
        self.mirror_root = None
        self.root_level = kvm.root_level
        self.requests = 0
        self.mode = OUTSIDE_GUEST_MODE
        self.mmu_shadow_page_cache = KvmMmuMemoryCache(kvm, "mmu_shadow_page_cache", SHADOW_NONPRESENT_VALUE)
        self.mmu_external_spt_cache = KvmMmuMemoryCache(kvm, "mmu_external_spt_cache")
        self.stat = {
            "exits": 0,
            "ept_violations": 0,
            "ept_misconfigs": 0,
            "pf_taken": 0,
            "pf_fixed": 0,
            "pf_spurious": 0,
            "pf_emulate": 0,
            "pf_retry": 0,
            "pf_mmio_spte_created": 0,
            "hypercalls": 0,
            "halt_exits": 0,
            "tlb_flush": 0,
        }
        self.arch = None  # per-vendor vCPU state (struct vcpu_tdx for a TD)
        self.last_pf_ret = None  # the RET_PF_* of the last fault (TDX's local retry)
        self.complete_userspace_io = None
        self.kvm_run = None
        # The VMM's watchdog: a KVM_RUN that takes this many exits (and local fault retries)
        # without a fault that fixed anything gets a signal (a livelocked fault, e.g. a
        # cmpxchg that always loses, a module that always says BUSY).
        self.exit_limit = 2000
        self.budget = self.exit_limit
        self.signal_pending = False
        self.srcu_idx = None  # the kvm->srcu index while in KVM_RUN outside guest mode

    # -- registers ------------------------------------------------------------------------------------------
    def get_regs(self):
        return self.kvm.x86_ops.get_regs(self)

    def set_regs(self, regs):
        self.kvm.x86_ops.set_regs(self, regs)

    def tick(self):
        """One VM exit (or local fault retry) of this KVM_RUN: the watchdog counts them."""
        self.budget -= 1
        if self.budget < 0:
            self.signal_pending = True

    def kvm_vcpu_exit_request(self):
        """kvm_vcpu_exit_request(): the last look before entering, with IN_GUEST_MODE set: a
        kick, a request, or a signal (xfer_to_guest_mode_work_pending())."""
        return self.mode == EXITING_GUEST_MODE or bool(self.requests) or self.signal_pending

    def touch_guest(self):
        """(emu.checkers.dpor) What guest code may have touched in the step that ends: every page its
        TLB maps (written, for all we know), the EPT entries behind them, and in a TD the
        S-EPT (the TDX module's state)."""
        sched = self.kvm.sched
        if getattr(sched, "fp", None) is None:
            return
        hw = self.hw
        crc, buf = hw.page_crc, hw.mem.buf
        for hpa in set(hw.tlb_shadow.values()):
            # Written if its contents changed since this vCPU last looked (a write of the same
            # value commutes with reads, and a write of another value conflicts anyway).
            c = zlib.crc32(buf[hpa : hpa + 4096])
            if crc is None or crc.get(hpa) != c:
                sched.touch(("page", hpa >> 12))
                if crc is not None:
                    crc[hpa] = c
            else:
                sched.touch(("page", hpa >> 12), False)
        self.touch_tlb()

    def touch_tlb(self):
        """(emu.checkers.dpor) The tables behind this vCPU's cached translations are read: the EPT
        entries on their paths, and in a TD the S-EPT entries of its private GPAs."""
        sched, hw = self.kvm.sched, self.hw
        if getattr(sched, "fp", None) is None or hw is None:
            return
        for sptep in hw.ept_entries():
            sched.touch(("spte", sptep), False)
        if hw.secure_eptp is not None:
            keys = self.kvm.x86_ops.module.sept_keys
            for gpage in hw.gpa_cache:
                if not (gpage << 12) & hw.shared_mask:
                    for key in keys(gpage << 12, -1)[0]:
                        sched.touch(key, False)

    def _guest_point(self, kind):
        """Between two guest slices: still in guest mode; the others may run (a yield)."""
        kvm = self.kvm
        self.touch_guest()
        if kvm.checker is not None and not kvm.flush_owed and self.hw.checked_generation != kvm.tables_generation:
            self.hw.checked_generation = kvm.tables_generation
            kvm.check_guest_tlbs(f"vCPU {self.vcpu_id} between two guest slices", [self])
        kvm.sched.point(self.vcpu_id, kind)

    # -- running ------------------------------------------------------------------------------------------
    def exit_to_user(self, exit_reason, **fields):
        self.kvm_run = KvmRun(exit_reason, **fields)
        # the port of KVM_EXIT_IO, the MSR of KVM_EXIT_X86_RDMSR/WRMSR
        extra = {k: fields[k] for k in ("port", "index") if k in fields}
        self.kvm.trace_emit(
            "kvm_userspace_exit", self.vcpu_id, reason=EXIT_NAMES.get(exit_reason, exit_reason), **extra
        )

    def run(self):
        """KVM_RUN (kvm_arch_vcpu_ioctl_run): the vCPU holds kvm->srcu while it runs KVM code
        (kvm_vcpu_srcu_read_lock()), so the memslots it looks up stay valid until it drops it,
        which it does only around guest mode (vcpu_enter_guest()) and on the way out."""
        kvm = self.kvm
        if kvm.vm_dead:
            # kvm_vcpu_ioctl(): every vCPU ioctl of a dead VM fails with -EIO.
            raise self.vm_dead_error()
        self.srcu_idx = kvm.srcu.srcu_read_lock()
        try:
            return self._vcpu_run()
        finally:
            if self.srcu_idx is not None:
                kvm.srcu.srcu_read_unlock(self.srcu_idx)
                self.srcu_idx = None

    def _vcpu_run(self):
        kvm = self.kvm
        if self.root is None:
            self.mmu_load()
        cui, self.complete_userspace_io = self.complete_userspace_io, None
        prev, self.kvm_run = self.kvm_run, None
        if cui is not None and cui(self, prev) == 0:
            return self.kvm_run  # the completion went straight back to userspace
        hw = self.hw
        tracer = kvm.tracer
        sched = kvm.sched
        srcu = kvm.srcu
        self.budget = self.exit_limit
        while True:
            self.tick()
            if self.signal_pending:
                # A signal: KVM_RUN returns -EINTR with KVM_EXIT_INTR for userspace to look at.
                self.signal_pending = False
                why = (
                    f"{self.exit_limit} VM exits and fault retries in a row fixed nothing"
                    if self.budget < 0
                    else "a signal from userspace"
                )
                return KvmRun(KVM_EXIT_INTR, reason=why)
            if self.requests:
                self.process_requests()
                if self.root is None:
                    self.kvm_mmu_reload()
            if tracer.enabled:
                tracer.vcpu = self.vcpu_id
                kvm.trace_emit(
                    "kvm_entry",
                    self.vcpu_id,
                    vcpu_id=self.vcpu_id,
                    rip=hw.reg("rip") if not kvm.has_mirrored_tdp else 0,
                )
            if sched is not None:
                sched.point(self.vcpu_id, "vm_entry")
            # vcpu_enter_guest(): interrupts off, IN_GUEST_MODE, then the last look at requests.
            # A remote request made before the mode store is seen here; one made after it
            # finds IN_GUEST_MODE and kicks (kvm_make_vcpus_request).
            self.mode = IN_GUEST_MODE
            # kvm_vcpu_srcu_read_unlock(): guest mode is not a read-side section (a memslot
            # change waits only for the KVM code around it).
            srcu.srcu_read_unlock(self.srcu_idx)
            self.srcu_idx = None
            if sched is not None:
                sched.point(self.vcpu_id, "guest_mode")
            if self.kvm_vcpu_exit_request() and not kvm.bugs.entry_ignores_requests:
                self.mode = OUTSIDE_GUEST_MODE
                hw.intr_pending = False  # local_irq_enable(): the IPI is taken
                self.srcu_idx = srcu.srcu_read_lock()
                continue
            if sched is not None:
                hw.guest_point = self._guest_point
                record = getattr(sched, "record", False)
                hw.on_leave = self.touch_guest if record else None
                if record and hw.page_crc is None:
                    hw.page_crc = {}
                if record and hw.ve_gpas is None:
                    hw.ve_gpas = []
                hw.slice_blocks = kvm.slice_blocks if sched.others_live() else 0
                if kvm.checker is not None and not kvm.flush_owed and hw.checked_generation != kvm.tables_generation:
                    # The checker: what this vCPU caches must hold as it enters the guest.
                    hw.checked_generation = kvm.tables_generation
                    kvm.check_guest_tlbs(f"vCPU {self.vcpu_id} entering the guest", [self], entering=True)
            if kvm.checker is not None:
                kvm.checker.vcpu_entering(kvm, self)
            slices = hw.slices
            exit = kvm.x86_ops.vcpu_run(self)
            if hw.slices != slices:
                self.budget = self.exit_limit  # the guest ran whole slices: it makes progress
            self.mode = OUTSIDE_GUEST_MODE
            hw.intr_pending = False  # local_irq_enable() after the exit: IPIs taken
            self.srcu_idx = srcu.srcu_read_lock()
            self.stat["exits"] += 1
            if tracer.enabled:
                self.trace_exit(exit)
            if sched is not None:
                sched.point(self.vcpu_id, "vm_exit")
            r = kvm.x86_ops.handle_exit(self, exit)
            if kvm.vm_dead and self.kvm_run is None:
                # KVM_REQ_VM_DEAD (kvm_vm_dead() / kvm_vm_bugged() request it of every vCPU):
                # vcpu_enter_guest() returns -EIO before the next entry.
                raise self.vm_dead_error()
            if r < 0:
                # KVM_RUN fails; kvm_run says why when KVM filled it in (KVM_EXIT_MEMORY_FAULT).
                run = self.kvm_run
                what = f" ({run.name}: {run.memory_fault!r})" if getattr(run, "memory_fault", None) else ""
                raise KvmIoctlError(-r, f"KVM_RUN failed with {r}{what}", run=run)
            if r == 0:
                return self.kvm_run

    def vm_dead_error(self):
        return KvmIoctlError(EIO, f"the VM is dead ({self.kvm.bug_reason}) (-EIO)")

    def process_requests(self):
        if self.requests & KVM_REQ_VM_DEAD:
            # vcpu_enter_guest(): kvm_check_request(KVM_REQ_VM_DEAD) -> -EIO, no entry.
            self.requests &= ~KVM_REQ_VM_DEAD
            raise self.vm_dead_error()
        if self.requests & KVM_REQ_MMU_FREE_OBSOLETE_ROOTS:
            self.kvm_mmu_free_obsolete_roots()
        if self.requests & KVM_REQ_TLB_FLUSH:
            self.stat["tlb_flush"] += 1
            self.kvm.x86_ops.flush_tlb(self)
            self.kvm.trace_emit("kvm_tlb_flush", self.vcpu_id, vcpu_id=self.vcpu_id, kind="invept")
        self.requests = 0

    def skip_emulated_instruction(self, exit):
        self.hw.set_reg("rip", exit.rip + exit.insn_len)

    def handle_hypercall(self, exit, nr, args):
        """kvm_emulate_hypercall(): RAX = nr, RBX, RCX, RDX, RSI = a0..a3; the result goes to RAX.
        KVM_HC_MAP_GPA_RANGE exits to userspace when userspace asked for it
        (KVM_CAP_EXIT_HYPERCALL: ``kvm.hypercall_exit_enabled``) and its operands are sane; the
        VMM also enables the guest runtime's report, fail, sync, assert and ucall calls, which
        exit the same way.  Anything else returns -KVM_ENOSYS."""
        self.stat["hypercalls"] += 1
        self.skip_emulated_instruction(exit)
        self.kvm.trace_emit(
            "kvm_hypercall",
            self.vcpu_id,
            msg=f"nr {nr:#x} a0 {args[0]:#x} a1 {args[1]:#x} a2 {args[2]:#x} a3 {args[3]:#x}",
        )
        ret = self.kvm_emulate_hypercall(nr, args, complete_hypercall_exit)
        if ret is None:
            return 0  # to userspace; complete_hypercall_exit() sets RAX
        self.hw.set_reg("rax", ret & ((1 << 64) - 1))
        return 1

    def kvm_emulate_hypercall(self, nr, args, complete):
        """__kvm_emulate_hypercall(): None after preparing KVM_EXIT_HYPERCALL (``complete`` puts
        userspace's kvm_run.hypercall.ret where the guest expects the result), else the value to
        return to the guest (-KVM_ENOSYS, -KVM_EINVAL, ...)."""
        kvm = self.kvm
        if nr == KVM_HC_MAP_GPA_RANGE:
            gpa, npages, attrs = args[0], args[1], args[2]
            if nr not in kvm.hypercall_exit_enabled:
                return -KVM_ENOSYS
            if gpa & 0xFFF or not npages or (gpa >> 12) + npages > 1 << 52:
                return -KVM_EINVAL
            self.exit_to_user(
                KVM_EXIT_HYPERCALL, nr=nr, args=[gpa, npages, attrs, 0, 0, 0], ret=0, flags=KVM_EXIT_HYPERCALL_LONG_MODE
            )
            self.complete_userspace_io = complete
            return None
        if nr in kvm.hypercall_exit_enabled:
            self.exit_to_user(KVM_EXIT_HYPERCALL, nr=nr, args=list(args), ret=0, flags=KVM_EXIT_HYPERCALL_LONG_MODE)
            self.complete_userspace_io = complete
            return None
        return -KVM_ENOSYS

    def gpa_to_hva(self, gpa, access=None):
        """The host address KVM reads guest-physical ``gpa`` with, through the memslots and the
        VMM's page tables (independent of EPT): an HPA; None outside every slot."""
        slot = self.kvm.gfn_to_memslot(gpa >> 12)
        if slot is None:
            return None
        return self.kvm.host.mm.hva_to_hpa(slot.userspace_addr + ((gpa >> 12) - slot.base_gfn) * 4096 + (gpa & 0xFFF))

    def read_guest_virt(self, gva, n):
        """kvm_read_guest_virt(): walk the guest's page tables in software, read through the memslots."""
        from ..hw.paging import probe

        mem = self.kvm.mem
        out = bytearray()
        cr3 = self.hw.reg("cr3")
        while n > 0:
            gpa = probe(mem.q, self.gpa_to_hva, cr3, gva)
            hva = None if gpa is None else self.gpa_to_hva(gpa)
            if hva is None:
                break
            chunk = min(n, 0x1000 - (gva & 0xFFF))
            out += mem.host_read(hva, chunk)
            gva += chunk
            n -= chunk
        return bytes(out)

    def disassemble(self, rip):
        from ..disasm import disassemble_one

        return disassemble_one(self.read_guest_virt(rip, 16), rip)
