# runtime.S: the guest runtime, linked into every guest that emu.guests builds.
#
# Functions (all preserve every register and RFLAGS unless noted):
#   emu_report(rdi = value)          report a value to the host
#   emu_sync(rdi = value)            GUEST_SYNC: the host records (vCPU, value)
#   emu_assert_fail(rdi = site, rsi = a, rdx = b)
#                                    GUEST_ASSERT failed: site is the address of
#                                    the assert site in .rodata; no return
#   emu_fail(rdi = code)             end this vCPU with an error; no return
#   emu_is_td() -> rax               1 inside a TDX guest (TD), else 0
#   emu_map_gpa(rdi = gpa, rsi = size) -> rax
#                                    TDG.VP.VMCALL<MapGPA>: convert [gpa, gpa+size)
#                                    to shared (gpa has the shared bit) or private;
#                                    rax = 0 or the TDVMCALL status (no-op outside a TD)
#   emu_shared_bit() -> rax          the TD's shared-GPA bit (TDG.VP.INFO GPAW), 0 outside
#   emu_accept(rdi = gpa, rsi = size) -> rax
#                                    accept private memory in a TD (no-op
#                                    elsewhere); rax = 0 or the TDX status
#   ucall_arch_do_ucall(rdi = address) the ucall transport: the host reads the
#                                    struct ucall at rdi (a plain VM: `in` from
#                                    UCALL_PIO_PORT; a TD: an MMIO write of rdi to
#                                    ucall_mmio_gpa); clobbers rax
#   kvm_hypercall(rdi = nr, rsi = a0, rdx = a1, rcx = a2, r8 = a3) -> rax
#                                    a KVM hypercall (VMCALL; in a TD,
#                                    TDG.VP.VMCALL with R10 = nr); rax = its result
#
# Host protocol (emu/guestabi.py is the host's copy of these facts):
#   not a TD:  VMCALL with RAX = EMU_HC_REPORT / EMU_HC_FAIL / EMU_HC_SYNC, RBX = value / code
#              assert: RAX = EMU_HC_ASSERT, RBX = site, RCX = a, RDX = b
#   a TD:      TDCALL leaf 0 (TDG.VP.VMCALL) with RCX = 0x1c00 (R10-R12 exposed)
#                report: R10 = EMU_HC_REPORT, R11 = value (R10 != 0: a vendor-specific
#                        TDVMCALL, which KVM runs as hypercall R10 with argument R11)
#                sync:   R10 = EMU_HC_SYNC, R11 = value (as report)
#                assert: RCX = 0x3c00, R10 = EMU_HC_ASSERT, R11 = site, R12 = a, R13 = b
#                fail:   R10 = 0, R11 = 0x10003 (GHCI ReportFatalError), R12 = code
#                halt:   R10 = 0, R11 = 12 (GHCI Instruction.HLT): a TD may not run HLT
# The choice is made at run time (emu_is_td), so one guest ELF runs both in a
# plain VM and in a TD.

.include "emu.inc"

    .section .rodata
# Which runtime ABI this image speaks, readable by the host from the ELF (and
# keeps .rodata, and so its PT_LOAD segment, non-empty in every guest).
    .globl emu_runtime_abi
    .type emu_runtime_abi, @object
emu_runtime_abi:
    .asciz "emu guest runtime, ABI 1"
    .size emu_runtime_abi, . - emu_runtime_abi

    .section .data
# 0xff until emu_is_td has run CPUID, then 0 (not a TD) or 1 (a TD).  Several
# vCPUs may race to fill it in; they all store the same answer.
    .type emu_td_state, @object
emu_td_state:
    .byte 0xff
    .size emu_td_state, . - emu_td_state

    .text

# ---------------------------------------------------------------------------
# emu_is_td: rax = 1 when CPUID leaf 0x21 (subleaf 0) returns the vendor
# string "IntelTDX    " in EBX, EDX, ECX, else 0.  That is the test Linux's
# tdx_early_init makes; like Linux it does not first compare the leaf with
# CPUID.0:EAX, because outside a TD an out-of-range leaf returns the data of
# the highest basic leaf, which never spells "IntelTDX".
# Clobbers rax only (the return value).
# ---------------------------------------------------------------------------
    .globl emu_is_td
    .type emu_is_td, @function
emu_is_td:
    pushfq
    movzx eax, byte ptr [rip + emu_td_state]
    cmp al, 0xff
    jne .Lis_td_known
    push rbx
    push rcx
    push rdx
    mov eax, TDX_CPUID_LEAF
    xor ecx, ecx
    cpuid
    xor eax, eax
    cmp ebx, 0x65746e49             # "Inte"
    jne .Lis_td_store
    cmp edx, 0x5844546c             # "lTDX"
    jne .Lis_td_store
    cmp ecx, 0x20202020             # "    "
    jne .Lis_td_store
    mov eax, 1
.Lis_td_store:
    mov byte ptr [rip + emu_td_state], al
    pop rdx
    pop rcx
    pop rbx
.Lis_td_known:
    popfq
    ret
    .size emu_is_td, . - emu_is_td

# ---------------------------------------------------------------------------
# emu_report(rdi = value): hand one 64-bit value to the host.
# ---------------------------------------------------------------------------
    .globl emu_report
    .type emu_report, @function
