/*
 * tdx_upm: the guest of Intel's TDX UPM selftest (intel/tdx,
 * tools/testing/selftests/kvm/x86/tdx_upm_test.c, verify_upm_test_explicit):
 * private memory in a TD, converted with TDG.VP.VMCALL<MapGPA> and back.
 *
 * The test area (2 MiB at TDX_UPM_TEST_AREA_GPA, a memslot with a guest_memfd
 * the host adds, private) is two general areas sandwiching a small focus area.
 * The host wrote PATTERN_CONFIDENCE_CHECK into the memslot's host memory before
 * the run.  The guest fills the area (private) and syncs: the host sees its
 * own pattern, not the guest's.  The guest converts the focus area to shared
 * (MapGPA): through the shared alias it sees the host's data; it writes there,
 * syncs, and sees what the host wrote back.  It converts the focus area back
 * to private and accepts it: zeros; the general areas never changed.
 *
 * Differences from the original, where this model's TD differs from the
 * selftest library's: the test area is not added at build time
 * (td_mark_pages_for_loading), so the guest accepts it first; the guest
 * accepts the focus area after converting it back explicitly, rather than in
 * a #VE handler (SEPT_VE_DISABLE is set, as QEMU sets it); and the area is
 * reached at its GPA (private) and through the loader's shared window, not at
 * GVAs of its own.  The host side is tests/test_selftest_ports.py.
 */
#include "emu.h"

#define PATTERN_CONFIDENCE_CHECK (0x11)
#define PATTERN_HOST_FOCUS (0x22)
#define PATTERN_GUEST_GENERAL (0x33)
#define PATTERN_GUEST_FOCUS (0x44)

#define SZ_1M 0x100000UL
#define SZ_2M 0x200000UL
#define SZ_8K 0x2000UL
#define SZ_32K 0x8000UL

#define TDX_UPM_TEST_AREA_GPA (0x80000000UL)
#define TDX_UPM_TEST_AREA_SIZE SZ_2M
#define TDX_UPM_GENERAL_AREA_0_SIZE SZ_1M
#define TDX_UPM_FOCUS_AREA_SIZE (SZ_32K + SZ_8K)
#define TDX_UPM_GENERAL_AREA_1_SIZE \
	(TDX_UPM_TEST_AREA_SIZE - TDX_UPM_GENERAL_AREA_0_SIZE - TDX_UPM_FOCUS_AREA_SIZE)

struct __attribute__((packed)) tdx_upm_test_area {
	u8 general_area_0[TDX_UPM_GENERAL_AREA_0_SIZE];
	u8 focus_area[TDX_UPM_FOCUS_AREA_SIZE];
	u8 general_area_1[TDX_UPM_GENERAL_AREA_1_SIZE];
};

/* Test stages for syncing with host */
enum {
	SYNC_CHECK_READ_PRIVATE_MEMORY_FROM_HOST = 1,
	SYNC_CHECK_READ_SHARED_MEMORY_FROM_HOST,
	SYNC_CHECK_READ_PRIVATE_MEMORY_FROM_HOST_AGAIN,
};

static void fill_test_area(struct tdx_upm_test_area *test_area_base, u8 pattern)
{
	memset(test_area_base, pattern, sizeof(*test_area_base));
}

static void fill_focus_area(struct tdx_upm_test_area *test_area_base, u8 pattern)
{
	memset(test_area_base->focus_area, pattern, sizeof(test_area_base->focus_area));
}

static bool check_area(u8 *base, u64 size, u8 expected_pattern)
{
	u64 i;

	for (i = 0; i < size; i++) {
		if (base[i] != expected_pattern)
			return false;
	}
	return true;
}

static bool check_general_areas(struct tdx_upm_test_area *test_area_base, u8 expected_pattern)
{
	return check_area(test_area_base->general_area_0, sizeof(test_area_base->general_area_0),
			  expected_pattern) &&
	       check_area(test_area_base->general_area_1, sizeof(test_area_base->general_area_1),
			  expected_pattern);
}

