"""Benchmarks of tether-ensemble: `python -m benchmarks --help`. Results in results/."""
