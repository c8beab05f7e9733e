/* convert: the guest fills a page, converts it to private; the host checks at each sync. */
#include "emu.h"

#define DATA_GPA 0x100000000UL            /* 4 GiB: the memslot the host adds */

u64 pattern = 0x11;                       /* the host sets it before the run */

void guest_main(void)
{
	u8 *shared = emu_shared_ptr(DATA_GPA), *private = emu_gpa_ptr(DATA_GPA);

	memset(shared, pattern, 4096);
	GUEST_SYNC_ARGS(0, DATA_GPA, 4096, pattern, 0);            /* the host sees the pattern */
	kvm_hypercall_map_gpa_range(DATA_GPA, 4096, MAP_GPA_SET_ATTRIBUTES);   /* to private */
	GUEST_ASSERT_EQ(emu_accept(DATA_GPA, 4096), 0);            /* a TD's ACCEPT; 0 elsewhere */
	memset(private, 0x22, 4096);
	GUEST_SYNC_ARGS(1, DATA_GPA, 4096, pattern, 0);            /* ... and still does */
	GUEST_PRINTF("vCPU %lu: private byte %#x\n", emu_vcpu_id(), private[7]);
}
