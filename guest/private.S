# private: a TD's private memory, page by page.  vCPU i takes pages i, i+n, ...
# of PRIVATE_PAGES pages at AREA (outside the loaded image, so nothing maps them
# yet): it accepts each (TDG.MEM.PAGE.ACCEPT: the first one faults to KVM, which
# builds the S-EPT levels and AUGs the page), checks it reads as zero, writes a
# pattern, reads it back, and reports the number of pages and a checksum.
# In a plain VM the accept is a no-op and the same checks hold.
.intel_syntax noprefix
.include "emu.inc"

.equ PRIVATE_PAGES, 16
.equ AREA, 0x1000000                    # 16 MiB

    .text
    .globl _start
_start:
    mov r12, rdi                        # r12 = this vCPU's index
    mov r13, rsi                        # r13 = number of vCPUs
    xor r14d, r14d                      # r14 = pages done
    xor r15d, r15d                      # r15 = checksum
    mov rbx, r12                        # rbx = page index
private_loop:
    cmp rbx, PRIVATE_PAGES
    jae private_done
    mov rdi, rbx
    shl rdi, 12
    add rdi, AREA                       # rdi = the page's GPA (= GVA: identity map)
    mov rsi, PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz private_accept_failed
    mov rcx, 512                        # an accepted page reads as zero
    mov rsi, rdi
private_zero_check:
    cmp qword ptr [rsi], 0
    jne private_not_zero
    add rsi, 8
    dec rcx
    jnz private_zero_check
    mov rax, rbx                        # pattern: page index * 0x10001 + 0x5a5a
    imul rax, rax, 0x10001
    add rax, 0x5a5a
    mov [rdi], rax
    mov [rdi + 0xff8], rax
    cmp [rdi], rax
    jne private_lost
    cmp [rdi + 0xff8], rax
    jne private_lost
    add r15, rax
    inc r14
    add rbx, r13
    jmp private_loop
private_done:
    REPORT r14
    REPORT r15
    EXIT
private_accept_failed:
    FAIL 0x10
private_not_zero:
    FAIL 0x11
private_lost:
    FAIL 0x12
