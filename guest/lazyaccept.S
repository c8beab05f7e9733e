# lazyaccept: private memory accepted lazily, through #VE.  Every vCPU loads
# the runtime's IDT (emu_idt_init: in a TD its #VE handler); vCPU 0 writes and
# reads back 8 private pages it never accepted: in a TD without
# SEPT_VE_DISABLE (`--td-attr ve`) each first access to a PENDING page is a
# #VE; the handler gets the GPA with TDG.VP.VEINFO.GET and accepts the page
# (TDG.MEM.PAGE.ACCEPT), and the access runs again.  With SEPT_VE_DISABLE
# (the default TD) an access to a PENDING page kills the TD, so the guest
# asks TDG.VP.INFO for the attributes and then accepts the pages up front.
# Finally every vCPU ends with a bare HLT: in a TD that is a #VE too (with or
# without SEPT_VE_DISABLE), which the handler turns into
# TDG.VP.VMCALL<Instruction.HLT>.
# Reports: the number of pages, the sum of what it read back (the same
# everywhere: 8, 0x8000000000000024).

.intel_syntax noprefix
.include "emu.inc"

.equ AREA,   0x1000000                      # 16 MiB: above the image, inside every memory size
.equ NPAGES, 8
.equ SEPT_VE_DISABLE_BIT, 28

    .text
    .globl _start
    .type _start, @function
_start:
    call emu_idt_init
    test rdi, rdi
    jnz halt
    call emu_is_td
    test eax, eax
    jz touch
    mov eax, TDG_VP_INFO
    TDCALL
    bt rdx, SEPT_VE_DISABLE_BIT             # RDX = the TD's attributes
    jnc touch
    mov edi, AREA                           # #VE on PENDING pages is off: accept first
    mov esi, NPAGES * PAGE_SIZE
    call emu_accept
    test rax, rax
    jz touch
    FAIL 1
touch:
    mov ebx, AREA
    xor ecx, ecx
    .globl touch_loop
touch_loop:
    lea rax, [rcx + 1]
    mov qword ptr [rbx + 8], rax            # the first access to the page: a #VE in a lazy TD
    add rbx, PAGE_SIZE
    inc ecx
    cmp ecx, NPAGES
    jb touch_loop
    mov ebx, AREA
    xor ecx, ecx
    mov rdx, 0x8000000000000000
sum_loop:
    add rdx, qword ptr [rbx + 8]
    add rdx, qword ptr [rbx]                # the rest of the page reads as zero
    add rbx, PAGE_SIZE
    inc ecx
    cmp ecx, NPAGES
    jb sum_loop
    REPORT NPAGES
    REPORT rdx
halt:
    call emu_is_td
    test eax, eax
    jz .Lplain
    hlt                                     # a TD: #VE, then TDG.VP.VMCALL<Instruction.HLT>
    jmp halt
.Lplain:
    EXIT