emu_report:
    pushfq
    push rax
    push rbx
    push rcx
    push r10
    push r11
    push r12
    call emu_is_td
    test eax, eax
    jnz .Lreport_td
    mov eax, EMU_HC_REPORT
    mov rbx, rdi
    vmcall
    jmp .Lreport_done
.Lreport_td:
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS
    mov r10d, EMU_HC_REPORT
    mov r11, rdi
    TDCALL
.Lreport_done:
    pop r12
    pop r11
    pop r10
    pop rcx
    pop rbx
    pop rax
    popfq
    ret
    .size emu_report, . - emu_report

# ---------------------------------------------------------------------------
# emu_map_gpa(rdi = gpa, rsi = size) -> rax: GHCI MapGPA.  The VMM converts in
# steps and answers RETRY with R11 = where to go on; loop until done.
# ---------------------------------------------------------------------------
    .globl emu_map_gpa
    .type emu_map_gpa, @function
emu_map_gpa:
    pushfq
    push rcx
    push r10
    push r11
    push r12
    push r13
    push r14
    call emu_is_td
    test eax, eax
    jz .Lmap_ok
    mov r12, rdi
    lea r14, [rdi + rsi]                    # r14 = end
.Lmap_again:
    mov r13, r14
    sub r13, r12
    mov eax, TDG_VP_VMCALL
    mov ecx, 0x3c00                         # R10-R13 go to the VMM
    xor r10d, r10d
    mov r11d, GHCI_MAP_GPA
    TDCALL
    cmp r10, 1                              # TDVMCALL_STATUS_RETRY: go on from R11
    jne .Lmap_status
    mov r12, r11
    jmp .Lmap_again
.Lmap_status:
    mov rax, r10
    jmp .Lmap_out
.Lmap_ok:
    xor eax, eax
.Lmap_out:
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop rcx
    popfq
    ret
    .size emu_map_gpa, . - emu_map_gpa

# ---------------------------------------------------------------------------
# emu_shared_bit() -> rax: 1 << (GPAW - 1) in a TD (TDG.VP.INFO RCX[5:0] = GPAW), else 0.
# ---------------------------------------------------------------------------
    .globl emu_shared_bit
    .type emu_shared_bit, @function
emu_shared_bit:
    push rcx
    push rdx
    push r8
    push r9
    call emu_is_td
    test eax, eax
    jz .Lsb_out
    mov eax, TDG_VP_INFO
    TDCALL
    and ecx, 63
    dec ecx
    mov eax, 1
    shl rax, cl
.Lsb_out:
    pop r9
    pop r8
    pop rdx
    pop rcx
    ret
    .size emu_shared_bit, . - emu_shared_bit

# ---------------------------------------------------------------------------
# emu_halt(): this vCPU is done (HLT; in a TD, TDG.VP.VMCALL<Instruction.HLT>).
# ---------------------------------------------------------------------------
    .globl emu_halt
    .type emu_halt, @function
emu_halt:
    push rax
    call emu_is_td
    test eax, eax
    pop rax                                 # (pop leaves the flags alone)
    jnz .Lhalt_td
    hlt                                     # every register as the guest left it
    ret
.Lhalt_td:
    push rax
    push rcx
    push r10
    push r11
    push r12
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS
    xor r10d, r10d
    mov r11d, GHCI_INSTRUCTION_HLT
    xor r12d, r12d
    TDCALL
    pop r12
    pop r11
    pop r10
    pop rcx
    pop rax
    ret
    .size emu_halt, . - emu_halt

# ---------------------------------------------------------------------------
# emu_fail(rdi = code): report a fatal error, then halt for good.
# The registers are restored before the final HLT, so a register dump taken
# when the vCPU stops shows the guest's state at the failure (RDI = code, RSP
# one return address lower, RIP inside emu_fail; the return address on the
# stack says where FAIL was used).
# ---------------------------------------------------------------------------
    .globl emu_fail
    .type emu_fail, @function
emu_fail:
    pushfq
    push rax
    push rbx
    push rcx
    push r10
    push r11
    push r12
    call emu_is_td
    test eax, eax
    jnz .Lfail_td
    mov eax, EMU_HC_FAIL
    mov rbx, rdi
    vmcall
    jmp .Lfail_done
.Lfail_td:
    # A TD uses the GHCI's standard ReportFatalError, which any TD-aware VMM
    # understands, rather than a vendor-specific call.
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS
    mov r10d, GHCI_STANDARD_R10
    mov r11d, GHCI_REPORT_FATAL_ERROR
    mov r12, rdi
    TDCALL
.Lfail_done:
    pop r12
    pop r11
    pop r10
    pop rcx
    pop rbx
    pop rax
    popfq
emu_fail_halt:
    hlt
    jmp emu_fail_halt
    .size emu_fail, . - emu_fail

