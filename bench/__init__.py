"""Benchmark harness for derpd: relay load generator (``bench.relay``) and a no-protocol baseline."""
