"""Command-line tools (conversion, preprocessing, generation, benchmarks); importable as ``polytron.tools``."""
