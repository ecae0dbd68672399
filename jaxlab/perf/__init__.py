"""Speed: compiled steps profiled, and jaxlab's loop timed beside Keras and PyTorch.

`profiling` measures one compiled step (compile time, XLA's costs, step time, a measured peak);
`benchmark` times whole training loops side by side.
"""
