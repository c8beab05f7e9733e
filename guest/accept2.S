# accept2: every vCPU accepts the same private pages of a 2M region nothing has
# mapped yet, at the same time.  One vCPU's ACCEPT exits and KVM maps the page
# (SEPT.ADD, AUG) while another vCPU's ACCEPT of the same page may hold the S-EPT
# entry's lock in the TDX module: the module answers BUSY, to KVM (which retries the
# fault) or to the guest (whose runtime retries the ACCEPT); a page accepted twice
# answers TDX_PAGE_ALREADY_ACCEPTED, which the runtime takes as success.
# Then each vCPU writes its own qword in every page, all meet at a barrier, and each
# checks every vCPU's qword.  Reports: the number of qwords checked (pages * vCPUs).
.intel_syntax noprefix
.include "emu.inc"

.equ PAGES, 4
.equ AREA, 0x1a00000                    # a 2M region of its own, outside the image
.equ SIZE, PAGES * PAGE_SIZE

    .data
    .balign 64
a2_arrived: .quad 0

    .text
    .globl _start
_start:
    mov r12, rdi                        # r12 = vCPU index
    mov r13, rsi                        # r13 = vCPUs
    mov rdi, AREA
    mov rsi, SIZE
    call emu_accept
    test rax, rax
    jnz a2_failed_accept
    mov rcx, PAGES
    mov rdi, AREA
    lea rax, [r12 + 0x100]
1:  mov [rdi + r12 * 8], rax            # this vCPU's qword of the page
    add rdi, PAGE_SIZE
    dec rcx
    jnz 1b
    lock inc qword ptr [rip + a2_arrived]
2:  cmp [rip + a2_arrived], r13         # wait for everyone (PAUSE: a polite spin)
    je 3f
    pause
    jmp 2b
3:  xor rbx, rbx                        # rbx = qwords checked
    mov rdi, AREA
    mov rcx, PAGES
4:  xor rdx, rdx
5:  lea rax, [rdx + 0x100]
    cmp [rdi + rdx * 8], rax
    jne a2_lost
    inc rbx
    inc rdx
    cmp rdx, r13
    jne 5b
    add rdi, PAGE_SIZE
    dec rcx
    jnz 4b
    REPORT rbx
    EXIT
a2_failed_accept:
    FAIL 0x50
a2_lost:
    FAIL 0x51
