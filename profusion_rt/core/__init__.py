"""Foundations: errors, file-system helpers, presets, image I/O, hardware facts. Imports nothing else from
profusion_rt."""
