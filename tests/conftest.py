"""Fixtures every test directory can use."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cli_json  # noqa: E402  (tests/cli_json.py)
from emu.checkers.inject import Plan  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _cli_json_follows_its_schema():
    """Every `--json` output of the CLI made by any test is validated against docs/schema/
    (tests/cli_json.py): a field renamed, dropped or of another type fails the test that saw it."""
    with cli_json.hooked():
        yield


@pytest.fixture
def inject():
    """Fault-injection plans from pytest: ``inject(machine, "POINT@N=ERROR", ..., seed=0)`` makes them the
    machine's active plan (the same plan language as ``--inject``) and returns the Plan, whose
    ``fired`` list says what was injected."""

    def activate(machine, *plans, seed=0):
        plan = Plan(plans, seed=seed, tracer=machine.tracer)
        machine.set_plan(plan)
        return plan

    return activate
