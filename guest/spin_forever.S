# spin_forever: every vCPU spins for ever, never pausing, exiting or halting: it counts its
# iterations in RAX (and in spin_count), and the odd ones in RBX too.  The guest for the
# limits and signals (docs/limits.md): `run spin_forever --timeout 2` or `--max-insns 10000000`
# ends as a hang (exit 1) that names the loop, Ctrl-C ends it at once (exit 130).  The same
# --max-insns stops it with the same registers every time.
.intel_syntax noprefix
.include "emu.inc"

    .data
    .balign 64
spin_count: .quad 0

    .text
    .globl _start
    .type _start, @function
_start:
    xor eax, eax
    xor ebx, ebx
spin_loop:
    inc rax
    mov [rip + spin_count], rax
    test al, 1
    jz spin_even
    inc rbx
spin_even:
    jmp spin_loop
    .size _start, . - _start
