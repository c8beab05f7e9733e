# idt: exceptions through the guest's own 64-bit IDT (emu_idt_init, emu_idt_set).
# vCPU 0 installs handlers for #UD, #PF and INT 0x80, then
#   runs UD2: the #UD handler reports the RIP the CPU pushed (the UD2) and the
#     RF bit of the pushed RFLAGS (set for a fault), and resumes past the UD2;
#   reads and then writes an unmapped address (1 GiB: the loader maps only
#     guest memory): the #PF handler reports the error code (0, then 2: a
#     write) and CR2, and resumes past the 3-byte access;
#   runs INT 0x80: the handler reports the pushed RIP (the next instruction).
# Reports: ud_site, 0x10000, 0, 0x40000000, 2, 0x40000000, int_next, 0x1d7.
# Other vCPUs only load the tables and report 0x1d7.  Same in a plain VM and a TD.

.intel_syntax noprefix
.include "emu.inc"

.equ UNMAPPED, 0x40000000

    .text
    .globl _start
    .type _start, @function
_start:
    mov r15, rdi
    call emu_idt_init
    test r15, r15
    jnz done
    mov edi, 6
    lea rsi, [rip + ud_handler]
    call emu_idt_set
    mov edi, 14
    lea rsi, [rip + pf_handler]
    call emu_idt_set
    mov edi, 0x80
    lea rsi, [rip + int80_handler]
    call emu_idt_set
    .globl ud_site
ud_site:
    ud2
    mov ebx, UNMAPPED
    .globl pf_read
pf_read:
    mov rax, qword ptr [rbx]                # 48 8b 03: 3 bytes
    .globl pf_write
pf_write:
    mov qword ptr [rbx], rax                # 48 89 03
    int 0x80
    .globl int_next
int_next:
done:
    REPORT 0x1d7
    EXIT

# Frame: [rsp] RIP, [rsp+8] CS, [rsp+16] RFLAGS, [rsp+24] RSP, [rsp+32] SS.  (REPORT pushes RDI
# before it reads its operand: [rsp + 8] in it is [rsp] here.)
ud_handler:
    REPORT qword ptr [rsp + 8]
    push rax
    mov rax, qword ptr [rsp + 24]
    and eax, 0x10000
    REPORT rax
    pop rax
    add qword ptr [rsp], 2
    iretq

# Frame: [rsp] error code, then RIP, CS, RFLAGS, RSP, SS.
pf_handler:
    REPORT qword ptr [rsp + 8]
    push rax
    mov rax, cr2
    REPORT rax
    pop rax
    add qword ptr [rsp + 8], 3
    add rsp, 8                              # the error code
    iretq

int80_handler:
    REPORT qword ptr [rsp + 8]
    iretq
