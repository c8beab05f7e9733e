# touch: every vCPU touches its share of a page-aligned .bss area, one page at
# a time, with the three kinds of access a TLB miss can be for:
#   read   the first word (the loader zeroed .bss: it must be 0),
#   write  a pattern to it (page index * 0x1000 + 0x5a),
#   fetch  a code stub it writes at offset 0x800 and calls
#          (`movabs rax, <page index>; ret`, stored byte by byte),
# then reads the pattern back.  vCPU i of n takes pages i, i+n, i+2n, ... so
# the vCPUs fault on disjoint pages concurrently.
# Reports (per vCPU, in order): the number of pages it touched, then the sum
# of the patterns it read back.  Any mismatch is a FAIL with the codes below.

.intel_syntax noprefix
.include "emu.inc"

.equ TOUCH_PAGES, 32
.equ STUB_OFFSET, 0x800
.equ PATTERN_LOW, 0x5a

# FAIL codes
.equ FAIL_BAD_ARGS,   1     # RSI = 0 or RDI >= RSI
.equ FAIL_NOT_ZERO,   2     # a page's first word was not 0 before our write
.equ FAIL_STUB,       3     # the stub returned the wrong page index
.equ FAIL_READBACK,   4     # the pattern did not read back

    .section .bss
    .balign PAGE_SIZE
touch_area:
    .skip TOUCH_PAGES * PAGE_SIZE

    .text
    .globl _start
    .type _start, @function
_start:
    test rsi, rsi
    jz bad_args
    cmp rdi, rsi
    jae bad_args
    mov r12, rdi                    # r12 = page index
    mov r13, rsi                    # r13 = stride (number of vCPUs)
    xor r14d, r14d                  # r14 = pages touched
    xor r15d, r15d                  # r15 = checksum of patterns read back
    lea rbp, [rip + touch_area]

touch_loop:
    cmp r12, TOUCH_PAGES
    jae touch_done
    mov rbx, r12
    shl rbx, 12
    add rbx, rbp                    # rbx = this page

    # read: the first access to the page
    mov rax, qword ptr [rbx]
    test rax, rax
    jnz not_zero

    # write the pattern
    mov rax, r12
    shl rax, 12
    add rax, PATTERN_LOW
    mov qword ptr [rbx], rax

    # write the stub `48 b8 imm64` (movabs rax, imm64) `c3` (ret), with the
    # page index as imm64, one byte at a time
    lea rdi, [rbx + STUB_OFFSET]
    mov byte ptr [rdi], 0x48
    mov byte ptr [rdi + 1], 0xb8
    mov rax, r12
    mov ecx, 8
stub_imm_loop:
    mov byte ptr [rdi + 2], al      # little-endian: lowest byte first
    shr rax, 8
    inc rdi
    dec ecx
    jnz stub_imm_loop
    mov byte ptr [rdi + 2], 0xc3    # rdi advanced by 8: this is offset 10

    # fetch: run the stub from the page
    lea rax, [rbx + STUB_OFFSET]
    call rax
    cmp rax, r12
    jne stub_wrong

    # read the pattern back
    mov rax, r12
    shl rax, 12
    add rax, PATTERN_LOW
    mov rdx, qword ptr [rbx]
    cmp rdx, rax
    jne readback_wrong
    add r15, rdx
    inc r14

    add r12, r13
    jmp touch_loop

touch_done:
    REPORT r14
    REPORT r15
    EXIT

bad_args:
    FAIL FAIL_BAD_ARGS
not_zero:
    FAIL FAIL_NOT_ZERO
stub_wrong:
    FAIL FAIL_STUB
readback_wrong:
    FAIL FAIL_READBACK
    .size _start, . - _start
