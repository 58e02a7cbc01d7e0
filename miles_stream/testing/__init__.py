"""Helpers for tests and benchmarks (synthetic trajectory groups). Nothing in the runtime imports this package."""
