# spin_waiter: vCPU 1 spins (no PAUSE) on a flag until vCPU 0 has accepted and written two
# private pages (EPT violations, TDH.MEM.PAGE.AUG in a TD) and set it.  An injected fault
# that kills the VM while vCPU 0 works leaves vCPU 1 spinning in guest mode: KVM must take
# it out (KVM_REQ_VM_DEAD and its kick), or the run must end as a hang.
# Reports: vCPU 0 the sum it wrote, vCPU 1 the flag it saw.
.intel_syntax noprefix
.include "emu.inc"

.equ AREA, 0x1c00000                    # a 2M region of its own, outside the image

    .data
    .balign 64
sw_flag: .quad 0

    .text
    .globl _start
_start:
    test rdi, rdi
    jnz sw_waiter
    mov rdi, AREA
    mov rsi, 2 * PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz sw_failed
    mov qword ptr [AREA], 0x11
    mov qword ptr [AREA + PAGE_SIZE], 0x22
    mov rax, [AREA]
    add rax, [AREA + PAGE_SIZE]
    mov qword ptr [rip + sw_flag], 1
    REPORT rax
    EXIT
sw_waiter:
    mov rax, [rip + sw_flag]
    test rax, rax
    jz sw_waiter
    REPORT rax
    EXIT
sw_failed:
    FAIL 1
