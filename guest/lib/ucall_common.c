/*
 * ucall_common.c: the guest side of a ucall, as KVM selftests' lib/ucall_common.c
 * has it (linked into every C guest; guest/include/emu.h declares it).
 *
 * A ucall fills a struct ucall taken from the pool the host set up, then hands
 * the host the struct's handle (ucall_arch_do_ucall, guest/lib/runtime.S: the
 * one place the transport is made), then gives the struct back.  The pool is
 * the host's: it lives in memory both sides can read (in a TD, shared memory,
 * as upstream's ucall_init() allocates it with vm_vaddr_alloc_shared()), its
 * address is written into ucall_pool by the VMM before the guest runs, and each
 * struct's hva field holds the handle the host reads it by.  Several vCPUs
 * make ucalls at once: each takes its own struct (an atomic bit per struct).
 */
#include "emu.h"

struct ucall_header {
	u64 in_use[UCALL_POOL_SLOTS / 64];
	struct ucall ucalls[UCALL_POOL_SLOTS];
};

/* Written by the host (emu.userspace.vmm): the pool's guest-virtual address. */
struct ucall_header *ucall_pool;

const char __ucall_sync_hello[] = "hello";

static struct ucall *ucall_alloc(void)
{
	struct ucall_header *pool = READ_ONCE(ucall_pool);
	int i;

	if (!pool)
		goto failed;
	for (i = 0; i < UCALL_POOL_SLOTS; i++) {
		u64 bit = 1UL << (i % 64);

		if (!(__atomic_fetch_or(&pool->in_use[i / 64], bit, __ATOMIC_SEQ_CST) & bit)) {
			struct ucall *uc = &pool->ucalls[i];

			memset(uc->args, 0, sizeof(uc->args));
			uc->nargs = 0;
			uc->buffer[0] = 0;
			return uc;
		}
	}
failed:
	/*
	 * No struct to fill: a bare ucall with a value the host recognizes
	 * (GUEST_UCALL_FAILED).  GUEST_ASSERT() needs a struct, so it cannot
	 * be used here.
	 */
	ucall_arch_do_ucall(GUEST_UCALL_FAILED);
	for (;;)
		emu_halt();
}

static void ucall_free(struct ucall *uc)
{
	u64 i = uc - ucall_pool->ucalls;

	__atomic_fetch_and(&ucall_pool->in_use[i / 64], ~(1UL << (i % 64)), __ATOMIC_SEQ_CST);
}

void ucall(u64 cmd, int nargs, ...)
{
	struct ucall *uc = ucall_alloc();
	__builtin_va_list va;
	int i;

	WRITE_ONCE(uc->cmd, cmd);
	if (nargs > UCALL_MAX_ARGS)
		nargs = UCALL_MAX_ARGS;
	if (nargs < 0)
		nargs = 0;
	__builtin_va_start(va, nargs);
	for (i = 0; i < nargs; ++i)
		WRITE_ONCE(uc->args[i], __builtin_va_arg(va, u64));
	__builtin_va_end(va);
	WRITE_ONCE(uc->nargs, (u64)nargs);
	ucall_arch_do_ucall(uc->hva);
	ucall_free(uc);
}

void ucall_fmt(u64 cmd, const char *fmt, ...)
{
	struct ucall *uc = ucall_alloc();
	__builtin_va_list va;

	uc->cmd = cmd;
	__builtin_va_start(va, fmt);
	guest_vsnprintf(uc->buffer, UCALL_BUFFER_LEN, fmt, va);
	__builtin_va_end(va);
	ucall_arch_do_ucall(uc->hva);
	ucall_free(uc);
}

static void __attribute__((noreturn)) ucall_abort(u64 kind, u64 a, u64 b, const char *exp, const char *file,
						  unsigned int line, const char *fmt, __builtin_va_list va)
{
	struct ucall *uc = ucall_alloc();

	uc->cmd = UCALL_ABORT;
	WRITE_ONCE(uc->args[0], (u64)exp);          /* GUEST_ERROR_STRING */
	WRITE_ONCE(uc->args[1], (u64)file);         /* GUEST_FILE */
	WRITE_ONCE(uc->args[2], (u64)line);         /* GUEST_LINE */
	WRITE_ONCE(uc->args[3], kind);              /* emu: the kind of assert */
	WRITE_ONCE(uc->args[4], a);                 /* emu: a comparison's values */
	WRITE_ONCE(uc->args[5], b);
	uc->nargs = 6;
	guest_vsnprintf(uc->buffer, UCALL_BUFFER_LEN, fmt, va);
	ucall_arch_do_ucall(uc->hva);
	/* The host ends the run; should it resume this vCPU, it halts for good. */
	for (;;)
		emu_halt();
}

void __ucall_assert(u64 kind, u64 a, u64 b, const char *exp, const char *file, unsigned int line,
		    const char *fmt, ...)
{
	__builtin_va_list va;

	__builtin_va_start(va, fmt);
	ucall_abort(kind, a, b, exp, file, line, fmt, va);
}

void ucall_assert(u64 cmd, const char *exp, const char *file, unsigned int line, const char *fmt, ...)
{
	__builtin_va_list va;

	(void)cmd;                                  /* always UCALL_ABORT */
	__builtin_va_start(va, fmt);
	ucall_abort(EMU_ASSERT_KIND_FMT, 0, 0, exp, file, line, fmt, va);
}

/* Where guest_main returns to (guest/lib/cstart.S), and GUEST_DONE(). */
void __emu_guest_done(void)
{
	ucall(UCALL_DONE, 0);
	for (;;)
		emu_halt();
}
