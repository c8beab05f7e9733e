/*
 * emu.h: the guest side of a C guest, in the shape of a KVM selftest's guest
 * code.  Freestanding: no libc, nothing else to include.
 *
 *     #include "emu.h"
 *
 *     void guest_main(void)                   // every vCPU starts here
 *     {
 *         GUEST_SYNC(emu_vcpu_id());           // the host records [vcpu, value]
 *         GUEST_SYNC_ARGS(1, 2, 3, 4, 5);      // ... [vcpu, 1, 2, 3, 4, 5]
 *         GUEST_PRINTF("%d pages at %#lx\n", 3, 0x1000UL);
 *         GUEST_ASSERT_EQ(1 + 1, 2);           // a failure ends the run: exit 1
 *         __GUEST_ASSERT(x < 4, "x is %d", x); // with a message
 *         GUEST_DONE();                        // or return from guest_main
 *     }
 *
 * GUEST_* are ucalls, as in KVM selftests (include/ucall_common.h): the guest
 * fills a struct ucall from a pool in memory the host can read (shared memory
 * in a TD) and tells the host where it is; the host's side, from Python, is
 * emu.selftest (GuestVM.on_ucall).  Messages are formatted in the guest
 * (guest/lib/guest_sprintf.c: %d %i %u %x %X %o %c %s %p %%, the l, ll, h, z
 * qualifiers, width, precision, and the - + space # 0 flags).
 *
 * `python -m emu run my.c` (or emu.guests.build) compiles it with gcc or clang
 * (freestanding, static, no red zone, kernel code model, see README "C
 * guests") and links it with guest/lib/cstart.S (_start, memset/memcpy/...),
 * the runtime (guest/lib/runtime.S), the selftest library (guest/lib/
 * ucall_common.c, guest_sprintf.c) and guest/link.ld.  One ELF runs in a
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

/* Assert kinds (guestabi.ASSERT_KIND_*, emu.userspace.ucall_common.ASSERT_KIND_*). */
#define EMU_ASSERT_KIND_ASSERT   0
#define EMU_ASSERT_KIND_EQ       1
#define EMU_ASSERT_KIND_NE       2
#define EMU_ASSERT_KIND_LT       3
#define EMU_ASSERT_KIND_LE       4
#define EMU_ASSERT_KIND_GT       5
#define EMU_ASSERT_KIND_GE       6
#define EMU_ASSERT_KIND_FMT      7
#define EMU_ASSERT_KIND_FAIL     8

/* guest/lib/cstart.S: what a compiler may call even in freestanding code. */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);

/* The guest's entry point: every vCPU calls it; returning is GUEST_DONE(). */
void guest_main(void);

/* ---- The runtime (guest/lib/runtime.S).  Each preserves every register but
 * its return value, so these are ordinary C calls. ---- */

/* Send one value to the host (res.reports, in order, with the vCPU). */
void emu_report(u64 value);
/* A sync without the ucall pool (what an assembler guest uses): the host
 * records [vcpu, value] in res.syncs and traces it. */
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

/* ---- KVM hypercalls (include/uapi/linux/kvm_para.h) ---- */

/* KVM's hypercall ABI: nr in RAX, a0..a3 in RBX, RCX, RDX, RSI, the result in
 * RAX (in a TD: TDG.VP.VMCALL with R10 = nr, R11..R14 = a0..a3, the result in
 * R10).  -KVM_ENOSYS (as a u64) for a hypercall KVM does not know. */
u64 kvm_hypercall(u64 nr, u64 a0, u64 a1, u64 a2, u64 a3);

#define KVM_ENOSYS                      1000
#define KVM_EINVAL                      22
#define KVM_HC_MAP_GPA_RANGE            12
#define KVM_MAP_GPA_RANGE_PAGE_SZ_4K    0
#define KVM_MAP_GPA_RANGE_PAGE_SZ_2M    1
#define KVM_MAP_GPA_RANGE_PAGE_SZ_1G    2
#define KVM_MAP_GPA_RANGE_ENCRYPTED     (1 << 4)
#define KVM_MAP_GPA_RANGE_DECRYPTED     (0 << 4)

/* The flags private_mem_conversions_test passes to KVM_HC_MAP_GPA_RANGE
 * (guestabi.MAP_GPA_*): the VMM does what that test's host does with them
 * (sets the attributes, private or shared, and fallocate()s guest_memfd,
 * punching the hole when going shared).  KVM_MAP_GPA_RANGE_ENCRYPTED, or 0,
 * is KVM's ABI instead: convert to private, or to shared. */
