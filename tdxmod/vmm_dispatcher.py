"""The SEAMCALL dispatcher's table: leaf number -> handler (src/vmm_dispatcher/tdx_vmm_dispatcher.c).

Each handler takes (module, input Regs, caller) and returns the output Regs.  The handlers live
one group of leaves per module in tdxmod/api_calls/, as the TDX module's api_calls/ directory
has them; TDH.VP.ENTER is in td_dispatch.py (src/td_transitions/tdh_vp_enter.c).
"""

from .abi import TDH_VP_ENTER
from .api_calls import tdh_mem_page, tdh_mem_range, tdh_mem_sept, tdh_mng, tdh_mr, tdh_phymem, tdh_vp
from .td_dispatch import vp_enter

HANDLERS = {TDH_VP_ENTER: vp_enter}
for _group in (tdh_mng, tdh_vp, tdh_mr, tdh_mem_sept, tdh_mem_page, tdh_mem_range, tdh_phymem):
    HANDLERS.update(_group.LEAVES)
