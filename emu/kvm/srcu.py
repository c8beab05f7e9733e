"""Sleepable RCU for kvm->srcu (kernel/rcu/srcutree.c), as the memslots use it.

Readers (a vCPU in KVM_RUN outside guest mode, a host path that reads the memslots) enter a
read-side section with ``idx = srcu_read_lock()`` and leave it with ``srcu_read_unlock(idx)``:
each section counts on the index that was current when it began.  ``synchronize_srcu()``
returns once every reader that was inside a section when it was called has left:

    1. wait until the inactive index has no readers (sections that began before an earlier
       flip, still in flight);
    2. flip the index: sections that begin from now on count on the other one;
    3. wait until the index that was current has no readers.

Sections that begin after the flip are not waited for, which is what lets a grace period end
while vCPUs keep entering KVM_RUN.  Under the deterministic scheduler the wait is a scheduler
wait (``srcu_wait``): the waiting task cannot run until the readers are out, and every other
task may run meanwhile.  SRCU has no callbacks here (KVM's memslot code calls only
synchronize_srcu[_expedited]; the expedited flavour differs only in speed).

Reads and writes of the counters are announced to partial-order reduction
(emu.checkers.dpor) through ``kvm.touch("srcu", ...)``, as emu/kvm/rcu.py does for RCU.
"""


class Srcu:
    """struct srcu_struct"""

    def __init__(self, kvm=None):
        self.kvm = kvm
        self.srcu_idx = 0  # ssp->srcu_idx: readers count on srcu_idx & 1
        self.lock_count = [0, 0]  # readers inside a section, per index
        self.grace_periods = 0  # completed synchronize_srcu() calls

    def _touch(self, write):
        if self.kvm is not None:
            self.kvm.touch("srcu", write)

    def srcu_read_lock(self):
        """Enter a read-side section; returns the index to give srcu_read_unlock()."""
        self._touch(False)
        idx = self.srcu_idx & 1
        self.lock_count[idx] += 1
        return idx

    def srcu_read_unlock(self, idx):
        self._touch(False)
        self.lock_count[idx] -= 1
        assert self.lock_count[idx] >= 0, "srcu_read_unlock() without srcu_read_lock()"

    def readers(self):
        return self.lock_count[0] + self.lock_count[1]

    def synchronize_srcu(self):
        """Wait until every read-side section that began before this call has ended."""
        self._touch(True)
        self._wait_zero((self.srcu_idx & 1) ^ 1)
        old = self.srcu_idx & 1
        self.srcu_idx += 1  # srcu_flip()
        self._touch(True)
        self._wait_zero(old)
        self.grace_periods += 1

    # KVM uses the expedited flavour for memslot swaps; the model makes no difference.
    synchronize_srcu_expedited = synchronize_srcu

    def _wait_zero(self, idx):
        if not self.lock_count[idx]:
            return
        sched = self.kvm.sched if self.kvm is not None else None
        if sched is None or getattr(sched, "current", None) is None:
            raise AssertionError(
                f"synchronize_srcu() with {self.lock_count[idx]} readers inside and no scheduler to let them out"
            )
        sched.wait_until(lambda: not self.lock_count[idx], what="srcu_wait")
