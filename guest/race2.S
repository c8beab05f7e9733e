# race2: the seed patch's race.  Two vCPUs accept and touch private 4K pages of
# the same 2M region that nothing has mapped yet, at the same time.  Each one's
# first ACCEPT exits to KVM, which must link a new page table under the 2M entry
# (TDH.MEM.SEPT.ADD) and then AUG the 4K page.  Without the freeze protocol the
# other vCPU can see the 2M mirror entry present before the S-EPT has the level,
# and its TDH.MEM.PAGE.AUG fails (TDX_EPT_WALK_FAILED): a KVM_BUG_ON.
# Each vCPU reports the value it wrote and read back.
.intel_syntax noprefix
.include "emu.inc"

.equ AREA, 0x1400000                    # 20 MiB: a 2M region of its own, outside the image

    .text
    .globl _start
_start:
    mov rbx, rdi
    shl rbx, 12
    add rbx, AREA                       # rbx = this vCPU's page (GPA = GVA)
    mov rdi, rbx
    mov rsi, PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz race2_accept_failed
    cmp qword ptr [rbx], 0
    jne race2_not_zero
    lea rax, [rbx + 0x2a]               # the value: the page's address + 0x2a
    mov [rbx], rax
    cmp [rbx], rax
    jne race2_lost
    REPORT rax
    EXIT
race2_accept_failed:
    FAIL 0x30
race2_not_zero:
    FAIL 0x31
race2_lost:
    FAIL 0x32
