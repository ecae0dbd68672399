"""Experiment declarations, one module per lab: `lab02`, `lab04_alexnet`, `lab04_vgg`.

This package imports nothing; `jaxlab.experiment` loads a lab's module by name when one of its
experiments is asked for, and a user's own lab file by path (`--lab=path/to/my_lab.py`).
"""