# ---------------------------------------------------------------------------
# emu_accept(rdi = gpa, rsi = size): make private memory [gpa, gpa + size)
# usable in a TD with TDG.MEM.PAGE.ACCEPT (TDCALL leaf 6, RCX = gpa | level).
# The range is widened to whole 4K pages.  Like Linux's tdx_accept_memory it
# uses 2M accepts where a whole aligned 2M page lies in the range, and falls
# back to 4K pages when the module answers PAGE_SIZE_MISMATCH.  BUSY answers
# are retried; informational statuses (bit 63 clear, e.g.
# PAGE_ALREADY_ACCEPTED) count as success.
# Outside a TD memory needs no acceptance: returns 0 at once.
# Returns rax = 0, or the first error status (the rest is then not accepted).
# ---------------------------------------------------------------------------
    .globl emu_accept
    .type emu_accept, @function
emu_accept:
    pushfq
    push rcx
    push rdx
    push r8
    push r9
    push r10
    call emu_is_td
    test eax, eax
    jz .Laccept_ok
    mov r8, rdi
    and r8, -PAGE_SIZE                      # r8 = cursor (first page)
    lea r9, [rdi + rsi + PAGE_SIZE - 1]
    and r9, -PAGE_SIZE                      # r9 = end, exclusive
.Laccept_next:
    cmp r8, r9
    jae .Laccept_ok
    test r8, HUGE_PAGE_SIZE - 1             # 2M-aligned, and a whole 2M left?
    jnz .Laccept_4k
    lea rdx, [r8 + HUGE_PAGE_SIZE]
    cmp rdx, r9
    ja .Laccept_4k
.Laccept_2m:
    lea rcx, [r8 + TDX_PS_2M]
    mov eax, TDG_MEM_PAGE_ACCEPT
    TDCALL
    call accept_status_class
    cmp r10d, 1
    je .Laccept_2m                          # busy: try again
    cmp r10d, 2
    je .Laccept_4k                          # mapped with 4K pages: go 4K
    cmp r10d, 3
    je .Laccept_out
    add r8, HUGE_PAGE_SIZE
    jmp .Laccept_next
.Laccept_4k:
    lea rcx, [r8 + TDX_PS_4K]
    mov eax, TDG_MEM_PAGE_ACCEPT
    TDCALL
    call accept_status_class
    cmp r10d, 1
    je .Laccept_4k
    cmp r10d, 2                             # cannot happen at 4K; an error
    jae .Laccept_out
    add r8, PAGE_SIZE
    jmp .Laccept_next                       # 4K steps up to the next 2M boundary
.Laccept_ok:
    xor eax, eax
.Laccept_out:
    pop r10
    pop r9
    pop r8
    pop rdx
    pop rcx
    popfq
    ret
    .size emu_accept, . - emu_accept

# accept_status_class: r10d = class of the TDX status in rax:
#   0 done (success or informational), 1 busy (retry), 2 PAGE_SIZE_MISMATCH,
#   3 another error.  Clobbers flags.
    .type accept_status_class, @function
accept_status_class:
    xor r10d, r10d
    bt rax, 63                              # error bit
    jnc .Lclass_out
    mov r10, rax
    shr r10, 40
    cmp r10d, 0x800002                      # TDX_OPERAND_BUSY and its variants
    mov r10d, 1
    je .Lclass_out
    mov r10, rax
    shr r10, 32
    cmp r10d, 0xc0000b0b                    # TDX_PAGE_SIZE_MISMATCH
    mov r10d, 2
    je .Lclass_out
    mov r10d, 3
.Lclass_out:
    ret
    .size accept_status_class, . - accept_status_class

# ---------------------------------------------------------------------------
# The C guests' calls (guest/include/emu.h).  They come last so that adding
# them moved none of the functions above.
# ---------------------------------------------------------------------------

# emu_sync(rdi = value): GUEST_SYNC; like emu_report with EMU_HC_SYNC.
    .globl emu_sync
    .type emu_sync, @function
emu_sync:
    pushfq
    push rax
    push rbx
    push rcx
    push r10
    push r11
    push r12
    call emu_is_td
    test eax, eax
    jnz .Lsync_td
    mov eax, EMU_HC_SYNC
    mov rbx, rdi
    vmcall
    jmp .Lsync_done
.Lsync_td:
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS
    mov r10d, EMU_HC_SYNC
    mov r11, rdi
    TDCALL
.Lsync_done:
    pop r12
    pop r11
    pop r10
    pop rcx
    pop rbx
    pop rax
    popfq
    ret
    .size emu_sync, . - emu_sync

# emu_assert_fail(rdi = site, rsi = a, rdx = b): a GUEST_ASSERT failed.  The
# host reads the site (file, expression, line, kind: emu/guestabi.py) from the
# ELF image and ends the run.  Does not return: should the vCPU run again, it
# halts for good, with the registers as they were at the call.
    .globl emu_assert_fail
    .type emu_assert_fail, @function
emu_assert_fail:
    pushfq
    push rax
    push rbx
    push rcx
    push rdx
    push r10
    push r11
    push r12
    push r13
    call emu_is_td
    test eax, eax
    jnz .Lassert_td
    mov eax, EMU_HC_ASSERT
    mov rbx, rdi
    mov rcx, rsi
    vmcall                                  # RDX = b already
    jmp .Lassert_done
.Lassert_td:
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS_4
    mov r10d, EMU_HC_ASSERT
    mov r11, rdi
    mov r12, rsi
    mov r13, rdx
    TDCALL
