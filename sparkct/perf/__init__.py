"""Performance tooling: `sparkct bench` (runs benchmarks/, writes one sparkct-bench/1 JSON, compares it
with a stored baseline), device peaks, rooflines, and the README's generated benchmark sections.
Nothing here imports torch at import time."""
