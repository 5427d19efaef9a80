"""The edgepipe version (one place; part of every stage cache key)."""

__version__ = "0.1.0"
