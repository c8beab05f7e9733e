# hpaccept: a 2M private page accepted at 2M.  Each vCPU accepts a 2M region of its own with one
# TDG.MEM.PAGE.ACCEPT at 2M (ACCEPT_LEVEL region, 1).  In a TD with --tdx-huge-pages (and
# --hugepages 2m) KVM maps the region with one TDH.MEM.PAGE.AUG at 2M and the ACCEPT returns 0;
# without huge pages KVM maps 4K and the module answers TDX_PAGE_SIZE_MISMATCH | 1, and the vCPU
# accepts 4K pages instead (emu_accept).  Then it checks that every byte of the region reads zero,
# writes a qword into each page and sums them back.
# Reports per vCPU: the status of the 2M ACCEPT (0 outside a TD), then the sum
# ((vCPU + 1) << 41) + 130816 (512 pages holding (vCPU + 1) << 32 | page index).
.intel_syntax noprefix
.include "emu.inc"

.equ REGIONS, 0x2400000                 # 36 MiB: one 2M region per vCPU from here

    .text
    .globl _start
_start:
    mov r12, rdi                        # r12 = vCPU index
    mov rbx, r12
    shl rbx, 21
    add rbx, REGIONS                    # rbx = this vCPU's region
    ACCEPT_LEVEL rbx, TDX_PS_2M
    mov r13, rax                        # r13 = the 2M ACCEPT's status
    bt rax, 63
    jnc 1f
    mov rdi, rbx                        # an error: accept with 4K pages (PAGE_SIZE_MISMATCH)
    mov rsi, HUGE_PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz hpa_failed_accept
1:  mov rdi, rbx                        # every qword of the region reads zero
    mov ecx, HUGE_PAGE_SIZE / 8
    xor eax, eax
2:  or rax, [rdi]
    add rdi, 8
    dec ecx
    jnz 2b
    test rax, rax
    jnz hpa_not_zero
    lea r14, [r12 + 1]
    shl r14, 32                         # r14 = (vCPU + 1) << 32
    xor ecx, ecx
3:  mov rax, rcx
    or rax, r14
    mov rdx, rcx
    shl rdx, 12
    mov [rbx + rdx], rax
    inc ecx
    cmp ecx, 512
    jb 3b
    xor eax, eax
    xor ecx, ecx
4:  mov rdx, rcx
    shl rdx, 12
    add rax, [rbx + rdx]
    inc ecx
    cmp ecx, 512
    jb 4b
    REPORT r13
    REPORT rax
    EXIT
hpa_failed_accept:
    FAIL 0x60
hpa_not_zero:
    FAIL 0x61
