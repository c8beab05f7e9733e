"""Run a measurement in a fresh child process (so peak RSS is its own)."""

import traceback

from emu.checkers.explore import in_child


def in_child_value(fn):
    kind, value = in_child(
        lambda: ("ok", fn()), lambda e: ("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    )
    if kind == "err":
        raise RuntimeError(value)
    return value
