"""One module per precision; each is registered (by module path) in :mod:`exporters.precision_registry`."""
