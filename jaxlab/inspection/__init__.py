"""Inside a model: its summary and its layer outputs by name, for tests and notebooks."""
