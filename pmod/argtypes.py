"""argparse value types shared by the `pmod` commands: a bad flag is refused by argparse itself, with the flag
named and exit code 2, before anything is loaded."""

from __future__ import annotations

import argparse
import math


def positive_int(value: str) -> int:
    number = _parse(int, value, "an integer")
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


MAX_LAYERS = 4096  # far above any decoder's depth; a typo of 10^8 layers would print for minutes


def layer_count(value: str) -> int:
    number = positive_int(value)
    if number > MAX_LAYERS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_LAYERS} decoder layers, got {value}")
    return number


def nonnegative_int(value: str) -> int:
    number = _parse(int, value, "an integer")
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def nonnegative_float(value: str) -> float:
    number = _parse(float, value, "a number")
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return number


def positive_float(value: str) -> float:
    number = nonnegative_float(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
    return number


def port(value: str) -> int:
    number = _parse(int, value, "an integer")
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1 to 65535, got {value}")
    return number


MAX_TEMPERATURE = 100.0  # beyond this sampling is uniform noise, and past ~1e300 the probabilities stop being numbers


def temperature(value: str) -> float:
    """A sampling temperature: 0 (greedy) up to `MAX_TEMPERATURE`."""
    number = nonnegative_float(value)
    if number > MAX_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TEMPERATURE:g} (0 = greedy), got {value}")
    return number


def ratio(value: str) -> float:
    """A keep ratio, in (0, 1]."""
    number = _parse(float, value, "a number")
    if not 0 < number <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a keep ratio in (0, 1], got {value}")
    return number


def _parse(kind: type, value: str, what: str):
    try:
        return kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}") from None
