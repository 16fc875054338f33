"""Evaluation: benchmark registry, official-parity metrics and statistics."""