.Lassert_done:
    pop r13
    pop r12
    pop r11
    pop r10
    pop rdx
    pop rcx
    pop rbx
    pop rax
    popfq
.Lassert_halt:
    call emu_halt
    jmp .Lassert_halt
    .size emu_assert_fail, . - emu_assert_fail

# ---------------------------------------------------------------------------
# Exceptions through a 64-bit IDT (opt-in: a guest that never calls
# emu_idt_init has no IDT, and an exception shuts it down as before).
#
# emu_idt_init(): load this vCPU's GDT (null, 64-bit ring-0 code at 0x08,
# data at 0x10; CS reloaded, SS/DS/ES = 0x10) and the runtime's IDT (256
# gates, all not present), and in a TD install emu_ve_handler for #VE
# (vector 20).  Call it on every vCPU (the tables are shared).  Preserves
# every register but RAX.
# emu_idt_set(rdi = vector, rsi = handler): an interrupt gate (type 0xE,
# selector 0x08, IST 0) for the vector.  The handler is raw: it finds the
# CPU's frame (RIP, CS, RFLAGS, RSP, SS, below them the error code for
# vectors 8, 10-14, 17, 21) on the stack and returns with IRETQ.  Preserves
# every register but RAX.
# ---------------------------------------------------------------------------
    .globl emu_idt_init
    .type emu_idt_init, @function
emu_idt_init:
    lea rax, [rip + emu_gdt]
    mov qword ptr [rip + emu_gdtr + 2], rax
    lea rax, [rip + emu_idt]
    mov qword ptr [rip + emu_idtr + 2], rax
    lgdt [rip + emu_gdtr]
    lidt [rip + emu_idtr]
    push 0x08
    lea rax, [rip + .Lidt_cs_loaded]
    push rax
    retfq                                   # CS = 0x08, from the new GDT
.Lidt_cs_loaded:
    mov eax, 0x10
    mov ss, eax
    mov ds, eax
    mov es, eax
    call emu_is_td
    test eax, eax
    jz .Lidt_init_done
    push rdi
    push rsi
    mov edi, 20
    lea rsi, [rip + emu_ve_handler]
    call emu_idt_set
    pop rsi
    pop rdi
.Lidt_init_done:
    ret
    .size emu_idt_init, . - emu_idt_init

    .globl emu_idt_set
    .type emu_idt_set, @function
emu_idt_set:
    push rdx
    push rdi
    lea rax, [rip + emu_idt]
    shl rdi, 4
    add rdi, rax                            # the gate's address
    mov rax, rsi
    and eax, 0xffff                         # offset 15:0
    or eax, 0x00080000                      # selector 0x08
    mov rdx, rsi
    shr rdx, 16
    shl rdx, 48                             # offset 31:16 in bits 63:48
    or rax, rdx
    mov rdx, 0x00008e0000000000             # present, DPL 0, type 0xE (interrupt gate)
    or rax, rdx
    mov qword ptr [rdi], rax
    mov rax, rsi
    shr rax, 32
    mov qword ptr [rdi + 8], rax            # offset 63:32, reserved 0
    pop rdi
    pop rdx
    ret
    .size emu_idt_set, . - emu_idt_set

# ---------------------------------------------------------------------------
# emu_ve_handler: #VE in a TD, as Linux's handler does it (tdx_get_ve_info(),
# then virt_exception_kernel()): TDG.VP.VEINFO.GET, then by exit reason
#   EPT violation (48) on a private GPA: TDG.MEM.PAGE.ACCEPT of its 4K page
#     (the lazy accept), and the access runs again;
#   EPT violation (48) on a shared GPA: MMIO (handle_mmio()): decode the
#     instruction at the saved RIP, make the access with
#     TDG.VP.VMCALL<#VE.RequestMMIO> (R11 = 48, R12 = size, R13 = 0 read /
#     1 write, R14 = the GPA from VE_INFO, R15 = the value written), put a
#     value read into the register, and RIP skips the instruction (its
#     length from the decode: VE_INFO has none for an EPT violation);
#   HLT (12): TDG.VP.VMCALL<Instruction.HLT>, then RIP skips the HLT (the
#     instruction length from VE_INFO);
#   CPUID (10), as Linux's handle_cpuid(): a leaf outside the hypervisor
#     range 0x40000000-0x4fffffff reads as zeros; one inside it is asked with
#     TDG.VP.VMCALL<Instruction.CPUID> (R11 = 10, R12 = EAX, R13 = ECX; the
#     answer in R12..R15 -> EAX, EBX, ECX, EDX);
#   I/O (30), as handle_io(): the qualification gives size, direction and
#     port; TDG.VP.VMCALL<Instruction.IO> (R11 = 30, R12 = size, R13 = 0 in /
#     1 out, R14 = port, R15 = RAX for OUT); an IN puts R11 into AL, AX, or
#     EAX zero-extended, as the CPU does (Linux clears one bit more:
#     GENMASK(8 * size, 0)); INS/OUTS are refused, as Linux refuses them;
#   RDMSR (31) / WRMSR (32), as read_msr()/write_msr():
#     TDG.VP.VMCALL<Instruction.RDMSR> (R12 = ECX; EDX:EAX = R11) or
#     <Instruction.WRMSR> (R12 = ECX, R13 = EDX:EAX);
#   and RIP skips the instruction (its length from VE_INFO).  A request the
#   VMM refuses (R10 != 0), or INS/OUTS, is a #GP at the instruction, as
#   Linux's ve_raise_fault(): the handler of vector 13 in the IDT loaded now
#   runs with error code 0; with none, emu_fail 0x5645_0100 | exit reason;
#   anything else: emu_fail with 0x5645_0000 | exit reason ("VE").
# The MMIO decoder knows only MOV between a register and memory (88, 89, 8A,
# 8B; 66 and REX prefixes; any ModRM/SIB/displacement form, RIP-relative
# included): 1, 2, 4 or 8 bytes.  A 4-byte read zero-extends the register, 1
# and 2 bytes replace its low bytes (AH, CH, DH, BH without REX), as the CPU
# does.  Any other instruction (and RSP as the register) is emu_fail
# 0x5645_0030; a TDVMCALL the VMM refuses is emu_fail with its status (R10).
# The guest's registers are saved as a block, [rsp + 8 * n] = GPR n (RAX,
# RCX, RDX, RBX, (RSP), RBP, RSI, RDI, R8..R15), the CPU's frame above them.
# ---------------------------------------------------------------------------
.equ VE_FRAME_RIP, 16 * 8                   # the CPU's frame: RIP, CS, RFLAGS, RSP, SS
    .globl emu_ve_handler
    .type emu_ve_handler, @function
