"""Objectives: pure functions on arrays."""
