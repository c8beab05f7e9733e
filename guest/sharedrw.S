# sharedrw: vCPUs read and write shared pages in a loop.  vCPU 0 converts the pages
# to shared (MapGPA) first; then every vCPU adds to its own qword of every page,
# ROUNDS times, through the shared alias (PAUSE between rounds).  Made for host
# events that convert the pages under the guest (--host 'private ...'): the VMM
# converts a page back when the guest touches it (as QEMU does on
# KVM_EXIT_MEMORY_FAULT), so the guest's results do not change, while faults race
# the conversions (mmu_invalidate_seq, is_page_fault_stale()).  In a plain VM the
# pages are ordinary memory.  Reports: each vCPU, the sum of its qwords.
.intel_syntax noprefix
.include "emu.inc"

.equ PAGES, 2
.equ AREA, 0x1c00000                    # a 2M region of its own, outside the image
.equ SIZE, PAGES * PAGE_SIZE
.equ ROUNDS, 24

    .data
    .balign 64
srw_ready: .quad 0

    .text
    .globl _start
_start:
    mov r12, rdi                        # r12 = vCPU index
    call emu_shared_bit
    mov r13, rax                        # r13 = the shared bit (0 in a plain VM)
    mov r14, AREA                       # r14 = where the pages are seen
    test r13, r13
    jz 1f
    mov r14, TD_SHARED_WINDOW_GVA + AREA
1:  test r12, r12
    jnz 3f
    test r13, r13
    jz 2f
    mov rdi, AREA
    or rdi, r13
    mov rsi, SIZE
    call emu_map_gpa
    test rax, rax
    jnz srw_failed_map
2:  mov qword ptr [rip + srw_ready], 1
3:  cmp qword ptr [rip + srw_ready], 1
    je 4f
    pause
    jmp 3b
4:  mov r15, ROUNDS
5:  mov rdi, r14
    mov rcx, PAGES
6:  mov rax, [rdi + r12 * 8]
    add rax, r15
    mov [rdi + r12 * 8], rax
    add rdi, PAGE_SIZE
    dec rcx
    jnz 6b
    pause
    dec r15
    jnz 5b
    xor rbx, rbx
    mov rdi, r14
    mov rcx, PAGES
7:  add rbx, [rdi + r12 * 8]
    add rdi, PAGE_SIZE
    dec rcx
    jnz 7b
    REPORT rbx
    EXIT
srw_failed_map:
    FAIL 0x60
