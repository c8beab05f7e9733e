# tdhuge: accept REGIONS 2M regions the TD has never used, each with one TDG.MEM.PAGE.ACCEPT at 2M
# (with --tdx-huge-pages: one exit, one TDH.MEM.PAGE.AUG at 2M, the ACCEPT again, which clears the
# 2M page), then touch every 4K page of each.  The benchmark of a 2M private page, against
# tdpages' 4K private pages (REGIONS * 512 of them).
.intel_syntax noprefix
.include "emu.inc"

.equ REGIONS, 2
.equ AREA, 0x1000000

    .text
    .globl _start
_start:
    mov rbx, AREA
    mov r12, REGIONS
tdhuge_loop:
    ACCEPT_LEVEL rbx, TDX_PS_2M
    test rax, rax
    jnz tdhuge_failed
    mov ecx, 512
1:  mov qword ptr [rbx], rcx
    add rbx, PAGE_SIZE
    dec ecx
    jnz 1b
    dec r12
    jnz tdhuge_loop
    EXIT
tdhuge_failed:
    FAIL 1
