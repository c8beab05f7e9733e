# hppunch: the host punches one 4K page out of a 2M private page under the guest.  vCPU 0 accepts a
# 2M region at 2M (4K pages when KVM maps 4K), writes a qword into every page but page 5, and then
# reads a sample of them again and again (ROUNDS times, a PAUSE between rounds: pages 4 and 6 and
# every 32nd page), never touching page 5, and at the end every page but page 5.  Run it
# with a host event that punches page 5 out of guest_memfd while it reads:
#   --host 'punch 0x2405000-0x2406000@STEP'
# KVM must zap exactly that page: with --tdx-huge-pages it first splits the 2M page
# (BLOCK, TRACK, DEMOTE), so the other 511 pages stay mapped and keep their data (an over-zap
# would leave them unmapped, and the next read of one kills the TD: access before accepting).
# Other vCPUs just halt.  Reports: the rounds that read the expected sample (ROUNDS), then the sum of
# every page but page 5 (0x1ff0001fefb: (511 << 32) + 130811).
.intel_syntax noprefix
.include "emu.inc"

.equ REGION, 0x2400000
.equ ROUNDS, 200

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
    xor r13d, r13d                      # r13 = rounds that read the right sample
    xor r12d, r12d                      # r12 = rounds
3:  xor eax, eax                        # a sample: pages 4 and 6 (page 5's neighbours), and
    add rax, [rbx + 4 * PAGE_SIZE]      # every 32nd page from 32 (TLB-friendly)
    add rax, [rbx + 6 * PAGE_SIZE]
    mov ecx, 32
4:  mov rdx, rcx
    shl rdx, 12
    add rax, [rbx + rdx]
    add ecx, 32
    cmp ecx, 512
    jb 4b
    mov rdx, 0x1100000f0a               # (17 << 32) + 4 + 6 + 32 + 64 + ... + 480
    cmp rax, rdx
    jne 6f
    inc r13
6:  pause
    inc r12
    cmp r12, ROUNDS
    jb 3b
    xor eax, eax                        # at the end, every page but page 5
    xor ecx, ecx
7:  cmp ecx, 5
    je 8f
    mov rdx, rcx
    shl rdx, 12
    add rax, [rbx + rdx]
8:  inc ecx
    cmp ecx, 512
    jb 7b
    REPORT r13
    REPORT rax
hp_halt:
    EXIT
hp_failed:
    FAIL 0x65
