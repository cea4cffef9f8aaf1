"""Benchmarks. Each prints its figures and a ratio against a physical-limit reference measured
in the same run; none asserts anything. Run them on a quiet machine."""
