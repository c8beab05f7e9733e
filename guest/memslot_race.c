/*
 * memslot_race: a scenario for memslot deletion racing page faults (the race
 * kvm->srcu closes).  Run it with a host event that deletes the memslot of
 * the range the vCPUs touch:
 *
 *   python -m emu explore memslot_race --vm tdx --vcpus 2 \
 *       --host 'delete 0x2000000-0x2008000@20' --random 300
 *
 * Each vCPU touches its pages of [RACE_GPA, RACE_GPA + RACE_PAGES * 4K)
 * (in a TD it accepts each first), READS times over.  The host deletes the
 * range's memslot while they do (the VMM gave the range a memslot of its
 * own).  A vCPU that touches the range once the memslot is gone gets
 * KVM_EXIT_MEMORY_FAULT (private memory) or an MMIO exit (shared) and stops
 * there: what the scenario expects.  What must never happen: a fault that
 * looked the memslot up before it was deleted maps the page afterwards
 * (kvm_swap_active_memslots() waits in synchronize_srcu() for exactly such
 * faults before the slot is zapped); the checker then reports a mapping of a
 * GFN that no memslot covers.  `--bug memslot-no-srcu-wait` switches the wait
 * off.  The guest reports nothing: how far each vCPU gets depends on the
 * schedule.
 */
#include "emu.h"

#define RACE_GPA   0x2000000UL
#define RACE_PAGES 8
#define READS      4

void guest_main(void)
{
	u64 id = emu_vcpu_id(), n = emu_nr_vcpus();
	u64 round, p, sum = 0;

	for (round = 0; round < READS; round++) {
		for (p = id; p < RACE_PAGES; p += n) {
			u64 gpa = RACE_GPA + p * EMU_PAGE_SIZE;

			if (round == 0)
				GUEST_ASSERT_EQ(emu_accept(gpa, EMU_PAGE_SIZE), 0);
			sum += READ_ONCE(*(volatile u64 *)gpa);
		}
	}
	GUEST_ASSERT_EQ(sum, 0);                /* nobody wrote there: zeros */
}
