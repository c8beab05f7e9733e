# convert: private -> shared -> private conversion of CONVERT_PAGES pages, and
# what each side sees (vCPU 0 only; a TD only: in a plain VM it reports 0).
#   1. accept the pages, write pattern A privately, read it back;
#   2. MapGPA to shared (KVM removes the private pages: BLOCK, TRACK, REMOVE);
#      through the shared alias the pages hold the shared backing (zero), not A;
#      write pattern B there, read it back;
#   3. MapGPA back to private (KVM drops the shared mapping), accept again: the
#      pages read as zero, neither A nor B; write A again, read it back.
# Reports: 1 (converted), the sum of what step 2 first read (0), B's sum, the sum
# step 3 first read (0), A's sum.
.intel_syntax noprefix
.include "emu.inc"

.equ CONVERT_PAGES, 4
.equ AREA, 0x1000000
.equ SIZE, CONVERT_PAGES * PAGE_SIZE
.equ PATTERN_A, 0xa0a0a0a000000000
.equ PATTERN_B, 0xb0b0b0b000000000

    .text
    .globl _start
_start:
    test rdi, rdi
    jnz convert_exit
    call emu_shared_bit
    test rax, rax
    jz convert_not_td
    mov r12, rax                        # r12 = the shared bit
    mov rdi, AREA
    mov rsi, SIZE
    call emu_accept
    test rax, rax
    jnz convert_failed_accept
    mov rdi, AREA
    mov rax, PATTERN_A
    call fill_pages                     # rax = sum written
    mov rbx, rax
    mov rdi, AREA
    call sum_pages
    cmp rax, rbx
    jne convert_lost
    mov r13, rbx                        # r13 = A's sum

    mov rdi, AREA                       # to shared
    or rdi, r12
    mov rsi, SIZE
    call emu_map_gpa
    test rax, rax
    jnz convert_failed_map
    mov rdi, TD_SHARED_WINDOW_GVA + AREA
    call sum_pages
    mov r14, rax                        # what the shared side first held
    mov rdi, TD_SHARED_WINDOW_GVA + AREA
    mov rax, PATTERN_B
    call fill_pages
    mov rbx, rax
    mov rdi, TD_SHARED_WINDOW_GVA + AREA
    call sum_pages
    cmp rax, rbx
    jne convert_lost
    mov r15, rbx                        # r15 = B's sum

    mov rdi, AREA                       # back to private
    mov rsi, SIZE
    call emu_map_gpa
    test rax, rax
    jnz convert_failed_map
    mov rdi, AREA
    mov rsi, SIZE
    call emu_accept
    test rax, rax
    jnz convert_failed_accept
    mov rdi, AREA
    call sum_pages
    mov rbp, rax                        # what the private side holds after re-accepting
    mov rdi, AREA
    mov rax, PATTERN_A
    call fill_pages
    mov rbx, rax
    mov rdi, AREA
    call sum_pages
    cmp rax, rbx
    jne convert_lost

    REPORT 1
    REPORT r14
    REPORT r15
    REPORT rbp
    REPORT rbx
convert_exit:
    EXIT
convert_not_td:
    REPORT 0
    EXIT
convert_failed_accept:
    FAIL 0x20
convert_failed_map:
    FAIL 0x21
convert_lost:
    FAIL 0x22

# fill_pages(rdi = address, rax = pattern) -> rax = sum of the words written:
# one word every 512 bytes of each page, pattern + offset.
fill_pages:
    push rcx
    push rdx
    push rsi
    mov rsi, rax
    xor eax, eax
    xor ecx, ecx
.Lfill:
    lea rdx, [rsi + rcx]
    mov [rdi + rcx], rdx
    add rax, rdx
    add rcx, 512
    cmp rcx, SIZE
    jb .Lfill
    pop rsi
    pop rdx
    pop rcx
    ret

# sum_pages(rdi = address) -> rax = sum of the words fill_pages writes
sum_pages:
    push rcx
    xor eax, eax
    xor ecx, ecx
.Lsum:
    add rax, [rdi + rcx]
    add rcx, 512
    cmp rcx, SIZE
    jb .Lsum
    pop rcx
    ret
