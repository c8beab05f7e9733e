"""The SEAMCALL handlers, one module per group of leaves (src/vmm_dispatcher/api_calls/ of the TDX module).

Every handler has the same shape: (module, input Regs, caller) -> output Regs.  Checks come in
the module's order (operands, TD state, locks, S-EPT walk and entry state, PAMT); nothing changes
until every check has passed.  Each module ends with LEAVES, its part of the dispatcher's table.
"""
