"""Argument types shared by the command lines (pumpflow's and the services' own)."""

from __future__ import annotations

import argparse
import math


def finite(text: str) -> float:
    """A number of an option; ``nan`` and ``inf``, which ``float`` reads, are refused (a
    NaN passes every bound check, and either can keep a run going for ever)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value
