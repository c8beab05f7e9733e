/*
 * private_c: the private guest written in C.  vCPU i of n takes pages i, i+n,
 * ... of PRIVATE_PAGES pages at AREA (outside the loaded image, so nothing maps
 * them yet): it accepts each one (in a TD, TDG.MEM.PAGE.ACCEPT: the first
 * access exits to KVM, which builds the S-EPT levels and AUGs the page), checks
 * that it reads as zero, writes a pattern at both ends and reads it back.
 * Reports (per vCPU), as guest/private.S does: the pages it did, the sum of
 * its patterns.  In a plain VM the accept is a no-op and the checks hold.
 */
#include "emu.h"

#define PRIVATE_PAGES 16
#define AREA 0x1000000UL                /* 16 MiB */

void guest_main(void)
{
	u64 n = emu_nr_vcpus(), pages = 0, sum = 0, page, i;

	for (page = emu_vcpu_id(); page < PRIVATE_PAGES; page += n) {
		u64 gpa = AREA + page * EMU_PAGE_SIZE;
		volatile u64 *p = emu_gpa_ptr(gpa);
		u64 pattern = page * 0x10001 + 0x5a5a;

		GUEST_ASSERT_EQ(emu_accept(gpa, EMU_PAGE_SIZE), 0);
		for (i = 0; i < EMU_PAGE_SIZE / 8; i++)
			GUEST_ASSERT_EQ(p[i], 0);
		p[0] = pattern;
		p[EMU_PAGE_SIZE / 8 - 1] = pattern;
		GUEST_ASSERT_EQ(p[0], pattern);
		GUEST_ASSERT_EQ(p[EMU_PAGE_SIZE / 8 - 1], pattern);
		sum += pattern;
		pages++;
	}
	emu_report(pages);
	emu_report(sum);
}
