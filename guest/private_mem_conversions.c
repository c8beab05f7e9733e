/*
 * private_mem_conversions: the guest of upstream's
 * tools/testing/selftests/kvm/x86/private_mem_conversions_test.c (every range
 * and every check of it), for a software-protected VM and for a TD.  The host
 * side is tests/test_selftest_ports.py (and docs/selftests.md).
 *
 * Each vCPU owns PER_CPU_DATA_SIZE bytes (2 MiB + 4 KiB) at
 * BASE_DATA_GPA + vCPU * per_cpu_size, in the memslot(s) the host adds there
 * with a guest_memfd.  It converts ranges between shared and private with
 * KVM_HC_MAP_GPA_RANGE, passing the test's flags (MAP_GPA_SET_ATTRIBUTES,
 * MAP_GPA_SHARED, MAP_GPA_DO_FALLOCATE), which the VMM handles as the test's
 * handle_exit_hypercall() does; it writes patterns and checks them, and asks
 * the host with GUEST_SYNC5/GUEST_SYNC4 to check what it sees through its
 * (shared) mapping and, for SYNC_SHARED, to write a new pattern.
 *
 * In a TD two things differ, as they do for any TD: private memory must be
 * accepted after it is converted to private, or after its hole was punched
 * (TDG.MEM.PAGE.ACCEPT, which also zeroes it), before the guest touches it;
 * and shared memory is reached through its shared alias (the loader's shared
 * window), private memory through the identity map.
 *
 * The host may narrow the run with the globals below (sync_global_to_guest):
 * which test variants run, and which of test_ranges[] they use.
 */
#include "emu.h"

#define SZ_2M                   0x200000UL
#define PAGE_SIZE               EMU_PAGE_SIZE
#define PAGE_SHIFT              12
#define BASE_DATA_GPA           ((u64)(1ull << 32))
#define PER_CPU_DATA_SIZE       ((u64)(SZ_2M + PAGE_SIZE))
#define ARRAY_SIZE(a)           (sizeof(a) / sizeof((a)[0]))

/* Set by the host: each vCPU's stride in the data memslots (upstream:
 * align_up(PER_CPU_DATA_SIZE, the backing's page size)). */
u64 per_cpu_size = 2 * SZ_2M;
/* Set by the host to run less than all of it: bit 0 the explicit conversions
 * without fallocate, bit 1 with it, bit 2 the PUNCH_HOLE test faulting all
 * memory back in, bit 3 faulting in only the target range; and the ranges. */
u64 test_variants = 0xf;
u64 test_ranges_mask = ~0UL;

enum ucall_syncs {
	SYNC_SHARED,
	SYNC_PRIVATE,
};

/* Arbitrary values, KVM doesn't care about the attribute flags. */
#define MAP_GPA_SET_ATTRIBUTES_T  MAP_GPA_SET_ATTRIBUTES
#define MAP_GPA_SHARED_T          MAP_GPA_SHARED
#define MAP_GPA_DO_FALLOCATE_T    MAP_GPA_DO_FALLOCATE

/* The guest's view of [gpa, ...) as private or shared memory. */
static u8 *mem(u64 gpa, bool private)
{
	return (private || !emu_is_td()) ? (u8 *)gpa : (u8 *)emu_shared_ptr(gpa);
}

/* A TD accepts what it converted to private (or what lost its pages to a hole). */
static void accept(u64 gpa, u64 size)
{
	GUEST_ASSERT_EQ(emu_accept(gpa, size), 0);
}

/*
 * memcmp_g: every byte of [gpa, gpa + size) holds pattern, or the guest fails
 * with upstream's message (a macro, so the assert names the caller's line).
 * Eight bytes at a time, then the byte that differs.
 */
#define memcmp_g(gpa, private, pattern, size)                                                   \
do {                                                                                            \
	u8 *__m = mem(gpa, private);                                                            \
	u64 __p8 = 0x0101010101010101UL * (u8)(pattern);                                         \
	size_t __i = 0;                                                                         \
                                                                                                \
	for (; __i + 8 <= (size) && *(volatile u64 *)(__m + __i) == __p8; __i += 8)             \
		;                                                                               \
	for (; __i < (size); __i++)                                                             \
		__GUEST_ASSERT(__m[__i] == (u8)(pattern),                                       \
			       "Guest expected 0x%x at offset %lu (gpa 0x%lx), got 0x%x",       \
			       (pattern), __i, (gpa) + __i, __m[__i]);                          \
} while (0)

