"""VM-exit records: what the emulated CPU hands the hypervisor when the guest stops.

Reason numbers are the SDM's basic exit reasons (Linux asm/vmx.h names);
TDCALL (77) is the reason the TDX module sees for a TDCALL in a TD.
"""

from .ept import decode_qualification

EXIT_REASON_EXCEPTION_NMI = 0
EXIT_REASON_TRIPLE_FAULT = 2
EXIT_REASON_EXTERNAL_INTERRUPT = 1
EXIT_REASON_CPUID = 10
EXIT_REASON_HLT = 12
EXIT_REASON_VMCALL = 18
EXIT_REASON_IO_INSTRUCTION = 30
EXIT_REASON_MSR_READ = 31
EXIT_REASON_MSR_WRITE = 32
EXIT_REASON_EPT_VIOLATION = 48
EXIT_REASON_EPT_MISCONFIG = 49
EXIT_REASON_TDCALL = 77

REASON_NAMES = {
    EXIT_REASON_EXCEPTION_NMI: "EXCEPTION_NMI",
    EXIT_REASON_TRIPLE_FAULT: "TRIPLE_FAULT",
    EXIT_REASON_EXTERNAL_INTERRUPT: "EXTERNAL_INTERRUPT",
    EXIT_REASON_CPUID: "CPUID",
    EXIT_REASON_HLT: "HLT",
    EXIT_REASON_VMCALL: "VMCALL",
    EXIT_REASON_IO_INSTRUCTION: "IO_INSTRUCTION",
    EXIT_REASON_MSR_READ: "MSR_READ",
    EXIT_REASON_MSR_WRITE: "MSR_WRITE",
    EXIT_REASON_EPT_VIOLATION: "EPT_VIOLATION",
    EXIT_REASON_EPT_MISCONFIG: "EPT_MISCONFIG",
    EXIT_REASON_TDCALL: "TDCALL",
}

# Exit qualification for I/O instructions (SDM Vol. 3C Table 28-5): bits 2:0 size - 1, bit 3 direction
# (1 = IN), bit 4 string instruction, bit 5 REP prefix, bit 6 operand encoding (1 = immediate), 31:16 port.
IO_QUAL_IN = 1 << 3
IO_QUAL_STRING = 1 << 4
IO_QUAL_REP = 1 << 5
IO_QUAL_IMM = 1 << 6


def io_qualification(size, is_in, port, string=False, rep=False, imm=False):
    """The exit qualification of an I/O instruction of ``size`` bytes (1, 2, 4) on ``port``."""
    return (
        (size - 1)
        | (IO_QUAL_IN if is_in else 0)
        | (IO_QUAL_STRING if string else 0)
        | (IO_QUAL_REP if rep else 0)
        | (IO_QUAL_IMM if imm else 0)
        | (port & 0xFFFF) << 16
    )


def decode_io_qualification(q):
    """'in 2 bytes port 0x60 dx' style words for an I/O exit qualification."""
    words = [
        "in" if q & IO_QUAL_IN else "out",
        f"{(q & 7) + 1} byte{'s' if q & 7 else ''}",
        f"port {q >> 16 & 0xFFFF:#x}",
        "imm" if q & IO_QUAL_IMM else "dx",
    ]
    if q & IO_QUAL_STRING:
        words.append("string")
    if q & IO_QUAL_REP:
        words.append("rep")
    return " ".join(words)


VECTOR_NAMES = {
    0: "#DE",
    1: "#DB",
    3: "#BP",
    4: "#OF",
    5: "#BR",
    6: "#UD",
    7: "#NM",
    8: "#DF",
    13: "#GP",
    14: "#PF",
    16: "#MF",
    17: "#AC",
    18: "#MC",
    19: "#XM",
    20: "#VE",
    21: "#CP",
}


class VmExit:
    """One VM exit.

    ``rip`` is the guest RIP of the instruction that caused it (for HLT, VMCALL, TDCALL,
    CPUID, RDMSR, WRMSR and I/O instructions the instruction itself, ``insn_len`` bytes long:
    the hypervisor advances RIP when it completes the instruction, as
    kvm_skip_emulated_instruction does).
    ``gpa``/``gla``/``qualification`` are the VMCS exit fields for EPT exits (for an I/O
    instruction: the I/O qualification, and for INS/OUTS the guest-linear address in ``gla``);
    ``vector``/``error_code``/``cr2`` for exceptions; ``misconfig`` names the rule
    an EPT misconfiguration broke.
    """

    __slots__ = (
        "reason",
        "rip",
        "insn_len",
        "qualification",
        "gpa",
        "gla",
        "vector",
        "error_code",
        "cr2",
        "misconfig",
        "vcpu",
    )

    def __init__(
        self,
        reason,
        rip,
        insn_len=0,
        qualification=0,
        gpa=None,
        gla=None,
        vector=None,
        error_code=None,
        cr2=None,
        misconfig=None,
        vcpu=0,
    ):
        self.reason, self.rip, self.insn_len = reason, rip, insn_len
        self.qualification, self.gpa, self.gla = qualification, gpa, gla
        self.vector, self.error_code, self.cr2, self.misconfig = vector, error_code, cr2, misconfig
        self.vcpu = vcpu

    @property
    def name(self):
        return REASON_NAMES.get(self.reason, str(self.reason))

    def describe(self):
        parts = [self.name]
        if self.reason == EXIT_REASON_EPT_VIOLATION:
            parts.append(
                f"gpa {self.gpa:#x} gla {self.gla:#x} qual {self.qualification:#x} "
                f"[{decode_qualification(self.qualification)}]"
            )
        elif self.reason == EXIT_REASON_EPT_MISCONFIG:
            parts.append(f"gpa {self.gpa:#x}: {self.misconfig}")
        elif self.reason == EXIT_REASON_IO_INSTRUCTION:
            parts.append(f"qual {self.qualification:#x} [{decode_io_qualification(self.qualification)}]")
        elif self.reason in (EXIT_REASON_EXCEPTION_NMI, EXIT_REASON_TRIPLE_FAULT):
            parts.append(VECTOR_NAMES.get(self.vector, f"vector {self.vector}"))
            if self.error_code is not None:
                parts.append(f"error code {self.error_code:#x}")
            if self.cr2 is not None:
                parts.append(f"cr2 {self.cr2:#x}")
        parts.append(f"rip {self.rip:#x}")
        return " ".join(parts)

    def __repr__(self):
        return f"VmExit({self.describe()})"


class VeInfo:
    """The virtualization-exception information area (SDM Vol. 3C "Virtualization-Exception
    Information"; the VMCS's virtualization-exception information address points at it).  A
    TD's is TDVPS.VE_INFO (tdvps_ve_info_t), which the TDX module also fills when it injects a
    #VE itself and empties with TDG.VP.VEINFO.GET.

    Architectural: ``exit_reason`` (offset 0), ``valid`` (offset 4: 0xFFFFFFFF once a #VE
    stored its information, 0 when software freed it; the CPU converts an EPT violation only
    while it is 0), ``qualification`` (8), ``gla`` (16), ``gpa`` (24), ``eptp_index`` (32).
    ``insn_len_info`` (instruction length | information << 32) is the TDX module's
    non-architectural field: the CPU never writes it."""

    __slots__ = ("exit_reason", "valid", "qualification", "gla", "gpa", "eptp_index", "insn_len_info")

    VALID = 0xFFFFFFFF

    def __init__(self):
        self.exit_reason = self.valid = self.qualification = self.gla = self.gpa = 0
        self.eptp_index = self.insn_len_info = 0
