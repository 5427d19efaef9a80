"""Durations as users write them on the command line: ``90s``, ``30m``, ``1.5h``, or plain seconds."""

from __future__ import annotations

import re

from pipeline.errors import ConfigError

__all__ = ["parse_duration"]

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in ``text``; raises ConfigError naming the option for anything else."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--time-budget: expected a positive duration like 90s, 30m or 2h, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]
