"""The real-model benchmarks: one harness, one entry point (``python -m bench --help``)."""