emu_ve_handler:
    push r15
    push r14
    push r13
    push r12
    push r11
    push r10
    push r9
    push r8
    push rdi
    push rsi
    push rbp
    push rsp                                # a placeholder for GPR 4 (never written back)
    push rbx
    push rdx
    push rcx
    push rax
    mov eax, TDG_VP_VEINFO_GET
    TDCALL
    test rax, rax
    jnz .Lve_fail
    cmp ecx, 48                             # EXIT_REASON_EPT_VIOLATION
    je .Lve_ept
    cmp ecx, 12                             # EXIT_REASON_HLT
    je .Lve_hlt
    mov ebx, r10d                           # the instruction's length
    mov ebp, ecx                            # the exit reason
    cmp ecx, 10                             # EXIT_REASON_CPUID
    je .Lve_cpuid
    cmp ecx, 30                             # EXIT_REASON_IO_INSTRUCTION
    je .Lve_io
    cmp ecx, 31                             # EXIT_REASON_MSR_READ
    je .Lve_rdmsr
    cmp ecx, 32                             # EXIT_REASON_MSR_WRITE
    je .Lve_wrmsr
    jmp .Lve_fail
.Lve_ept:
    call emu_shared_bit                     # (keeps rcx, r8, r9)
    test r9, rax
    jnz .Lve_mmio                           # a shared GPA: MMIO
    mov rdi, r9
    and rdi, -PAGE_SIZE
    mov esi, PAGE_SIZE
    call emu_accept
    test rax, rax
    jnz .Lve_fail
    jmp .Lve_done
.Lve_hlt:
    call emu_halt                           # TDG.VP.VMCALL<Instruction.HLT>
    mov eax, r10d                           # the instruction length
    add qword ptr [rsp + VE_FRAME_RIP], rax # the saved RIP, past the HLT
    jmp .Lve_done

.Lve_cpuid:
    mov r12d, dword ptr [rsp]               # the leaf (EAX)
    lea eax, [r12 - 0x40000000]
    cmp eax, 0x10000000
    jae .Lcpuid_zeros                       # outside the hypervisor range: all zeros
    mov r13d, dword ptr [rsp + 8]           # the subleaf (ECX)
    mov r11d, 10                            # Instruction.CPUID
    call .Lve_vmcall
    mov eax, r12d
    mov qword ptr [rsp], rax                # EAX, EBX, ECX, EDX (32-bit: the upper halves zero)
    mov eax, r13d
    mov qword ptr [rsp + 3 * 8], rax
    mov eax, r14d
    mov qword ptr [rsp + 8], rax
    mov eax, r15d
    mov qword ptr [rsp + 2 * 8], rax
    jmp .Lve_skip
.Lcpuid_zeros:
    xor eax, eax
    mov qword ptr [rsp], rax
    mov qword ptr [rsp + 8], rax
    mov qword ptr [rsp + 2 * 8], rax
    mov qword ptr [rsp + 3 * 8], rax
    jmp .Lve_skip

.Lve_io:
    test edx, 16                            # INS/OUTS: refused (a #GP)
    jnz .Lve_gp
    mov r12d, edx
    and r12d, 7
    inc r12d                                # R12 = the size
    mov r13d, edx
    shr r13d, 3
    and r13d, 1
    xor r13d, 1                             # R13 = 1 for OUT, 0 for IN
    mov r14d, edx
    shr r14d, 16                            # R14 = the port
    mov r15, qword ptr [rsp]                # R15 = RAX (what an OUT writes)
    mov r11d, 30                            # Instruction.IO
    call .Lve_vmcall
    test r13d, r13d
    jnz .Lve_skip                           # OUT: done
    cmp r12d, 4
    jne 1f
    mov eax, r11d                           # IN EAX: zero-extends RAX
    mov qword ptr [rsp], rax
    jmp .Lve_skip
