"""Proofs over every request the contract accepts: an SMT encoding of a version's decision (z3)."""
