"""Speed: XLA:CPU's kernel libraries chosen per machine (`kernels`), compiled steps profiled
(`profiling`), and jaxlab's loop timed beside its peers, Keras and PyTorch (`benchmark`).

Imports nothing: `kernels` runs before JAX starts.
"""
