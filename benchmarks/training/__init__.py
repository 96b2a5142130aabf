"""Training benchmarks (customization speed on CPU; the prepared GPU customization run)."""
