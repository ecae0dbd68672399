"""Keras 3 beside jaxlab: Keras models of plans, their layer outputs, and weights.

`model` builds the Keras model of a plan and reads its layers' outputs; `weights` moves Keras
weights into and out of jaxlab and its run directories.
"""
