"""Throughput benchmarks: python -m benchmarks.step | benchmarks.e2e (see benchmarks/README.md)."""
