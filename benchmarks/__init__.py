"""Throughput and accuracy benchmarks (see benchmarks/README.md)."""
