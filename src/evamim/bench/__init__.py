"""Benchmarks: ``evamim bench model|data|pretrain``. Results are recorded in docs/benchmarks.md."""
