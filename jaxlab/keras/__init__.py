"""Keras 3 beside jaxlab: the Keras model of a plan and its layer outputs (`model`), and Keras
weights into and out of jaxlab and its runs (`weights`)."""
