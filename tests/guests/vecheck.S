.intel_syntax noprefix
.include "emu.inc"
    .text
    .globl _start
_start:
    call emu_idt_init
    mov edi, 20
    lea rsi, [rip + ve_handler]
    call emu_idt_set
    mov edi, 8
    lea rsi, [rip + df_handler]
    call emu_idt_set
    mov ebx, 0x1000000
    .globl access
access:
    mov qword ptr [rbx + 0x18], rax
    .globl hlt1
hlt1:
    hlt
    .globl hlt2
hlt2:
    hlt
    .globl hlt3
hlt3:
    hlt
    FAIL 3

ve_handler:
    push rax
    lea rax, [rip + hlt2]
    cmp qword ptr [rsp + 8], rax
    pop rax
    je .Lunread
    push rax
    push rcx
    push rdx
    push r8
    push r9
    push r10
    mov eax, TDG_VP_VEINFO_GET
    TDCALL
    REPORT rax
    REPORT rcx
    REPORT rdx
    REPORT r8
    REPORT r9
    REPORT r10
    cmp ecx, 48
    jne .Lskip
    push rdi
    push rsi
    mov rdi, r9
    and rdi, -4096
    mov esi, 4096
    call emu_accept
    pop rsi
    pop rdi
    jmp .Lret
.Lskip:
    mov eax, r10d
    add qword ptr [rsp + 48], rax
.Lret:
    pop r10
    pop r9
    pop r8
    pop rdx
    pop rcx
    pop rax
    iretq
.Lunread:
    REPORT 0x20
    add qword ptr [rsp], 1
    iretq

df_handler:
    REPORT 8
    REPORT qword ptr [rsp + 8]
    REPORT qword ptr [rsp + 16]
    mov eax, TDG_VP_VEINFO_GET
    TDCALL
    REPORT rax
    REPORT rcx
    REPORT r10
    mov eax, TDG_VP_VEINFO_GET
    mov ecx, 0x77
    TDCALL
    REPORT rax
    REPORT rcx
    EXIT
