# hpsplit: a 4K ACCEPT inside a 2M PENDING page.  Each vCPU works in a 2M region of its own.
# In a TD without SEPT_VE_DISABLE (--sept-ve-disable off) it loads the runtime's IDT and writes
# to page 5 of the region before accepting anything: the EPT violation makes KVM map the whole
# region with one 2M TDH.MEM.PAGE.AUG (--tdx-huge-pages), the write to the PENDING page is a #VE,
# and the runtime's handler accepts the page at 4K: the module answers with an EPT violation of
# type ACCEPT at level 4K, and KVM splits the 2M page (BLOCK, TRACK, DEMOTE) before the ACCEPT
# runs again.  Elsewhere (the default TD, a plain VM) it accepts page 5 at 4K first.
# Then it accepts page 6 at 4K, and the whole region at 2M, which now has 4K pages.
# Reports per vCPU: the 4K ACCEPT's status (0), the 2M ACCEPT's (TDX_PAGE_SIZE_MISMATCH | 1 in a
# TD, 0 outside), what page 5 holds and the first qword of page 6 (0).
.intel_syntax noprefix
.include "emu.inc"

.equ REGIONS, 0x2400000
.equ SEPT_VE_DISABLE_BIT, 28

    .text
    .globl _start
_start:
    mov r12, rdi
    mov rbx, r12
    shl rbx, 21
    add rbx, REGIONS                    # rbx = this vCPU's region
    call emu_idt_init
    mov r14, 0x5050505000000000
    add r14, r12                        # r14 = what page 5 gets
    call emu_is_td
    test eax, eax
    jz hs_accept_first
    mov eax, TDG_VP_INFO
    TDCALL
    bt rdx, SEPT_VE_DISABLE_BIT         # RDX = the TD's attributes
    jnc hs_touch                        # #VE on PENDING pages: touch first
hs_accept_first:
    lea rdi, [rbx + 5 * PAGE_SIZE]
    mov esi, PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz hs_failed
hs_touch:
    mov [rbx + 5 * PAGE_SIZE + 16], r14 # a #VE in a lazy TD: the 4K ACCEPT splits the 2M page
    lea rdi, [rbx + 6 * PAGE_SIZE]
    ACCEPT_LEVEL rdi, TDX_PS_4K
    mov r13, rax
    ACCEPT_LEVEL rbx, TDX_PS_2M
    REPORT r13
    REPORT rax
    REPORT qword ptr [rbx + 5 * PAGE_SIZE + 16]
    REPORT qword ptr [rbx + 6 * PAGE_SIZE]
    EXIT
hs_failed:
    FAIL 0x62