1:  cmp r12d, 2
    jne 2f
    mov word ptr [rsp], r11w                # IN AX: the rest of RAX stays
    jmp .Lve_skip
2:  mov byte ptr [rsp], r11b                # IN AL
    jmp .Lve_skip

.Lve_rdmsr:
    mov r12d, dword ptr [rsp + 8]           # R12 = ECX
    mov r11d, 31                            # Instruction.RDMSR
    call .Lve_vmcall
    mov eax, r11d
    mov qword ptr [rsp], rax                # EAX = R11[31:0]
    shr r11, 32
    mov qword ptr [rsp + 2 * 8], r11        # EDX = R11[63:32]
    jmp .Lve_skip

.Lve_wrmsr:
    mov r12d, dword ptr [rsp + 8]           # R12 = ECX
    mov r13d, dword ptr [rsp + 2 * 8]
    shl r13, 32
    mov eax, dword ptr [rsp]
    or r13, rax                             # R13 = EDX:EAX
    mov r11d, 32                            # Instruction.WRMSR
    call .Lve_vmcall
.Lve_skip:
    add qword ptr [rsp + VE_FRAME_RIP], rbx # RIP past the instruction (VE_INFO's length)
    jmp .Lve_done

# TDG.VP.VMCALL with R11 = the sub-function, R12..R15 as set (R10..R15 exposed); on success
# it returns with the answer in R11..R15; a refusal (R10 != 0) is a #GP at the instruction.
# (Called from the cases above: [rsp + 8] is the block.)
.Lve_vmcall:
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS_MMIO      # R10 to R15
    xor r10d, r10d                          # GHCI standard
    TDCALL
    test rax, rax
    jnz .Lve_vmcall_broken
    test r10, r10
    jnz .Lve_vmcall_refused
    ret
.Lve_vmcall_broken:
    mov rdi, rax                            # the TDCALL's status: the module refused the call
    call emu_fail
.Lve_vmcall_refused:
    add rsp, 8                              # drop the return address: back on the block
.Lve_gp:
    # ve_raise_fault(): a #GP(0) at the instruction.  The IDT loaded now (SIDT) gives the
    # handler of vector 13; the GPRs go back, error code 0 goes on the #VE's frame, and the
    # handler runs as if the instruction had faulted.  Its address waits in the block's RSP
    # slot (GPR 4, never written back), read below RSP after the pops: interrupts are off in
    # this handler (an interrupt gate), so nothing can overwrite it meanwhile.
    sub rsp, 16
    sidt [rsp]
    mov rax, qword ptr [rsp + 2]            # the IDT's base
    add rsp, 16
    mov rdx, qword ptr [rax + 13 * 16]      # gate 13, low half
    bt rdx, 47                              # present?
    jnc .Lve_gp_none
    mov rcx, rdx
    and ecx, 0xffff                         # offset 15:0
    shr rdx, 48
    shl rdx, 16
    or rcx, rdx                             # offset 31:16
    mov rdx, qword ptr [rax + 13 * 16 + 8]
    shl rdx, 32
    or rcx, rdx                             # offset 63:32
    mov qword ptr [rsp + 4 * 8], rcx
    pop rax
    pop rcx
    pop rdx
    pop rbx
    add rsp, 8
    pop rbp
    pop rsi
    pop rdi
    pop r8
    pop r9
    pop r10
    pop r11
    pop r12
    pop r13
    pop r14
    pop r15
    push 0                                  # the #GP's error code
    jmp qword ptr [rsp - 11 * 8]            # the block's RSP slot
.Lve_gp_none:
    mov edi, 0x56450100                     # no #GP handler: emu_fail 0x5645_0100 | exit reason
    or edi, ebp
    call emu_fail

.Lve_mmio:
    mov r14, r9                             # R14 = the GPA, as VE_INFO has it (shared bit set)
    mov rsi, qword ptr [rsp + VE_FRAME_RIP] # the instruction
    mov rdi, rsi                            # the decode cursor
    xor r8d, r8d                            # r8 = the REX byte (0: none)
    xor r9d, r9d                            # r9 = 1 with an operand-size (66) prefix
.Lmmio_prefix:
    movzx eax, byte ptr [rdi]
    cmp al, 0x66
    jne .Lmmio_rex
    mov r9d, 1
    inc rdi
    jmp .Lmmio_prefix
.Lmmio_rex:
    mov edx, eax
    and edx, 0xf0
    cmp edx, 0x40
    jne .Lmmio_opcode
    mov r8d, eax
    inc rdi
    movzx eax, byte ptr [rdi]
.Lmmio_opcode:
    mov edx, eax
    and edx, 0xfc
    cmp edx, 0x88                           # 88, 89: register to memory; 8A, 8B: memory to register
    jne .Lmmio_bad
    mov r13d, eax
    shr r13d, 1
    and r13d, 1
    xor r13d, 1                             # R13 = 1 (write) for 88/89, 0 (read) for 8A/8B
    mov r12d, 1                             # R12 = the size: 1 for 88/8A,
    test al, 1
    jz .Lmmio_modrm
    mov r12d, 8                             # 8 with REX.W,
    test r8d, 8
    jnz .Lmmio_modrm
    mov r12d, 2                             # 2 with 66,
    test r9d, r9d
    jnz .Lmmio_modrm
    mov r12d, 4                             # else 4
