"""jaxlab: the Lab 02 MLP and Lab 04 CNN studies as a JAX research codebase."""

__version__ = "0.1.0"
