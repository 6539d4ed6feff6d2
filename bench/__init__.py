"""Benchmarks of monim-store (run as modules, e.g. ``python -m bench.search_bench``)."""
