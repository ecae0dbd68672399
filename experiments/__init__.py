"""Experiment declarations, one module per lab report; importing this registers them all."""

from experiments import lab02  # noqa: F401
