# hppunch: the host punches one 4K page out of a 2M private page under the guest.  vCPU 0 accepts a
# 2M region at 2M (4K pages when KVM maps 4K), writes a qword into every page but page 5, and then
# reads them again and again (ROUNDS times, a PAUSE between rounds), never touching page 5.  Run it
# with a host event that punches page 5 out of guest_memfd while it reads:
#   --host 'punch 0x2405000-0x2406000@STEP'
# KVM must zap exactly that page: with --tdx-huge-pages it first splits the 2M page
# (BLOCK, TRACK, DEMOTE), so the other 511 pages stay mapped and keep their data (an over-zap
# would leave them unmapped, and the next read of one kills the TD: access before accepting).
# Other vCPUs just halt.  Reports: the rounds that read the expected sum (ROUNDS), then the sum
# (0x1ff0001fefb: (511 << 32) + 130811).
.intel_syntax noprefix
.include "emu.inc"

.equ REGION, 0x2400000
.equ ROUNDS, 400

    .text
    .globl _start
_start:
    test rdi, rdi
    jnz hp_halt
    mov rbx, REGION
    mov rdi, rbx
    mov esi, HUGE_PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz hp_failed
    mov r14, 1
    shl r14, 32
    xor ecx, ecx
1:  cmp ecx, 5
    je 2f
    mov rax, rcx
    or rax, r14
    mov rdx, rcx
    shl rdx, 12
    mov [rbx + rdx], rax
2:  inc ecx
    cmp ecx, 512
    jb 1b
    xor r13d, r13d                      # r13 = rounds that read the right sum
    xor r12d, r12d                      # r12 = rounds
3:  xor eax, eax
    xor ecx, ecx
4:  cmp ecx, 5
    je 5f
    mov rdx, rcx
    shl rdx, 12
    add rax, [rbx + rdx]
5:  inc ecx
    cmp ecx, 512
    jb 4b
    mov r15, rax
    mov rdx, 0x1ff0001fefb              # (511 << 32) + 130816 - 5
    cmp rax, rdx
    jne 6f
    inc r13
6:  pause
    inc r12
    cmp r12, ROUNDS
    jb 3b
    REPORT r13
    REPORT r15
hp_halt:
    EXIT
hp_failed:
    FAIL 0x65
