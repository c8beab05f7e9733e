# lost_wakeup: a wake-up that a schedule can lose.  vCPU 1 says it is waiting, then spins
# (no PAUSE) until vCPU 0 sets the flag; vCPU 0 sets the flag only if vCPU 1 is not waiting
# yet.  The non-preemptive schedule (vCPU 0 first) passes; one that runs vCPU 1 first leaves
# it spinning for ever, alone: the explorer must end that run as a hang.
.intel_syntax noprefix
.include "emu.inc"

    .data
    .balign 64
lw_waiting: .quad 0
lw_flag:    .quad 0

    .text
    .globl _start
_start:
    test rdi, rdi
    jnz lw_waiter
    mov rax, [rip + lw_waiting]
    test rax, rax
    jnz 1f                              # the bug: vCPU 1 already waits, and is never woken
    mov qword ptr [rip + lw_flag], 1
1:  EXIT
lw_waiter:
    mov qword ptr [rip + lw_waiting], 1
lw_spin:
    mov rax, [rip + lw_flag]
    test rax, rax
    jz lw_spin
    EXIT
