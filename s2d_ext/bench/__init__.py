"""Benchmarks that ship with the package (``s2d bench``): the Spec-Bench harness and the kernel report.

The kernel microbenchmarks (``bench/verify.py``, ``bench/exit_head.py``, ...) stay in the source checkout's
``bench/`` folder; they import the package, never the other way round.
"""
