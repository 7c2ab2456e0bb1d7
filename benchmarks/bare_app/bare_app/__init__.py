"""A Flower app that does no work: the framework baseline of `scripts/bench_system.py`."""
