"""kvm->mmu_lock: x86's queued rwlock (kernel/locking/qrwlock.c), as the scheduler sees it."""


class MmuLock:
    """kvm->mmu_lock, x86's queued rwlock: faults hold it for read, zaps for write.

    Writers are preferred: once a writer waits, new readers queue behind it (a fault
    stream cannot starve a zap).  Under the scheduler a task that cannot take it waits
    (the others run meanwhile)."""

    def __init__(self, kvm):
        self.kvm = kvm
        self.readers = 0
        self.writer = False
        self.writers_waiting = 0

    def _touch(self, write):
        # (emu.checkers.dpor) two readers' lock and unlock commute; a writer's do not.  (With no
        # scheduler nothing records footprints: the hot read side does not call this then.)
        self.kvm.touch("mmu_lock", write)

    def read_lock(self):
        if self.kvm.sched is not None:
            self._touch(False)
        if self.writer or self.writers_waiting:
            self._wait(lambda: not self.writer and not self.writers_waiting)
        self.readers += 1

    def read_unlock(self):
        if self.kvm.sched is not None:
            self._touch(False)
        self.readers -= 1

    def write_lock(self):
        self._touch(True)
        if self.writer or self.readers:
            self.writers_waiting += 1
            try:
                self._wait(lambda: not self.writer and not self.readers)
            finally:
                self.writers_waiting -= 1
        self.writer = True

    def _wait(self, pred):
        sched = self.kvm.sched
        if sched is None:
            raise AssertionError("mmu_lock contended without a scheduler")
        sched.wait_until(pred, what="lock_wait")

    def write_unlock(self):
        self._touch(True)
        self.writer = False


class Mutex:
    """struct mutex, as the scheduler sees it: one owner; a task that cannot take it sleeps
    (the others run meanwhile).  ``lockdep_assert_held()`` is lockdep's check of the owner."""

    def __init__(self, kvm, name):
        self.kvm = kvm
        self.name = name
        self.owner = None

    def _who(self):
        sched = self.kvm.sched
        cur = getattr(sched, "current", None)
        return "main" if cur is None else cur.name

    def lock(self):
        self.kvm.touch(("mutex", self.name))
        if self.owner is not None:
            sched = self.kvm.sched
            if sched is None:
                raise AssertionError(f"{self.name} contended without a scheduler")
            sched.wait_until(lambda: self.owner is None, what="lock_wait")
        self.owner = self._who()

    def unlock(self):
        self.kvm.touch(("mutex", self.name))
        self.owner = None

    def lockdep_assert_held(self):
        assert self.owner is not None and self.owner == self._who(), f"{self.name} not held"
