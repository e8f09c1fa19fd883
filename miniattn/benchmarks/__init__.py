"""Benchmark suites, one module per topic, each runnable as
``python -m miniattn bench --suite NAME`` or ``python -m miniattn.benchmarks.NAME``.

Every suite measures ratios within one run (the machines are noisy), prints a
table and can write its rows as JSON. ``harness`` holds the shared timing,
memory and fitting helpers.
"""
