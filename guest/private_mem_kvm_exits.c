/*
 * private_mem_kvm_exits: the guest of upstream's
 * tools/testing/selftests/kvm/x86/private_mem_kvm_exits_test.c.
 *
 * The guest reads one page forever; the host makes the page private and
 * either deletes its memslot under the running vCPU
 * (test_private_access_memslot_deleted) or gives it a memslot without a
 * guest_memfd (test_private_access_memslot_not_private).  Either way KVM
 * cannot map the private access: KVM_RUN fails with -EFAULT and
 * KVM_EXIT_MEMORY_FAULT (flags KVM_MEMORY_EXIT_FLAG_PRIVATE, the page's GPA,
 * 4 KiB).  The host side is tests/test_selftest_ports.py.
 *
 * In a TD the page must be accepted before it is read: the guest accepts it
 * first (TDG.MEM.PAGE.ACCEPT is the access KVM then cannot map, if the memslot
 * is already gone).
 */
#include "emu.h"

/* Arbitrarily selected to avoid overlaps with anything else */
#define EXITS_TEST_GVA 0xc0000000UL
#define EXITS_TEST_GPA EXITS_TEST_GVA
#define EXITS_TEST_NPAGES 1
#define EXITS_TEST_SIZE (EXITS_TEST_NPAGES * EMU_PAGE_SIZE)

static u64 guest_repeatedly_read(void)
{
	volatile u64 value = 0;

	while (true)
		value = *((volatile u64 *)EXITS_TEST_GVA);
	return value;
}

void guest_main(void)
{
	emu_accept(EXITS_TEST_GPA, EXITS_TEST_SIZE);        /* a TD's; nothing elsewhere */
	guest_repeatedly_read();
}
