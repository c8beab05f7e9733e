# wait_forever: vCPU 0 halts at once; every other vCPU waits for a flag that nobody
# ever sets, spinning without PAUSE.  Run with --vcpus 2: once vCPU 0 has halted the
# waiter is the only task left and runs unsliced, so only the limits (--timeout,
# --max-insns) or a signal end the run; the hang's error line names where it waits.
.intel_syntax noprefix
.include "emu.inc"

    .data
    .balign 64
wait_flag: .quad 0                      # never set

    .text
    .globl _start
    .type _start, @function
_start:
    test rdi, rdi
    jnz wait_for_flag
    EXIT                                # vCPU 0
wait_for_flag:
    mov rax, [rip + wait_flag]
    test rax, rax
    jz wait_for_flag
    EXIT
    .size _start, . - _start
