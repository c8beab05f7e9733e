/*
 * memslot_move: a scenario for a memslot moved to GPAs the vCPUs touch (the
 * MMIO SPTE generation race).  Run it with a host event that moves the range's
 * memslot to TO:
 *
 *   python -m emu explore memslot_move --vcpus 2 \
 *       --host 'move 0x2000000-0x2008000 0x10000000@4' --random 300
 *
 * Each vCPU reads its pages of [TO, TO + MOVE_PAGES * 4K), READS times over.
 * Before the move no memslot covers them: the first read faults, KVM installs an
 * MMIO SPTE and exits with KVM_EXIT_MMIO, and the vCPU stops there (what the
 * scenario expects).  After the move they are the slot's memory (zeros).  What
 * must never happen: a fault that looked up the memslots before the move makes
 * its MMIO SPTE while kvm_swap_active_memslots() waits for it, with a
 * generation that is current after the move; the guest's accesses to the
 * moved memory would be taken for MMIO until the next memslot change.  The
 * checker reports such an SPTE.  `--bug mmio-gen-before-srcu-wait` bumps the
 * generation before the wait (the bug "kvm: fix potentially corrupt mmio cache"
 * fixed).  The guest reports nothing: how far each vCPU gets depends on the
 * schedule.
 */
#include "emu.h"

#define MOVE_TO    0x10000000UL
#define MOVE_PAGES 8
#define READS      4

void guest_main(void)
{
	u64 id = emu_vcpu_id(), n = emu_nr_vcpus();
	u64 round, p, sum = 0;

	for (round = 0; round < READS; round++)
		for (p = id; p < MOVE_PAGES; p += n)
			sum += READ_ONCE(*(volatile u64 *)(MOVE_TO + p * EMU_PAGE_SIZE));
	GUEST_ASSERT_EQ(sum, 0);                /* the moved slot was never written: zeros */
}
