"""Benchmarks: ratios measured side by side in one run; `make bench` runs them (not in CI)."""
