# hprace: the races of splitting private huge pages, for the explorer.  Four 2M regions: vCPU 0
# accepts each at 2M in turn (ACCEPT_LEVEL region, 1; the 4 pages it uses at 4K when the module
# answers TDX_PAGE_SIZE_MISMATCH); every other vCPU accepts pages 1 and 2 of each region at 4K,
# each followed by a page of a 2M region of its own (its faults, SEPT.ADD and AUG, beside the
# others').  A 4K ACCEPT that meets a region vCPU 0's ACCEPT exit has just mapped at 2M (PENDING)
# makes KVM split it under mmu_lock held for write (BLOCK, TRACK, DEMOTE) and set GUEST_INHIBIT;
# with three vCPUs two of them may race to split the same region.  Every vCPU writes its qword
# (0x100 + vCPU, at 8 * vCPU) into the pages it accepted, all meet at a barrier, and each checks
# every qword written.  Run with --vm tdx --hugepages 2m --tdx-huge-pages --vcpus 3.
# Reports per vCPU: the qwords it checked (16 + 16 * (vCPUs - 1)).
.intel_syntax noprefix
.include "emu.inc"

.equ BASE, 0x2400000
.equ REGIONS, 4
.equ OWN, BASE + REGIONS * HUGE_PAGE_SIZE   # then one 2M region per other vCPU

    .data
    .balign 64
hr_arrived: .quad 0

    .text
    .globl _start
_start:
    mov r12, rdi                        # r12 = vCPU index
    mov r13, rsi                        # r13 = vCPUs
    lea r14, [r12 + 0x100]              # r14 = this vCPU's qword
    test r12, r12
    jnz hr_small
    mov rbx, BASE
    mov r15d, REGIONS
1:  ACCEPT_LEVEL rbx, TDX_PS_2M
    bt rax, 63
    jnc 2f
    mov rdi, rbx                        # PAGE_SIZE_MISMATCH: the 4 pages it uses, at 4K
    mov esi, 4 * PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz hr_failed
2:  xor ecx, ecx
3:  mov rdx, rcx
    shl rdx, 12
    mov [rbx + rdx], r14
    inc ecx
    cmp ecx, 4
    jb 3b
    add rbx, HUGE_PAGE_SIZE
    dec r15d
    jnz 1b
    jmp hr_meet
hr_small:
    mov r15, r12
    shl r15, 21
    add r15, OWN - HUGE_PAGE_SIZE       # r15 = the next page of this vCPU's own region
    mov rbx, BASE
4:  mov ecx, 1
5:  mov rdi, rcx
    shl rdi, 12
    add rdi, rbx
    ACCEPT_LEVEL rdi, TDX_PS_4K         # 0, or TDX_PAGE_ALREADY_ACCEPTED (bit 63 clear)
    bt rax, 63
    jc hr_failed
    mov [rdi + r12 * 8], r14
    add r15, PAGE_SIZE
    ACCEPT_LEVEL r15, TDX_PS_4K
    test rax, rax
    jnz hr_failed
    mov [r15 + r12 * 8], r14
    inc ecx
    cmp ecx, 3
    jb 5b
    add rbx, HUGE_PAGE_SIZE
    cmp rbx, OWN
    jb 4b
hr_meet:
    lock inc qword ptr [rip + hr_arrived]
6:  cmp [rip + hr_arrived], r13
    je 7f
    pause
    jmp 6b
7:  xor r9d, r9d                        # r9 = qwords checked
    mov rbx, BASE                       # vCPU 0's qword in pages 0-3 of each region
8:  xor ecx, ecx
9:  mov rdx, rcx
    shl rdx, 12
    cmp qword ptr [rbx + rdx], 0x100
    jne hr_lost
    inc r9
    inc ecx
    cmp ecx, 4
    jb 9b
    add rbx, HUGE_PAGE_SIZE
    cmp rbx, OWN
    jb 8b
    mov r8d, 1                          # every other vCPU's qword in pages 1-2 of each region
10: cmp r8, r13                         # and in its own region's first 8 pages
    jae 14f
    lea r10, [r8 + 0x100]
    mov rbx, BASE
11: mov ecx, 1
12: mov rdx, rcx
    shl rdx, 12
    add rdx, rbx
    cmp [rdx + r8 * 8], r10
    jne hr_lost
    inc r9
    inc ecx
    cmp ecx, 3
    jb 12b
    add rbx, HUGE_PAGE_SIZE
    cmp rbx, OWN
    jb 11b
    mov rbx, r8
    shl rbx, 21
    add rbx, OWN - HUGE_PAGE_SIZE
    mov ecx, 1
13: mov rdx, rcx
    shl rdx, 12
    add rdx, rbx
    cmp [rdx + r8 * 8], r10
    jne hr_lost
    inc r9
    inc ecx
    cmp ecx, 9
    jb 13b
    inc r8
    jmp 10b
14: REPORT r9
    EXIT
hr_failed:
    FAIL 0x68
hr_lost:
    FAIL 0x69
