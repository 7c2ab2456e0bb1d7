"""Benchmarks: scripts that measure quality, cost and the system, and print and write their figures."""
