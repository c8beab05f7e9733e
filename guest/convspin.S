# convspin: pages converted private -> shared -> private while another vCPU, which
# used them, spins beside them in guest mode.
#   vCPU 1 accepts the pages and writes them (its TLB now holds them), then spins
#   (PAUSE) until vCPU 0 has converted them to shared and written pattern B through
#   the shared alias; it reads B there (its TLB now holds the shared alias too) and
#   spins again, without PAUSE, while vCPU 0 converts them back to private,
#   accepts them (they read as zero) and writes pattern C.  Then vCPU 1 reads C.
# Each conversion zaps what vCPU 1 may still cache while it runs guest code: KVM
# must kick it (a remote TLB flush for the shared EPT; TRACK and the kick out of
# the TD before TDH.MEM.PAGE.REMOVE for the S-EPT).  In a plain VM there is no
# conversion; the handshake and the reports are the same.
# Reports: vCPU 0 the sum of C; vCPU 1 the sum of B it read, then the sum of C.
.intel_syntax noprefix
.include "emu.inc"

.equ PAGES, 2
.equ AREA, 0x1800000                    # a 2M region of its own, outside the image
.equ SIZE, PAGES * PAGE_SIZE
.equ PATTERN_A, 0xa0a0a0a000000000
.equ PATTERN_B, 0xb0b0b0b000000000
.equ PATTERN_C, 0xc0c0c0c000000000

    .data
    .balign 64
cs_phase: .quad 0

    .text
    .globl _start
_start:
    cmp rdi, 1
    je cs_user
    test rdi, rdi
    jnz cs_done

# vCPU 0: converts
    mov rdi, 1
    call cs_wait_pause
    call emu_shared_bit
    mov r12, rax                        # r12 = the shared bit (0 in a plain VM)
    test r12, r12
    jz 1f
    mov rdi, AREA
    or rdi, r12
    mov rsi, SIZE
    call emu_map_gpa                    # to shared: BLOCK, TRACK, kick, REMOVE
    test rax, rax
    jnz cs_failed_map
1:  call cs_alias
    mov rax, PATTERN_B
    call cs_fill
    mov qword ptr [rip + cs_phase], 2
    mov rdi, 3
    call cs_wait_pause
    test r12, r12
    jz 2f
    mov rdi, AREA                       # back to private, a page at a time: each zaps the
    mov rsi, PAGE_SIZE                  # shared EPT, flushes and kicks vCPU 1 again
    call emu_map_gpa
    test rax, rax
    jnz cs_failed_map
    mov rdi, AREA + PAGE_SIZE
    mov rsi, PAGE_SIZE
    call emu_map_gpa
    test rax, rax
    jnz cs_failed_map
    mov rdi, AREA
    mov rsi, SIZE
    call emu_accept
    test rax, rax
    jnz cs_failed_accept
    mov rdi, AREA
    call cs_sum
    test rax, rax
    jnz cs_not_zero                     # re-accepted pages read as zero
2:  mov rdi, AREA
    mov rax, PATTERN_C
    call cs_fill
    mov r13, rax
    mov qword ptr [rip + cs_phase], 4
    REPORT r13
    jmp cs_done

# vCPU 1: uses the pages, then spins beside them
cs_user:
    mov rdi, AREA
    mov rsi, SIZE
    call emu_accept
    test rax, rax
    jnz cs_failed_accept
    mov rdi, AREA
    mov rax, PATTERN_A
    call cs_fill
    mov rbx, rax
    mov rdi, AREA
    call cs_sum
    cmp rax, rbx
    jne cs_lost
    mov qword ptr [rip + cs_phase], 1
    mov rdi, 2
    call cs_wait_pause
    call cs_alias
    call cs_sum
    REPORT rax                          # B's sum
    mov qword ptr [rip + cs_phase], 3
1:  cmp qword ptr [rip + cs_phase], 4   # spin without PAUSE: the slice budget preempts it
    jne 1b
    mov rdi, AREA
    call cs_sum
    REPORT rax                          # C's sum
cs_done:
    EXIT

# cs_alias: rdi = the shared alias of AREA in a TD (the loader's window), AREA itself in a plain VM
cs_alias:
    mov rdi, AREA
    call emu_shared_bit
    test rax, rax
    jz 1f
    mov rdi, TD_SHARED_WINDOW_GVA + AREA
1:  ret

# cs_wait_pause: spin with PAUSE until cs_phase == rdi
cs_wait_pause:
    cmp [rip + cs_phase], rdi
    je 1f
    pause
    jmp cs_wait_pause
1:  ret

# cs_fill: write rax + i at every qword of the PAGES pages at rdi; rax = the sum written
cs_fill:
    mov rcx, SIZE / 8
    xor rdx, rdx
    mov rsi, rax
1:  mov [rdi], rsi
    add rdx, rsi
    inc rsi
    add rdi, 8
    dec rcx
    jnz 1b
    mov rax, rdx
    ret

# cs_sum: rax = the sum of the qwords of the PAGES pages at rdi
cs_sum:
    mov rcx, SIZE / 8
    xor rax, rax
1:  add rax, [rdi]
    add rdi, 8
    dec rcx
    jnz 1b
    ret

cs_failed_map:
    FAIL 0x40
cs_failed_accept:
    FAIL 0x41
cs_not_zero:
    FAIL 0x42
cs_lost:
    FAIL 0x43
