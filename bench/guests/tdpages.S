# tdpages: accept and touch TDPAGES private pages the TD has never used (in a TD each
# is an ACCEPT that exits to KVM, SEPT.ADD where a level is missing, PAGE.AUG, the
# ACCEPT again, then the access).  The benchmark of a TD private page.
.intel_syntax noprefix
.include "emu.inc"

.equ TDPAGES, 1024
.equ AREA, 0x1000000

    .text
    .globl _start
_start:
    mov rbx, AREA
    mov r12, TDPAGES
tdpages_loop:
    mov rdi, rbx
    mov rsi, PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz tdpages_failed
    mov qword ptr [rbx], r12
    add rbx, 0x1000
    dec r12
    jnz tdpages_loop
    EXIT
tdpages_failed:
    FAIL 1
