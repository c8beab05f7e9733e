# spread: touch SPREAD_PAGES pages spread over a 4 GiB guest (one every MiB), so KVM builds
# page tables all over the address space.  The memory benchmark.
.intel_syntax noprefix
.include "emu.inc"

.equ SPREAD_PAGES, 3000
.equ AREA, 0x1000000

    .text
    .globl _start
_start:
    mov rbx, AREA
    mov rcx, SPREAD_PAGES
spread_loop:
    mov rdi, rbx                        # a TD accepts the page first (a no-op in a plain VM)
    mov rsi, PAGE_SIZE
    call emu_accept
    mov qword ptr [rbx], rcx
    add rbx, 0x100000
    dec rcx
    jnz spread_loop
    EXIT