static bool check_focus_area(struct tdx_upm_test_area *test_area_base, u8 expected_pattern)
{
	return check_area(test_area_base->focus_area, sizeof(test_area_base->focus_area), expected_pattern);
}

static bool check_test_area(struct tdx_upm_test_area *test_area_base, u8 expected_pattern)
{
	return check_general_areas(test_area_base, expected_pattern) &&
	       check_focus_area(test_area_base, expected_pattern);
}

static bool fill_and_check(struct tdx_upm_test_area *test_area_base, u8 pattern)
{
	fill_test_area(test_area_base, pattern);
	return check_test_area(test_area_base, pattern);
}

static void guest_upm_explicit(void)
{
	struct tdx_upm_test_area *test_area_gva_private = emu_gpa_ptr(TDX_UPM_TEST_AREA_GPA);
	struct tdx_upm_test_area *test_area_gva_shared = emu_shared_ptr(TDX_UPM_TEST_AREA_GPA);
	u64 focus_gpa = TDX_UPM_TEST_AREA_GPA + TDX_UPM_GENERAL_AREA_0_SIZE;

	GUEST_ASSERT(emu_is_td());
	/* The test area is private and was not added at build time: accept it. */
	GUEST_ASSERT_EQ(emu_accept(TDX_UPM_TEST_AREA_GPA, TDX_UPM_TEST_AREA_SIZE), 0);

	/* Check: host reading private memory does not modify guest's view */
	fill_test_area(test_area_gva_private, PATTERN_GUEST_GENERAL);

	GUEST_SYNC(SYNC_CHECK_READ_PRIVATE_MEMORY_FROM_HOST);

	GUEST_ASSERT(check_test_area(test_area_gva_private, PATTERN_GUEST_GENERAL));

	/* Remap focus area as shared */
	GUEST_ASSERT_EQ(emu_map_gpa(focus_gpa | emu_shared_bit(), TDX_UPM_FOCUS_AREA_SIZE), 0);

	/* General areas should be unaffected by remapping */
	GUEST_ASSERT(check_general_areas(test_area_gva_private, PATTERN_GUEST_GENERAL));

	/*
	 * Use memory contents to confirm that the memory allocated using mmap
	 * is used as backing memory for shared memory - PATTERN_CONFIDENCE_CHECK
	 * was written by the VMM at the beginning of this test.
	 */
	GUEST_ASSERT(check_focus_area(test_area_gva_shared, PATTERN_CONFIDENCE_CHECK));

	/* Guest can use focus area after remapping as shared */
	fill_focus_area(test_area_gva_shared, PATTERN_GUEST_FOCUS);

	GUEST_SYNC(SYNC_CHECK_READ_SHARED_MEMORY_FROM_HOST);

	/* Check that guest has the same view of shared memory */
	GUEST_ASSERT(check_focus_area(test_area_gva_shared, PATTERN_HOST_FOCUS));

	/* Remap focus area back to private */
	GUEST_ASSERT_EQ(emu_map_gpa(focus_gpa, TDX_UPM_FOCUS_AREA_SIZE), 0);

	/* General areas should be unaffected by remapping */
	GUEST_ASSERT(check_general_areas(test_area_gva_private, PATTERN_GUEST_GENERAL));

	/* Focus area should be zeroed after remapping (and accepting) */
	GUEST_ASSERT_EQ(emu_accept(focus_gpa, TDX_UPM_FOCUS_AREA_SIZE), 0);
	GUEST_ASSERT(check_focus_area(test_area_gva_private, 0));

	GUEST_SYNC(SYNC_CHECK_READ_PRIVATE_MEMORY_FROM_HOST_AGAIN);

	/* Check that guest can use private memory after focus area is remapped as private */
	GUEST_ASSERT(fill_and_check(test_area_gva_private, PATTERN_GUEST_GENERAL));

	GUEST_DONE();
}

void guest_main(void)
{
	guest_upm_explicit();
}
