"""Experiment declarations, one module per lab report; importing this registers them all."""

from experiments import lab02, lab04  # noqa: F401
