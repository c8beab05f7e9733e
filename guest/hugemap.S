# hugemap: a huge mapping replaces a table of 4K mappings while another vCPU faults
# below it.  Run it as a TD with 2M backing (--vm tdx --hugepages 2m).
#   vCPU 0 converts the first page of a 2M region to shared and reads it: the region
#   has mixed attributes, so KVM maps that page at 4K (a 4K table under the 2M entry
#   of the shared EPT).  Then it converts the rest of the region to shared: the
#   region may now be mapped by one 2M page.  It lets vCPU 1 go and reads the middle
#   of the region: KVM replaces the 4K table with a 2M leaf and frees the table once
#   an RCU grace period has passed, while vCPU 1 faults on pages of the region and its
#   walk may be inside that table.
# In a plain VM the region is ordinary memory.  Reports: each vCPU, the sum it read.
.intel_syntax noprefix
.include "emu.inc"

.equ REGION, 0x2000000                  # a 2M region of its own, outside the image
.equ TOUCH, 8                           # pages vCPU 1 reads

    .data
    .balign 64
hm_go: .quad 0

    .text
    .globl _start
_start:
    mov r12, rdi
    call emu_shared_bit
    mov r13, rax                        # r13 = the shared bit (0 in a plain VM)
    mov r14, REGION                     # r14 = where the region is seen
    test r13, r13
    jz 1f
    mov r14, TD_SHARED_WINDOW_GVA + REGION
1:  test r12, r12
    jnz hm_second
    test r13, r13
    jz 2f
    mov rdi, REGION
    or rdi, r13
    mov rsi, PAGE_SIZE
    call emu_map_gpa                    # the first page: shared, the rest private
    test rax, rax
    jnz hm_failed_map
    mov rbx, [r14]                      # mapped at 4K: the region is mixed
    mov rdi, REGION + PAGE_SIZE
    or rdi, r13
    mov rsi, HUGE_PAGE_SIZE - PAGE_SIZE
    call emu_map_gpa                    # the rest: the region is all shared now
    test rax, rax
    jnz hm_failed_map
2:  mov qword ptr [rip + hm_go], 1
    add rbx, [r14 + HUGE_PAGE_SIZE / 2] # a 2M mapping replaces the 4K table
    REPORT rbx
    EXIT
hm_second:
    cmp qword ptr [rip + hm_go], 1
    je 3f
    pause
    jmp hm_second
3:  xor rbx, rbx
    mov rcx, TOUCH
    lea rdi, [r14 + PAGE_SIZE]
4:  add rbx, [rdi]
    add rdi, PAGE_SIZE
    dec rcx
    jnz 4b
    REPORT rbx
    EXIT
hm_failed_map:
    FAIL 0x70