static void guest_sync_shared(u64 gpa, u64 size, u8 current_pattern, u8 new_pattern)
{
	GUEST_SYNC5(SYNC_SHARED, gpa, size, current_pattern, new_pattern);
}

static void guest_sync_private(u64 gpa, u64 size, u8 pattern)
{
	GUEST_SYNC4(SYNC_PRIVATE, gpa, size, pattern);
}

static void guest_map_mem(u64 gpa, u64 size, bool map_shared, bool do_fallocate)
{
	u64 flags = MAP_GPA_SET_ATTRIBUTES_T;

	if (map_shared)
		flags |= MAP_GPA_SHARED_T;
	if (do_fallocate)
		flags |= MAP_GPA_DO_FALLOCATE_T;
	kvm_hypercall_map_gpa_range(gpa, size, flags);
}

static void guest_map_shared(u64 gpa, u64 size, bool do_fallocate)
{
	guest_map_mem(gpa, size, true, do_fallocate);
}

static void guest_map_private(u64 gpa, u64 size, bool do_fallocate)
{
	guest_map_mem(gpa, size, false, do_fallocate);
	accept(gpa, size);
}

static const struct {
	u64 offset;
	u64 size;
} test_ranges[] = {
	{ 0, PAGE_SIZE },
	{ 0, SZ_2M },
	{ PAGE_SIZE, PAGE_SIZE },
	{ PAGE_SIZE, SZ_2M },
	{ SZ_2M, PAGE_SIZE },
};

static void guest_test_explicit_conversion(u64 base_gpa, bool do_fallocate)
{
	const u8 def_p = 0xaa;
	const u8 init_p = 0xcc;
	u64 j;
	u64 i;

	/* Memory should be shared by default. */
	memset(mem(base_gpa, false), def_p, PER_CPU_DATA_SIZE);
	memcmp_g(base_gpa, false, def_p, PER_CPU_DATA_SIZE);
	guest_sync_shared(base_gpa, PER_CPU_DATA_SIZE, def_p, init_p);

	memcmp_g(base_gpa, false, init_p, PER_CPU_DATA_SIZE);

	for (i = 0; i < ARRAY_SIZE(test_ranges); i++) {
		u64 gpa = base_gpa + test_ranges[i].offset;
		u64 size = test_ranges[i].size;
		u8 p1 = 0x11;
		u8 p2 = 0x22;
		u8 p3 = 0x33;
		u8 p4 = 0x44;

		if (!(test_ranges_mask & (1UL << i)))
			continue;
		/*
		 * Set the test region to pattern one to differentiate it from
		 * the data range as a whole (contains the initial pattern).
		 */
		memset(mem(gpa, false), p1, size);

		/*
		 * Convert to private, set and verify the private data, and
		 * then verify that the rest of the data (map shared) still
		 * holds the initial pattern, and that the host always sees the
		 * shared memory (initial pattern).  Unlike shared memory,
		 * punching a hole in private memory is destructive, i.e.
		 * previous values aren't guaranteed to be preserved.
		 */
		guest_map_private(gpa, size, do_fallocate);

		if (size > PAGE_SIZE) {
			memset(mem(gpa, true), p2, PAGE_SIZE);
			goto skip;
		}

		memset(mem(gpa, true), p2, size);
		guest_sync_private(gpa, size, p1);

		/*
		 * Verify that the private memory was set to pattern two, and
		 * that shared memory still holds the initial pattern.
		 */
		memcmp_g(gpa, true, p2, size);
		if (gpa > base_gpa)
			memcmp_g(base_gpa, false, init_p, gpa - base_gpa);
		if (gpa + size < base_gpa + PER_CPU_DATA_SIZE)
			memcmp_g(gpa + size, false, init_p, (base_gpa + PER_CPU_DATA_SIZE) - (gpa + size));

		/*
		 * Convert odd-number page frames back to shared to verify KVM
		 * also correctly handles holes in private ranges.
		 */
		for (j = 0; j < size; j += PAGE_SIZE) {
			if ((j >> PAGE_SHIFT) & 1) {
				guest_map_shared(gpa + j, PAGE_SIZE, do_fallocate);
				guest_sync_shared(gpa + j, PAGE_SIZE, p1, p3);

				memcmp_g(gpa + j, false, p3, PAGE_SIZE);
			} else {
				guest_sync_private(gpa + j, PAGE_SIZE, p1);
			}
		}

skip:
		/*
		 * Convert the entire region back to shared, explicitly write
		 * pattern three to fill in the even-number frames before
		 * asking the host to verify (and write pattern four).
		 */
		guest_map_shared(gpa, size, do_fallocate);
		memset(mem(gpa, false), p3, size);
		guest_sync_shared(gpa, size, p3, p4);
		memcmp_g(gpa, false, p4, size);

		/* Reset the shared memory back to the initial pattern. */
		memset(mem(gpa, false), init_p, size);

		/*
		 * Free (via PUNCH_HOLE) *all* private memory so that the next
		 * iteration starts from a clean slate, e.g. with respect to
		 * whether or not there are pages/folios in guest_mem.
		 */
		guest_map_shared(base_gpa, PER_CPU_DATA_SIZE, true);
	}
}

