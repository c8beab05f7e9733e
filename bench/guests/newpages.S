# newpages: touch one qword in each of NEWPAGES pages, each never touched before
# (each costs one EPT violation), then halt.  The benchmark of a new 4K page.
.intel_syntax noprefix
.include "emu.inc"

.equ NEWPAGES, 2048
.equ AREA, 0x1000000                # 16 MiB: above the image, below the loader

    .text
    .globl _start
_start:
    mov rbx, AREA
    mov rcx, NEWPAGES
newpages_loop:
    mov qword ptr [rbx], rcx
    add rbx, 0x1000
    dec rcx
    jnz newpages_loop
    EXIT
