"""Benchmarks run by ``gam bench <name>`` (one module per benchmark)."""
