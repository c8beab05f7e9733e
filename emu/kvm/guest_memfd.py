"""guest_memfd (virt/kvm/guest_memfd.c): the private memory of a VM, behind no host mapping.

A memslot with KVM_MEM_GUEST_MEMFD has its range of a guest_memfd file; here the file's pages are
a run of host memory (``slot.gmem_addr``), allocated up front: kvm_gmem_allocate() (fallocate
without PUNCH_HOLE) has nothing to do, and a page that was never written, or whose hole was
punched, reads as zeros (as a freshly allocated folio does).
"""

from .tdp_mmu import KVM_MIRROR_ROOTS, KVM_DIRECT_ROOTS


class KvmGmem:
    """The guest_memfd side of struct kvm."""

    def kvm_gmem_get_pfn(self, slot, gfn):
        """kvm_gmem_get_pfn(): the page of the slot's guest_memfd that backs private ``gfn``."""
        return (slot.gmem_addr >> 12) + gfn - slot.base_gfn

    def kvm_gmem_punch_hole(self, start_gfn, end_gfn):
        """fallocate(PUNCH_HOLE) on guest_memfd: kvm_gmem_invalidate_begin() unmaps the private
        mappings of the range under an invalidation (KVM_FILTER_PRIVATE: the mirror root of a TD;
        a VM without a mirror keeps private and shared mappings in its direct root, and zaps the
        range there), the pages are truncated (their contents dropped), then
        kvm_gmem_invalidate_end()."""
        types = KVM_MIRROR_ROOTS if self.has_mirrored_tdp else KVM_DIRECT_ROOTS
        self.invalidate_and_unmap([(start_gfn, end_gfn)], types)
        for gfn in range(start_gfn, end_gfn):
            slot = self.gfn_to_memslot(gfn)
            if slot is not None and slot.gmem_addr is not None:
                self.mem.host_zero(self.kvm_gmem_get_pfn(slot, gfn) << 12)
        self.invalidate_end()
