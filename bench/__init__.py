"""Benchmarks and measurement scripts, outside the installed package (the wheel carries none of them).

Run one from the repository root as a module, e.g. `python -m bench.describe_speed`, or all of them with
`python -m bench.run_all` (`make bench`); they import shared helpers as `bench.machine`, with no path edits.
"""
