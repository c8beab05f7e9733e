# stale: read `target` (alone on its page) twice with a REPORT in between.
# Between the two reads the test re-points the GPA of `target` at another host
# page; the second read must see the new page.

.intel_syntax noprefix
.include "emu.inc"

    .section .data
    .balign 4096
    .globl target
target:
    .quad 0x1111
    .balign 4096

    .text
    .globl _start
    .type _start, @function
_start:
    mov rax, qword ptr [rip + target]
    REPORT rax
    mov rax, qword ptr [rip + target]
    REPORT rax
    EXIT
    .size _start, . - _start
