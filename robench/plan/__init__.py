"""Planning: benchmark files and flags -> a frozen Benchmark -> validated cells.

Nothing here trains or attacks; every name and parameter is checked against the
registries, so a typo fails in milliseconds.
"""
