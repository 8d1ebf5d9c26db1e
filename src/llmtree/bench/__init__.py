"""Benchmarking: ``llmtree bench`` (a load generator for OpenAI-compatible servers) and the
arithmetic and reports that ``benchmarks/run_all.py`` (``make bench``) shares with it.

``workload`` makes seeded synthetic requests, ``loadgen`` sends them (closed or open loop) and
records each one, ``stats`` turns records into per-level summaries, ``report`` shows them.
"""
