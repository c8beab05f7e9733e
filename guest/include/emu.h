/*
 * emu.h: the guest side of a C guest, in the shape of a KVM selftest's guest
 * code.  Freestanding: no libc, nothing else to include.
 *
 *     #include "emu.h"
 *
 *     void guest_main(void)                   // every vCPU starts here
 *     {
 *         GUEST_SYNC(emu_vcpu_id());           // the host records [vcpu, value]
 *         GUEST_ASSERT_EQ(1 + 1, 2);           // a failure ends the run: exit 1
 *         GUEST_DONE();                        // or return from guest_main
 *     }
 *
 * `python -m emu run my.c` (or emu.guests.build) compiles it with gcc or clang
 * (freestanding, static, no red zone, kernel code model, see README "C
 * guests") and links it with guest/lib/cstart.S (_start, memset/memcpy/...),
 * the runtime (guest/lib/runtime.S) and guest/link.ld.  One ELF runs in a
 * plain VM and in a TD: the runtime picks VMCALL or TDCALL at run time.
 *
 * The host's side of every call is emu/guestabi.py; the numbers below are
 * checked against it by the tests.
 */
#ifndef EMU_H
#define EMU_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long s64;
typedef unsigned long size_t;
typedef unsigned long uintptr_t;
typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

/* Boot layout (emu/guestabi.py). */
#define EMU_STACK_SIZE           0x4000UL        /* per vCPU, STACK_SIZE-aligned top */
#define EMU_TD_SHARED_WINDOW_GVA 0x400000000000UL /* shared alias of GPA x at this + x */
#define EMU_PAGE_SIZE            0x1000UL
#define EMU_HUGE_PAGE_SIZE       0x200000UL

/* Assert kinds (guestabi.ASSERT_KIND_*). */
#define EMU_ASSERT_KIND_ASSERT   0
#define EMU_ASSERT_KIND_EQ       1

/* The guest's entry point: every vCPU calls it; returning is GUEST_DONE(). */
void guest_main(void);

/* ---- The runtime (guest/lib/runtime.S).  Each preserves every register but
 * its return value, so these are ordinary C calls. ---- */

/* Send one value to the host (res.reports, in order, with the vCPU). */
void emu_report(u64 value);
/* GUEST_SYNC: the host records [vcpu, value] in res.syncs and traces it. */
void emu_sync(u64 value);
/* End this vCPU with an error code (exit "fail"); does not return. */
void emu_fail(u64 code) __attribute__((noreturn));
/* This vCPU is done: HLT (a TD: TDG.VP.VMCALL<Instruction.HLT>).  Returns
 * only if something resumes the vCPU; GUEST_DONE() loops on it. */
void emu_halt(void);
/* 1 in a TD, 0 in a plain VM. */
u64 emu_is_td(void);
/* TDG.MEM.PAGE.ACCEPT of [gpa, gpa + size) (whole pages; 2M where it can).
 * 0, or the first TDX error status.  Outside a TD: 0, nothing to do. */
u64 emu_accept(u64 gpa, u64 size);
/* One TDG.MEM.PAGE.ACCEPT of the page at gpa at a level: EMU_ACCEPT_4K (0) or
 * EMU_ACCEPT_2M (1), retried while the module is busy.  The TDX status as the
 * module returned it: 0 on success, TDX_PAGE_ALREADY_ACCEPTED | level (bit 63
 * clear), TDX_PAGE_SIZE_MISMATCH | level, ...  Outside a TD: 0. */
u64 emu_accept_level(u64 gpa, u64 level);
#define EMU_ACCEPT_4K                   0
#define EMU_ACCEPT_2M                   1
#define TDX_PAGE_ALREADY_ACCEPTED       0x00000B0A00000000UL
#define TDX_PAGE_SIZE_MISMATCH          0xC0000B0B00000000UL
/* TDG.VP.VMCALL<MapGPA>: convert [gpa, gpa + size) to shared (gpa has the
 * shared bit) or to private.  0, or the TDVMCALL status.  Outside a TD: 0. */
u64 emu_map_gpa(u64 gpa, u64 size);
/* The TD's shared-GPA bit (1 << (GPAW - 1)); 0 outside a TD. */
u64 emu_shared_bit(void);

/* What GUEST_ASSERT leaves in .rodata for the host (guestabi.ASSERT_SITE_FORMAT). */
struct emu_assert_site {
	const char *file;
	const char *expr;
	u64 line;
	u64 kind;
};
void emu_assert_fail(const struct emu_assert_site *site, u64 a, u64 b) __attribute__((noreturn));

/* ---- vCPU identity (kept at the top of the vCPU's stack by cstart.S) ---- */

static inline u64 *__emu_stack_top(void)
{
	u64 rsp;

	__asm__ volatile("mov %%rsp, %0" : "=r"(rsp));
	return (u64 *)((rsp | (EMU_STACK_SIZE - 1)) + 1);
}

