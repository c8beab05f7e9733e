/*
 * race2_c: the race2 guest (the seed patch's race) written in C.  Every vCPU
 * accepts and touches its own private 4K page of one 2M region that nothing
 * has mapped yet, at the same time: each first ACCEPT exits to KVM, which
 * must link a new page table under the 2M entry (TDH.MEM.SEPT.ADD) and then
 * AUG the page.  `python -m emu explore race2_c --vm tdx --vcpus 2 --no-freeze`
 * finds the race (a KVM_BUG_ON) as it does with guest/race2.S.
 * Reports (per vCPU): the value it wrote and read back (its page's GPA + 0x2a).
 */
#include "emu.h"

#define AREA 0x1400000UL                /* 20 MiB: a 2M region of its own */

void guest_main(void)
{
	u64 gpa = AREA + emu_vcpu_id() * EMU_PAGE_SIZE;
	volatile u64 *p = emu_gpa_ptr(gpa);

	GUEST_ASSERT_EQ(emu_accept(gpa, EMU_PAGE_SIZE), 0);
	GUEST_ASSERT_EQ(*p, 0);
	*p = gpa + 0x2a;
	GUEST_ASSERT_EQ(*p, gpa + 0x2a);
	emu_report(gpa + 0x2a);
}