#define MAP_GPA_SET_ATTRIBUTES          (1 << 0)
#define MAP_GPA_SHARED                  (1 << 1)
#define MAP_GPA_DO_FALLOCATE            (1 << 2)

static inline u64 __kvm_hypercall_map_gpa_range(u64 gpa, u64 size, u64 flags)
{
	return kvm_hypercall(KVM_HC_MAP_GPA_RANGE, gpa, size >> 12, flags, 0);
}

/* ---- ucalls (include/ucall_common.h; guest/lib/ucall_common.c) ---- */

enum {
	UCALL_NONE,
	UCALL_SYNC,
	UCALL_ABORT,
	UCALL_PRINTF,
	UCALL_DONE,
	UCALL_UNHANDLED,
};

#define UCALL_MAX_ARGS   7
#define UCALL_BUFFER_LEN 1024
#define UCALL_POOL_SLOTS 64

/* The layout the host reads (emu.userspace.ucall_common): upstream's, and the
 * number of arguments passed. */
struct ucall {
	u64 cmd;
	u64 args[UCALL_MAX_ARGS];
	char buffer[UCALL_BUFFER_LEN];
	u64 hva;                        /* the host's handle for this struct */
	u64 nargs;
};

/* The ucall transport (guest/lib/runtime.S), as upstream's: `in` from port
 * 0x1000 with RDI = uc in a plain VM, an 8-byte MMIO write of uc to the ucall
 * GPA in a TD.  Clobbers RAX. */
void ucall_arch_do_ucall(u64 uc);
#define GUEST_UCALL_FAILED ((u64)-1)

