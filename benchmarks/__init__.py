"""Speed and memory benchmarks of the engine against a plain tutorial-style baseline.

Run ``python -m benchmarks.bench`` (or ``pastiche bench``) from a source checkout; see
docs/BENCHMARKS.md for what is measured and the latest numbers.
"""
