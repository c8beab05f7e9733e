# hello: the smallest useful guest.  Every vCPU hashes a string from .rodata
# with FNV-1a (64-bit) and REPORTs the hash, so the host sees one identical
# value per vCPU.  Exercises: fetch from .text, reads from .rodata, the
# stack (REPORT calls into the runtime), and the report hypercall.

.intel_syntax noprefix
.include "emu.inc"

.equ FNV64_OFFSET_BASIS, 0xcbf29ce484222325
.equ FNV64_PRIME,        0x100000001b3

    .section .rodata
greeting:
    .ascii "hello, EPT"
greeting_end:

    .text
    .globl _start
    .type _start, @function
_start:
    lea rsi, [rip + greeting]               # RSI/RDI (vCPU count, index) are
    lea rdx, [rip + greeting_end]           # not needed: every vCPU does the same
    mov rax, FNV64_OFFSET_BASIS
    mov rcx, FNV64_PRIME
fnv_loop:
    cmp rsi, rdx
    jae fnv_done
    movzx ebx, byte ptr [rsi]
    xor rax, rbx                            # FNV-1a: xor the byte in first,
    imul rax, rcx                           # then multiply (mod 2^64)
    inc rsi
    jmp fnv_loop
fnv_done:
    REPORT rax
    EXIT
    .size _start, . - _start