void ucall(u64 cmd, int nargs, ...);
void ucall_fmt(u64 cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void ucall_assert(u64 cmd, const char *exp, const char *file, unsigned int line, const char *fmt, ...)
	__attribute__((format(printf, 5, 6), noreturn));
void __ucall_assert(u64 kind, u64 a, u64 b, const char *exp, const char *file, unsigned int line,
		    const char *fmt, ...) __attribute__((format(printf, 7, 8), noreturn));
void __emu_guest_done(void) __attribute__((noreturn));
/* GUEST_SYNC's "hello": the host tells GUEST_SYNC / GUEST_SYNC_ARGS (stage in
 * args[1]) from GUEST_SYNC1..6 (stage in args[0]) by it. */
extern const char __ucall_sync_hello[];

int guest_vsnprintf(char *buf, int n, const char *fmt, __builtin_va_list args);
int guest_snprintf(char *buf, int n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#define GUEST_UCALL_NONE() ucall_arch_do_ucall(0)

/* GUEST_SYNC(stage): the host records [vcpu, stage] (run.syncs) and, with
 * on_ucall, sees uc.stage == stage and uc.args == ().  GUEST_SYNC_ARGS adds
 * four arguments (uc.args). */
#define GUEST_SYNC(stage)                                                       \
	ucall(UCALL_SYNC, 2, (u64)__ucall_sync_hello, (u64)(stage))
#define GUEST_SYNC_ARGS(stage, arg1, arg2, arg3, arg4)                          \
	ucall(UCALL_SYNC, 6, (u64)__ucall_sync_hello, (u64)(stage), (u64)(arg1),  \
	      (u64)(arg2), (u64)(arg3), (u64)(arg4))
/* GUEST_SYNC1..6 (newer upstream): the first argument is the stage. */
#define GUEST_SYNC1(a0) ucall(UCALL_SYNC, 1, (u64)(a0))
#define GUEST_SYNC2(a0, a1) ucall(UCALL_SYNC, 2, (u64)(a0), (u64)(a1))
#define GUEST_SYNC3(a0, a1, a2) ucall(UCALL_SYNC, 3, (u64)(a0), (u64)(a1), (u64)(a2))
#define GUEST_SYNC4(a0, a1, a2, a3)                                             \
	ucall(UCALL_SYNC, 4, (u64)(a0), (u64)(a1), (u64)(a2), (u64)(a3))
#define GUEST_SYNC5(a0, a1, a2, a3, a4)                                         \
	ucall(UCALL_SYNC, 5, (u64)(a0), (u64)(a1), (u64)(a2), (u64)(a3), (u64)(a4))
#define GUEST_SYNC6(a0, a1, a2, a3, a4, a5)                                     \
	ucall(UCALL_SYNC, 6, (u64)(a0), (u64)(a1), (u64)(a2), (u64)(a3), (u64)(a4), \
	      (u64)(a5))

/* GUEST_PRINTF(fmt, ...): the host records [vcpu, text] (run.printfs). */
#define GUEST_PRINTF(_fmt, _args...) ucall_fmt(UCALL_PRINTF, _fmt, ##_args)

/* GUEST_DONE(): this vCPU is done: UCALL_DONE, then it halts for good. */
#define GUEST_DONE() __emu_guest_done()

/* The asserts: a failure is a UCALL_ABORT with the expression, the file and
 * the line (upstream's three arguments), the kind and the two values of a
 * comparison (emu's), and the formatted message; the run ends (exit "fail",
 * status 1) with "GUEST_ASSERT failed at FILE:LINE: cond", or for a
 * comparison "GUEST_ASSERT_EQ failed at FILE:LINE: a == b (0x3 != 0x4)".
 * Syncs and reports made before it are kept. */
#define ____GUEST_ASSERT(_kind, _a, _b, _condition, _exp, _fmt, _args...)        \
	do {                                                                     \
		if (!(_condition))                                               \
			__ucall_assert(_kind, (u64)(_a), (u64)(_b), _exp, __FILE__, \
				       __LINE__, _fmt, ##_args);                 \
	} while (0)

/* __GUEST_ASSERT(cond, fmt, ...): with a message of the guest's. */
#define __GUEST_ASSERT(_condition, _fmt, _args...)                              \
	____GUEST_ASSERT(EMU_ASSERT_KIND_FMT, 0, 0, _condition, #_condition, _fmt, ##_args)

#define GUEST_ASSERT(_condition)                                                \
	____GUEST_ASSERT(EMU_ASSERT_KIND_ASSERT, 0, 0, _condition, #_condition, "%s", #_condition)

#define GUEST_FAIL(_fmt, _args...)                                              \
	__ucall_assert(EMU_ASSERT_KIND_FAIL, 0, 0, "Unconditional guest failure", __FILE__, \
		       __LINE__, _fmt, ##_args)

/* The comparisons: each argument evaluated once, in its own type. */
#define __GUEST_ASSERT_CMP(_kind, a, b, _op, _nop)                              \
	do {                                                                     \
		__typeof__(a) __a = (a);                                         \
		__typeof__(b) __b = (b);                                         \
		____GUEST_ASSERT(_kind, __a, __b, __a _op __b, #a " " #_op " " #b, \
				 "%#lx " #_nop " %#lx (%s " #_nop " %s)",        \
				 (unsigned long)(__a), (unsigned long)(__b), #a, #b); \
	} while (0)

#define GUEST_ASSERT_EQ(a, b) __GUEST_ASSERT_CMP(EMU_ASSERT_KIND_EQ, a, b, ==, !=)
#define GUEST_ASSERT_NE(a, b) __GUEST_ASSERT_CMP(EMU_ASSERT_KIND_NE, a, b, !=, ==)
#define GUEST_ASSERT_LT(a, b) __GUEST_ASSERT_CMP(EMU_ASSERT_KIND_LT, a, b, <, >=)
#define GUEST_ASSERT_LE(a, b) __GUEST_ASSERT_CMP(EMU_ASSERT_KIND_LE, a, b, <=, >)
#define GUEST_ASSERT_GT(a, b) __GUEST_ASSERT_CMP(EMU_ASSERT_KIND_GT, a, b, >, <=)
#define GUEST_ASSERT_GE(a, b) __GUEST_ASSERT_CMP(EMU_ASSERT_KIND_GE, a, b, >=, <)

/* kvm_hypercall_map_gpa_range(): convert with KVM_HC_MAP_GPA_RANGE; the VMM
 * must say yes. */
static inline void kvm_hypercall_map_gpa_range(u64 gpa, u64 size, u64 flags)
{
	u64 ret = __kvm_hypercall_map_gpa_range(gpa, size, flags);

	GUEST_ASSERT(!ret);
}

/* The assembler-level assert (emu_assert_fail, EMU_HC_ASSERT), kept for
 * guests that call the runtime directly. */
#define __EMU_ASSERT_FAIL(kind, expr, a, b)                                     \
	do {                                                                     \
		static const struct emu_assert_site __emu_site = {               \
			__FILE__, expr, __LINE__, kind };                        \
		emu_assert_fail(&__emu_site, (u64)(a), (u64)(b));               \
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
