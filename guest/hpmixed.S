# hpmixed: vCPUs accepting the same 2M region at different levels at the same time.  vCPU 0
# accepts the region at 2M (ACCEPT_LEVEL region, 1; when the module answers
# TDX_PAGE_SIZE_MISMATCH, the 16 pages it uses at 4K).  Every other vCPU accepts pages 1 to 4 of
# the region at 4K, each followed by the same page of a 2M region of its own (so that its faults,
# SEPT.ADD and AUG, run beside the other vCPUs').  Whichever comes first decides KVM's mapping: a
# 2M ACCEPT exit maps the region at 2M (--tdx-huge-pages); a 4K ACCEPT on a 2M PENDING page makes
# KVM split it (BLOCK, TRACK, DEMOTE) and set GUEST_INHIBIT; a 4K ACCEPT of a 2M page already
# accepted is TDX_PAGE_ALREADY_ACCEPTED, which counts as done.  Each vCPU writes its qword (at
# 8 * vCPU, 0x100 + vCPU) into the pages it accepted, all meet at a barrier, and each checks every
# qword written.  With three vCPUs two of them race to split the same 2M page.
# Reports per vCPU: the qwords it checked (16 + 8 * (vCPUs - 1)).
.intel_syntax noprefix
.include "emu.inc"

.equ REGION, 0x2400000
.equ SMALL, 4                           # pages each other vCPU accepts in the region, and in its own

    .data
    .balign 64
hm_arrived: .quad 0

    .text
    .globl _start
_start:
    mov r12, rdi                        # r12 = vCPU index
    mov r13, rsi                        # r13 = vCPUs
    mov rbx, REGION
    lea r14, [r12 + 0x100]              # r14 = this vCPU's qword
    test r12, r12
    jnz hm_small
    ACCEPT_LEVEL rbx, TDX_PS_2M
    bt rax, 63
    jnc 1f
    mov rdi, rbx                        # PAGE_SIZE_MISMATCH: the 16 pages it uses, at 4K
    mov esi, 16 * PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz hm_failed
1:  xor ecx, ecx
2:  mov rdx, rcx
    shl rdx, 12
    mov [rbx + rdx], r14
    inc ecx
    cmp ecx, 16
    jb 2b
    jmp hm_meet
hm_small:
    mov r15, r12
    shl r15, 21
    add r15, rbx                        # r15 = this vCPU's own region
    mov ecx, 1
3:  mov rdi, rcx
    shl rdi, 12
    add rdi, rbx
    ACCEPT_LEVEL rdi, TDX_PS_4K         # 0, or TDX_PAGE_ALREADY_ACCEPTED (bit 63 clear)
    bt rax, 63
    jc hm_failed
    mov [rdi + r12 * 8], r14
    mov rdi, rcx
    shl rdi, 12
    add rdi, r15
    ACCEPT_LEVEL rdi, TDX_PS_4K
    test rax, rax
    jnz hm_failed
    mov [rdi + r12 * 8], r14
    inc ecx
    cmp ecx, SMALL + 1
    jb 3b
hm_meet:
    lock inc qword ptr [rip + hm_arrived]
4:  cmp [rip + hm_arrived], r13
    je 5f
    pause
    jmp 4b
5:  xor r15d, r15d                      # r15 = qwords checked
    xor ecx, ecx                        # vCPU 0's qword in pages 0-15
6:  mov rdx, rcx
    shl rdx, 12
    cmp qword ptr [rbx + rdx], 0x100
    jne hm_lost
    inc r15
    inc ecx
    cmp ecx, 16
    jb 6b
    mov r8d, 1                          # every other vCPU's qword in pages 1-4, here and in its region
7:  cmp r8, r13
    jae 9f
    lea r9, [r8 + 0x100]
    mov r10, r8
    shl r10, 21
    add r10, rbx
    mov ecx, 1
8:  mov rdx, rcx
    shl rdx, 12
    lea rax, [rbx + rdx]
    cmp [rax + r8 * 8], r9
    jne hm_lost
    lea rax, [r10 + rdx]
    cmp [rax + r8 * 8], r9
    jne hm_lost
    add r15, 2
    inc ecx
    cmp ecx, SMALL + 1
    jb 8b
    inc r8
    jmp 7b
9:  REPORT r15
    EXIT
hm_failed:
    FAIL 0x66
hm_lost:
    FAIL 0x67
