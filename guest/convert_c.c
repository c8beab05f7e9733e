/*
 * convert_c: the convert guest written in C.  vCPU 0 converts CONVERT_PAGES
 * pages private -> shared -> private with MapGPA and checks what each side
 * sees (a TD only: in a plain VM it reports 0):
 *   1. accept the pages, write pattern A privately, read it back;
 *   2. MapGPA to shared (KVM removes the private pages: BLOCK, TRACK, REMOVE);
 *      through the shared alias the pages hold the shared backing (zero), not
 *      A; write pattern B there, read it back;
 *   3. MapGPA back to private (KVM drops the shared mapping), accept again:
 *      the pages read as zero, neither A nor B; write A again, read it back.
 * Reports, as guest/convert.S does: 1, the sum step 2 first read (0), B's sum,
 * the sum step 3 first read (0), A's sum.
 */
#include "emu.h"

#define CONVERT_PAGES 4
#define AREA 0x1000000UL
#define SIZE (CONVERT_PAGES * EMU_PAGE_SIZE)
#define PATTERN_A 0xa0a0a0a000000000UL
#define PATTERN_B 0xb0b0b0b000000000UL

/* One word every 512 bytes: pattern + offset.  Returns the sum written. */
static u64 fill(volatile u64 *p, u64 pattern)
{
	u64 off, sum = 0;

	for (off = 0; off < SIZE; off += 512) {
		p[off / 8] = pattern + off;
		sum += pattern + off;
	}
	return sum;
}

static u64 sum_of(volatile u64 *p)
{
	u64 off, sum = 0;

	for (off = 0; off < SIZE; off += 512)
		sum += p[off / 8];
	return sum;
}

void guest_main(void)
{
	volatile u64 *private = emu_gpa_ptr(AREA);
	volatile u64 *shared = emu_shared_ptr(AREA);
	u64 shared_bit = emu_shared_bit();
	u64 a, b, shared_first, private_again;

	if (emu_vcpu_id() != 0)
		return;
	if (!shared_bit) {
		emu_report(0);
		return;
	}
	GUEST_ASSERT_EQ(emu_accept(AREA, SIZE), 0);
	a = fill(private, PATTERN_A);
	GUEST_ASSERT_EQ(sum_of(private), a);

	GUEST_ASSERT_EQ(emu_map_gpa(AREA | shared_bit, SIZE), 0);      /* to shared */
	shared_first = sum_of(shared);
	b = fill(shared, PATTERN_B);
	GUEST_ASSERT_EQ(sum_of(shared), b);

	GUEST_ASSERT_EQ(emu_map_gpa(AREA, SIZE), 0);                   /* back to private */
	GUEST_ASSERT_EQ(emu_accept(AREA, SIZE), 0);
	private_again = sum_of(private);
	GUEST_ASSERT_EQ(fill(private, PATTERN_A), a);
	GUEST_ASSERT_EQ(sum_of(private), a);

	emu_report(1);
	emu_report(shared_first);
	emu_report(b);
	emu_report(private_again);
	emu_report(a);
}
