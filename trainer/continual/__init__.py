"""Continual multi-task pre-training (ERNIE 2.0, seed 004): ``kd train continual``."""