.Lmmio_modrm:
    movzx eax, byte ptr [rdi + 1]           # ModRM
    add rdi, 2                              # past the opcode and ModRM
    mov edx, eax
    shr edx, 6                              # mod
    cmp edx, 3
    je .Lmmio_bad                           # a register operand: not an access
    mov ecx, eax
    and ecx, 7                              # rm
    cmp ecx, 4
    jne .Lmmio_no_sib
    movzx ecx, byte ptr [rdi]               # SIB
    inc rdi
    and ecx, 7                              # its base: 5 with mod 0 means disp32, no base
    test edx, edx
    jnz .Lmmio_disp
    cmp ecx, 5
    jne .Lmmio_disp
    add rdi, 4
    jmp .Lmmio_disp
.Lmmio_no_sib:
    test edx, edx
    jnz .Lmmio_disp
    cmp ecx, 5                              # mod 0, rm 5: RIP-relative disp32
    jne .Lmmio_disp
    add rdi, 4
.Lmmio_disp:
    cmp edx, 1
    jne 1f
    inc rdi                                 # disp8
1:  cmp edx, 2
    jne 2f
    add rdi, 4                              # disp32
2:  # The register: ModRM.reg, REX.R its bit 3.  rbx = its slot (AH..BH: byte 1 of RAX..RBX).
    mov ebx, eax
    shr ebx, 3
    and ebx, 7
    test r8d, 4
    jz 3f
    or ebx, 8
3:  cmp r12d, 1
    jne 4f
    test r8d, r8d
    jnz 4f
    cmp ebx, 4
    jb 4f
    lea rbx, [rsp + rbx * 8 - 4 * 8 + 1]    # AH, CH, DH, BH
    jmp .Lmmio_call
4:  cmp ebx, 4
    je .Lmmio_bad                           # RSP
    lea rbx, [rsp + rbx * 8]
.Lmmio_call:
    xor r15d, r15d                          # R15 = the value written (0 for a read)
    test r13d, r13d
    jz .Lmmio_vmcall
    cmp r12d, 8
    jne 5f
    mov r15, qword ptr [rbx]
    jmp .Lmmio_vmcall
5:  cmp r12d, 4
    jne 6f
    mov r15d, dword ptr [rbx]
    jmp .Lmmio_vmcall
6:  cmp r12d, 2
    jne 7f
    movzx r15d, word ptr [rbx]
    jmp .Lmmio_vmcall
7:  movzx r15d, byte ptr [rbx]
.Lmmio_vmcall:
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS_MMIO      # R10 to R15
    xor r10d, r10d                          # GHCI standard
    mov r11d, TDVMCALL_VE_REQUEST_MMIO
    TDCALL
    test rax, rax
    jnz .Lmmio_failed
    test r10, r10
    jnz .Lmmio_failed
    test r13d, r13d
    jnz .Lmmio_next                         # a write: done
    cmp r12d, 8                             # a read: R11 = the value
    jne 5f
    mov qword ptr [rbx], r11
    jmp .Lmmio_next
5:  cmp r12d, 4
    jne 6f
    mov eax, r11d                           # a 32-bit load zero-extends the register
    mov qword ptr [rbx], rax
    jmp .Lmmio_next
6:  cmp r12d, 2
    jne 7f
    mov word ptr [rbx], r11w
    jmp .Lmmio_next
7:  mov byte ptr [rbx], r11b
.Lmmio_next:
    sub rdi, rsi                            # the instruction's length
    add qword ptr [rsp + VE_FRAME_RIP], rdi
.Lve_done:
    pop rax
    pop rcx
    pop rdx
    pop rbx
    add rsp, 8                              # the RSP placeholder
    pop rbp
    pop rsi
    pop rdi
    pop r8
    pop r9
    pop r10
    pop r11
    pop r12
    pop r13
    pop r14
    pop r15
    iretq
.Lmmio_failed:
    mov rdi, rax
    test rax, rax
    jnz 8f
    mov rdi, r10                            # the TDVMCALL status
8:  call emu_fail
.Lmmio_bad:
    mov ecx, 48
.Lve_fail:
    mov edi, ecx
    or edi, 0x56450000
    call emu_fail
    .size emu_ve_handler, . - emu_ve_handler

    .section .data
    .balign 16
emu_gdt:
    .quad 0
    .quad 0x00af9a000000ffff                # 0x08: 64-bit code, ring 0
    .quad 0x00cf92000000ffff                # 0x10: data, ring 0
emu_gdt_end:
    .balign 16
    .word 0
emu_gdtr:
    .word emu_gdt_end - emu_gdt - 1
    .quad 0
    .balign 16
    .word 0
emu_idtr:
    .word 256 * 16 - 1
    .quad 0
    .section .bss
    .balign 4096
    .globl emu_idt
emu_idt:
    .zero 256 * 16
    .text

