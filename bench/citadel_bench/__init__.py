"""Citadel's benchmarks: `make bench` runs them and writes docs/benchmarks.md.

Run with `bench/` on `PYTHONPATH` and `PYTHONSAFEPATH=1`: `python -m citadel_bench`.
"""
