"""Fixtures every test directory can use."""

import pytest

from emu.checkers.inject import Plan


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