static void guest_punch_hole(u64 gpa, u64 size)
{
	/* "Mapping" memory shared via fallocate() is done via PUNCH_HOLE. */
	u64 flags = MAP_GPA_SHARED_T | MAP_GPA_DO_FALLOCATE_T;

	kvm_hypercall_map_gpa_range(gpa, size, flags);
}

/*
 * Test that PUNCH_HOLE actually frees memory by punching holes without doing a
 * proper conversion.  Freeing (PUNCH_HOLE) should zap SPTEs, and reallocating
 * (subsequent fault) should zero memory.  (A TD accepts the pages again first:
 * its pages left the S-EPT with the hole.)
 */
static void guest_test_punch_hole(u64 base_gpa, bool precise)
{
	const u8 init_p = 0xcc;
	u64 i;

	/*
	 * Convert the entire range to private, this testcase is all about
	 * punching holes in guest_memfd, i.e. shared mappings aren't needed.
	 */
	guest_map_private(base_gpa, PER_CPU_DATA_SIZE, false);

	for (i = 0; i < ARRAY_SIZE(test_ranges); i++) {
		u64 gpa = base_gpa + test_ranges[i].offset;
		u64 size = test_ranges[i].size;

		if (!(test_ranges_mask & (1UL << i)))
			continue;
		/*
		 * Free all memory before each iteration, even for the !precise
		 * case where the memory will be faulted back in.  Freeing and
		 * reallocating should obviously work, and freeing all memory
		 * minimizes the probability of cross-testcase influence.
		 */
		guest_punch_hole(base_gpa, PER_CPU_DATA_SIZE);

		/* Fault-in and initialize memory, and verify the pattern. */
		if (precise) {
			accept(gpa, size);
			memset(mem(gpa, true), init_p, size);
			memcmp_g(gpa, true, init_p, size);
		} else {
			accept(base_gpa, PER_CPU_DATA_SIZE);
			memset(mem(base_gpa, true), init_p, PER_CPU_DATA_SIZE);
			memcmp_g(base_gpa, true, init_p, PER_CPU_DATA_SIZE);
		}

		/*
		 * Punch a hole at the target range and verify that reads from
		 * the guest succeed and return zeroes.
		 */
		guest_punch_hole(gpa, size);
		accept(gpa, size);
		memcmp_g(gpa, true, 0, size);
	}
}

static void guest_code(u64 base_gpa)
{
	/*
	 * Run the conversion test twice, with and without doing fallocate() on
	 * the guest_memfd backing when converting between shared and private.
	 */
	if (test_variants & 1)
		guest_test_explicit_conversion(base_gpa, false);
	if (test_variants & 2)
		guest_test_explicit_conversion(base_gpa, true);

	/*
	 * Run the PUNCH_HOLE test twice too, once with the entire guest_memfd
	 * faulted in, once with only the target range faulted in.
	 */
	if (test_variants & 4)
		guest_test_punch_hole(base_gpa, false);
	if (test_variants & 8)
		guest_test_punch_hole(base_gpa, true);
	GUEST_DONE();
}

void guest_main(void)
{
	/* upstream: vcpu_args_set(vcpus[i], 1, BASE_DATA_GPA + i * per_cpu_size) */
	guest_code(BASE_DATA_GPA + emu_vcpu_id() * per_cpu_size);
}
