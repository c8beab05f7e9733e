/* counter: every vCPU counts to its own limit with a shared atomic counter. */
#include "emu.h"

static u64 total;

void guest_main(void)
{
	u64 id = emu_vcpu_id(), i;

	GUEST_SYNC(emu_nr_vcpus());
	for (i = 0; i < 10 * (id + 1); i++)
		__atomic_fetch_add(&total, 1, __ATOMIC_RELAXED);
	GUEST_ASSERT_EQ(i, 10 * (id + 1));
	emu_report(i);
	GUEST_SYNC(i);
	GUEST_DONE();
}
