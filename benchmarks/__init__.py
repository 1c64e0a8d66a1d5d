"""Benchmarks: step time, data path, scaling (run `python benchmarks/perf.py --help`)."""
