# probe: read the quadword at PROBE (32 MiB) and REPORT it, write 0x5157 there,
# read it back and REPORT it.  tests/kvm/test_vm.py changes the memslots under
# PROBE (none, read-only, writable) to get the exits of each case.

.intel_syntax noprefix
.include "emu.inc"

.equ PROBE, 0x2000000

    .text
    .globl _start
    .type _start, @function
_start:
    mov rax, qword ptr [PROBE]
    REPORT rax
    mov rbx, 0x5157
    mov qword ptr [PROBE], rbx
    mov rax, qword ptr [PROBE]
    REPORT rax
    EXIT
    .size _start, . - _start
