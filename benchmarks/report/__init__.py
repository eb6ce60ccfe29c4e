"""The markdown of `scripts/benchmark.py`, one module per table; `page.render` puts them together."""
