# ud: an invalid opcode (#UD) with no IDT.

.intel_syntax noprefix
.include "emu.inc"

    .text
    .globl _start
    .type _start, @function
_start:
    nop
    ud2
    EXIT
    .size _start, . - _start
