"""Benchmarks: run as scripts (make bench); figures go in the README."""
