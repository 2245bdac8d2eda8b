"""Benchmarks of autoresearch-mcp: `python -m bench` prints one table of every performance figure, each next to
what it is compared with, measured in the same run (see bench/__main__.py). Figures are printed, never asserted."""
