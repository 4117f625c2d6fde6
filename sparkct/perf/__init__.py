"""Performance tooling: `sparkct bench` (runs benchmarks/, writes one sparkct-bench/1 JSON, compares it
with a stored baseline) and the pieces around it. Nothing here imports torch at import time."""
