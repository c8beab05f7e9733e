"""guest_memfd (virt/kvm/guest_memfd.c): the private memory of a VM, behind no host mapping.

A memslot with KVM_MEM_GUEST_MEMFD has its range of a guest_memfd file; here the file's pages are
a run of host memory (``slot.gmem_addr``), allocated up front: kvm_gmem_allocate() (fallocate
without PUNCH_HOLE) has nothing to do, and a page that was never written, or whose hole was
punched, reads as zeros (as a freshly allocated folio does).
"""

from .kvm_host import KvmIoctlError
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
        kvm_gmem_invalidate_end().  A TD's huge private pages that the hole cuts are split first,
        so that only the hole goes (as for a conversion: kvm_gmem_convert)."""
        r = self.x86_ops.gmem_convert(self, start_gfn, end_gfn, False)
        if r:
            raise KvmIoctlError(-r, f"punching gfn {start_gfn:#x}-{end_gfn:#x}: splitting failed ({r})")
        types = KVM_MIRROR_ROOTS if self.has_mirrored_tdp else KVM_DIRECT_ROOTS
        self.invalidate_and_unmap([(start_gfn, end_gfn)], types)
        for gfn in range(start_gfn, end_gfn):
            slot = self.gfn_to_memslot(gfn)
            if slot is not None and slot.gmem_addr is not None:
                hpa = self.kvm_gmem_get_pfn(slot, gfn) << 12
                if hpa >> 12 in self.mem.protected:
                    continue  # still the TD's (KVM could not take it back): leaked, kept
                # truncate_inode_pages_range(): the page goes back to the host's allocator
                self.check_td_page_freed(
                    hpa,
                    f"kvm_gmem_punch_hole() frees the private page of gfn {gfn:#x}, "
                    f"which TDH.MEM.PAGE.REMOVE gave back (tdx_sept_remove_private_spte())",
                )
                self.mem.host_zero(hpa)
        if self.checker is not None:
            # (still inside the invalidation: no fault can have mapped the range again)
            self.checker.range_unmapped(self, start_gfn, end_gfn, types, "fallocate(PUNCH_HOLE) on guest_memfd")
        self.invalidate_end()
