"""The checkers: what runs the model many ways and judges each run.

sched       the deterministic scheduler: tasks switched at scheduling points, step footprints
explore     bounded DFS, PCT sampling, replay and minimization of schedules
dpor        dynamic partial-order reduction (explore --dpor)
campaign    fault-injection campaigns; inject holds the fault points and their expected reactions
check       the invariants every run must keep
distributed the same runs on a Ray cluster (--ray)
"""