# ---------------------------------------------------------------------------
# emu_accept_level(rdi = gpa, rsi = level) -> rax: one TDG.MEM.PAGE.ACCEPT of
# the page at gpa at the level asked (0 = 4K, 1 = 2M; TDCALL leaf 6, RCX =
# gpa | level), retried while the module answers BUSY (TDX_OPERAND_BUSY or
# BUSY_HOST_PRIORITY).  rax = the TDX status as the module returned it: 0,
# informational (TDX_PAGE_ALREADY_ACCEPTED | level) or an error
# (TDX_PAGE_SIZE_MISMATCH | level, ...).  Outside a TD: 0.  C guests: emu.h.
# ---------------------------------------------------------------------------
    .globl emu_accept_level
    .type emu_accept_level, @function
emu_accept_level:
    pushfq
    push rcx
    push rdx
    push r8
    push r9
    push r10
    call emu_is_td
    test eax, eax
    jz .Laccept_level_ok
.Laccept_level_again:
    mov rcx, rdi
    and rcx, -PAGE_SIZE
    or rcx, rsi
    mov eax, TDG_MEM_PAGE_ACCEPT
    TDCALL
    call accept_status_class
    cmp r10d, 1
    je .Laccept_level_again                 # busy: try again
    jmp .Laccept_level_out
.Laccept_level_ok:
    xor eax, eax
.Laccept_level_out:
    pop r10
    pop r9
    pop r8
    pop rdx
    pop rcx
    popfq
    ret
    .size emu_accept_level, . - emu_accept_level

# ---------------------------------------------------------------------------
# The selftest library's calls (guest/include/emu.h, guest/lib/ucall_common.c).
# They come last so that adding them moved none of the functions above.
# ---------------------------------------------------------------------------

# ucall_arch_do_ucall(rdi = the struct ucall's address): the ucall transport,
# the one place the guest makes it, as upstream's lib/x86/ucall.c.  A plain
# VM: `in al, dx` from UCALL_PIO_PORT with RDI = the address; KVM exits with
# KVM_EXIT_IO and the host reads RDI (KVM_GET_REGS).  A TD, whose registers the
# host cannot read: an 8-byte MMIO write of the address to ucall_mmio_gpa (the
# TDX selftests' ucall: tdg_vp_vmcall_ve_request_mmio_write()), asked for
# directly with TDG.VP.VMCALL<#VE.RequestMMIO>, no #VE; KVM exits with
# KVM_EXIT_MMIO and the host takes the address from the data.  Clobbers RAX
# (upstream's asm declares "rax" clobbered: AL is what the IN read, 0 as KVM
# leaves it); preserves every other register.
    .globl ucall_arch_do_ucall
    .type ucall_arch_do_ucall, @function
ucall_arch_do_ucall:
    pushfq
    push rdx
    call emu_is_td
    test eax, eax
    jnz .Lucall_td
    mov edx, UCALL_PIO_PORT
    in al, dx
    jmp .Lucall_done
.Lucall_td:
    push rcx
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS_MMIO      # R10 to R15
    xor r10d, r10d                          # GHCI standard
    mov r11d, TDVMCALL_VE_REQUEST_MMIO
    mov r12d, 8                             # size
    mov r13d, 1                             # a write
    mov r14, qword ptr [rip + ucall_mmio_gpa]
    mov r15, rdi                            # the value: the address
    TDCALL
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop rcx
.Lucall_done:
    pop rdx
    popfq
    ret
    .size ucall_arch_do_ucall, . - ucall_arch_do_ucall

    .section .data
    .balign 8
# The GPA of a TD's ucall MMIO write, the shared bit set: written by the host
# before the guest runs (ucall_arch_init(): guestabi.UCALL_MMIO_GPA | the shared
# bit), as upstream's sync_global_to_guest(vm, ucall_mmio_gpa).
    .globl ucall_mmio_gpa
    .type ucall_mmio_gpa, @object
ucall_mmio_gpa:
    .quad 0
    .size ucall_mmio_gpa, . - ucall_mmio_gpa
    .text

# kvm_hypercall(rdi = nr, rsi = a0, rdx = a1, rcx = a2, r8 = a3) -> rax: KVM's
# hypercall ABI, VMCALL with RAX = nr, RBX/RCX/RDX/RSI = a0..a3, the result in
# RAX.  In a TD: TDG.VP.VMCALL with R10 = nr (non-zero: a KVM hypercall, not a
# GHCI call), R11..R14 = a0..a3; KVM answers in R10, returned in RAX.
# Preserves every register but RAX.
    .globl kvm_hypercall
    .type kvm_hypercall, @function
kvm_hypercall:
    push rbx
    push rcx
    push rdx
    push rsi
    push r10
    push r11
    push r12
    push r13
    push r14
    call emu_is_td
    test eax, eax
    jnz .Lhc_td
    mov rax, rdi
    mov rbx, rsi
    xchg rcx, rdx                           # rcx = a1, rdx = a2
    mov rsi, r8
    vmcall
    jmp .Lhc_done
.Lhc_td:
    mov r10, rdi
    mov r11, rsi
    mov r12, rdx
    mov r13, rcx
    mov r14, r8
    mov eax, TDG_VP_VMCALL
    mov ecx, TDVMCALL_EXPOSE_REGS_5         # R10 to R14
    TDCALL
    mov rax, r10
.Lhc_done:
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    ret
    .size kvm_hypercall, . - kvm_hypercall
