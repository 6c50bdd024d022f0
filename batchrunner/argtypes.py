"""argparse value types shared by the commands: each raises ArgumentTypeError with the rule."""

from __future__ import annotations

import argparse
import math

DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError("must be a non-negative number")
    return value


def duration(text: str) -> float:
    """Seconds from '3600', '90m', '12h' or '7d'."""
    text = text.strip().lower()
    scale = DURATION_UNITS.get(text[-1:])
    number = text[:-1] if scale is not None else text
    try:
        value = float(number) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError("a duration like 3600, 90m, 12h or 7d") from None
    if value <= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError("must be positive")
    return value
