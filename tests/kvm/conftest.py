import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import emu.vmm as vmm  # noqa: E402


@pytest.fixture
def make_machine():
    """Machine(...) factory (the guest may be a name or a path)."""
    def make(guest, **kw):
        return vmm.Machine(str(guest), **kw)
    return make
