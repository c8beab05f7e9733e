# hpconvert: MapGPA of one 4K page inside a 2M private page.  Each vCPU accepts a 2M region of its
# own at 2M (4K pages when KVM maps 4K: TDX_PAGE_SIZE_MISMATCH), writes a qword into each of its
# 512 pages, then converts page 5 alone to shared.  KVM must zap exactly that page: with
# --tdx-huge-pages it first splits the 2M page (tdx_gmem_convert(): BLOCK, TRACK, DEMOTE), and the
# other 511 pages keep their data.  The vCPU writes page 5 through its shared alias, converts it
# back to private, accepts it at 4K and finds it zero.
# Reports per vCPU: the sum of the other 511 pages' qwords after the conversion, the value read
# back through the shared alias (0x5ad0 + vCPU), the 4K ACCEPT's status (0) and the private read
# (0); the sum is ((vCPU + 1) << 32) * 511 + 130816 - 5.  (A plain VM converts nothing: the shared
# alias is the page itself.)
.intel_syntax noprefix
.include "emu.inc"

.equ REGIONS, 0x2400000
.equ VICTIM, 5 * PAGE_SIZE

    .text
    .globl _start
_start:
    mov r12, rdi
    mov rbx, r12
    shl rbx, 21
    add rbx, REGIONS                    # rbx = this vCPU's region
    call emu_shared_bit
    mov r15, rax                        # r15 = the shared bit (0 in a plain VM)
    mov rdi, rbx
    mov esi, HUGE_PAGE_SIZE
    call emu_accept                     # 2M first, 4K if the module says PAGE_SIZE_MISMATCH
    test rax, rax
    jnz hc_failed
    lea r14, [r12 + 1]
    shl r14, 32
    xor ecx, ecx
1:  mov rax, rcx
    or rax, r14
    mov rdx, rcx
    shl rdx, 12
    mov [rbx + rdx], rax
    inc ecx
    cmp ecx, 512
    jb 1b
    lea rdi, [rbx + VICTIM]
    or rdi, r15
    mov esi, PAGE_SIZE
    call emu_map_gpa                    # page 5: private -> shared
    test rax, rax
    jnz hc_failed_map
    xor eax, eax                        # the other 511 pages kept their data
    xor ecx, ecx
2:  cmp ecx, 5
    je 3f
    mov rdx, rcx
    shl rdx, 12
    add rax, [rbx + rdx]
3:  inc ecx
    cmp ecx, 512
    jb 2b
    REPORT rax
    lea rdi, [rbx + VICTIM]             # page 5 through its shared alias
    test r15, r15
    jz 4f
    mov rax, TD_SHARED_WINDOW_GVA
    add rdi, rax
4:  lea rax, [r12 + 0x5ad0]
    mov [rdi], rax
    REPORT qword ptr [rdi]
    lea rdi, [rbx + VICTIM]
    mov esi, PAGE_SIZE
    call emu_map_gpa                    # back to private
    test rax, rax
    jnz hc_failed_map
    lea rdi, [rbx + VICTIM]
    ACCEPT_LEVEL rdi, TDX_PS_4K
    REPORT rax
    REPORT qword ptr [rbx + VICTIM]
    EXIT
hc_failed:
    FAIL 0x63
hc_failed_map:
    FAIL 0x64
