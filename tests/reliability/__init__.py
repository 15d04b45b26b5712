"""Reliability and safety suite: faults, load, bad input, safety (`python -m tests.reliability --report`)."""
