"""Experiments: many runs rather than one. `queue` (a folder of queued runs, run one at a time, resumed after a
crash), `sweep` (one queued run per combination of --grid values, sharing one cache), `compare` (the table, the
best run, the strength grid of several runs or of one run's checkpoints)."""
