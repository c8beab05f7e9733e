# fail: REPORT 7, then FAIL with code 0x2a.

.intel_syntax noprefix
.include "emu.inc"

    .text
    .globl _start
    .type _start, @function
_start:
    REPORT 7
    FAIL 0x2a
    .size _start, . - _start
