"""Benchmarks of profusion-rt against eager PyTorch (each backend measured in its own process)."""
