"""backhaul.core: the pure BITS job model.

Rules of this package: no I/O, no wall clock, no randomness, no third-party
library but attrs. Time comes in as an argument; identifiers come in as
arguments. Everything here is deterministic, so the event log replays to the
same state on every store.
"""
