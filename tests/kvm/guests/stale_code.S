# stale_code: call `fn` (alone on its page, in .data) twice with a REPORT of its
# result in between.  Between the two calls the test re-points the GPA of `fn`
# at another host page holding other code; the second call must run that code.

.intel_syntax noprefix
.include "emu.inc"

    .section .data
    .balign 4096
    .globl fn
fn:
    mov eax, 0x1111
    ret
    .balign 4096

    .text
    .globl _start
    .type _start, @function
_start:
    lea rbx, [rip + fn]
    call rbx
    REPORT rax
    call rbx
    REPORT rax
    EXIT
    .size _start, . - _start
