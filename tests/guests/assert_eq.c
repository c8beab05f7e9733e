/* assert_eq: a GUEST_ASSERT_EQ that fails, for tests/test_cguests.py. */
#include "emu.h"

void guest_main(void)
{
	GUEST_SYNC(1);
	GUEST_ASSERT_EQ(emu_vcpu_id(), 5);
}
