# pagewalk: the guest builds its own 4-level page tables, loads them into CR3
# and checks that one physical page seen through two different mappings holds
# the same data.  Only vCPU 0 does this; the others EXIT at once.
#
# Mappings (GVA -> GPA), all P|RW, no A/D preset, built by map_page below from
# a pool of zeroed .bss pages (the first one is the PML4):
#   0 .. 4 MiB                       identity, 2M pages (the image is at 1 MiB)
#   the 2M page holding RSP          identity, 2M page (the loader puts the
#                                    stacks in the top 4 MiB of guest memory)
#   ALIAS_4K_GVA + k*4K, k = 0..3    -> alias_data + k*4K (.bss), 4K pages
#   ALIAS_2M_GVA                     -> ALIAS_2M_GPA, one 2M page
# ALIAS_2M_GPA is 2 MiB: it is guest memory for any memory size the loader
# accepts (>= 8 MiB; 4 MiB would be the loader's page tables at 8 MiB) and it
# lies inside the identity-mapped first 4 MiB, so it can be read both ways.
# The image must end below it (checked).
#
# Reports, in order:
#   1. CR3 as read back after `mov cr3` (the GPA of pt_pool, our PML4)
#   2. V1 written via ALIAS_4K_GVA page 1, read via the identity map
#   3. V2 written via the identity map of alias_data page 3, read via the alias
#   4. V3 written via ALIAS_2M_GVA, read via the identity map
#   5. V4 written via the identity map, read via ALIAS_2M_GVA
# In a TD the 2M window is private memory outside the loaded image, so it is
# accepted first (emu_accept; a no-op in a plain VM).

.intel_syntax noprefix
.include "emu.inc"

.equ PT_POOL_PAGES,   8
.equ ALIAS_4K_PAGES,  4
.equ ALIAS_4K_GVA,    0x40000000
.equ ALIAS_2M_GVA,    0x80000000
.equ ALIAS_2M_GPA,    0x200000
.equ LOW_IDENTITY,    0x400000          # identity-mapped first 4 MiB

.equ PTE_P,           0x1
.equ PTE_RW,          0x2
.equ PTE_PS,          0x80
.equ PTE_ADDR_MASK,   0x000ffffffffff000 # bits 51:12

.equ V1, 0x4b1dface00000001
.equ V2, 0x4b1dface00000002
.equ V3, 0x4b1dface00000003
.equ V4, 0x4b1dface00000004

# FAIL codes
.equ FAIL_IMAGE_TOO_BIG,   1    # the image reaches into the 2M window
.equ FAIL_POOL_EXHAUSTED,  2    # more page-table pages needed than the pool has
.equ FAIL_MAP_CONFLICT,    3    # a GVA is already mapped (or a large page is in the way)
.equ FAIL_MISALIGNED,      4    # map_page got a GVA/GPA not aligned to the page size
.equ FAIL_ACCEPT,          5    # TDG.MEM.PAGE.ACCEPT failed (TD only)
.equ FAIL_CHECK_BASE,      0x10 # + n: check n read back the wrong value

    .section .bss
    .balign PAGE_SIZE
pt_pool:                                # page-table pages; pt_pool[0] = PML4
    .skip PT_POOL_PAGES * PAGE_SIZE
alias_data:                             # the targets of the 4K aliases
    .skip ALIAS_4K_PAGES * PAGE_SIZE

    .section .data
    .balign 8
pt_next:                                # index of the next free pool page
    .quad 0

    .text
    .globl _start
    .type _start, @function
_start:
    test rdi, rdi
    jnz other_vcpu

    lea rax, [rip + __image_end]
    cmp rax, ALIAS_2M_GPA
    ja image_too_big

    call pt_alloc                       # the PML4
    mov r15, rax                        # r15 = the CR3 we will load

build_identity:
    xor edi, edi                        # [0, 2M)
    xor esi, esi
    mov edx, 2
    call map_page
    mov edi, 0x200000                   # [2M, 4M)
    mov esi, edi
    call map_page

build_stack_map:
    lea rdi, [rsp - 8]                  # where the next push goes
    and rdi, -HUGE_PAGE_SIZE
    cmp rdi, LOW_IDENTITY               # already covered (not with today's
    jb build_aliases_4k                 # loader, but cheap to be robust)
    mov rsi, rdi
    call map_page                       # rdx is still 2

build_aliases_4k:
    xor r12d, r12d                      # r12 = k
alias_4k_loop:
    mov rax, r12
    shl rax, 12
    mov edi, ALIAS_4K_GVA
    add rdi, rax
    lea rsi, [rip + alias_data]
    add rsi, rax
    mov edx, 1
    call map_page
    inc r12
    cmp r12, ALIAS_4K_PAGES
    jb alias_4k_loop

build_alias_2m:
    mov edi, ALIAS_2M_GVA               # zero-extended: 0x80000000
    mov esi, ALIAS_2M_GPA
    mov edx, 2
    call map_page

    mov edi, ALIAS_2M_GPA               # TD: private memory outside the image
    mov esi, HUGE_PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz accept_failed

switch_cr3:
    mov cr3, r15
    mov rax, cr3
    REPORT rax

