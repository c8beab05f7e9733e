# cstart.S: the start of a C guest (guest/include/emu.h), linked into C guests
# only (an assembler guest has its own _start).
#
#   _start      every vCPU: keep its index and the vCPU count at the top of its
#               stack, call guest_main(), then GUEST_DONE (UCALL_DONE, then
#               halt for good)
#   memset, memcpy, memmove, memcmp
#               what a compiler may call even in freestanding code (a struct
#               copy, a zeroed array); there is no libc
#
# Per-vCPU data: the loader gives each vCPU its own STACK_SIZE (16 KiB) stack
# whose top is STACK_SIZE-aligned (the stacks come down from the top of guest
# memory, a multiple of 2 MiB).  _start stores the vCPU's index at top - 8 and
# the vCPU count at top - 16, and runs guest_main below them, so any code on
# that stack finds them from RSP: top = (RSP | (STACK_SIZE - 1)) + 1.  That is
# what emu_vcpu_id() and emu_nr_vcpus() in emu.h do.

.intel_syntax noprefix
.include "emu.inc"

    .section .text.start, "ax", @progbits
    .globl _start
    .type _start, @function
_start:
    mov [rsp - 8], rdi                      # RSP is the top of this vCPU's stack
    mov [rsp - 16], rsi
    sub rsp, 16                             # still 16-byte aligned for the call
    xor ebp, ebp                            # the end of the frame chain
    call guest_main
    call __emu_guest_done                   # GUEST_DONE(): UCALL_DONE, then halt for good
    .size _start, . - _start

    .text

# void *memset(void *dst, int c, size_t n)
    .globl memset
    .type memset, @function
memset:
    mov r8, rdi
    mov eax, esi
    mov rcx, rdx
    rep stosb
    mov rax, r8
    ret
    .size memset, . - memset

# void *memcpy(void *dst, const void *src, size_t n)
    .globl memcpy
    .type memcpy, @function
memcpy:
    mov rax, rdi
    mov rcx, rdx
    rep movsb
    ret
    .size memcpy, . - memcpy

# void *memmove(void *dst, const void *src, size_t n): copies backwards when
# dst lies inside [src, src + n).
    .globl memmove
    .type memmove, @function
memmove:
    mov rax, rdi
    mov rcx, rdx
    mov r8, rdi
    sub r8, rsi
    cmp r8, rdx                             # (dst - src) < n, unsigned: overlap
    jb .Lmemmove_back
    rep movsb
    ret
.Lmemmove_back:
    lea rsi, [rsi + rdx - 1]
    lea rdi, [rdi + rdx - 1]
    std
    rep movsb
    cld
    ret
    .size memmove, . - memmove

# int memcmp(const void *a, const void *b, size_t n)
    .globl memcmp
    .type memcmp, @function
memcmp:
    xor eax, eax
.Lmemcmp_loop:
    test rdx, rdx
    jz .Lmemcmp_out
    movzx eax, byte ptr [rdi]
    movzx ecx, byte ptr [rsi]
    sub eax, ecx
    jnz .Lmemcmp_out
    inc rdi
    inc rsi
    dec rdx
    jmp .Lmemcmp_loop
.Lmemcmp_out:
    ret
    .size memcmp, . - memcmp
