/*
 * spinlock: a counter under a test-and-test-and-set spinlock, over every vCPU.
 * Each vCPU takes the lock ITERATIONS times (an atomic exchange, spinning with
 * cpu_relax() while another vCPU holds it), increments the shared counter with
 * a plain read and write, and checks no one else got in; the last vCPU to finish
 * (an atomic count, not a wait) checks the counter is ITERATIONS * vCPUs.
 * Reports (per vCPU): ITERATIONS.  Syncs: the last vCPU's final counter.
 *
 * Until vCPUs run truly concurrently, guest code runs atomically between VM
 * exits, so this guest is written never to wait while holding the lock:
 *   - the critical section makes no VM exit: no report or sync inside it, and
 *     every page it touches (lock, counter: one page; this code; the stack) is
 *     mapped before the first lock (the warm-up below), so no EPT violation
 *     (whose handling is a scheduling point) happens while the lock is held;
 *   - a vCPU spins only while another vCPU holds the lock.
 * Today no vCPU ever finds the lock taken; once vCPUs are preempted at PAUSE
 * and by an instruction budget, a holder can be preempted inside the critical
 * section and the others spin in spin_lock() below: that is where the
 * concurrent version matters (and where a broken lock would lose increments).
 */
#include "emu.h"

#define ITERATIONS 1000

static struct {
	u32 lock;               /* 0 free, 1 held */
	u32 owner;              /* vCPU id + 1 of the holder, 0 when free */
	u64 counter;            /* only touched with the lock held */
	u64 finished;           /* vCPUs done, atomically */
} shared __attribute__((aligned(4096)));

static void spin_lock(u32 *lock)
{
	while (__atomic_exchange_n(lock, 1, __ATOMIC_ACQUIRE)) {
		/* Held by another vCPU.  With concurrent vCPUs this is where we
		 * wait (PAUSE lets the holder run); today it is never reached. */
		while (__atomic_load_n(lock, __ATOMIC_RELAXED))
			cpu_relax();
	}
}

static void spin_unlock(u32 *lock)
{
	__atomic_store_n(lock, 0, __ATOMIC_RELEASE);
}

void guest_main(void)
{
	u64 me = emu_vcpu_id() + 1;
	u64 n = emu_nr_vcpus();
	u64 i, done;

	/* Warm-up: a write access to the shared page that changes nothing, so
	 * that the page is mapped writable before any lock is held. */
	__atomic_fetch_add(&shared.finished, 0, __ATOMIC_RELAXED);

	for (i = 0; i < ITERATIONS; i++) {
		spin_lock(&shared.lock);
		/* critical section: no VM exit in here */
		GUEST_ASSERT_EQ(READ_ONCE(shared.owner), 0);
		WRITE_ONCE(shared.owner, me);
		WRITE_ONCE(shared.counter, READ_ONCE(shared.counter) + 1);
		GUEST_ASSERT_EQ(READ_ONCE(shared.owner), me);
		WRITE_ONCE(shared.owner, 0);
		spin_unlock(&shared.lock);
	}
	emu_report(ITERATIONS);

	done = __atomic_add_fetch(&shared.finished, 1, __ATOMIC_ACQ_REL);
	if (done == n) {
		u64 total;

		spin_lock(&shared.lock);
		total = READ_ONCE(shared.counter);
		spin_unlock(&shared.lock);
		GUEST_ASSERT_EQ(total, ITERATIONS * n);
		GUEST_SYNC(total);
	}
	GUEST_DONE();
}
