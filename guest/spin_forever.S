# spin_forever: every vCPU spins for ever in a loop of three instructions that touches
# memory and never pauses, exits or halts.  The guest for the limits and signals
# (docs/limits.md): `run spin_forever --timeout 2` or `--max-insns 10000000` ends
# as a hang (exit 1) naming the loop, Ctrl-C ends it at once (exit 130).
.intel_syntax noprefix
.include "emu.inc"

    .data
    .balign 64
spin_count: .quad 0

    .text
    .globl _start
    .type _start, @function
_start:
spin_loop:
    inc qword ptr [rip + spin_count]
    jmp spin_loop
    .size _start, . - _start
