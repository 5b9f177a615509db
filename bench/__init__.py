"""Side-by-side benchmarks: `python -m bench.run_all` (what `make bench` runs) prints tables, writes JSON + PNG."""
