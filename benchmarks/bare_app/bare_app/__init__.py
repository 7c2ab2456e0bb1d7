"""A Flower app that does no work: the framework baseline of `benchmarks/bench_system.py`."""
