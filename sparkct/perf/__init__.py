"""Performance tooling: `sparkct bench` (runs benchmarks/, writes one sparkct-bench/1 JSON, compares it
with a stored baseline), device peaks, rooflines, and the generated benchmark tables of docs/benchmarks.md.
Nothing here imports torch at import time."""
