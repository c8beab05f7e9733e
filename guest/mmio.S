# mmio: MMIO in a TD through #VE.  vCPU 0 loads the runtime's IDT (in a TD
# its #VE handler), maps the VMM's MMIO device (guestabi EMU_MMIO_GPA: no
# memslot there; in a TD its shared alias, EMU_MMIO_GPA | the shared bit) at
# MMIO_GVA with page tables of its own, and reads and writes the device's
# registers with plain MOVs of 1, 2, 4 and 8 bytes.
#
# In a TD the first access is an EPT violation (KVM's shared EPT has no entry
# there yet): KVM installs its MMIO SPTE, whose value for a TD is 0
# (suppress-#VE clear), and lets the access run again, which is now a #VE.
# The runtime's handler decodes the MOV and asks the VMM for the access with
# TDG.VP.VMCALL<#VE.RequestMMIO>; KVM turns that into KVM_EXIT_MMIO, the VMM's
# device answers.  Every later access is a #VE straight away.
#
# Reports (a TD): the ID register (8 bytes), the scratch register written with
# 8 bytes and read back as 4 (zero-extended), as 2 into R9W (the rest of R9
# kept) and as 1 into AH; after byte and word writes, the scratch register
# read with a SIB address; the device's write count (4: a write to the
# read-only ID register counts, and changes nothing); the ID's first byte.
# In a plain VM the model's KVM has no instruction emulator to serve an MMIO
# access with, so the guest reports nothing and halts.

.intel_syntax noprefix
.include "emu.inc"

.equ MMIO_GVA, 0x600000000000               # PML4 slot 192: neither the identity map nor the TD window
.equ PTE_FLAGS, 0x3                         # present, writable
.equ PDE_2M, 0x83                           # present, writable, a 2M page

    .text
    .globl _start
    .type _start, @function
_start:
    test rdi, rdi
    jnz done
    call emu_idt_init
    call emu_is_td
    test eax, eax
    jz done                                 # a plain VM: no MMIO (see above)

    # Map MMIO_GVA -> the device (2M page): PML4[192] -> mmio_pdpt[0] -> mmio_pd[0].
    call emu_shared_bit
    mov rdx, EMU_MMIO_GPA | PDE_2M
    or rdx, rax                             # a TD's MMIO is shared
    mov qword ptr [rip + mmio_pd], rdx
    lea rdx, [rip + mmio_pd]
    or rdx, PTE_FLAGS
    mov qword ptr [rip + mmio_pdpt], rdx
    mov rax, cr3
    and rax, -PAGE_SIZE                     # the loader's PML4: identity-mapped
    lea rdx, [rip + mmio_pdpt]
    or rdx, PTE_FLAGS
    mov qword ptr [rax + ((MMIO_GVA >> 39) & 511) * 8], rdx
    mov rax, cr3
    mov cr3, rax

    mov rbx, MMIO_GVA
    .globl mmio_first
mmio_first:
    mov rax, qword ptr [rbx + EMU_MMIO_REG_ID]           # 48 8b 03: an EPT violation, then a #VE
    REPORT rax
    mov rcx, 0x1122334455667788
    .globl mmio_write8
mmio_write8:
    mov qword ptr [rbx + EMU_MMIO_REG_SCRATCH], rcx      # 48 89 4b 08
    mov rdx, -1
    mov edx, dword ptr [rbx + EMU_MMIO_REG_SCRATCH + 4]  # 8b 53 0c: zero-extends RDX
    REPORT rdx
    mov r9, -1
    mov r9w, word ptr [rbx + EMU_MMIO_REG_SCRATCH]       # 66 44 8b 4b 08: keeps R9's upper bytes
    REPORT r9
    xor eax, eax
    mov ah, byte ptr [rbx + EMU_MMIO_REG_SCRATCH + 1]    # 8a 63 09: AH (no REX)
    REPORT rax
    mov esi, 0xab
    mov byte ptr [rbx + EMU_MMIO_REG_SCRATCH], sil       # 40 88 73 08
    mov edx, 0x3344
    mov word ptr [rbx + EMU_MMIO_REG_SCRATCH + 6], dx    # 66 89 53 0e
    xor ecx, ecx
    mov r10, qword ptr [rbx + rcx + EMU_MMIO_REG_SCRATCH] # 4c 8b 54 0b 08: SIB, disp8
    REPORT r10
    mov dword ptr [rbx + EMU_MMIO_REG_ID], esi           # 89 33: read-only, ignored (but counted)
    mov r11, qword ptr [rbx + EMU_MMIO_REG_WRITES]       # 4c 8b 5b 10
    REPORT r11
    xor ecx, ecx
    mov cl, byte ptr [rbx + EMU_MMIO_REG_ID]             # 8a 0b
    REPORT rcx
done:
    EXIT

    .section .bss
    .balign 4096
mmio_pdpt:
    .zero 4096
mmio_pd:
    .zero 4096
