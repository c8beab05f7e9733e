# exits: the exits every guest makes, the same in a plain VM and in a TD.  vCPU 0
# loads the runtime's IDT (in a TD its #VE handler turns port I/O, CPUID and MSRs
# into TDG.VP.VMCALLs) and a #GP handler of its own, then:
#   writes "exits\n" to the debug console (port 0xe9, one OUT per byte) and a
#     byte to port 0x80 (a sink);
#   reads AL from port 0x60 (no device: all ones) and EAX from port 0xe9 (the
#     console's readback value 0xe9 in each byte);
#   CPUID 0x40000000: KVM's signature ("KVMK" in EBX);
#   RDMSR of MSR_CORE_THREAD_COUNT (0x35): the VMM answers it (1 core, 1 thread);
#   RDMSR of IA32_PAT: the power-on value;
#   RDMSR of an MSR nobody has (0xdeadbeef) and WRMSR of EFER = 0 in long mode:
#     each a #GP, counted by the handler, which skips the instruction.
# Reports: 0xff, 0xe9e9e9e9, 0x4b4d564b, 0x10001, 0x0007040600070406, 2.

.intel_syntax noprefix
.include "emu.inc"

    .text
    .globl _start
    .type _start, @function
_start:
    test rdi, rdi
    jnz done
    call emu_idt_init
    mov edi, 13
    lea rsi, [rip + gp_handler]
    call emu_idt_set
    lea rsi, [rip + msg]
    mov dx, EMU_DEBUGCON_PORT
1:  lodsb
    test al, al
    jz 2f
    out dx, al
    jmp 1b
2:  mov al, 0x42
    out IO_DELAY_PORT, al
    xor eax, eax
    in al, 0x60
    REPORT rax
    mov dx, EMU_DEBUGCON_PORT
    in eax, dx
    REPORT rax
    mov eax, 0x40000000
    xor ecx, ecx
    cpuid
    REPORT rbx
    mov ecx, 0x35                           # MSR_CORE_THREAD_COUNT
    rdmsr
    REPORT rax
    mov ecx, 0x277                          # IA32_PAT
    rdmsr
    shl rdx, 32
    or rax, rdx
    REPORT rax
    mov ecx, 0xdeadbeef
    .globl bad_rdmsr
bad_rdmsr:
    rdmsr                                   # #GP
    mov ecx, 0xc0000080                     # EFER
    xor eax, eax
    xor edx, edx
    .globl bad_wrmsr
bad_wrmsr:
    wrmsr                                   # #GP: LME cannot change while paging is on
    REPORT qword ptr [rip + gp_count]
done:
    EXIT

# #GP: count it and skip the RDMSR/WRMSR (two bytes) that raised it.
gp_handler:
    add rsp, 8                              # the error code
    inc qword ptr [rip + gp_count]
    add qword ptr [rsp], 2
    iretq

    .section .rodata
msg:
    .asciz "exits\n"

    .section .data
    .balign 8
gp_count:
    .quad 0
