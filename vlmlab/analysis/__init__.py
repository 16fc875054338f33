"""Analyses of frozen features (probes) and of localization instability."""
