"""The registers of a SEAMCALL or TDCALL (RAX = the leaf in, the status out)."""


class Regs:
    """The registers a SEAMCALL returns (RAX = status)."""

    __slots__ = ("rax", "rcx", "rdx", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rbx", "rsi", "rdi")

    def __init__(self, rax=0, rcx=0, rdx=0, r8=0, r9=0, r10=0, r11=0, r12=0, r13=0, r14=0, r15=0, rbx=0, rsi=0, rdi=0):
        self.rax, self.rcx, self.rdx, self.r8, self.r9, self.r10, self.r11 = rax, rcx, rdx, r8, r9, r10, r11
        self.r12, self.r13, self.r14, self.r15, self.rbx, self.rsi, self.rdi = r12, r13, r14, r15, rbx, rsi, rdi

    def __repr__(self):
        return "Regs(" + ", ".join(f"{k}={getattr(self, k):#x}" for k in self.__slots__ if getattr(self, k)) + ")"
