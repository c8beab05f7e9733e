"""Fixtures for the TDX module tests: a host with a TDX module, and a TD built up to a given stage."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tdxhelpers import TdEnv  # noqa: E402


@pytest.fixture
def env():
    """A host with a TDX module and no TD."""
    return TdEnv()


@pytest.fixture
def make_td():
    """make_td(stage, **td_params): a TdEnv whose TD is built up to ``stage``."""

    def make(stage, **params):
        return TdEnv().build(stage, **params)

    return make


@pytest.fixture
def td_created(make_td):
    return make_td("created")


@pytest.fixture
def td_keyed(make_td):
    """MNG.CREATE + KEY.CONFIG + all MNG.ADDCX: op_state UNINITIALIZED."""
    return make_td("keyed")


@pytest.fixture
def td_init(make_td):
    return make_td("initialized")


@pytest.fixture
def td_vcpu(make_td):
    return make_td("vcpu")


@pytest.fixture
def td_run(make_td):
    return make_td("runnable")
