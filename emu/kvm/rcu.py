"""A model of RCU for the TDP MMU: removed page tables are freed only after a grace period.

Readers are vCPUs inside a fault (rcu_read_lock) and the zappers.  call_rcu()
waits for every reader that was inside a read-side section when it was called;
the callback runs when the last of them leaves.  A table freed too early would
be reused while a vCPU still walks it: exactly the bug RCU prevents.
"""


class Rcu:
    def __init__(self, kvm=None):
        self.depth = {}  # reader -> nesting depth
        self.pending = []  # [set of readers still to leave, callback]
        self.no_grace_period = False
        self.kvm = kvm

    def _touch(self, write):
        # (emu.checkers.dpor) readers entering commute with each other; a grace period's end and
        # call_rcu() (which reads who is inside) do not.  Only a scheduler records footprints:
        # the read side, every fault's, does not call this without one.
        if self.kvm is not None:
            self.kvm.touch("rcu", write)

    def read_lock(self, who):
        if self.kvm is not None and self.kvm.sched is not None:
            self._touch(False)
        self.depth[who] = self.depth.get(who, 0) + 1

    def read_unlock(self, who):
        if self.kvm is not None and self.kvm.sched is not None:
            self._touch(bool(self.pending))
        d = self.depth[who] - 1
        if d:
            self.depth[who] = d
            return
        del self.depth[who]
        if self.pending:
            ready = []
            for entry in self.pending:
                entry[0].discard(who)
                if not entry[0]:
                    ready.append(entry)
            for entry in ready:
                self.pending.remove(entry)
                entry[1]()

    def call_rcu(self, fn):
        self._touch(True)
        if self.no_grace_period:
            fn()  # bug switch: freed while readers may still walk it
            return
        waiting = set(self.depth)
        if waiting:
            self.pending.append([waiting, fn])
        else:
            fn()

    def barrier(self):
        """rcu_barrier() at a point where no reader can be inside: run every callback."""
        assert not self.depth, f"rcu_barrier with readers inside: {self.depth}"
        pending, self.pending = self.pending, []
        for _, fn in pending:
            fn()
