import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import emu.userspace.vmm as vmm  # noqa: E402

TEST_TIMEOUT = 60  # seconds; the whole tests/kvm suite takes a few


@pytest.fixture(autouse=True)
def _no_hang():
    """Fail a test that loops forever (a fault retried for ever, an iterator that never ends)."""

    def expired(signum, frame):
        raise TimeoutError(f"test did not finish in {TEST_TIMEOUT} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def make_machine():
    """Machine(...) factory (the guest may be a name or a path)."""

    def make(guest, **kw):
        return vmm.Machine(str(guest), **kw)

    return make
