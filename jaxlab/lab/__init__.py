"""Labs: every (experiment, seed) as one ordinary run directory, by one or many workers.

`runner` trains a lab's runs; `workers` starts several workers on one machine.
"""
