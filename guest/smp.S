# smp: vCPUs that synchronize through memory.  Each vCPU adds to a shared counter
# ITERS times under a spinlock (xchg, spinning with PAUSE), then all meet at a
# sense-reversing barrier that spins WITHOUT PAUSE (only the slice budget lets the
# others run), then vCPU 0 hands a token round the vCPUs through a flag each one
# spins on.  Every vCPU reports the counter (ITERS * vCPUs) and the token (vCPUs).
# Without guest mode lasting across scheduling points, a vCPU would spin forever.
.intel_syntax noprefix
.include "emu.inc"

.equ ITERS, 64

    .data
    .balign 64
smp_lock:    .quad 0
smp_counter: .quad 0
    .balign 64
smp_arrived: .quad 0                   # barrier: vCPUs arrived in this round
smp_sense:   .quad 0                   # barrier: flips when the last one arrives
    .balign 64
smp_token:   .quad 0                   # whose turn it is in the token ring
smp_hops:    .quad 0

    .text
    .globl _start
_start:
    mov r12, rdi                        # r12 = vCPU index
    mov r13, rsi                        # r13 = number of vCPUs
    mov r14, ITERS
smp_add:
    call smp_lock_acquire
    mov rax, [rip + smp_counter]        # a plain read-modify-write: the lock must protect it
    inc rax
    mov [rip + smp_counter], rax
    mov qword ptr [rip + smp_lock], 0   # release (x86 stores are not reordered with older stores)
    dec r14
    jnz smp_add
    call smp_barrier
    # the token ring: vCPU i waits for token == i, then passes it on
smp_wait_token:
    mov rax, [rip + smp_token]
    cmp rax, r12
    je smp_have_token
    jmp smp_wait_token                  # no PAUSE: the budget must preempt this spin
smp_have_token:
    inc qword ptr [rip + smp_hops]
    lea rax, [r12 + 1]
    mov [rip + smp_token], rax
    call smp_barrier                    # everyone has passed the token
    mov rax, [rip + smp_counter]
    REPORT rax
    mov rax, [rip + smp_hops]
    REPORT rax
    EXIT

smp_lock_acquire:
    mov eax, 1
    xchg rax, [rip + smp_lock]
    test rax, rax
    jz 2f
1:  pause                               # spin politely until it looks free
    cmp qword ptr [rip + smp_lock], 0
    jne 1b
    jmp smp_lock_acquire
2:  ret

# Sense-reversing barrier over r13 vCPUs (spins without PAUSE).
smp_barrier:
    mov rcx, [rip + smp_sense]
    mov eax, 1
    lock xadd [rip + smp_arrived], rax
    inc rax
    cmp rax, r13
    jne 1f
    mov qword ptr [rip + smp_arrived], 0
    not rcx
    mov [rip + smp_sense], rcx          # the last one releases the others
    ret
1:  cmp [rip + smp_sense], rcx
    je 1b
    ret
