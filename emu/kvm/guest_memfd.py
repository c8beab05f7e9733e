"""guest_memfd (virt/kvm/guest_memfd.c): the private memory of a TD, behind no host mapping."""

from .kvm_host import KvmIoctlError
from .tdp_mmu import KVM_MIRROR_ROOTS


class KvmGmem:
    """The guest_memfd side of struct kvm."""

    def kvm_gmem_punch_hole(self, start_gfn, end_gfn):
        """fallocate(PUNCH_HOLE) on guest_memfd: kvm_gmem_invalidate_begin() unmaps the private
        mappings of the range under an invalidation, the pages are truncated (their contents
        dropped), then kvm_gmem_invalidate_end().  A TD's huge private pages that the hole cuts
        are split first, so that only the hole goes (as for a conversion: kvm_gmem_convert)."""
        r = self.x86_ops.gmem_convert(self, start_gfn, end_gfn, False)
        if r:
            raise KvmIoctlError(-r, f"punching gfn {start_gfn:#x}-{end_gfn:#x}: splitting failed ({r})")
        self.invalidate_and_unmap([(start_gfn, end_gfn)], KVM_MIRROR_ROOTS)
        for gfn in range(start_gfn, end_gfn):
            slot = self.gfn_to_memslot(gfn)
            if slot is not None and slot.gmem_addr is not None:
                hpa = self.x86_ops.gmem_get_pfn(self, slot, gfn) << 12
                if hpa >> 12 in self.mem.protected:
                    continue                  # still the TD's (KVM could not take it back): leaked, kept
                # truncate_inode_pages_range(): the page goes back to the host's allocator
                self.check_td_page_freed(hpa, f"kvm_gmem_punch_hole() frees the private page of gfn {gfn:#x}, "
                                              f"which TDH.MEM.PAGE.REMOVE gave back (tdx_sept_remove_private_spte())")
                self.mem.host_zero(hpa)
        self.invalidate_end()

