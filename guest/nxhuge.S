# nxhuge: instruction fetches and data faults in one 2M region, for KVM's NX huge page
# mitigation.  Run it with 2M backing and the mitigation on (--vcpus 2 --hugepages 2m
# --nx-huge-pages; a plain VM).  The image's 2M region (GPA 0-2M) could be one 2M page, but
# an instruction fetch there is mapped at 4K: its table is "NX huge page disallowed" (a
# possible NX huge page).  Each vCPU then faults on data pages of its own in the same region:
# those faults want 2M, and go down into that table at 4K (disallowed_hugepage_adjust()).
# The NX recovery worker (--host 'nx-recover 0-0x200000[@STEP]') zaps the table under
# mmu_lock for read while such a walk may be inside it: RCU must keep the table until the
# walk is out.  Reports: each vCPU, the sum of what it read (PAGES * (1 + 2 + .. + ROUNDS)).
.intel_syntax noprefix
.include "emu.inc"

.equ PAGES, 6                           # data pages per vCPU
.equ ROUNDS, 2

    .bss
    .balign 4096
nx_area: .skip 2 * PAGES * PAGE_SIZE    # vCPU 0's pages, then vCPU 1's

    .text
    .globl _start
_start:
    mov r12, rdi                        # r12 = vCPU index
    and r12, 1
    lea r14, [rip + nx_area]
    imul rax, r12, PAGES * PAGE_SIZE
    add r14, rax                        # r14 = this vCPU's pages
    xor rbx, rbx
    mov r15, ROUNDS
1:  mov rdi, r14
    mov rcx, PAGES
2:  inc qword ptr [rdi]                 # a write fault at 4K below the disallowed table
    add rbx, [rdi]
    add rdi, PAGE_SIZE
    dec rcx
    jnz 2b
    dec r15
    jnz 1b
    REPORT rbx
    EXIT