check_4k_alias_to_identity:
    mov rax, V1
    mov edi, ALIAS_4K_GVA + 1 * PAGE_SIZE + 0x10
    mov qword ptr [rdi], rax
    lea rsi, [rip + alias_data + 1 * PAGE_SIZE + 0x10]
    mov rdx, qword ptr [rsi]
    cmp rdx, rax
    jne check1_failed
    REPORT rdx

check_identity_to_4k_alias:
    mov rax, V2
    lea rdi, [rip + alias_data + 3 * PAGE_SIZE + 0x18]
    mov qword ptr [rdi], rax
    mov esi, ALIAS_4K_GVA + 3 * PAGE_SIZE + 0x18
    mov rdx, qword ptr [rsi]
    cmp rdx, rax
    jne check2_failed
    REPORT rdx

check_2m_alias_to_identity:
    mov rax, V3
    mov edi, ALIAS_2M_GVA + 0x1238
    mov qword ptr [rdi], rax
    mov esi, ALIAS_2M_GPA + 0x1238
    mov rdx, qword ptr [rsi]
    cmp rdx, rax
    jne check3_failed
    REPORT rdx

check_identity_to_2m_alias:
    mov rax, V4
    mov edi, ALIAS_2M_GPA + 0x1ff008     # the last 4K page of the 2M page
    mov qword ptr [rdi], rax
    mov esi, ALIAS_2M_GVA + 0x1ff008
    mov rdx, qword ptr [rsi]
    cmp rdx, rax
    jne check4_failed
    REPORT rdx

pagewalk_done:
    EXIT

other_vcpu:
    EXIT

image_too_big:
    FAIL FAIL_IMAGE_TOO_BIG
accept_failed:
    FAIL FAIL_ACCEPT
check1_failed:
    FAIL FAIL_CHECK_BASE + 1
check2_failed:
    FAIL FAIL_CHECK_BASE + 2
check3_failed:
    FAIL FAIL_CHECK_BASE + 3
check4_failed:
    FAIL FAIL_CHECK_BASE + 4
    .size _start, . - _start

# ---------------------------------------------------------------------------
# pt_alloc: rax = GPA of the next zeroed page-table page from the pool.
# The pool is .bss, which the loader zeroed, and is identity-mapped by the
# loader's tables, so its GVA is its GPA while we build.  Clobbers flags.
# ---------------------------------------------------------------------------
    .type pt_alloc, @function
pt_alloc:
    mov rax, qword ptr [rip + pt_next]
    cmp rax, PT_POOL_PAGES
    jae pool_exhausted
    inc qword ptr [rip + pt_next]
    shl rax, 12
    push rcx
    lea rcx, [rip + pt_pool]
    add rax, rcx
    pop rcx
    ret
pool_exhausted:
    FAIL FAIL_POOL_EXHAUSTED
    .size pt_alloc, . - pt_alloc

# ---------------------------------------------------------------------------
# map_page(rdi = gva, rsi = gpa, rdx = level): map one page in the tables
# rooted at pt_pool[0]; level 1 = a 4K PTE, 2 = a 2M PDE (PS).  Missing
# intermediate tables come from pt_alloc.  A GVA that is already mapped, or
# whose path runs into a large page, is a FAIL: this guest never remaps.
# Clobbers rax and flags.
# ---------------------------------------------------------------------------
    .type map_page, @function
map_page:
    push rbx
    push rcx
    push r8
    push r9
    push r10
    # r9 = shift of the leaf's index = 12 + 9 * (level - 1) = 9 * level + 3
    lea r9, [rdx + rdx * 8 + 3]
    # gva and gpa must be aligned to the page size: low r9 bits clear
    mov ecx, r9d
    mov rax, 1
    shl rax, cl
    dec rax
    test rdi, rax
    jnz map_misaligned
    test rsi, rax
    jnz map_misaligned

    mov r10, PTE_ADDR_MASK
    lea rbx, [rip + pt_pool]            # rbx = current table (the PML4)
    mov ecx, 39                         # index shift of the PML4 level
map_descend:
    cmp ecx, r9d
    je map_leaf
    mov rax, rdi
    shr rax, cl
    and eax, 511
    lea r8, [rbx + rax * 8]             # r8 = the entry
    mov rax, qword ptr [r8]
    test al, PTE_P
    jnz map_have_table
    call pt_alloc
    or rax, PTE_P | PTE_RW
    mov qword ptr [r8], rax
map_have_table:
    test al, PTE_PS                     # a large page where a table should be
    jnz map_conflict
    mov rbx, rax
    and rbx, r10
    sub ecx, 9
    jmp map_descend

map_leaf:
    mov rax, rdi
    shr rax, cl
    and eax, 511
    lea r8, [rbx + rax * 8]
    cmp qword ptr [r8], 0
    jne map_conflict
    mov rax, rsi
    or rax, PTE_P | PTE_RW
    cmp rdx, 1
    je map_store
    or rax, PTE_PS
map_store:
    mov qword ptr [r8], rax
    pop r10
    pop r9
    pop r8
    pop rcx
    pop rbx
    ret
map_conflict:
    FAIL FAIL_MAP_CONFLICT
map_misaligned:
    FAIL FAIL_MISALIGNED
    .size map_page, . - map_page