/* This vCPU's index, 0 to emu_nr_vcpus() - 1. */
static inline u64 emu_vcpu_id(void)
{
	return __emu_stack_top()[-1];
}

/* The number of vCPUs in the VM. */
static inline u64 emu_nr_vcpus(void)
{
	return __emu_stack_top()[-2];
}

/* ---- Memory ---- */

/* The shared alias of a GPA, as a pointer.  In a TD that is the loader's shared
 * window (GVA EMU_TD_SHARED_WINDOW_GVA + gpa, mapping gpa | shared bit); in a
 * plain VM all memory is shared and the identity map is the alias. */
static inline void *emu_shared_ptr(u64 gpa)
{
	return (void *)(emu_is_td() ? EMU_TD_SHARED_WINDOW_GVA + gpa : gpa);
}

/* The private (identity-mapped) view of a GPA. */
static inline void *emu_gpa_ptr(u64 gpa)
{
	return (void *)gpa;
}

/* A compiler barrier; one volatile load or store of x (as in Linux). */
#define barrier() __asm__ volatile("" ::: "memory")
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, val) (*(volatile __typeof__(x) *)&(x) = (val))

/* PAUSE: the body of every spin loop. */
static inline void cpu_relax(void)
{
	__asm__ volatile("pause" ::: "memory");
}

/* ---- The selftest macros ---- */

#define GUEST_SYNC(x) emu_sync((u64)(x))

#define __EMU_ASSERT_FAIL(kind, expr, a, b)                                     \
	do {                                                                     \
		static const struct emu_assert_site __emu_site = {               \
			__FILE__, expr, __LINE__, kind };                        \
		emu_assert_fail(&__emu_site, (u64)(a), (u64)(b));               \
	} while (0)

/* GUEST_ASSERT(cond): when cond is false the run ends (exit "fail", status 1)
 * with "GUEST_ASSERT failed at FILE:LINE: cond".  Reports and syncs made
 * before it are kept. */
#define GUEST_ASSERT(cond)                                                      \
	do {                                                                     \
		if (!(cond))                                                     \
			__EMU_ASSERT_FAIL(EMU_ASSERT_KIND_ASSERT, #cond, 0, 0);  \
	} while (0)

/* GUEST_ASSERT_EQ(a, b): each evaluated once; on a mismatch the error names
 * both values: "GUEST_ASSERT_EQ failed at FILE:LINE: a == b (0x3 != 0x4)". */
#define GUEST_ASSERT_EQ(a, b)                                                   \
	do {                                                                     \
		u64 __emu_a = (u64)(a), __emu_b = (u64)(b);                      \
		if (__emu_a != __emu_b)                                          \
			__EMU_ASSERT_FAIL(EMU_ASSERT_KIND_EQ, #a " == " #b,       \
					  __emu_a, __emu_b);                     \
	} while (0)

/* GUEST_DONE(): this vCPU is done (halts for good). */
#define GUEST_DONE()                                                            \
	do {                                                                     \
		for (;;)                                                         \
			emu_halt();                                              \
	} while (0)

/* ---- Port I/O, MSRs, CPUID (docs/exits.md): each a VM exit KVM handles; in a
 * TD a #VE that the runtime's handler (installed by emu_idt_init()) turns into
 * TDG.VP.VMCALL<Instruction.IO/RDMSR/WRMSR/CPUID>, or one the TDX module
 * answers.  An MSR access KVM refuses is a #GP. ---- */
#define EMU_DEBUGCON_PORT        0xe9            /* bytes written: the run's console */
#define EMU_IO_DELAY_PORT        0x80            /* a sink */

/* Load the runtime's GDT and IDT (in a TD: its #VE handler); on every vCPU. */
void emu_idt_init(void);
/* An interrupt gate for a vector (the handler is raw: it ends with IRETQ). */
void emu_idt_set(u64 vector, void *handler);

static inline void outb(u16 port, u8 value)  { __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port)); }
static inline void outw(u16 port, u16 value) { __asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port)); }
static inline void outl(u16 port, u32 value) { __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port)); }
static inline u8 inb(u16 port)   { u8 v;  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port)  { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port)  { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return (u64)hi << 32 | lo;
}

static inline void wrmsr(u32 msr, u64 value)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)value), "d"((u32)(value >> 32)) : "memory");
}

static inline void cpuid_count(u32 leaf, u32 subleaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(subleaf));
}

/* Write a string to the debug console (one OUT per byte: a TD's runtime
 * refuses string I/O, as Linux's #VE handler does). */
static inline void emu_console_puts(const char *s)
{
	while (*s)
		outb(EMU_DEBUGCON_PORT, (u8)*s++);
}

#endif /* EMU_H */
