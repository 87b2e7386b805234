"""Whole runs: trace, baselines, curve, stability, model sweeps, info and the memory plan."""
